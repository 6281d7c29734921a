"""Loss and gradient-norm clipping that understand tensor parallelism.

- `loss_fn`: cross-entropy on vocab-sharded logits through megatron-core's `vocab_parallel_cross_entropy`
  (plain `F.cross_entropy` when tp == 1).
- `clip_grad_norm_`: global gradient norm where a TP-sharded parameter contributes every rank's shard and a
  TP-replicated parameter (norm weights) contributes once. The parameter selection is megatron's
  `param_is_not_tensor_parallel_duplicate`; megatron's own `get_grad_norm_fp32` allocates on 'cuda', so the
  reduction is written here with torch's `get_total_norm` / `clip_grads_with_norm_`.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .dims import is_tp_sharded

IGNORE_INDEX = -100


def loss_fn(logits: torch.Tensor, labels: torch.Tensor, dims=None, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean token cross-entropy. `logits` (B, L, V_local): the full padded vocab at tp=1, this rank's vocab shard
    under TP. Labels equal to `ignore_index` are left out of the mean: that is how the loader's loss masks
    (prepare --mask-field / --prompt-field) apply, under every layout (TP, SP, DP, ZeRO: they all call this).
    The mean is over the micro-batch's counted tokens; a micro-batch with none gives 0.

    Under TP the fp32 logits are overwritten in place (megatron's kernel does that to save a logits-sized buffer);
    gather or copy them first if they are needed afterwards.
    """
    valid = labels != ignore_index
    if dims is None or not dims.tp_enabled:
        # sum / count rather than reduction="mean": a micro-batch whose labels are all masked gives 0, not nan
        total = F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=ignore_index,
                                reduction="sum")
        return total / valid.sum().clamp(min=1)
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    target = torch.where(valid, labels, torch.zeros_like(labels))
    per_token = vocab_parallel_cross_entropy(logits, target)
    return (per_token * valid).sum() / valid.sum().clamp(min=1)


def grad_norm(parameters: Iterable[torch.Tensor], dims=None) -> torch.Tensor:
    """L2 norm of all gradients of the model, counting TP-replicated parameters once. Gradients are assumed to be
    already reduced over data parallelism (DDP), so only the TP group is summed over."""
    params = [p for p in parameters if p.grad is not None]
    tp_on = dims is not None and dims.tp_enabled
    tp_rank = dims.tp_rank if tp_on else 0
    # megatron's rule (param_is_not_tensor_parallel_duplicate): sharded params count on every rank,
    # replicated ones on TP rank 0 only.
    counted = [p.grad for p in params if is_tp_sharded(p) or tp_rank == 0]
    device = params[0].grad.device if params else torch.device("cpu")
    if counted:
        sq = torch.nn.utils.get_total_norm(counted, norm_type=2.0, foreach=None).float().to(device) ** 2
    else:
        sq = torch.zeros((), dtype=torch.float32, device=device)
    if tp_on:
        dist.all_reduce(sq, group=dims.tp_group)
    return sq.sqrt()


def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float, dims=None) -> torch.Tensor:
    """Clip gradients in place to a global norm of `max_norm` (no clipping when max_norm <= 0) and return the
    norm before clipping. TP-aware replacement for torch.nn.utils.clip_grad_norm_."""
    params = [p for p in parameters if p.grad is not None]
    total = grad_norm(params, dims)
    if max_norm and max_norm > 0 and params:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


def gather_tp_tensor(t: torch.Tensor, dims, dim: int = -1) -> torch.Tensor:
    """Concatenate a tensor sharded evenly along `dim` over the TP group (e.g. vocab-sharded logits), no grad."""
    if dims is None or not dims.tp_enabled:
        return t
    parts = [torch.empty_like(t) for _ in range(dims.tp)]
    dist.all_gather(parts, t.contiguous(), group=dims.tp_group)
    return torch.cat(parts, dim=dim)


__all__ = ["loss_fn", "grad_norm", "clip_grad_norm_", "gather_tp_tensor", "IGNORE_INDEX"]

