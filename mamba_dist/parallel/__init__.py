"""Parallelism applied to the model from outside: ParallelDims (tp x dp groups), tensor/sequence parallelism,
activation recomputation, DDP or DeepSpeed ZeRO 0-3, TP-aware loss and gradient clipping.

Trainer-facing API:
    dims = ParallelDims.from_env(cfg.parallel).build()
    model = parallelize(model, dims, cfg)                       # TP(+SP) -> AC -> DDP (zero_stage 0)
    engine = build_deepspeed_engine(model, cfg.optim, dims, zero_stage=..., precision=..., grad_clip=...,
                                    micro_batch_size=..., grad_accum=...)   # zero_stage 1-3
    loss = loss_fn(logits, labels, dims)                        # vocab-parallel cross-entropy under TP
    norm = clip_grad_norm_(model.parameters(), max_norm, dims)  # torch path; counts TP-replicated params once

Names are imported on first use (PEP 562): megatron-core takes ~3.5 s to import, which a single-process run that
only needs ParallelDims should not pay.
"""

import importlib

_EXPORTS = {
    "ParallelDims": "dims", "ParallelLayoutError": "dims", "check_model_layout": "dims",
    "parallelize": "parallelize",
    "apply_tp": "tp", "check_tp_layout": "tp", "full_state_dict": "tp", "full_grad_dict": "tp",
    "load_full_state_dict": "tp", "full_optimizer_state_dict": "tp", "load_full_optimizer_state_dict": "tp",
    "unwrap": "dims", "is_tp_sharded": "dims",
    "apply_ac": "ac", "selected_layers": "ac",
    "loss_fn": "loss", "clip_grad_norm_": "loss", "grad_norm": "loss", "gather_tp_tensor": "loss",
    "build_deepspeed_engine": "zero", "deepspeed_config": "zero", "DeepSpeedMPU": "zero",
    "adamw_param_groups": "zero", "save_engine_checkpoint": "zero", "load_engine_checkpoint": "zero",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
