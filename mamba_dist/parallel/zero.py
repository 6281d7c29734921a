"""DeepSpeed ZeRO 0-3 engine construction, composed with tensor parallelism.

Decisions (each measured on CPU/gloo with DeepSpeed 0.19.8):
- Precision. DeepSpeed's native `bf16` mode casts *every* parameter to bf16 (its `keep_in_fp32_modules` keeps
  only buffers), which would hold A_log, D and the dt biases in bf16 -- exactly what mamba_ssm's README warns
  against ("SSMs are sensitive to their recurrent dynamics ... try a framework storing parameters in fp32 (such
  as AMP)"). So precision="bf16" uses DeepSpeed's `torch_autocast` section instead: parameters and optimizer
  state stay fp32 (fp32 master weights), matmuls run in bf16 under torch.autocast, and the gradients of the
  linear/conv weights are communicated in bf16 (DeepSpeed's `lower_precision_safe_modules`). A_log, D and dt
  biases are fp32 throughout. precision="fp32" disables both.
- `gradient_clipping` is always written: DeepSpeed defaults it to 1.0 when absent.
- The client optimizer is torch.optim.AdamW (`zero_allow_untested_optimizer`): the same update rule as the plain
  torch path, and no JIT-built FusedAdam on CPU.
- TP composition goes through `mpu=` (`DeepSpeedMPU`): DeepSpeed then reduces gradients over the DP group only,
  and its ZeRO-1/2/3 gradient norm counts a parameter tagged `tensor_model_parallel` on every TP rank and an
  untagged one on TP rank 0 only (deepspeed.runtime.utils.is_model_parallel_parameter). The tags are set by
  `layers.mark_tp` on every sharded parameter.
- `deepspeed_shm_comm`: every DeepSpeed init on the CPU accelerator JIT-builds this shared-memory collective
  (~20 s) although gloo does the work here; marking it incompatible before `initialize` skips the build
  (deepspeed/comm/torch.py: build_shm_op).
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any, Optional

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16")


class DeepSpeedMPU:
    """The model-parallel unit DeepSpeed expects (`mpu=`), backed by ParallelDims' megatron groups.
    There is no pipeline parallelism, so "model parallel" == tensor parallel."""

    def __init__(self, dims):
        self.dims = dims

    def get_model_parallel_rank(self):
        return self.dims.tp_rank

    def get_model_parallel_world_size(self):
        return self.dims.tp

    def get_model_parallel_group(self):
        return self.dims.tp_group

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_tensor_model_parallel_src_rank(self):
        return dist.get_process_group_ranks(self.dims.tp_group)[0]

    def get_data_parallel_rank(self):
        return self.dims.dp_rank

    def get_data_parallel_world_size(self):
        return self.dims.dp

    def get_data_parallel_group(self):
        return self.dims.dp_group

    def get_data_parallel_group_ranks(self):
        return dist.get_process_group_ranks(self.dims.dp_group)


def _import_deepspeed():
    import deepspeed

    if not torch.cuda.is_available():
        # See module docstring: skip the shm_comm JIT build on the CPU accelerator.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def _autocast_safe_modules(model: torch.nn.Module) -> list[str]:
    """Class paths of the modules whose parameters may be communicated in bf16 under torch_autocast: linear and
    conv weights (including our TP subclasses). Norms and the mixers' own A_log / D / dt_bias are not listed."""
    from .layers import ColumnParallel, RowParallel, VocabParallelEmbed

    classes = {torch.nn.Linear, torch.nn.Conv1d, ColumnParallel, RowParallel, VocabParallelEmbed,
               torch.nn.Embedding}
    names = set()
    for m in model.modules():
        cls = type(m)
        if cls in classes or (cls.__name__ == "CausalConv1d"):
            names.add(f"{cls.__module__}.{cls.__qualname__}")
    return sorted(names)


