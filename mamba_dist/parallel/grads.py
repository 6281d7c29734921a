"""Data-parallel gradient averaging done once per step, outside autograd: for a step whose backward cannot carry
DDP's reducer hooks (a CUDA graph replays the backward; DDP's Python-side bucket logic cannot be captured).

Gradients are averaged in flat buckets (one all-reduce per bucket of at most `bucket_mb`, per dtype), which is
what DDP does too, minus its overlap with the backward: the price of replaying the backward as one graph.
Hand-written (a few lines over torch's flatten helpers) because torch.distributed has no maintained coalesced
all-reduce for a list of tensors (all_reduce_coalesced is deprecated)."""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


def all_reduce_grads_(params: Iterable[torch.nn.Parameter], group, world: int, bucket_mb: float = 256.0) -> None:
    """Replace each parameter's .grad by its mean over the `world` ranks of `group`, in place."""
    if world <= 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    limit = int(bucket_mb * 2 ** 20)
    by_dtype: dict = {}
    for g in grads:
        by_dtype.setdefault((g.dtype, g.device), []).append(g)
    for same in by_dtype.values():
        bucket, size = [], 0
        for g in same + [None]:  # None flushes the last bucket
            if g is not None and (not bucket or size + g.numel() * g.element_size() <= limit):
                bucket.append(g)
                size += g.numel() * g.element_size()
                continue
            if bucket:
                flat = _flatten_dense_tensors(bucket)
                dist.all_reduce(flat, group=group)
                flat /= world
                for dst, src in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                    dst.copy_(src)
            bucket, size = ([g], g.numel() * g.element_size()) if g is not None else ([], 0)


__all__ = ["all_reduce_grads_"]
