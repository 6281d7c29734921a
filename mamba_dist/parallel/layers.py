"""Tensor-parallel layers: thin subclasses of megatron-core's ColumnParallelLinear, RowParallelLinear and
VocabParallelEmbedding that behave like the torch modules they replace (return a tensor, not an
(output, bias) tuple; keep mamba_ssm's parameter names).

Every TP layer here is built with `use_cpu_initialization=True, perform_initialization=False` and then filled by
copying slices of the single-process weights (`shard_`), so a TP run starts from exactly the TP=1 model.
megatron only sets the `tensor_model_parallel` attribute when it initializes a weight; we set it on every sharded
parameter ourselves (`mark_tp`), otherwise TP-aware gradient-norm code (ours, DeepSpeed's) counts a sharded weight
on TP rank 0 only and under-counts the norm.

Layout metadata: a sharded parameter carries `partition_dim` and `tp_segments`, the global sizes of the blocks
that are sharded independently along that dim. Mamba-1's in_proj rows are [x | z] -> segments (d_inner, d_inner):
rank r holds [x_r ; z_r]. `shard_tensor` / `unshard_tensors` convert between the two layouts.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

from .comm import copy_to_tp, gather_seq, reduce_scatter_seq, scatter_seq

# --------------------------------------------------------------------------------------------- layout helpers


def shard_tensor(full: torch.Tensor, dim: int, segments: Sequence[int], rank: int, world: int) -> torch.Tensor:
    """This rank's shard: each segment along `dim` is split into `world` equal parts, rank r keeps part r of
    every segment, concatenated in segment order."""
    if sum(segments) != full.shape[dim]:
        raise ValueError(f"segments {list(segments)} do not add up to size {full.shape[dim]} of dim {dim}")
    parts = []
    for seg in full.split(list(segments), dim=dim):
        if seg.shape[dim] % world:
            raise ValueError(f"segment of size {seg.shape[dim]} is not divisible by tp={world}")
        parts.append(seg.chunk(world, dim=dim)[rank])
    return torch.cat(parts, dim=dim).contiguous()


def unshard_tensors(shards: Sequence[torch.Tensor], dim: int, segments: Sequence[int]) -> torch.Tensor:
    """Inverse of `shard_tensor` given every rank's shard in rank order."""
    world = len(shards)
    local = [s // world for s in segments]
    per_rank = [sh.split(local, dim=dim) for sh in shards]
    return torch.cat([torch.cat([pr[i] for pr in per_rank], dim=dim) for i in range(len(segments))], dim=dim)


def mark_tp(param: torch.Tensor, dim: int, segments: Sequence[int]) -> None:
    """Tag a parameter as TP-sharded (megatron's attribute names, which DeepSpeed's and our clipping read)."""
    param.tensor_model_parallel = True
    param.partition_dim = dim
    param.partition_stride = 1
    param.tp_segments = tuple(int(s) for s in segments)


from .dims import is_tp_sharded  # noqa: E402,F401  (re-exported; defined megatron-free)


def megatron_config(tp: int, dtype: torch.dtype) -> ModelParallelConfig:
    # sequence_parallel stays False in megatron's config: its SP collectives need CUDA and a (L, B, D) layout;
    # ours live in comm.py and are applied by these subclasses / tp.py.
    return ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True,
                               perform_initialization=False, params_dtype=dtype, sequence_parallel=False)


def _plain_state_dict(module: nn.Module) -> None:
    # megatron adds a `_extra_state` entry (None) to the state dict and a load pre-hook inserting it; drop both so
    # state-dict keys stay exactly mamba_ssm's.
    module._load_state_dict_pre_hooks.clear()


def _copy_param(dst: Optional[nn.Parameter], src: Optional[torch.Tensor]) -> None:
    if dst is None:
        return
    with torch.no_grad():
        dst.copy_(src.to(dst.dtype))


def _linear_off_cuda(module, input, weight, bias=None, allreduce_dgrad=False, **_):
    """megatron's linear autograd function declares custom_fwd/custom_bwd for device_type='cuda' only, so under
    CPU autocast its backward multiplies a bf16 gradient by the fp32 weight and fails. Off CUDA the same math
    (matmul, plus the input-gradient all-reduce when asked) runs through F.linear and megatron's mapping."""
    if allreduce_dgrad:
        input = copy_to_tp(input, module.tp_group)
    return torch.nn.functional.linear(input, weight, bias)


class _OffCudaLinear:
    """Mixin for megatron's parallel linears: their own autograd function on CUDA, `_linear_off_cuda` elsewhere."""

    def _forward_impl(self, input, weight, *args, **kwargs):
        if input.is_cuda:
            return super()._forward_impl(input, weight, *args, **kwargs)
        return _linear_off_cuda(self, input, weight, *args, **kwargs)


# --------------------------------------------------------------------------------------------- modules