def deepspeed_config(*, zero_stage: int, precision: str, grad_clip: float, micro_batch_size: int,
                     grad_accum: int = 1, model: Optional[torch.nn.Module] = None,
                     extra: Optional[dict] = None) -> dict:
    """The DeepSpeed JSON config for our settings; `extra` is merged on top (nested dicts merged)."""
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS} under DeepSpeed, got {precision!r}")
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": int(micro_batch_size),
        "gradient_accumulation_steps": int(grad_accum),
        "gradient_clipping": float(grad_clip or 0.0),
        "zero_optimization": {"stage": int(zero_stage)},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if model is not None:
        # DeepSpeed allocates its gradient buckets (default 5e8 elements, 2 GB in fp32) afresh at every
        # micro-step; for a model smaller than that a bucket larger than the model only costs memory, and on
        # CPU under torch's deterministic mode (which NaN-fills every new tensor) ~0.25 s per allocation.
        bucket = int(min(5e8, max(1, sum(p.numel() for p in model.parameters()))))
        cfg["zero_optimization"].update(reduce_bucket_size=bucket, allgather_bucket_size=bucket,
                                        stage3_prefetch_bucket_size=min(bucket, int(5e7)))
    if precision == "bf16":
        cfg["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
        if model is not None:
            cfg["torch_autocast"]["lower_precision_safe_modules"] = _autocast_safe_modules(model)
    if extra:
        _merge(cfg, extra)
    return cfg


def _merge(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = v


def adamw_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weight decay, and none for the model's `no_weight_decay()` names (A_log, D, dt biases, norms,
    biases); falls back to "every 0/1-d parameter" for models without that method."""
    nwd = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else None
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        skip = (name in nwd) if nwd is not None else p.ndim < 2
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _adamw_from_cfg(model: torch.nn.Module, optim_cfg: Any) -> torch.optim.Optimizer:
    def get(key, default):
        return optim_cfg.get(key, default) if isinstance(optim_cfg, dict) else getattr(optim_cfg, key, default)

    betas = get("betas", None) or (get("beta1", 0.9), get("beta2", 0.95))
    return torch.optim.AdamW(adamw_param_groups(model, get("weight_decay", 0.1)), lr=get("lr", 3e-4),
                             betas=tuple(betas), eps=get("eps", 1e-8))


def build_deepspeed_engine(model: torch.nn.Module, optim_cfg: Any, dims, *, zero_stage: int,
                           precision: str = "fp32", grad_clip: float = 0.0, micro_batch_size: int = 1,
                           grad_accum: int = 1, lr_scheduler: Any = None, extra_config: Optional[dict] = None):
    """Wrap an (already tensor-parallelized) model in a DeepSpeed engine.

    optim_cfg: a torch optimizer over `model`'s parameters, or a config (object or dict with lr, weight_decay,
        betas | beta1/beta2, eps) from which AdamW is built with the model's no-decay groups.
    lr_scheduler: passed to deepspeed.initialize (an LR scheduler object or a callable(optimizer) -> scheduler);
        DeepSpeed steps it at each optimizer step.
    Returns the engine: `loss = loss_fn(engine(input_ids, seq_idx=...), labels, dims); engine.backward(loss);
    engine.step()` per micro-batch; DeepSpeed divides by grad_accum and steps the optimizer at the boundary.
    """
    deepspeed = _import_deepspeed()
    if not dims.built or not dims.distributed:
        raise RuntimeError("DeepSpeed needs torch.distributed: call ParallelDims(...).build() first")
    # DeepSpeed asserts LOCAL_RANK is set; a single process without a launcher (ZeRO on one GPU) has none.
    if dist.get_world_size() == 1:
        os.environ.setdefault("LOCAL_RANK", "0")
    if zero_stage == 3:  # ZeRO-3 gathers a weight only around its own module's forward: no ops.mamba1_inner
        for m in model.modules():
            if hasattr(m, "use_inner_fn"):
                m.use_inner_fn = False
    optimizer = optim_cfg if isinstance(optim_cfg, torch.optim.Optimizer) else _adamw_from_cfg(model, optim_cfg)
    config = deepspeed_config(zero_stage=zero_stage, precision=precision, grad_clip=grad_clip,
                              micro_batch_size=micro_batch_size, grad_accum=grad_accum, model=model,
                              extra=extra_config)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                           lr_scheduler=lr_scheduler, mpu=DeepSpeedMPU(dims),
                                           dist_init_required=False)
    _check_fp32_ssm_params(engine.module)
    return engine


def _check_fp32_ssm_params(model: torch.nn.Module) -> None:
    """Guard against a config (e.g. extra_config={"bf16": {"enabled": True}}) that casts the SSM parameters."""
    bad = [n for n, p in model.named_parameters()
           if (n.rsplit(".", 1)[-1] in ("A_log", "D", "dt_bias") or n.endswith("dt_proj.bias"))
           and p.dtype != torch.float32]
    if bad:
        raise RuntimeError(f"SSM parameters not in fp32 under DeepSpeed: {bad[:3]}")


def save_engine_checkpoint(engine, save_dir: str, tag: str, client_state: Optional[dict] = None) -> None:
    """Sharded checkpoint (every rank writes its own model-parallel / ZeRO partition files) into save_dir/tag.

    DeepSpeed writes straight into save_dir/tag; to make the step atomic, files go to save_dir/.tmp-<tag> first
    and rank 0 renames the directory once every rank has finished (shared filesystem assumed, as DeepSpeed does).
    The `latest` file is written last, after the rename.
    """
    tmp_root = os.path.join(save_dir, f".tmp-{tag}")
    final = os.path.join(save_dir, tag)
    if os.path.exists(final):  # checked on every rank (shared filesystem), so no rank waits at a barrier alone
        raise FileExistsError(f"checkpoint {final} already exists")
    if dist.get_rank() == 0:
        shutil.rmtree(tmp_root, ignore_errors=True)  # left over from a crash during an earlier save
    dist.barrier()
    engine.save_checkpoint(tmp_root, tag=tag, client_state=client_state or {}, save_latest=False)
    dist.barrier()
    if dist.get_rank() == 0:
        os.replace(os.path.join(tmp_root, tag), final)
        for name in os.listdir(tmp_root):  # DeepSpeed's zero_to_fp32.py etc., which expect to sit in save_dir
            os.replace(os.path.join(tmp_root, name), os.path.join(save_dir, name))
        os.rmdir(tmp_root)
        tmp_latest = os.path.join(save_dir, ".latest.tmp")
        with open(tmp_latest, "w") as f:
            f.write(tag)
        os.replace(tmp_latest, os.path.join(save_dir, "latest"))
    dist.barrier()


def load_engine_checkpoint(engine, load_dir: str, tag: Optional[str] = None) -> dict:
    """Load model, ZeRO optimizer partitions and LR scheduler; returns the client_state dict. `tag=None` reads
    load_dir/latest. Fails with one line if the checkpoint is missing."""
    if tag is None:
        latest = os.path.join(load_dir, "latest")
        if not os.path.exists(latest):
            raise FileNotFoundError(f"no DeepSpeed checkpoint in {load_dir} (missing 'latest')")
        with open(latest) as f:
            tag = f.read().strip()
    if not os.path.isdir(os.path.join(load_dir, tag)):
        raise FileNotFoundError(f"DeepSpeed checkpoint {os.path.join(load_dir, tag)} does not exist")
    path, client_state = engine.load_checkpoint(load_dir, tag=tag)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {os.path.join(load_dir, tag)}")
    return client_state or {}
