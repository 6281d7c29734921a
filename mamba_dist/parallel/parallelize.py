"""parallelize(): the one place where parallelism is composed onto a model, in a fixed order (as torchtitan's
parallelize_* functions do):

1. tensor (+ sequence) parallelism  -- swaps submodules, so it must see the plain model;
2. activation recomputation          -- wraps whole blocks, whose submodules are already the TP ones;
3. data parallelism                  -- torch DDP over the DP group when zero_stage == 0 and dp > 1. With
   zero_stage 1-3, DeepSpeed owns data parallelism: pass the result to `build_deepspeed_engine`.
"""

from __future__ import annotations

from typing import Any, Optional

import torch.nn as nn

from .ac import apply_ac


def _lookup(cfg: Any, *paths: str, default=None):
    """First attribute found along dotted `paths` of cfg (a full Config or just its parallel section)."""
    for path in paths:
        obj = cfg
        for part in path.split("."):
            obj = getattr(obj, part, None) if obj is not None else None
        if obj is not None:
            return obj
    return default


def parallelize(model: nn.Module, dims, cfg: Any = None, *, ac_fraction: Optional[float] = None,
                zero_stage: Optional[int] = None, ddp: Optional[bool] = None) -> nn.Module:
    """Apply TP(+SP) -> AC -> DDP to `model` (a MambaLMHeadModel on its final device) and return the model to
    train. `cfg` may be the training Config (reads train.ac_fraction, parallel.zero_stage) or a section holding
    `ac_fraction` / `zero_stage`; keyword arguments override it. `ddp=None` wraps in DDP exactly when
    zero_stage == 0 and dims.dp > 1."""
    if ac_fraction is None:
        ac_fraction = float(_lookup(cfg, "train.ac_fraction", "ac_fraction", default=0.0))
    if zero_stage is None:
        zero_stage = int(_lookup(cfg, "parallel.zero_stage", "zero_stage", default=0))
    if dims.tp_enabled:  # imported here: megatron-core (tp.py) is needed only under TP
        from .tp import apply_tp

        model = apply_tp(model, dims)
    if ac_fraction > 0:
        apply_ac(model, ac_fraction)
    if ddp is None:
        ddp = zero_stage == 0 and dims.distributed and dims.dp > 1
    if ddp:
        device = next(model.parameters()).device
        model = nn.parallel.DistributedDataParallel(
            model, process_group=dims.dp_group, device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False)
    return model


__all__ = ["parallelize"]

