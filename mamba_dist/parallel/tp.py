"""Tensor (and sequence) parallelism for MambaLMHeadModel: split the expanded inner dimension over TP ranks.

`apply_tp(model, dims)` swaps submodules in place (names unchanged) and copies slices of the single-process
weights into them, so the TP model starts from exactly the TP=1 model:

Mamba-1 (S6)                                  | Mamba-2 (SSD)
----------------------------------------------|------------------------------------------------------------
in_proj  column-parallel, rows [x_r ; z_r]    | in_proj column-parallel, rows [z_r ; x_r ; B_r ; C_r ; dt_r]
conv1d   channels x_r                         |         (groups and heads split, ngroups % tp == nheads % tp == 0)
x_proj   row-parallel; (dt_low, B, C) all-    | conv1d  channels [x_r ; B_r ; C_r] (the local xBC layout)
         reduced forward AND backward         | A_log, D, dt_bias  heads of rank r
dt_proj  column-parallel (weight rows, bias)  | norm    gated RMSNorm weight x_r; group size = d_ssm/ngroups is
A_log, D channels x_r                         |         the same locally, so each shard normalises whole groups
out_proj row-parallel                         | out_proj row-parallel
GatedMLP (d_intermediate > 0): fc1 column-parallel ([y_r ; gate_r]), fc2 row-parallel.
Attention (MHA, hybrid models): split by head -- in_proj column-parallel, rows [q_r ; k_r ; v_r (; up_r ; gate_r)]
(num_heads_kv % tp == 0, so each GQA group stays on one rank), conv1d channels [q_r ; k_r ; v_r], out_proj
row-parallel over [context_r (; mlp_r)]; num_heads / num_heads_kv / mlp_dim set to the local sizes.

Mixer attributes holding inner sizes (d_inner; d_ssm, nheads, ngroups) are set to the local sizes; the mixer code
reads only those, so the (fused or reference) kernels run unchanged on the local shard and seq_idx resets work
per shard.

Why x_proj needs an all-reduce in backward too: its output x_dbl = sum_r x_r W_r^T is a sum of partial products,
and dt_low, B, C are then used by every rank's *own* channels only. Rank r's backward therefore produces only its
channels' share of dL/dx_dbl; the true gradient (the same for every partial sum) is the sum over ranks. dt_proj then
must not all-reduce its input gradient again (ColumnParallel(grad_reduce=False)).

Vocabulary: the embedding is megatron's VocabParallelEmbedding; the tied head multiplies by this rank's rows of the
same weight and returns vocab-sharded logits (B, L, V/tp) for `loss.loss_fn` (vocab_parallel_cross_entropy).

Sequence parallelism (dims.sequence_parallel): between blocks the hidden states and the fp32 residual are split
along the sequence, (B, L/tp, D). The embedding output is cut to the local shard, each mixer all-gathers its input
along the sequence (a forward pre-hook, also on the MLP; the mixer therefore still sees the full length and the full seq_idx) and its
out_proj reduce-scatters instead of all-reducing; the head all-gathers before the vocab projection. The norms then
see only a sequence shard, so their (replicated) weight gradients are summed over TP by a gradient hook.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .comm import all_reduce_grad_hook, gather_seq
from .dims import ParallelLayoutError, check_attention_tp, check_mamba1_tp, check_mamba2_tp
from .layers import (ColumnParallel, RowParallel, VocabParallelEmbed, is_tp_sharded, mark_tp, shard_tensor,
                     unshard_tensors)


def _is_mamba2(mixer: nn.Module) -> bool:
    return hasattr(mixer, "nheads") and hasattr(mixer, "ngroups")


def _is_mamba1(mixer: nn.Module) -> bool:
    return hasattr(mixer, "x_proj") and hasattr(mixer, "dt_proj")


def _is_attention(mixer: nn.Module) -> bool:
    return hasattr(mixer, "num_heads") and hasattr(mixer, "num_heads_kv")


def _attention_mlp_width(m: nn.Module) -> int:
    """The in-attention MLP's width (up + gate) of an MHA at its current (full or local) sizes."""
    return m.in_proj.weight.shape[0] - m.head_dim * (m.num_heads + 2 * m.num_heads_kv)


