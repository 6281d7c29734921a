"""CUDA kernels: the `fused` backend. Thin wrappers over mamba_ssm / causal_conv1d with the signatures of
`ops/reference.py` (DESIGN.md), which is the twin each one is tested against (tests/test_gpu_fused.py).

mamba_ssm and causal_conv1d do not import without their CUDA extensions, so every wrapper imports them inside the
function; importing this module itself needs neither.

The wrappers call the kernels' autograd functions directly with tensors handed in by the mixer, never
mamba_inner_fn / mamba_split_conv1d_scan_combined: those read submodule weights themselves, which ZeRO-3 (gathers a
weight only around its own module's forward) and tensor parallelism (swaps the submodules) cannot see.

Packed rows (seq_idx): causal_conv1d and the SSD kernels restart at seq_idx changes natively. mamba_ssm's Mamba-1
selective scan has no reset; `selective_scan` below makes it exact (see its docstring). Attention (hybrids) needs
no extension: torch's flex_attention with a block mask from seq_idx (`attention`).
"""

from __future__ import annotations

import logging
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)

# exp(dt*A) must be exactly 0 in fp32 at a document start: the kernel evaluates exp2f(dt * A * log2(e)), whose
# result flushes to 0 below 2^-126 (2^-149 without flush-to-zero). dt*|A| >= 200 puts the exponent at -288.
_RESET_DT_A = 200.0
# and above the softplus pass-through threshold (20), so a kernel-side softplus leaves the value untouched
_RESET_DT_MIN = 64.0


def causal_conv1d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, seq_idx: Optional[Tensor] = None,
                  activation: Optional[str] = None) -> Tensor:
    """causal_conv1d_fn. x (B, C, L), weight (C, W), bias (C,) -> (B, C, L).

    The kernel treats any x with x.stride(1) == 1 (and x.stride(2) > 1) as channel-last, a layout it accepts only
    with C and x.stride(0), x.stride(2) multiples of 8, and it has a seq_idx path for that layout only. The Mamba
    mixers hand in `in_proj(...)[..., slice].transpose(1, 2)`, a channel-last view that normally qualifies and goes
    in as is. Otherwise: without seq_idx, x is made contiguous (the channel-first path has no such constraints);
    with seq_idx, x is copied to channel-last, channels zero-padded to a multiple of 8."""
    from causal_conv1d import causal_conv1d_fn

    W = weight.shape[-1]
    if not 2 <= W <= 4:
        raise ValueError(f"fused causal_conv1d supports kernel widths 2..4, got {W}; use backend='reference'")
    Bsz, C, L = x.shape
    channel_last = x.stride(1) == 1 and x.stride(2) > 1
    channel_last_ok = C % 8 == 0 and x.stride(0) % 8 == 0 and x.stride(2) % 8 == 0
    if seq_idx is None:
        if channel_last and not channel_last_ok:
            x = x.contiguous()
        return causal_conv1d_fn(x, weight, bias, activation=activation)
    pad = (-C) % 8
    if not (channel_last and channel_last_ok):
        xt = x.transpose(1, 2)  # (B, L, C)
        xt = F.pad(xt, (0, pad)) if pad else xt.contiguous()
        x = xt.transpose(1, 2)
        if pad:
            weight = F.pad(weight, (0, 0, 0, pad))
            bias = F.pad(bias, (0, pad)) if bias is not None else None
    out = causal_conv1d_fn(x, weight, bias, seq_idx=seq_idx.to(torch.int32).contiguous(), activation=activation)
    return out[:, :C] if pad else out


# one entry: (seq_idx tensor, its version, (row, time) of every document start). Every layer of a forward (and an
# activation-recomputation replay) gets the same seq_idx object, so the host sync of nonzero() happens once per
# batch instead of once per layer. Holding the tensor keeps its memory from being reused by a different batch, and
# _version catches in-place edits.
_starts_cache: list = [None]


