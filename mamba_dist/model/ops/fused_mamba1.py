"""The Mamba-1 mixer as one autograd function (the fused backend's `mamba1_inner`), in_proj to out_proj:
in_proj -> causal conv1d + SiLU -> x_proj -> dt_proj -> selective scan with exact document resets -> SiLU(z) gate
-> out_proj. mamba_ssm's `mamba_inner_fn` is the model; what differs:

- Layout: feature-major from end to end, with no transposing copy of a (B, D, L)-sized tensor, forward or
  backward. in_proj is computed as W_in @ h^T, so xz is a (2D, B*L) matrix ("_mem" below); its (B, D, L) views
  have stride(-1) == 1, which the conv and scan kernels read directly, and their outputs (empty_like of those
  views) keep the layout. x_proj, dt_proj, out_proj and every weight gradient are matmuls on these matrices
  (cuBLAS takes the transposes as flags); B and C go to the scan as strided views of x_proj's output, the kernels'
  dB / dC come back in the same layout. (mamba_inner_fn copies its conv output and out_z once each way.)
- Conv resets. Only causal_conv1d's channel-last kernel takes seq_idx, and the channel-last layout is what forced
  transposes. So the conv runs channel-first without resets and the few outputs whose window crosses a document
  start (the first W - 1 positions of each document, "fix-up columns") are recomputed from their in-document
  inputs and overwritten ((D, F) tensors, F <= (W - 1) x starts). In backward the incoming gradient is zeroed at
  those columns before the kernel and their exact contributions to dx, dweight and dbias are added by hand.
- Scan resets: the construction of ops/fused.py `selective_scan` (see its docstring) applied to the R
  document-start positions only, in place on tensors this function owns, with its gradients written by hand:
  At a start (b, t), for every channel:
    forward   delta[b,:,t] <- v with dt_new = v + delta_bias >= 64 and dt_new * min|A| >= 200, so
              exp(dt_new A) == 0 in fp32 (the previous document's state is dropped exactly, both ways);
              u[b,:,t] <- u_new = u * dt_old / dt_new (the state input dt B u is unchanged);
              out[b,:,t] += D (u - u_new) (the kernel's skip term used u_new), then out_z = out * silu(z).
              The corrected pre-gate `out` is what the kernel's backward reads for dz, so dz needs no fix-up.
    backward  g = dout * silu(z) (the gradient of the pre-gate output); du_new = du_kernel - D g;
              du = du_new dt_old / dt_new + D g;  d dt_old = du_new u / dt_new;
              ddelta = d dt_old * softplus'(delta + delta_bias) (replacing the kernel's ddelta there);
              ddelta_bias += sum_starts (ddelta - ddelta_kernel) (the kernel summed its own share of the start
              positions into ddelta_bias; dt_new is a constant);  dD += sum_starts g (u - u_new).
  dA is exact without a fix-up: the kernel's dA terms at a start carry the factor exp(dt_new A) == 0.
  The rewrite of u is done on the conv output after x_proj has read it, and undone in backward once the scan's
  backward is through (x_proj's weight gradient reads the true conv output).
- The function reads every weight of the mixer directly, so tensor parallelism (swapped submodules with their
  own reduces) and ZeRO-3 (a weight gathered only around its own module's forward) switch it off
  (Mamba.use_inner_fn).
- Recomputation as mamba_inner_fn's checkpoint_lvl=1: the conv output, delta and out_z are recomputed in
  backward, not saved. Saved: in_proj's input and output, x_proj's output, the scan's chunk states and pre-gate
  output, the matmul weights in the compute dtype (as autocast keeps them for backward: casting them again in
  backward cost ~4 ms a step at 1.4B), (R, D) / (D, F) tensors for the resets.

Kernel entry points used (signatures of mamba_ssm 2.3.2 / causal_conv1d 1.7.0, read from their C++ bindings):
  selective_scan_cuda.fwd(u, delta, A, B, C, D?, z?, delta_bias?, delta_softplus) -> [out, x, out_z (if z)]
  selective_scan_cuda.bwd(u, delta, A, B, C, D?, z?, delta_bias?, dout, x?, out?, dz?, delta_softplus,
      recompute_out_z) -> [du, ddelta, dA, dB, dC, dD, ddelta_bias, dz (if z), out_z (if recompute_out_z)]
  causal_conv1d.cpp_functions.causal_conv1d_fwd_function(x, weight, bias?, seq_idx?, initial_states?,
      final_states_out?, silu_activation) -> out (torch.empty_like(x))
  causal_conv1d.cpp_functions.causal_conv1d_bwd_function(x, weight, bias?, dout, seq_idx?, initial_states?,
      dfinal_states?, dx?, return_dinitial_states, silu_activation) -> (dx, dweight, dbias, dinitial_states)
Both packages are imported inside the functions (they do not import without CUDA); tests/test_fused_mamba1_cpu.py
runs this module on CPU against emulators of exactly these entry points (their checks and output layouts).
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)

try:  # torch >= 2.4: device-generic decorators (torch.cuda.amp.custom_fwd is deprecated)
    from torch.amp import custom_bwd, custom_fwd

    _custom_fwd, _custom_bwd = custom_fwd(device_type="cuda"), custom_bwd(device_type="cuda")
except ImportError:  # pragma: no cover
    from torch.cuda.amp import custom_bwd as _custom_bwd, custom_fwd as _custom_fwd


def _fused():
    # imported here, not at module level: ops/fused.py re-exports mamba1_inner from this module
    from . import fused
    return fused


def _bcl(m: Tensor, Bsz: int) -> Tensor:
    """A feature-major (C, B*L) matrix as the (B, C, L) view the kernels take (stride(-1) == 1)."""
    return m.view(m.shape[0], Bsz, m.shape[1] // Bsz).transpose(0, 1)


def _mem(t: Tensor) -> Tensor:
    """The (C, B*L) matrix under a (B, C, L) tensor laid out feature-major (.view raises if it is not)."""
    return t.transpose(0, 1).view(t.shape[1], t.shape[0] * t.shape[2])


def _rows(x: Tensor, b: Tensor, t: Tensor) -> Tensor:
    """(R, D) values of a (B, D, L) tensor at the start positions (b, t)."""
    return x[b, :, t]


def _packing_tensors(seq_idx: Tensor, W: int) -> tuple:
    """The packing of a batch, exact sizes, on seq_idx's device (nonzero / unique: host syncs there).
    starts b, t (R,): the tokens that start a document after position 0 of their row (the scan's resets).
    fcol (F,): the positions p whose conv window [p - W + 1, p] crosses a document start, as columns b * L + p of
    the feature-major matrices; win_col / win_ok (F, W): the window's k-th input x[p - k] and whether it is in p's
    document; ucol / inv: the distinct window columns, and each window entry's index among them (so gradients add
    up in fp32 with no per-layer sync)."""
    Bsz, L = seq_idx.shape
    dev = seq_idx.device
    pos = torch.arange(L, device=dev)
    start = torch.zeros_like(seq_idx, dtype=torch.bool)
    start[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    crossed = seq_idx != seq_idx[:, (pos - (W - 1)).clamp_min(0)]  # non-decreasing ids: the window's oldest
    b, t = start.nonzero(as_tuple=True)
    fb, fp = crossed.nonzero(as_tuple=True)
    k = torch.arange(W, device=dev)
    tk = fp[:, None] - k  # (F, W): x[p - k]
    win_col = fb[:, None] * L + tk.clamp_min(0)
    win_ok = (tk >= 0) & (seq_idx[fb[:, None], tk.clamp_min(0)] == seq_idx[fb, fp][:, None])
    ucol, inv = torch.unique(win_col.flatten(), return_inverse=True)
    return b, t, fb * L + fp, win_col, win_ok, ucol, inv


class _Packing:
    """Where a packed batch needs fix-ups (see _packing_tensors). valid_s / valid_f are None for an exact-size
    packing; a StaticPacking pads to fixed capacities and masks the padding with them."""

    def __init__(self, b, t, fcol, win_col, win_ok, ucol, inv, valid_s=None, valid_f=None):
        self.b, self.t, self.fcol, self.win_col, self.win_ok, self.ucol, self.inv = b, t, fcol, win_col, win_ok, ucol, inv
        self.valid_s, self.valid_f = valid_s, valid_f


class StaticPacking(_Packing):
    """A packing in fixed-capacity device buffers, so that the Mamba-1 mixer runs with no host sync and can be
    captured in a CUDA graph (train.py CudaGraphPath). fill_(seq_idx) computes a batch's packing on the host and
    copies it in before each replay. Entries past the batch's own counts are masked (valid_s / valid_f False) and
    point at position (0, 0) / column 0, which is never a real start or fix-up column; every masked write puts
    back the value that is there, and masked gradient terms are zero. fill_ returns False when the batch needs
    more room than the capacities (the caller captures again with a bigger packing)."""

    def __init__(self, W: int, cap_starts: int, cap_fix: int, device):
        def buf(*shape, dtype=torch.long):
            return torch.zeros(*shape, dtype=dtype, device=device)

        self.W, self.cap_starts, self.cap_fix = W, cap_starts, cap_fix
        super().__init__(buf(cap_starts), buf(cap_starts), buf(cap_fix), buf(cap_fix, W),
                         buf(cap_fix, W, dtype=torch.bool), buf(cap_fix * W), buf(cap_fix * W),
                         buf(cap_starts, dtype=torch.bool), buf(cap_fix, dtype=torch.bool))

    @staticmethod
    def counts(seq_idx: Tensor, W: int) -> tuple:
        """(starts, fix-up columns) of a batch."""
        b, t, fcol = _packing_tensors(seq_idx.cpu(), W)[:3]
        return b.numel(), fcol.numel()

    @classmethod
    def sized_for(cls, seq_idx: Tensor, W: int, device, slack: int = 2) -> "StaticPacking":
        """Capacities of `slack` times this batch's counts (powers of two, at least 64)."""
        def cap(n):
            return max(64, 1 << max(0, slack * n - 1).bit_length())

        R, Fn = cls.counts(seq_idx, W)
        return cls(W, cap(R), cap(Fn), device)

    def fill_(self, seq_idx: Tensor) -> bool:
        b, t, fcol, win_col, win_ok, ucol, inv = _packing_tensors(seq_idx.cpu(), self.W)
        R, Fn, U = b.numel(), fcol.numel(), ucol.numel()
        if R > self.cap_starts or Fn > self.cap_fix:
            return False
        for dst, src, n in ((self.b, b, R), (self.t, t, R), (self.fcol, fcol, Fn), (self.win_col, win_col, Fn),
                            (self.win_ok, win_ok, Fn), (self.ucol, ucol, U), (self.inv, inv, Fn * self.W)):
            host = torch.zeros(dst.shape, dtype=dst.dtype)
            host[:n] = src
            dst.copy_(host.pin_memory() if dst.is_cuda else host, non_blocking=True)
        for dst, n in ((self.valid_s, R), (self.valid_f, Fn)):
            host = torch.zeros(dst.shape, dtype=torch.bool)
            host[:n] = True
            dst.copy_(host.pin_memory() if dst.is_cuda else host, non_blocking=True)
        return True

    def bind(self, seq_idx: Tensor) -> None:
        """Make the mixers use this packing for the (static) seq_idx tensor until another batch is seen."""
        _packing_cache[0] = (seq_idx, seq_idx._version, self.W, self)