def check_tp_layout(model: nn.Module, tp: int) -> None:
    """One-line ParallelLayoutError if the built model cannot be split over `tp` ranks (checked on the mixers'
    own attributes, before anything is modified)."""
    if tp == 1:
        return
    vocab = model.backbone.embedding.weight.shape[0]
    if vocab % tp:
        raise ParallelLayoutError(
            f"padded vocab size {vocab} is not divisible by tp={tp}; set pad_vocab_size_multiple to a multiple of {tp}")
    for i, layer in enumerate(model.backbone.layers):
        mixer = layer.mixer
        if _is_mamba2(mixer):
            check_mamba2_tp(mixer.d_ssm, mixer.nheads, mixer.ngroups, tp)
        elif _is_mamba1(mixer):
            check_mamba1_tp(mixer.d_inner, tp)
        elif _is_attention(mixer):
            check_attention_tp(mixer.num_heads, mixer.num_heads_kv, _attention_mlp_width(mixer), tp)
        else:
            raise ParallelLayoutError(f"layer {i}: tensor parallelism of {type(mixer).__name__} is not implemented")
        mlp = getattr(layer, "mlp", None)
        if mlp is not None and mlp.fc2.weight.shape[1] % tp:
            raise ParallelLayoutError(f"tp={tp} does not divide the MLP hidden size {mlp.fc2.weight.shape[1]}")


# --------------------------------------------------------------------------------------------- helpers


def _linear_parts(lin: nn.Module):
    return lin.weight.detach(), (lin.bias.detach() if getattr(lin, "bias", None) is not None else None)


def _finish(new: nn.Module, old_param: torch.Tensor) -> nn.Module:
    return new.to(device=old_param.device)


def _shard_param_(module: nn.Module, name: str, dim: int, segments, rank: int, world: int) -> None:
    """Replace module.<name> by this rank's shard (keeping dtype, device, requires_grad and attributes such as
    mamba_ssm's `_no_weight_decay`)."""
    old = getattr(module, name)
    if old is None:
        return
    new = nn.Parameter(shard_tensor(old.detach(), dim, segments, rank, world).clone(),
                       requires_grad=old.requires_grad)
    for k, v in vars(old).items():
        setattr(new, k, v)
    mark_tp(new, dim, segments)
    setattr(module, name, new)


def _column(lin: nn.Linear, group, segments=None, grad_reduce=True) -> ColumnParallel:
    w, b = _linear_parts(lin)
    new = ColumnParallel(w.shape[1], w.shape[0], b is not None, tp_group=group, dtype=w.dtype, segments=segments,
                         grad_reduce=grad_reduce)
    new.load_full_(w, b)
    return _finish(new, w)


def _row(lin: nn.Linear, group, segments=None, reduce="all") -> RowParallel:
    w, b = _linear_parts(lin)
    new = RowParallel(w.shape[1], w.shape[0], b is not None, tp_group=group, dtype=w.dtype, segments=segments,
                      reduce=reduce)
    new.load_full_(w, b)
    return _finish(new, w)