def _doc_starts(seq_idx: Tensor) -> Tuple[Tensor, Tensor]:
    """(rows, times) of the tokens that start a document after position 0 of their row."""
    hit = _starts_cache[0]
    if hit is not None and hit[0] is seq_idx and hit[1] == seq_idx._version:
        return hit[2]
    b, t = (seq_idx[:, 1:] != seq_idx[:, :-1]).nonzero(as_tuple=True)
    starts = (b, t + 1)
    _starts_cache[0] = (seq_idx, seq_idx._version, starts)
    return starts


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                   z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                   seq_idx: Optional[Tensor] = None) -> Tensor:
    """mamba_ssm's selective_scan_fn, with exact document resets.

    u, delta, z (B, D, L); A (D, N) fp32 (negative); B, C (B, N, L); D, delta_bias (D,). Returns (B, D, L).

    The kernel has no reset, so at each document start t (seq_idx[t] != seq_idx[t-1]):
    - the kernel's dt is replaced by a per-channel constant dt_new with dt_new * min|A| >= 200, so exp(dt_new A)
      is exactly 0 in fp32: the previous document's state is dropped, forward and backward (its dA, ddt and the
      state gradient flowing back across the start are multiplied by that exact 0);
    - u is replaced by u * dt_old / dt_new, so the state input dt * B * u is unchanged, and dt_old (the true
      softplus(delta + delta_bias), built in autograd from delta and delta_bias) gets its gradient through it;
    - the kernel's skip term there is D * u_new; D * (u - u_new) * silu(z) is added outside, so the output is
      (scan + D u) * silu(z) as without packing.
    dt_new is a constant to autograd. It is fed through the kernel's own bias + softplus (delta_bias is kept in the
    kernel, so unpacked positions are computed exactly as mamba_ssm computes them, in fp32 inside the kernel):
    the kernel input at a start is v = dt_new - delta_bias (rounded to the input dtype; dt_new is then re-derived
    as v + delta_bias in fp32, the kernel's own arithmetic), with a zero-valued `- (bias - bias.detach())` term so
    that the kernel's summed delta_bias gradient loses exactly the start positions' share. Only the R start
    positions are gathered and rewritten ((R, D) tensors), so packing adds no (B, D, L)-sized saved activations.
    """
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    dtype = u.dtype
    delta, B, C = delta.to(dtype), B.to(dtype), C.to(dtype)  # the kernel wants one input dtype
    z = z.to(dtype) if z is not None else None
    Df = D.float() if D is not None else None
    bias = delta_bias.float() if delta_bias is not None else None
    if seq_idx is None:
        return selective_scan_fn(u, delta, A, B, C, Df, z, bias, delta_softplus)
    b_idx, t_idx = _doc_starts(seq_idx)
    if b_idx.numel() == 0:
        return selective_scan_fn(u, delta, A, B, C, Df, z, bias, delta_softplus)
    if dtype == torch.float16:
        # u * dt_old / dt_new can underflow fp16 and dt_new overflow it; bf16 and fp32 share fp32's exponent range
        out = selective_scan(u.float(), delta.float(), A, B.float(), C.float(), D,
                             z.float() if z is not None else None, delta_bias, delta_softplus, seq_idx)
        return out.to(dtype)

    # per-channel reset dt: 200 / min_n |A[d, n]|, at least 64 (> softplus threshold), finite
    A_min = A.detach().float().abs().amin(-1).clamp_min(1e-30)
    dt_new = (_RESET_DT_A / A_min).clamp(min=_RESET_DT_MIN, max=1e30)
    if bias is not None:
        v = (dt_new - bias.detach()).to(dtype)
        dt_new = v.float() + bias.detach()  # what the kernel computes from v (fp32 add; softplus passes >20)
        if bias.requires_grad:
            v = v - (bias - bias.detach()).to(dtype)  # value v; d(v)/d(bias) = -1 cancels the kernel's share
    else:
        v = dt_new.to(dtype)
        dt_new = v.float()

    # (B, D, L) viewed as (B, L, D): advanced indexing by (row, time) then reads/writes (R, D) rows
    def rows(x: Tensor) -> Tensor:
        return x.transpose(1, 2)[b_idx, t_idx]

    def put(x: Tensor, vals: Tensor) -> Tensor:
        return torch.index_put(x.transpose(1, 2), (b_idx, t_idx), vals).transpose(1, 2)

    u_r = rows(u)
    dt_old = rows(delta).float()
    if bias is not None:
        dt_old = dt_old + bias
    if delta_softplus:
        dt_old = F.softplus(dt_old)  # threshold 20, as the kernel's softplus
    u_new = (u_r.float() * (dt_old / dt_new)).to(dtype)
    R = u_r.shape[0]
    out = selective_scan_fn(put(u, u_new), put(delta, v.expand(R, -1)), A, B, C, Df, z, bias, delta_softplus)
    if Df is not None:
        corr = Df * (u_r.float() - u_new.float())
        if z is not None:
            corr = corr * F.silu(rows(z).float())
        out = put(out, (rows(out).float() + corr).to(out.dtype))
    return out