def static_packing_for(model: torch.nn.Module, seq_idx: Optional[Tensor]) -> Optional[StaticPacking]:
    """A StaticPacking sized for this batch (on its device) if the model runs fused mixers that fix up their conv
    at document starts (Mamba-1 through mamba1_inner; Mamba-2 through mamba2_inner with the conv fast path of
    ops/fused_mamba2.py) and the batch is packed; None otherwise (nothing to capture for them)."""
    from ..mamba1 import Mamba
    from ..mamba2 import Mamba2
    from .fused_mamba2 import enabled as mamba2_fixups

    fixes_conv = (Mamba, Mamba2) if mamba2_fixups() else (Mamba,)
    widths = {m.d_conv for m in model.modules()
              if isinstance(m, fixes_conv) and m.backend == "fused" and m.use_inner_fn}
    if seq_idx is None or not widths:
        return None
    if len(widths) > 1:
        raise ValueError(f"mixers with different conv widths {sorted(widths)} cannot share one packing")
    return StaticPacking.sized_for(seq_idx, widths.pop(), seq_idx.device)


_packing_cache: list = [None]


def _packing(seq_idx: Tensor, W: int) -> _Packing:
    """The batch's packing, cached per seq_idx object: every layer of a forward and of an activation-recomputation
    replay gets the same seq_idx tensor, so the host sync happens once per batch, not once per layer."""
    hit = _packing_cache[0]
    if hit is not None and hit[0] is seq_idx and hit[1] == seq_idx._version and hit[2] == W:
        return hit[3]
    pk = _Packing(*_packing_tensors(seq_idx, W))
    _packing_cache[0] = (seq_idx, seq_idx._version, W, pk)  # holding seq_idx keeps its memory from reuse
    return pk


