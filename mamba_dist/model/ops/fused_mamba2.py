"""Mamba-2's conv on causal_conv1d's fast path: no seq_idx in the kernel, exact fix-ups at the document starts.

The fused Mamba-2 mixer runs mamba_ssm's `mamba_split_conv1d_scan_combined` (ops/fused.py `mamba2_inner`), which
hands seq_idx to causal_conv1d's channel-last kernel so that no conv window reaches into the previous document.
That kernel variant is slow: on an H200 at the 1.3B shape (8 x 2048 tokens, 4,352 channels) 154 us a forward and
375 us a backward against 91 / 217 us without seq_idx, +13.7 ms a step over 48 layers (PERF.md). Only the first
W - 1 outputs of each document differ between the two, so here the kernel runs without seq_idx and those few
outputs are put right, as the Mamba-1 mixer already does (ops/fused_mamba1.py, whose packing and fix-up functions
this reuses; the channel-last (B, C, L) tensors are (C, B*L) matrices with unit row stride there, so the fix-up
columns are contiguous token rows, read and written coalesced):
  forward   out = conv(x) without seq_idx; at each fix-up position p, out[p] = silu(the in-document window sum),
            recomputed in fp32 and overwritten;
  backward  the incoming gradient is zeroed at the fix-up positions before the kernel's backward (so the kernel
            adds nothing through them, in particular nothing across documents), and their exact contributions
            to dx, dweight and dbias are added after it.
The SSD scan kernels still get seq_idx (their state resets are native and cheap).

The combined function calls the conv through the module globals `causal_conv1d_fwd_function` /
`causal_conv1d_bwd_function` of mamba_ssm.ops.triton.ssd_combined and offers no other way in; copying its
~200-line autograd function to change two calls would fork it. So `install` wraps those two names, once. The
wrappers act only for a seq_idx tensor that `register` was given (mamba2_inner registers its own, with the batch's
packing); any other call, and any call they cannot serve (initial states, no SiLU), goes to the real function
unchanged. A registration that is gone by backward time (activation recomputation re-registers) only means the
backward takes the seq_idx kernel: exact as well, just slower. MAMBA_DIST_CONV_FIXUPS=0 turns the fast path off
(every call then takes the seq_idx kernel)."""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch
from torch import Tensor

from .fused_mamba1 import (_add_fix_grads_, _conv_fix_, _conv_windows, _fused_small, _mem, _Packing, _packing,
                           _take_fix_grads_)

_registered: list = [None]  # (seq_idx handed to the combined function, its packing): one batch at a time
_seq32_cache: list = [None]  # (seq_idx, its version, the int32 contiguous copy the kernels take)


def enabled() -> bool:
    """Whether mamba2_inner takes the conv fast path (MAMBA_DIST_CONV_FIXUPS, default on)."""
    return os.environ.get("MAMBA_DIST_CONV_FIXUPS", "1") != "0"


def seq_idx_int32(seq_idx: Tensor) -> Tensor:
    """seq_idx as the kernels take it (int32, contiguous), one tensor per batch for every layer, so that one
    registration serves them all (and the conversion runs once)."""
    hit = _seq32_cache[0]
    if hit is not None and hit[0] is seq_idx and hit[1] == seq_idx._version:
        return hit[2]
    seq32 = seq_idx.to(torch.int32).contiguous()
    _seq32_cache[0] = (seq_idx, seq_idx._version, seq32)
    return seq32


def register(seq32: Tensor, seq_idx: Tensor, W: int) -> None:
    """Let the wrapped conv serve calls with seq32 (the int32 copy of seq_idx) through the batch's packing
    (the cached exact one, or the StaticPacking a CUDA graph bound to seq_idx)."""
    hit = _registered[0]
    if hit is not None and hit[0] is seq32:
        return
    _registered[0] = (seq32, _packing(seq_idx, W))


def _lookup(seq_idx: Optional[Tensor]) -> Optional[_Packing]:
    hit = _registered[0]
    if seq_idx is None or hit is None:
        return None
    seq32 = hit[0]
    # identity, or the same memory (the registration holds it alive, so no other tensor can sit there): saved
    # tensors may come back from autograd as other Python objects over the same storage
    if seq_idx is seq32 or (seq_idx.data_ptr() == seq32.data_ptr() and seq_idx.shape == seq32.shape
                            and seq_idx.dtype == seq32.dtype and seq_idx.device == seq32.device):
        return hit[1]
    return None


@_fused_small
def _window_values(x_mem: Tensor, win_col: Tensor, win_ok: Tensor, w_rev: Tensor, conv_bias: Optional[Tensor]):
    """The fix-up positions' in-document windows and pre-activations (what the backward's terms need)."""
    return _conv_windows(x_mem, win_col, win_ok, w_rev, conv_bias)


def conv_fwd(real_fwd, x: Tensor, weight: Tensor, bias: Optional[Tensor], seq_idx: Optional[Tensor],
             initial_states: Optional[Tensor], final_states_out: Optional[Tensor], silu_activation: bool) -> Tensor:
    """causal_conv1d_fwd_function's signature; x (B, C, L) channel-last, weight (C, W)."""
    pk = _lookup(seq_idx)
    if pk is None or initial_states is not None or final_states_out is not None or not silu_activation:
        return real_fwd(x, weight, bias, seq_idx, initial_states, final_states_out, silu_activation)
    out = real_fwd(x, weight, bias, None, None, None, True)
    if pk.fcol.numel():
        _conv_fix_(_mem(out), _mem(x), pk, weight.float().flip(-1), bias)
    return out


def conv_bwd(real_bwd, x: Tensor, weight: Tensor, bias: Optional[Tensor], dout: Tensor, seq_idx: Optional[Tensor],
             initial_states: Optional[Tensor], dfinal_states: Optional[Tensor], dx: Optional[Tensor],
             return_dinitial_states: bool, silu_activation: bool):
    """causal_conv1d_bwd_function's signature -> (dx, dweight, dbias, dinitial_states). dout is zeroed at the
    fix-up positions in place: the combined function's backward hands in a buffer of its own that it does not
    read again."""
    pk = _lookup(seq_idx)
    if (pk is None or initial_states is not None or dfinal_states is not None or return_dinitial_states
            or not silu_activation):
        return real_bwd(x, weight, bias, dout, seq_idx, initial_states, dfinal_states, dx, return_dinitial_states,
                        silu_activation)
    if not pk.fcol.numel():
        return real_bwd(x, weight, bias, dout, None, None, None, dx, False, True)
    w_rev = weight.float().flip(-1)
    xw, pre = _window_values(_mem(x), pk.win_col, pk.win_ok, w_rev, bias)
    g = _take_fix_grads_(_mem(dout), pk)
    dx, dweight, dbias, _ = real_bwd(x, weight, bias, dout, None, None, None, dx, False, True)
    dweight, dbias = _add_fix_grads_(_mem(dx), dweight, dbias, g, pk, pre, w_rev, xw)
    return dx, dweight, dbias, None


def install(module) -> None:
    """Wrap `module`'s causal_conv1d_fwd_function / causal_conv1d_bwd_function (mamba_ssm's ssd_combined), once."""
    if getattr(module.causal_conv1d_fwd_function, "_mamba_dist_fixups", False):
        return
    fwd = functools.partial(conv_fwd, module.causal_conv1d_fwd_function)
    bwd = functools.partial(conv_bwd, module.causal_conv1d_bwd_function)
    fwd._mamba_dist_fixups = bwd._mamba_dist_fixups = True
    module.causal_conv1d_fwd_function, module.causal_conv1d_bwd_function = fwd, bwd