def ssd_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int, D: Optional[Tensor] = None,
             z: Optional[Tensor] = None, dt_bias: Optional[Tensor] = None, dt_softplus: bool = False,
             seq_idx: Optional[Tensor] = None, dt_limit=(0.0, float("inf"))) -> Tensor:
    """mamba_chunk_scan_combined (Triton SSD). x (B, L, H, P), dt (B, L, H), A (H,) fp32, B, C (B, L, G, N),
    D (H,) or (H, P), z (B, L, H, P), dt_bias (H,). seq_idx restarts the state natively. -> (B, L, H, P)."""
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    if seq_idx is not None:
        seq_idx = seq_idx.to(torch.int32).contiguous()
    return mamba_chunk_scan_combined(x, dt, A.float(), B, C, chunk_size, D=D.float() if D is not None else None,
                                     z=z, dt_bias=dt_bias.float() if dt_bias is not None else None,
                                     dt_softplus=dt_softplus, seq_idx=seq_idx, dt_limit=tuple(dt_limit))


def mamba2_inner(zxbcdt: Tensor, conv_weight: Tensor, conv_bias: Optional[Tensor], dt_bias: Tensor, A: Tensor,
                 D: Tensor, chunk_size: int, seq_idx: Optional[Tensor], dt_limit, rmsnorm_weight: Optional[Tensor],
                 rmsnorm_eps: float, norm_before_gate: bool, out_proj_weight: Tensor, out_proj_bias: Optional[Tensor],
                 headdim: Optional[int], ngroups: int) -> Tensor:
    """The Mamba-2 mixer after in_proj, as one autograd function: mamba_ssm's mamba_split_conv1d_scan_combined
    (its `use_mem_eff_path`): conv (+ seq_idx restarts) -> SSD scan -> gated RMSNorm -> out_proj, with the conv
    output and the norm's output recomputed in backward instead of saved (about 0.28 GB a layer at the 1.3B shape,
    8 x 2048 tokens). zxbcdt (B, L, d_in_proj): in_proj's output; conv_weight (C, 1, W) or (C, W); D (H,) with
    headdim, or (H, P) with headdim None; rmsnorm_weight None: z gates inside the scan. -> (B, L, d_model).
    With seq_idx the conv takes causal_conv1d's fast path (no seq_idx in that kernel, exact fix-ups at the document
    starts: ops/fused_mamba2.py) unless MAMBA_DIST_CONV_FIXUPS=0; the SSD scan gets seq_idx either way."""
    from mamba_ssm.ops.triton import ssd_combined

    from . import fused_mamba2

    if seq_idx is not None:
        seq32 = fused_mamba2.seq_idx_int32(seq_idx)
        if fused_mamba2.enabled():  # the conv without seq_idx, exact fix-ups at the document starts
            fused_mamba2.install(ssd_combined)
            fused_mamba2.register(seq32, seq_idx, conv_weight.shape[-1])
        seq_idx = seq32
    extra = {} if tuple(dt_limit) == (0.0, float("inf")) else {"dt_limit": tuple(dt_limit)}
    return ssd_combined.mamba_split_conv1d_scan_combined(
        zxbcdt, conv_weight.reshape(conv_weight.shape[0], conv_weight.shape[-1]), conv_bias, dt_bias.float(),
        A.float(), D.float(), chunk_size, seq_idx=seq_idx, activation="silu", rmsnorm_weight=rmsnorm_weight,
        rmsnorm_eps=rmsnorm_eps, outproj_weight=out_proj_weight, outproj_bias=out_proj_bias, headdim=headdim,
        ngroups=ngroups, norm_before_gate=norm_before_gate, **extra)


def rms_norm_gated(x: Tensor, z: Optional[Tensor], weight: Tensor, eps: float, group_size: Optional[int] = None,
                   norm_before_gate: bool = False) -> Tensor:
    """mamba_ssm's Triton gated RMSNorm (layernorm_gated.rmsnorm_fn), per group of `group_size` channels."""
    from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn

    return rmsnorm_fn(x, weight, None, z=z, eps=eps, group_size=group_size, norm_before_gate=norm_before_gate)


