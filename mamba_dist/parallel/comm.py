"""Autograd-aware tensor-parallel collectives.

From megatron-core (they run on CPU/gloo): `copy_to_tensor_model_parallel_region` (identity forward, all-reduce
backward) and `reduce_from_tensor_model_parallel_region` (all-reduce forward, identity backward).

Hand-written, because megatron's versions cannot be used here:
- sequence-parallel gather / reduce-scatter / scatter: megatron's (`gather_from_sequence_parallel_region`, ...)
  allocate their outputs with `torch.cuda.current_device()` (fail on CPU) and split dim 0, the sequence dim of its
  (L, B, D) layout; our activations are batch-first (B, L, D) and are split along dim 1.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
)

__all__ = [
    "copy_to_tp",
    "reduce_from_tp",
    "all_reduce_fwd_bwd",
    "gather_seq",
    "reduce_scatter_seq",
    "scatter_seq",
    "all_reduce_grad_hook",
]

SEQ_DIM = 1


class _ContiguousGrad(torch.autograd.Function):
    """Identity; makes the incoming gradient contiguous. megatron's `_reduce` all-reduces `grad.contiguous()` and
    returns `grad`, so a non-contiguous gradient would silently skip its all-reduce."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g.contiguous()


def copy_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    """Identity forward, all-reduce of the gradient backward (entry into a TP region)."""
    return _ContiguousGrad.apply(copy_to_tensor_model_parallel_region(x, group=group))


def reduce_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    """All-reduce forward, identity backward (exit of a TP region: partial sums -> replicated value)."""
    return reduce_from_tensor_model_parallel_region(x.contiguous(), group=group)


def all_reduce_fwd_bwd(x: torch.Tensor, group) -> torch.Tensor:
    """All-reduce forward AND backward.

    For a partial sum (row-parallel output) whose replicated result is then consumed by rank-local channels only
    (Mamba-1's x_proj -> dt_low, B, C): each rank's backward sees only its own channels' gradient, and the true
    gradient of every partial sum is the sum of them. Composition of megatron's two mappings.
    """
    return copy_to_tp(reduce_from_tp(x, group), group)


def _check_seq(x: torch.Tensor, world: int) -> None:
    if x.shape[SEQ_DIM] % world:
        raise ValueError(f"sequence length {x.shape[SEQ_DIM]} is not divisible by tp={world} (sequence parallelism)")


def _all_gather_seq(x: torch.Tensor, group) -> torch.Tensor:
    world = dist.get_world_size(group)
    xt = x.movedim(SEQ_DIM, 0).contiguous()
    out = torch.empty((world * xt.shape[0],) + tuple(xt.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(out, xt, group=group)
    return out.movedim(0, SEQ_DIM)


def _reduce_scatter_seq(x: torch.Tensor, group) -> torch.Tensor:
    world = dist.get_world_size(group)
    _check_seq(x, world)
    xt = x.movedim(SEQ_DIM, 0).contiguous()
    out = torch.empty((xt.shape[0] // world,) + tuple(xt.shape[1:]), dtype=x.dtype, device=x.device)
    dist.reduce_scatter_tensor(out, xt, group=group)
    return out.movedim(0, SEQ_DIM)


def _split_seq(x: torch.Tensor, group) -> torch.Tensor:
    world = dist.get_world_size(group)
    _check_seq(x, world)
    return x.chunk(world, dim=SEQ_DIM)[dist.get_rank(group)].contiguous()


class _GatherSeq(torch.autograd.Function):
    """All-gather along the sequence forward; reduce-scatter backward (the gathered tensor is used by every
    rank's shard of a column-parallel layer, so its gradient is a sum over ranks)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather_seq(x, group)

    @staticmethod
    def backward(ctx, g):
        return _reduce_scatter_seq(g, ctx.group), None


class _ReduceScatterSeq(torch.autograd.Function):
    """Reduce-scatter along the sequence forward (row-parallel partial sums -> this rank's sequence shard);
    all-gather backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_seq(x, group)

    @staticmethod
    def backward(ctx, g):
        return _all_gather_seq(g, ctx.group), None


class _ScatterSeq(torch.autograd.Function):
    """Keep this rank's sequence shard of a replicated tensor forward; all-gather backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_seq(x, group)

    @staticmethod
    def backward(ctx, g):
        return _all_gather_seq(g, ctx.group), None


def gather_seq(x: torch.Tensor, group) -> torch.Tensor:
    return _GatherSeq.apply(x, group)


def reduce_scatter_seq(x: torch.Tensor, group) -> torch.Tensor:
    return _ReduceScatterSeq.apply(x, group)


def scatter_seq(x: torch.Tensor, group) -> torch.Tensor:
    return _ScatterSeq.apply(x, group)


def all_reduce_grad_hook(group):
    """A tensor hook summing a replicated parameter's gradient over the TP group.

    Under sequence parallelism each TP rank applies the replicated norms to its own sequence shard, so each
    holds a partial weight gradient. Registered with `param.register_hook`, it runs before the gradient is
    accumulated into `.grad`, hence before DDP's or DeepSpeed's reduction hooks see it.
    """

    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=group)
        return grad

    return hook