class ColumnParallel(_OffCudaLinear, ColumnParallelLinear):
    """Column-parallel linear: output features sharded (weight rows, bias).

    grad_reduce: all-reduce the input gradient over TP (megatron's allreduce_dgrad; the input is replicated and
        every rank's output shard depends on it). Off when the caller already accounts for it (input produced by
        `all_reduce_fwd_bwd`, or gathered along the sequence under SP).
    gather_input_seq: all-gather the input along the sequence first (sequence parallelism; backward reduce-scatter).
    """

    get_extra_state = nn.Module.get_extra_state
    set_extra_state = nn.Module.set_extra_state

    def __init__(self, in_features: int, out_features: int, bias: bool, *, tp_group, dtype: torch.dtype,
                 segments: Optional[Sequence[int]] = None, grad_reduce: bool = True, gather_input_seq: bool = False,
                 allocate_weight: bool = True):
        world = tp_group.size()
        super().__init__(in_features, out_features, config=megatron_config(world, dtype), init_method=None,
                         bias=bias, gather_output=False, skip_weight_param_allocation=not allocate_weight,
                         disable_grad_reduce=not grad_reduce, tp_group=tp_group)
        _plain_state_dict(self)
        self.gather_input_seq = gather_input_seq
        self.segments = tuple(segments) if segments is not None else (out_features,)
        self.in_features, self.out_features = in_features, self.output_size_per_partition
        if self.weight is not None:
            mark_tp(self.weight, 0, self.segments)
        if self.bias is not None:
            for attr in ("tensor_model_parallel", "partition_dim", "partition_stride"):
                delattr(self.bias, attr)
            mark_tp(self.bias, 0, self.segments)

    def load_full_(self, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
        r, w = self.tp_group.rank(), self.tp_group.size()
        if self.weight is not None:
            _copy_param(self.weight, shard_tensor(weight, 0, self.segments, r, w))
        if bias is not None:
            _copy_param(self.bias, shard_tensor(bias, 0, self.segments, r, w))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gather_input_seq:
            x = gather_seq(x, self.tp_group)
        return super().forward(x)[0]


class RowParallel(_OffCudaLinear, RowParallelLinear):
    """Row-parallel linear: input features sharded (weight columns); the bias (if any) is replicated.

    reduce="all":          all-reduce the partial outputs (megatron's reduce_from_tensor_model_parallel_region).
    reduce="all_fwd_bwd":  all-reduce forward and backward (output consumed by rank-local channels only).
    reduce="scatter_seq":  reduce-scatter along the sequence (sequence parallelism), bias added after.
    """

    get_extra_state = nn.Module.get_extra_state
    set_extra_state = nn.Module.set_extra_state

    def __init__(self, in_features: int, out_features: int, bias: bool, *, tp_group, dtype: torch.dtype,
                 segments: Optional[Sequence[int]] = None, reduce: str = "all"):
        if reduce not in ("all", "all_fwd_bwd", "scatter_seq"):
            raise ValueError(f"unknown reduce mode {reduce!r}")
        world = tp_group.size()
        super().__init__(in_features, out_features, config=megatron_config(world, dtype), init_method=None,
                         bias=bias, input_is_parallel=True, skip_bias_add=False, tp_group=tp_group)
        _plain_state_dict(self)
        self.reduce = reduce
        self.segments = tuple(segments) if segments is not None else (in_features,)
        self.in_features, self.out_features = self.input_size_per_partition, out_features
        mark_tp(self.weight, 1, self.segments)

    def load_full_(self, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
        r, w = self.tp_group.rank(), self.tp_group.size()
        _copy_param(self.weight, shard_tensor(weight, 1, self.segments, r, w))
        if bias is not None:
            _copy_param(self.bias, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reduce == "all":
            return super().forward(x)[0]
        if self.reduce == "all_fwd_bwd":
            return copy_to_tp(super().forward(x)[0], self.tp_group)
        # sequence parallel: megatron's reduce_scatter_to_sequence_parallel_region is CUDA-only and (L, B, D)
        y = self._forward_impl(input=x, weight=self.weight, bias=None, gradient_accumulation_fusion=False,
                               allreduce_dgrad=False, sequence_parallel=False, tp_group=None,
                               grad_output_buffer=None)
        y = reduce_scatter_seq(y, self.tp_group)
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbed(VocabParallelEmbedding):
    """megatron's VocabParallelEmbedding (rows of the padded vocab sharded, output all-reduced); under sequence
    parallelism the output is then cut to this rank's sequence shard."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, tp_group, dtype: torch.dtype,
                 scatter_output_seq: bool = False):
        world = tp_group.size()
        if num_embeddings % world:
            raise ValueError(f"padded vocab size {num_embeddings} is not divisible by tp={world}")
        super().__init__(num_embeddings, embedding_dim, init_method=None, config=megatron_config(world, dtype),
                         tp_group=tp_group)
        self.scatter_output_seq = scatter_output_seq
        mark_tp(self.weight, 0, (num_embeddings,))

    def load_full_(self, weight: torch.Tensor) -> None:
        _copy_param(self.weight, shard_tensor(weight, 0, (self.num_embeddings,), self.tp_group.rank(),
                                              self.tp_group.size()))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = super().forward(input_ids)
        if self.scatter_output_seq:
            out = scatter_seq(out, self.tp_group)
        return out