def add_norm(x: Tensor, residual: Optional[Tensor], weight: Tensor, bias: Optional[Tensor], eps: float,
             residual_in_fp32: bool = False, is_rms_norm: bool = True) -> Tuple[Tensor, Tensor]:
    """Residual add + RMSNorm/LayerNorm in one Triton kernel (mamba_ssm's layer_norm_fn with prenorm=True), forward
    and backward. Output in x's dtype (bf16 under autocast, where the next matmul wants it), statistics in fp32."""
    from mamba_ssm.ops.triton.layer_norm import layer_norm_fn

    return layer_norm_fn(x, weight, bias, residual=residual, eps=eps, prenorm=True,
                         residual_in_fp32=residual_in_fp32, is_rms_norm=is_rms_norm)


def selective_state_update(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                           D: Optional[Tensor] = None, z: Optional[Tensor] = None, dt_bias: Optional[Tensor] = None,
                           dt_softplus: bool = False) -> Tensor:
    """mamba_ssm's Triton selective_state_update (one recurrent step, `state` updated in place); shapes as in
    ops/reference.py. A, dt, dt_bias may be stride-0 expansions over the head dimension (the kernel then computes
    one decay per head)."""
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update as ssu

    # mamba_ssm 2.3 reads dt_bias's and D's strides whether or not they are given (`*(D.stride(0), ...) if D is not
    # None else 0` unpacks an int): pass zeros, as stride-0 expansions (so the per-head tie of dt is kept)
    zero = torch.zeros((), dtype=torch.float32, device=x.device)
    if dt_bias is None:
        dt_bias = zero.expand(dt.shape[1:])
    if D is None:
        D = zero.expand(x.shape[1:])
    return ssu(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus)


__all__ = ["causal_conv1d", "selective_scan", "ssd_scan", "mamba2_inner", "rms_norm_gated", "add_norm",
           "selective_state_update"]


# --------------------------------------------------------------------------------------------- attention
# torch.nn.attention.flex_attention with a block mask built from seq_idx: blocks (128 x 128) that lie entirely in
# another document or above the diagonal are skipped, not computed and masked (what SDPA with a dense mask does).
# One entry per cache, as _starts_cache: every attention layer of a forward (and its recomputation) reuses the
# block mask of the same seq_idx object.
_block_mask_cache: list = [None]
_flex_compiled: list = [None]
_logged: list = [False]


def document_block_mask(seq_idx: Tensor, causal: bool = True):
    """flex_attention BlockMask: query t sees key s iff seq_idx[b, s] == seq_idx[b, t] (and s <= t if causal)."""
    from torch.nn.attention.flex_attention import create_block_mask

    hit = _block_mask_cache[0]
    if hit is not None and hit[0] is seq_idx and hit[1] == seq_idx._version and hit[2] == causal:
        return hit[3]
    docs = seq_idx.to(torch.int32)

    def mask_mod(b, h, q_idx, kv_idx):
        same = docs[b, q_idx] == docs[b, kv_idx]
        return same & (q_idx >= kv_idx) if causal else same

    Bsz, L = seq_idx.shape
    mask = create_block_mask(mask_mod, Bsz, None, L, L, device=seq_idx.device)
    _block_mask_cache[0] = (seq_idx, seq_idx._version, causal, mask)
    return mask


def _flex(device: torch.device):
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":  # eager flex (a CPU test of this wrapper's masking); the compiled kernel is CUDA's
        return flex_attention
    if _flex_compiled[0] is None:
        _flex_compiled[0] = torch.compile(flex_attention, dynamic=False)
    return _flex_compiled[0]


def attention(q: Tensor, k: Tensor, v: Tensor, seq_idx: Optional[Tensor] = None, causal: bool = True,
              softmax_scale: Optional[float] = None) -> Tensor:
    """reference.attention's signature: q (B, L, H, Dh), k, v (B, L, Hkv, Dh) -> (B, L, H, Dh), in q's dtype.
    Packed rows run flex_attention with the document block mask (GQA native); rows without seq_idx take SDPA's
    is_causal path (flash attention), which has no mask to skip."""
    from . import reference

    if not _logged[0]:
        log.info("attention kernel: flex_attention with a document block mask (packed rows), SDPA otherwise")
        _logged[0] = True
    if seq_idx is None:
        return reference.sdpa_attention(q, k, v, None, causal, softmax_scale)
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") and q.is_cuda else q.dtype
    q, k, v = (t.to(dtype).transpose(1, 2) for t in (q, k, v))
    out = _flex(q.device)(q, k, v, block_mask=document_block_mask(seq_idx, causal), scale=softmax_scale,
                          enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(1, 2)


from .fused_mamba1 import mamba1_inner  # noqa: E402  (the Mamba-1 mixer as one autograd function)