def _fused_small(fn):
    """`fn` (pure tensor arithmetic on the packing's few columns and rows) through torch.compile on CUDA tensors:
    its gathers and fp32 element-wise ops fuse into a few kernels instead of one launch each (before, ~110 small
    kernels a layer, ~5 ms a step at 130M even inside a CUDA graph). Eager on CPU, where
    MAMBA_DIST_COMPILE_FIXUPS=0, and from the first failure on (logged once): the same function either way."""
    state = {"compiled": None, "failed": False}

    def call(*args):
        if not state["failed"] and compile_enabled(args[0].device):
            if state["compiled"] is None:
                state["compiled"] = torch.compile(fn, dynamic=None)
            try:
                return state["compiled"](*args)
            except Exception as e:  # noqa: BLE001 - a compiler failure must not stop training: run it eagerly
                state["failed"] = True
                log.warning("mamba1_inner: torch.compile of %s failed (%s: %s); running it eagerly", fn.__name__,
                            type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return fn(*args)

    call.eager = fn
    _COMPILED_SMALL[fn.__name__] = state
    return call


_COMPILED_SMALL: dict = {}
_COMPILE_ON_CPU = False  # tests: the same compiled path on CPU tensors (inductor's C++ backend)


def compile_enabled(device: torch.device) -> bool:
    """Whether the packing helpers run through torch.compile on this device (CUDA, unless
    MAMBA_DIST_COMPILE_FIXUPS=0; a helper whose compilation failed runs eagerly regardless)."""
    return (device.type == "cuda" or _COMPILE_ON_CPU) and os.environ.get("MAMBA_DIST_COMPILE_FIXUPS", "1") != "0"


def compile_failures() -> list:
    """Names of the packing helpers whose torch.compile failed in this process (they run eagerly)."""
    return sorted(name for name, st in _COMPILED_SMALL.items() if st["failed"])


def _conv_windows(x_mem: Tensor, win_col: Tensor, win_ok: Tensor, w_rev: Tensor, conv_bias: Optional[Tensor]):
    """The fix-up columns' in-document conv windows (D, F, W) in fp32 and pre-activations (D, F). w_rev: the conv
    weight in fp32 with its taps reversed (column k multiplies x[p - k])."""
    D, W = w_rev.shape
    xw = x_mem[:, win_col.flatten()].view(D, -1, W).float() * win_ok
    pre = (xw * w_rev[:, None, :]).sum(-1)
    if conv_bias is not None:
        pre = pre + conv_bias.float()[:, None]
    return xw, pre


@_fused_small
def _conv_fix_values(x_mem: Tensor, win_col: Tensor, win_ok: Tensor, w_rev: Tensor, conv_bias: Optional[Tensor],
                     conv_mem: Tensor, fcol: Tensor, valid_f: Optional[Tensor]):
    """The conv output's in-document values at the fix-up columns (D, F) in conv_mem's dtype, with xw and pre."""
    xw, pre = _conv_windows(x_mem, win_col, win_ok, w_rev, conv_bias)
    fixed = F.silu(pre).to(conv_mem.dtype)
    if valid_f is not None:  # padding (StaticPacking) keeps the value that is there
        fixed = torch.where(valid_f, fixed, conv_mem[:, fcol])
    return fixed, xw, pre


def _conv_fix_(conv_mem: Tensor, x_mem: Tensor, pk: _Packing, w_rev: Tensor, conv_bias: Optional[Tensor]):
    """Overwrite the conv output at the fix-up columns with its in-document value; returns (xw, pre)."""
    fixed, xw, pre = _conv_fix_values(x_mem, pk.win_col, pk.win_ok, w_rev, conv_bias, conv_mem, pk.fcol,
                                      pk.valid_f)
    conv_mem[:, pk.fcol] = fixed
    return xw, pre


class _Reset:
    """The scan reset's per-start state, (R, D) tensors (plus dt_new (D,)); u_r / u_new also in fp32 (u32, u_new32),
    converted once instead of at every use."""

    def __init__(self, b, t, u_r, u_new, pre, dt_new, v, u32, u_new32):
        self.b, self.t, self.u_r, self.u_new, self.pre, self.dt_new, self.v = b, t, u_r, u_new, pre, dt_new, v
        self.u32, self.u_new32 = u32, u_new32

    def tensors(self):
        return self.b, self.t, self.u_r, self.u_new, self.pre, self.dt_new, self.v, self.u32, self.u_new32


def _reset_dt(A: Tensor, bias: Optional[Tensor], dtype: torch.dtype) -> tuple:
    """The reset's delta input v (D,) in the scan's dtype and the dt_new (D,) fp32 the kernel makes of it.
    Eager, not compiled: the compiler may keep v unrounded in fp32 (its casts are not rounding points), and dt_new
    must be what the kernel computes from the rounded v, or u_new would not keep dt * u."""
    fused = _fused()
    # per-channel reset dt: 200 / min_n |A[d, n]|, at least 64 (> the kernel's softplus threshold 20), finite
    A_min = A.abs().amin(-1).clamp_min(1e-30)
    dt_new = (fused._RESET_DT_A / A_min).clamp(min=fused._RESET_DT_MIN, max=1e30)
    if bias is not None:
        v = (dt_new - bias).to(dtype)
        return v, v.float() + bias  # the kernel's own fp32 arithmetic (softplus passes values > 20 through)
    v = dt_new.to(dtype)
    return v, v.float()


@_fused_small
def _reset_values(u: Tensor, delta: Tensor, bias: Optional[Tensor], b: Tensor, t: Tensor,
                  valid_s: Optional[Tensor], v: Tensor, dt_new: Tensor):
    """The scan reset's rewritten u and delta at the starts, and what backward needs (see _reset_inputs_)."""
    u_r = _rows(u, b, t)
    u32 = u_r.float()
    pre = _rows(delta, b, t).float()
    if bias is not None:
        pre = pre + bias
    dt_old = F.softplus(pre)  # threshold 20, as the kernel's softplus
    u_new = (u32 * (dt_old / dt_new)).to(u.dtype)
    v = v.expand_as(u_new)
    if valid_s is not None:
        valid = valid_s[:, None]
        u_new, v = torch.where(valid, u_new, u_r), torch.where(valid, v, _rows(delta, b, t))
    return u_r, u_new, pre, v, u32


def _reset_inputs_(u: Tensor, delta: Tensor, A: Tensor, bias: Optional[Tensor], pk: _Packing) -> _Reset:
    """Rewrite u and delta in place at the starts (module docstring); returns what backward needs. Masked
    (padding) starts get their own values back: u_new = u, and delta unchanged."""
    v, dt_new = _reset_dt(A, bias, u.dtype)
    u_r, u_new, pre, v, u32 = _reset_values(u, delta, bias, pk.b, pk.t, pk.valid_s, v, dt_new)
    u[pk.b, :, pk.t] = u_new
    delta[pk.b, :, pk.t] = v
    # u_new as stored (rounded), converted here: inside the compiled function the round trip could be elided
    return _Reset(pk.b, pk.t, u_r, u_new, pre, dt_new, v, u32, u_new.float())


@_fused_small
def _skip_values(out: Tensor, out_z: Tensor, z: Tensor, b: Tensor, t: Tensor, D: Tensor, u32: Tensor,
                 u_new32: Tensor, valid_s: Optional[Tensor]):
    """The pre-gate output with the skip term D u of the true u at the starts, and its gated value."""
    out_r = _rows(out, b, t).float() + D * (u32 - u_new32)
    out_z_r = (out_r * F.silu(_rows(z, b, t).float())).to(out_z.dtype)
    if valid_s is not None:
        out_z_r = torch.where(valid_s[:, None], out_z_r, _rows(out_z, b, t))
    return out_r.to(out.dtype), out_z_r


@_fused_small
def _reset_grads(dout: Tensor, z: Tensor, du: Tensor, ddelta: Tensor, b: Tensor, t: Tensor, D: Optional[Tensor],
                 u32: Tensor, u_new32: Tensor, pre: Tensor, dt_new: Tensor, valid_s: Optional[Tensor]):
    """The scan reset's gradients at the starts (module docstring): du and ddelta there (in their dtypes), and the
    terms to add to dD and ddelta_bias (None without D; the latter always returned)."""
    g = _rows(dout, b, t).float() * F.silu(_rows(z, b, t).float())  # d L / d out (pre-gate)
    du_k = _rows(du, b, t).float()
    du_new = du_k
    if D is not None:
        du_new = du_new - D * g
    dt_old = F.softplus(pre)
    du_r = du_new * (dt_old / dt_new)
    dD_add = None
    if D is not None:
        du_r = du_r + D * g
        dD_add = (g * (u32 - u_new32)).sum(0)  # masked starts: u_new == u, a zero term
    softplus_grad = torch.where(pre > 20.0, 1.0, torch.sigmoid(pre))
    ddelta_r = du_new * u32 / dt_new * softplus_grad
    ddelta_k = _rows(ddelta, b, t).float()
    if valid_s is not None:  # masked starts keep the kernel's gradients (and add nothing below)
        valid = valid_s[:, None]
        du_r = torch.where(valid, du_r, du_k)
        ddelta_r = torch.where(valid, ddelta_r, ddelta_k)
    return du_r.to(du.dtype), ddelta_r.to(ddelta.dtype), dD_add, (ddelta_r - ddelta_k).sum(0)


@_fused_small
def _conv_fix_grads(g_conv: Tensor, valid_f: Optional[Tensor], pre_conv: Tensor, w_rev: Tensor, win_ok: Tensor,
                    xw: Tensor, has_bias: bool):
    """The fix-up columns' exact gradients: to their in-document window inputs, (F*W, D) (one contiguous row per
    window entry, so that summing them per distinct column is a coalesced index_add_ over rows: along the columns
    of a (D, U) matrix it took ~53 us a layer at 1.4B), and the terms to add to the conv weight (D, W, taps
    reversed back) and bias."""
    g = g_conv.float() if valid_f is None else g_conv.float() * valid_f
    sig = torch.sigmoid(pre_conv)
    d_pre = g * sig * (1 + pre_conv * (1 - sig))  # (D, F)
    dwin = (d_pre[:, :, None] * w_rev[:, None, :] * win_ok).flatten(1).t().contiguous()  # (F*W, D)
    dw_add = (d_pre[:, :, None] * xw).sum(1).flip(-1)
    return dwin, dw_add, d_pre.sum(1) if has_bias else None


def _take_fix_grads_(dconv_mem: Tensor, pk: _Packing) -> Tensor:
    """The incoming gradient at the fix-up columns (D, F), zeroed there in dconv_mem: the conv kernel's own
    (cross-document) backward of those outputs is replaced by _add_fix_grads_. index_fill_, not `= 0`: a Python
    scalar in __setitem__ becomes a host tensor copied to the GPU, a sync per layer. Padding keeps its value."""
    g_conv = dconv_mem[:, pk.fcol]
    if pk.valid_f is None:
        dconv_mem.index_fill_(1, pk.fcol, 0)
    else:
        dconv_mem[:, pk.fcol] = torch.where(pk.valid_f, torch.zeros_like(g_conv), g_conv)
    return g_conv


def _add_fix_grads_(dx_mem: Tensor, dconv_w: Tensor, dconv_b: Optional[Tensor], g_conv: Tensor, pk: _Packing,
                    pre_conv: Tensor, w_rev: Tensor, xw: Tensor):
    """Add the fix-up columns' exact gradients (from g_conv, taken by _take_fix_grads_) to the conv input's
    gradient dx_mem (D, B*L, in place, summed in fp32 per distinct window column) and to the conv weight and bias
    gradients; returns (dconv_w, dconv_b)."""
    dwin, dw_add, db_add = _conv_fix_grads(g_conv, pk.valid_f, pre_conv, w_rev, pk.win_ok, xw, dconv_b is not None)
    acc = torch.zeros(pk.ucol.numel(), dx_mem.shape[0], device=dwin.device, dtype=torch.float32)
    acc.index_add_(0, pk.inv, dwin)
    dx_mem[:, pk.ucol] = (dx_mem[:, pk.ucol].float() + acc.t()).to(dx_mem.dtype)
    dconv_w = dconv_w + dw_add.to(dconv_w.dtype).view_as(dconv_w)
    if dconv_b is not None:
        dconv_b = dconv_b + db_add.to(dconv_b.dtype)
    return dconv_w, dconv_b


def _linear_t(w: Tensor, x_t: Tensor, bias: Optional[Tensor]) -> Tensor:
    """(W x^T) with x^T given feature-major: (out, in) @ (in, n) [+ bias per row] -> (out, n)."""
    return torch.addmm(bias[:, None], w, x_t) if bias is not None else w @ x_t


class _Mamba1Inner(torch.autograd.Function):

    @staticmethod
    @_custom_fwd
    def forward(ctx, h, in_w, in_b, conv_weight, conv_bias, x_proj_w, dt_proj_w, dt_proj_bias, out_w, out_b, A, D,
                seq_idx):
        import selective_scan_cuda
        from causal_conv1d.cpp_functions import causal_conv1d_fwd_function

        dev = h.device.type
        # as mamba_inner_fn: the matmuls in the autocast dtype, so that u, delta, B, C and z share the one input
        # dtype the scan kernel accepts; the conv weight and bias stay as they are (the conv kernel takes fp32)
        dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
        Bsz, L, d_model = h.shape
        d = in_w.shape[0] // 2
        r, N = dt_proj_w.shape[1], A.shape[1]
        conv_w = conv_weight.reshape(d, conv_weight.shape[-1])
        pk = _packing(seq_idx, conv_w.shape[1]) if seq_idx is not None else None

        h2 = h.reshape(Bsz * L, d_model)
        h2 = h2 if h2.dtype == dt else h2.to(dt)
        in_w, x_proj_w, dt_proj_w, out_w = (w if w.dtype == dt else w.to(dt) for w in (in_w, x_proj_w, dt_proj_w,
                                                                                      out_w))
        xz = _linear_t(in_w, h2.t(), in_b.to(dt) if in_b is not None else None)  # (2D, B*L)
        x_mem = xz[:d]
        conv = causal_conv1d_fwd_function(_bcl(x_mem, Bsz), conv_w, conv_bias, None, None, None, True)
        conv_mem = _mem(conv)
        if pk is not None and pk.fcol.numel():
            _conv_fix_(conv_mem, x_mem, pk, conv_w.float().flip(-1), conv_bias)
        x_dbl = x_proj_w @ conv_mem  # (r + 2N, B*L)
        delta = _bcl(dt_proj_w @ x_dbl[:r], Bsz)  # the bias goes in as delta_bias, as in mamba_inner_fn
        Bm, Cm = _bc(x_dbl, Bsz, r, N)
        u, z = conv, _bcl(xz[d:], Bsz)

        rs = None
        if pk is not None and pk.b.numel():
            rs = _reset_inputs_(u, delta, A, dt_proj_bias, pk)  # u is the conv output: x_proj read it
        out, scan_x, out_z = selective_scan_cuda.fwd(u, delta, A, Bm, Cm, D, z, dt_proj_bias, True)[:3]
        if rs is not None and D is not None:  # the skip term D u at the starts (without D nothing to correct)
            out_r, out_z_r = _skip_values(out, out_z, z, rs.b, rs.t, D, rs.u32, rs.u_new32, pk.valid_s)
            out[rs.b, :, rs.t] = out_r  # the pre-gate output the backward's dz reads (masked: +0)
            out_z[rs.b, :, rs.t] = out_z_r
        out_t = _mem(out_z).t()  # (B*L, D), a transposed view: cuBLAS reads it as is
        y = torch.addmm(out_b.to(dt), out_t, out_w.t()) if out_b is not None else out_t @ out_w.t()

        ctx.has_reset = rs is not None
        ctx.pk = pk
        ctx.dims = (Bsz, L, d, r, N, dt)
        ctx.input_dtype = h.dtype
        ctx.save_for_backward(h2, in_w, in_b, xz, conv_w, conv_bias, x_dbl, x_proj_w, dt_proj_w, dt_proj_bias,
                              out_w, out_b, A, D, scan_x, out, *(rs.tensors() if rs is not None else ()))
        ctx.conv_weight_shape = conv_weight.shape
        return y.view(Bsz, L, -1)

    @staticmethod
    @_custom_bwd
    def backward(ctx, dy):
        import selective_scan_cuda
        from causal_conv1d.cpp_functions import causal_conv1d_bwd_function, causal_conv1d_fwd_function

        (h2, in_w, in_b, xz, conv_w, conv_bias, x_dbl, x_proj_w, dt_proj_w, dt_proj_bias, out_w, out_b, A, D,
         scan_x, out, *rest) = ctx.saved_tensors
        Bsz, L, d, r, N, dt = ctx.dims
        pk = ctx.pk
        in_w_c, x_proj_w_c, dt_proj_w_c, out_w_c = in_w, x_proj_w, dt_proj_w, out_w  # already in dt
        x_mem = xz[:d]
        # recompute (checkpoint_lvl=1): conv output (with its fix-ups), delta, and the scan reset's rewrite
        conv = causal_conv1d_fwd_function(_bcl(x_mem, Bsz), conv_w, conv_bias, None, None, None, True)
        conv_mem = _mem(conv)
        fix = pk is not None and pk.fcol.numel()
        if fix:
            w_rev = conv_w.float().flip(-1)
            xw, pre_conv = _conv_fix_(conv_mem, x_mem, pk, w_rev, conv_bias)
        delta = _bcl(dt_proj_w_c @ x_dbl[:r], Bsz)
        Bm, Cm = _bc(x_dbl, Bsz, r, N)
        u, z = conv, _bcl(xz[d:], Bsz)
        rs = _Reset(*rest) if ctx.has_reset else None
        if rs is not None:
            u[rs.b, :, rs.t] = rs.u_new
            delta[rs.b, :, rs.t] = rs.v

        dy2 = dy.reshape(Bsz * L, -1).to(dt)
        dout = _bcl(out_w_c.t() @ dy2.t(), Bsz)  # (D, B*L): d out_z, feature-major
        dxz = torch.empty_like(xz)
        du, ddelta, dA, dB, dC, dD, ddelta_bias, _, out_z = selective_scan_cuda.bwd(
            u, delta, A, Bm, Cm, D, z, dt_proj_bias, dout, scan_x, out, _bcl(dxz[d:], Bsz), True, True)[:9]

        if rs is not None:
            du_r, ddelta_r, dD_add, dbias_add = _reset_grads(dout, z, du, ddelta, rs.b, rs.t, D, rs.u32, rs.u_new32,
                                                             rs.pre, rs.dt_new, pk.valid_s)
            if D is not None:
                dD = dD + dD_add
            if ddelta_bias is not None:
                ddelta_bias = ddelta_bias + dbias_add
            du[rs.b, :, rs.t] = du_r
            ddelta[rs.b, :, rs.t] = ddelta_r
            u[rs.b, :, rs.t] = rs.u_r  # undo the rewrite: x_proj's weight gradient reads the true conv output

        d_out_w = dy2.t() @ _mem(out_z).t()
        d_out_b = dy2.sum(0) if out_b is not None else None
        ddelta_mem = _mem(ddelta)
        d_dt_proj_w = ddelta_mem @ x_dbl[:r].t()
        dx_dbl = torch.empty_like(x_dbl)
        dx_dbl[:r] = dt_proj_w_c.t() @ ddelta_mem
        dx_dbl[r:r + N].view(N, Bsz, L).copy_(dB[:, 0].transpose(0, 1))  # dB has B's feature-major layout
        dx_dbl[r + N:].view(N, Bsz, L).copy_(dC[:, 0].transpose(0, 1))
        d_x_proj_w = dx_dbl @ conv_mem.t()
        # du + W_x^T dx_dbl, (D, B*L), in du's own buffer: addmm into a new tensor first copies du there
        dconv_mem = _mem(du).addmm_(x_proj_w_c.t(), dx_dbl)
        g_conv = _take_fix_grads_(dconv_mem, pk) if fix else None
        _, dconv_w, dconv_b, _ = causal_conv1d_bwd_function(
            _bcl(x_mem, Bsz), conv_w, conv_bias, _bcl(dconv_mem, Bsz), None, None, None, _bcl(dxz[:d], Bsz),
            False, True)
        if fix:
            dconv_w, dconv_b = _add_fix_grads_(dxz[:d], dconv_w, dconv_b, g_conv, pk, pre_conv, w_rev, xw)
        d_in_w = dxz @ h2
        d_in_b = dxz.sum(1) if in_b is not None else None
        dh = (dxz.t() @ in_w_c).view(Bsz, L, -1)
        return (dh, d_in_w, d_in_b, dconv_w.reshape(ctx.conv_weight_shape), dconv_b, d_x_proj_w, d_dt_proj_w,
                ddelta_bias, d_out_w, d_out_b, dA, dD, None)


def _bc(x_dbl: Tensor, Bsz: int, r: int, N: int):
    """B and C as the kernel's (B, 1, N, L) tensors: strided views of x_proj's feature-major output."""
    Bm = _bcl(x_dbl[r:r + N], Bsz).unsqueeze(1)
    Cm = _bcl(x_dbl[r + N:], Bsz).unsqueeze(1)
    return Bm, Cm


def mamba1_inner(hidden: Tensor, in_proj_weight: Tensor, in_proj_bias: Optional[Tensor], conv_weight: Tensor,
                 conv_bias: Optional[Tensor], x_proj_weight: Tensor, dt_proj_weight: Tensor,
                 dt_proj_bias: Optional[Tensor], out_proj_weight: Tensor, out_proj_bias: Optional[Tensor], A: Tensor,
                 D: Optional[Tensor] = None, seq_idx: Optional[Tensor] = None) -> Tensor:
    """The Mamba-1 mixer from in_proj to out_proj, with exact document resets (see the module docstring).

    hidden (B, L, d_model); in_proj_weight (2 D, d_model) (x then z); conv_weight (D, 1, W) or (D, W), W in 2..4;
    conv_bias (D,); x_proj_weight (R + 2 N, D); dt_proj_weight (D, R); dt_proj_bias (D,) (applied before the
    softplus); out_proj_weight (d_model, D); A (D, N) (negative); D (D,); seq_idx (B, L) non-decreasing document
    ids or None. Returns out_proj((conv -> x_proj -> dt_proj -> scan + D skip) * silu(z)), (B, L, d_model)."""
    d = in_proj_weight.shape[0] // 2
    W = conv_weight.shape[-1]
    if d % 8 or not 2 <= W <= 4:
        raise ValueError(f"fused mamba1_inner needs d_inner % 8 == 0 and conv width 2..4, got d_inner={d}, "
                         f"width={W}; use the op-by-op path (Mamba.use_inner_fn=False) or backend='reference'")
    A = A.float()
    D = D.float() if D is not None else None
    bias = dt_proj_bias.float() if dt_proj_bias is not None else None
    args = (in_proj_weight, in_proj_bias, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, bias,
            out_proj_weight, out_proj_bias, A, D, seq_idx)
    if hidden.dtype == torch.float16 or (torch.is_autocast_enabled(hidden.device.type)
                                         and torch.get_autocast_dtype(hidden.device.type) == torch.float16):
        # u * dt_old / dt_new can underflow fp16 and dt_new overflow it (bf16 and fp32 share fp32's exponent
        # range): run in fp32, as ops/fused.py selective_scan does
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            y = _Mamba1Inner.apply(hidden.float(), *(a.float() if torch.is_tensor(a) and a.is_floating_point()
                                                      else a for a in args))
        return y.to(torch.float16)
    return _Mamba1Inner.apply(hidden, *args)


__all__ = ["mamba1_inner", "StaticPacking", "static_packing_for", "compile_enabled", "compile_failures"]