def _shard_conv_(conv: nn.Module, segments, rank: int, world: int) -> None:
    """Depthwise conv: every channel is independent, so a shard is the same module with fewer channels."""
    full = conv.weight.shape[0]
    _shard_param_(conv, "weight", 0, segments, rank, world)
    _shard_param_(conv, "bias", 0, segments, rank, world)
    # keep the module's own size attributes consistent (nn.Conv1d-style modules use them in forward)
    for attr in ("channels", "in_channels", "out_channels", "groups", "dim"):
        if getattr(conv, attr, None) == full:
            setattr(conv, attr, full // world)


def _nonzero(*segments):
    return tuple(s for s in segments if s)


# --------------------------------------------------------------------------------------------- mixers


def _tp_mamba1(m: nn.Module, group, sp: bool) -> None:
    r, tp = group.rank(), group.size()
    d_inner = m.d_inner
    check_mamba1_tp(d_inner, tp)
    m.in_proj = _column(m.in_proj, group, segments=(d_inner, d_inner), grad_reduce=not sp)
    _shard_conv_(m.conv1d, (d_inner,), r, tp)
    m.x_proj = _row(m.x_proj, group, reduce="all_fwd_bwd")
    m.dt_proj = _column(m.dt_proj, group, grad_reduce=False)
    _shard_param_(m, "A_log", 0, (d_inner,), r, tp)
    _shard_param_(m, "D", 0, (d_inner,), r, tp)
    m.out_proj = _row(m.out_proj, group, reduce="scatter_seq" if sp else "all")
    m.d_inner = d_inner // tp
    m.use_inner_fn = False  # ops.mamba1_inner would read the swapped submodules' weights and skip their reduces


def _tp_mamba2(m: nn.Module, group, sp: bool) -> None:
    r, tp = group.rank(), group.size()
    d_ssm, H, G, N = m.d_ssm, m.nheads, m.ngroups, m.d_state
    check_mamba2_tp(d_ssm, H, G, tp)
    d_in_proj = m.in_proj.weight.shape[0]
    d_mlp = (d_in_proj - 2 * d_ssm - 2 * G * N - H) // 2
    if d_mlp < 0 or d_mlp % tp:
        raise ParallelLayoutError(f"tp={tp} does not divide Mamba-2 d_mlp={d_mlp}")
    m.in_proj = _column(m.in_proj, group, segments=_nonzero(d_mlp, d_mlp, d_ssm, d_ssm, G * N, G * N, H),
                        grad_reduce=not sp)
    _shard_conv_(m.conv1d, (d_ssm, G * N, G * N), r, tp)
    _shard_param_(m, "A_log", 0, (H,), r, tp)
    _shard_param_(m, "dt_bias", 0, (H,), r, tp)
    _shard_param_(m, "D", 0, (m.D.shape[0],), r, tp)  # per head, or per channel (D_has_hdim)
    if getattr(m, "norm", None) is not None:
        _shard_param_(m.norm, "weight", 0, (d_ssm,), r, tp)
    m.out_proj = _row(m.out_proj, group, segments=_nonzero(d_mlp, d_ssm), reduce="scatter_seq" if sp else "all")
    m.d_ssm, m.nheads, m.ngroups = d_ssm // tp, H // tp, G // tp
    if hasattr(m, "d_inner"):
        m.d_inner = m.d_inner // tp
    m.use_inner_fn = False  # ops.mamba2_inner would read the swapped submodules' weights and skip their reduces


def _tp_attention(m: nn.Module, group, sp: bool) -> None:
    """MHA split by head: in_proj column-parallel with q, k, v (and the MLP's up / gate halves) sharded separately,
    so rank r holds query heads r*H/tp.. and kv heads r*Hkv/tp.. -- with Hkv % tp == 0 the query heads of a GQA
    group land on the rank holding their kv head; the q|k|v conv per channel; out_proj row-parallel over
    [context | mlp]."""
    r, tp = group.rank(), group.size()
    H, Hkv, Dh = m.num_heads, m.num_heads_kv, m.head_dim
    mlp = _attention_mlp_width(m)
    check_attention_tp(H, Hkv, mlp, tp)
    qkv = (H * Dh, Hkv * Dh, Hkv * Dh)
    m.in_proj = _column(m.in_proj, group, segments=_nonzero(*qkv, mlp // 2, mlp // 2), grad_reduce=not sp)
    if getattr(m, "conv1d", None) is not None:
        _shard_conv_(m.conv1d, qkv, r, tp)
    m.out_proj = _row(m.out_proj, group, segments=_nonzero(H * Dh, mlp // 2), reduce="scatter_seq" if sp else "all")
    m.num_heads, m.num_heads_kv = H // tp, Hkv // tp
    m.mlp_dim = mlp // tp


def _tp_mlp(mlp: nn.Module, group, sp: bool) -> None:
    """GatedMLP (d_intermediate > 0): fc1 column-parallel with its [y ; gate] halves sharded separately, fc2
    row-parallel -- megatron's MLP split."""
    hidden = mlp.fc2.weight.shape[1]
    mlp.fc1 = _column(mlp.fc1, group, segments=(hidden, hidden), grad_reduce=not sp)
    mlp.fc2 = _row(mlp.fc2, group, reduce="scatter_seq" if sp else "all")


def _sp_gather_input_hook(group):
    def hook(module, args, kwargs):
        if args:
            return (gather_seq(args[0], group),) + tuple(args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = gather_seq(kwargs["hidden_states"], group)
        return args, kwargs

    return hook


# --------------------------------------------------------------------------------------------- model


def apply_tp(model: nn.Module, dims) -> nn.Module:
    """Tensor-parallelize `model` (a MambaLMHeadModel) in place over dims.tp_group; returns it.
    After this, model(input_ids, seq_idx) returns this rank's vocab shard of the logits."""
    if not dims.tp_enabled:
        return model
    check_tp_layout(model, dims.tp)
    group, sp = dims.tp_group, dims.sequence_parallel
    bb = model.backbone
    old_emb = bb.embedding
    tied = getattr(model, "lm_head", None) is not None and model.lm_head.weight is old_emb.weight
    V, D = old_emb.weight.shape
    emb = VocabParallelEmbed(V, D, tp_group=group, dtype=old_emb.weight.dtype, scatter_output_seq=sp)
    emb.load_full_(old_emb.weight.detach())
    bb.embedding = _finish(emb, old_emb.weight)

    for layer in bb.layers:
        mixer = layer.mixer
        if _is_mamba2(mixer):
            _tp_mamba2(mixer, group, sp)
        elif _is_attention(mixer):
            _tp_attention(mixer, group, sp)
        else:
            _tp_mamba1(mixer, group, sp)
        if sp:
            mixer.register_forward_pre_hook(_sp_gather_input_hook(group), with_kwargs=True)
        if getattr(layer, "mlp", None) is not None:
            _tp_mlp(layer.mlp, group, sp)
            if sp:
                layer.mlp.register_forward_pre_hook(_sp_gather_input_hook(group), with_kwargs=True)

    old_head = model.lm_head
    head = ColumnParallel(D, V, getattr(old_head, "bias", None) is not None, tp_group=group,
                          dtype=old_head.weight.dtype, grad_reduce=not sp, gather_input_seq=sp,
                          allocate_weight=not tied)
    if tied:
        head.weight = bb.embedding.weight  # same Parameter: the tie survives sharding
        if head.bias is not None:
            head.load_full_(old_head.weight.detach(), old_head.bias.detach())
    else:
        head.load_full_(*_linear_parts(old_head))
    model.lm_head = _finish(head, old_head.weight)

    if sp:
        _register_sp_grad_hooks(model, group)
    return model


def _register_sp_grad_hooks(model: nn.Module, group) -> None:
    for name, p in model.named_parameters():
        if p.requires_grad and not is_tp_sharded(p) and not getattr(p, "_sp_hooked", False):
            # norms (and a row-parallel bias) act on sequence shards: partial gradients, summed over TP
            p.register_hook(all_reduce_grad_hook(group))
            p.sequence_parallel = True
            p._sp_hooked = True


# --------------------------------------------------------------------------------------------- state dicts
# Layout-independent (single-process, mamba_ssm-format) views of a TP model's weights, gradients and optimizer
# state: saving these lets a run resume on another TP degree, and lets checkpoints be exported or compared.


def _gather_full(t: torch.Tensor, p: torch.Tensor, dims) -> torch.Tensor:
    """Full tensor from this rank's shard `t` of parameter `p` (collective over TP); `t` itself if p is
    replicated."""
    t = t.detach()
    if dims is not None and dims.tp_enabled and is_tp_sharded(p) and t.shape == p.shape:
        import torch.distributed as dist

        shards = [torch.empty_like(t) for _ in range(dims.tp)]
        dist.all_gather(shards, t.contiguous(), group=dims.tp_group)
        t = unshard_tensors(shards, p.partition_dim, p.tp_segments)
    return t.cpu().clone()


def _local_slice(t: torch.Tensor, p: torch.Tensor, dims) -> torch.Tensor:
    if dims is not None and dims.tp_enabled and is_tp_sharded(p) and t.dim() == p.dim() and t.dim() > 0:
        return shard_tensor(t, p.partition_dim, p.tp_segments, dims.tp_rank, dims.tp)
    return t


def full_state_dict(model: nn.Module, dims=None) -> dict:
    """The single-process (mamba_ssm-format) state dict of a TP model, gathered over the TP group; identical on
    every rank, tensors on CPU. Collective: call on every rank. Pass the unwrapped model (see `unwrap`)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    return {name: _gather_full(t, params[name], dims) if name in params else t.detach().cpu().clone()
            for name, t in model.state_dict().items()}


def load_full_state_dict(model: nn.Module, state_dict: dict, dims=None, strict: bool = True) -> None:
    """Load a single-process (mamba_ssm-format) state dict into a TP model: each rank copies its slices."""
    params = dict(model.named_parameters(remove_duplicate=False))
    local = {name: _local_slice(t, params[name], dims) if name in params else t for name, t in state_dict.items()}
    missing, unexpected = model.load_state_dict(local, strict=False)
    if strict and (missing or unexpected):
        raise KeyError(f"state dict mismatch: missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]}")


def full_grad_dict(model: nn.Module, dims=None) -> dict:
    """Gradients gathered to full (single-process) shapes, keyed by parameter name (a tied parameter under its
    first name). Collective: call on every rank."""
    return {name: _gather_full(p.grad, p, dims) for name, p in model.named_parameters() if p.grad is not None}


def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, dims=None) -> dict:
    """A torch optimizer's state keyed by parameter *name*, with per-parameter tensors (AdamW's exp_avg,
    exp_avg_sq) gathered to full shape: {"state": {name: {...}}, "param_groups": [{..., "params": [names]}]}.
    Loadable at any TP degree with `load_full_optimizer_state_dict`. Collective: call on every rank."""
    names = {id(p): n for n, p in model.named_parameters()}
    state, groups = {}, []
    for group in optimizer.param_groups:
        groups.append({**{k: v for k, v in group.items() if k != "params"},
                       "params": [names[id(p)] for p in group["params"]]})
        for p in group["params"]:
            if p in optimizer.state:
                state[names[id(p)]] = {k: _gather_full(v, p, dims) if torch.is_tensor(v) else v
                                       for k, v in optimizer.state[p].items()}
    return {"state": state, "param_groups": groups}


def load_full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, full: dict,
                                   dims=None) -> None:
    """Inverse of `full_optimizer_state_dict` on a model of any TP degree with the same parameter groups."""
    params = dict(model.named_parameters())
    saved_groups = full["param_groups"]
    if len(saved_groups) != len(optimizer.param_groups):
        raise ValueError(f"optimizer has {len(optimizer.param_groups)} parameter groups, the checkpoint "
                         f"{len(saved_groups)}")
    names = {id(p): n for n, p in params.items()}
    for group, saved in zip(optimizer.param_groups, saved_groups):
        mine = [names[id(p)] for p in group["params"]]
        if mine != saved["params"]:
            raise ValueError("optimizer parameter groups differ from the checkpoint's "
                             f"(first difference near {next((a for a, b in zip(mine, saved['params']) if a != b), '?')})")
        group.update({k: v for k, v in saved.items() if k != "params"})
    optimizer.state.clear()
    for name, st in full["state"].items():
        p = params[name]
        optimizer.state[p] = {k: _local_slice(v, p, dims).to(p.device).clone() if torch.is_tensor(v) else v
                              for k, v in st.items()}


from .dims import unwrap  # noqa: E402  (re-exported; defined megatron-free)


__all__ = ["apply_tp", "check_tp_layout", "full_state_dict", "load_full_state_dict", "full_grad_dict",
           "full_optimizer_state_dict", "load_full_optimizer_state_dict", "unwrap"]
