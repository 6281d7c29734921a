"""The Mamba-1 mixer between in_proj and out_proj as one autograd function (the fused backend's `mamba1_inner`):
channel-last causal conv1d + SiLU (seq_idx restarts) -> x_proj -> dt_proj -> selective scan with exact document
resets -> SiLU(z) gate. mamba_ssm's `mamba_inner_fn` is the model; what differs:

- Packed rows. The scan kernel has no reset; the construction of ops/fused.py `selective_scan` (see its docstring)
  is applied here to the R document-start positions only, in place on tensors this function owns, with its
  gradients written by hand in backward: no (B, D, L)-sized index_put copies, no autograd graph around the kernel.
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
- The conv is always causal_conv1d's channel-last path (the only one with seq_idx): x is in_proj's output viewed
  as (B, D, L) with stride(1) == 1, so it goes in without a copy, x_proj reads the conv output as a (B*L, D)
  matrix without a copy, and the conv's dx is written straight into the (B, L, 2D) gradient of in_proj's output.
  The scan wants L-contiguous u and z: one copy each (the only layout copies of the forward).
- in_proj and out_proj stay module calls in the mixer (tensor parallelism / ZeRO-3 see them); the function reads
  conv1d / x_proj / dt_proj weights directly, so TP shards and ZeRO-3 switch it off (Mamba.use_inner_fn).
- checkpoint_lvl=1 as mamba_inner_fn: the conv output and delta are recomputed in backward (and the L-contiguous
  z copy), not saved. Saved: in_proj's output xz, x_dbl, B, C, the scan's chunk states, its pre-gate output, and
  (R, D)-sized tensors for the reset.

Kernel entry points used (signatures of mamba_ssm 2.3.2 / causal_conv1d 1.7.0, read from their C++ bindings):
  selective_scan_cuda.fwd(u, delta, A, B, C, D?, z?, delta_bias?, delta_softplus) -> [out, x, out_z (if z)]
  selective_scan_cuda.bwd(u, delta, A, B, C, D?, z?, delta_bias?, dout, x?, out?, dz?, delta_softplus,
      recompute_out_z) -> [du, ddelta, dA, dB, dC, dD, ddelta_bias, dz (if z), out_z (if recompute_out_z)]
  causal_conv1d.cpp_functions.causal_conv1d_fwd_function(x, weight, bias?, seq_idx?, initial_states?,
      final_states_out?, silu_activation) -> out (torch.empty_like(x))
  causal_conv1d.cpp_functions.causal_conv1d_bwd_function(x, weight, bias?, dout, seq_idx?, initial_states?,
      dfinal_states?, dx?, return_dinitial_states, silu_activation) -> (dx, dweight, dbias, dinitial_states)
Both packages are imported inside the functions (they do not import without CUDA); tests/test_fused_mamba1_cpu.py
runs this module on CPU against emulators of exactly these entry points.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

try:  # torch >= 2.4: device-generic decorators (torch.cuda.amp.custom_fwd is deprecated)
    from torch.amp import custom_bwd, custom_fwd

    _custom_fwd, _custom_bwd = custom_fwd(device_type="cuda"), custom_bwd(device_type="cuda")
except ImportError:  # pragma: no cover
    from torch.cuda.amp import custom_bwd as _custom_bwd, custom_fwd as _custom_fwd


def _fused():
    # imported here, not at module level: ops/fused.py re-exports mamba1_inner from this module
    from . import fused
    return fused


def _rows(x: Tensor, b: Tensor, t: Tensor) -> Tensor:
    """(R, D) values of a (B, D, L) tensor at the start positions (b, t)."""
    return x[b, :, t]


class _Reset:
    """The reset's per-start state, (R, D) tensors (plus dt_new (D,))."""

    def __init__(self, b, t, u_r, u_new, pre, dt_new, v):
        self.b, self.t, self.u_r, self.u_new, self.pre, self.dt_new, self.v = b, t, u_r, u_new, pre, dt_new, v

    def tensors(self):
        return self.b, self.t, self.u_r, self.u_new, self.pre, self.dt_new, self.v


def _reset_inputs_(u: Tensor, delta: Tensor, A: Tensor, bias: Optional[Tensor], b: Tensor, t: Tensor) -> _Reset:
    """Rewrite u and delta in place at the starts (module docstring); returns what backward needs."""
    fused = _fused()
    dtype = u.dtype
    # per-channel reset dt: 200 / min_n |A[d, n]|, at least 64 (> the kernel's softplus threshold 20), finite
    A_min = A.abs().amin(-1).clamp_min(1e-30)
    dt_new = (fused._RESET_DT_A / A_min).clamp(min=fused._RESET_DT_MIN, max=1e30)
    if bias is not None:
        v = (dt_new - bias).to(dtype)
        dt_new = v.float() + bias  # the kernel's own fp32 arithmetic (softplus passes values > 20 through)
    else:
        v = dt_new.to(dtype)
        dt_new = v.float()
    u_r = _rows(u, b, t)
    pre = _rows(delta, b, t).float()
    if bias is not None:
        pre = pre + bias
    dt_old = F.softplus(pre)  # threshold 20, as the kernel's softplus
    u_new = (u_r.float() * (dt_old / dt_new)).to(dtype)
    u[b, :, t] = u_new
    delta[b, :, t] = v.expand_as(u_new)
    return _Reset(b, t, u_r, u_new, pre, dt_new, v)


def _reapply_(u: Tensor, delta: Tensor, rs: _Reset) -> None:
    """The same rewrite on the recomputed u and delta in backward (bit-identical to the forward's)."""
    u[rs.b, :, rs.t] = rs.u_new
    delta[rs.b, :, rs.t] = rs.v.expand_as(rs.u_new)


class _Mamba1Inner(torch.autograd.Function):

    @staticmethod
    @_custom_fwd
    def forward(ctx, xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D, seq_idx):
        import selective_scan_cuda
        from causal_conv1d.cpp_functions import causal_conv1d_fwd_function

        dev = xz.device.type
        # as mamba_inner_fn: the matmul weights in the autocast dtype (and xz, which in_proj under autocast
        # already is), so that u, delta, B, C and z share the one input dtype the scan kernel accepts
        dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else xz.dtype
        xz, x_proj_weight, dt_proj_weight = xz.to(dt), x_proj_weight.to(dt), dt_proj_weight.to(dt)
        if xz.stride(-1) != 1:
            xz = xz.contiguous()
        Bsz, L, two_d = xz.shape
        d = two_d // 2
        r, N = dt_proj_weight.shape[1], A.shape[1]
        conv_w = conv_weight.reshape(d, conv_weight.shape[-1])
        x_cl = xz[..., :d].transpose(1, 2)  # (B, D, L) channel-last view of in_proj's output
        seq32 = seq_idx.to(torch.int32).contiguous() if seq_idx is not None else None

        conv = causal_conv1d_fwd_function(x_cl, conv_w, conv_bias, seq32, None, None, True)  # channel-last
        x_dbl = F.linear(conv.transpose(1, 2).reshape(Bsz * L, d), x_proj_weight)  # (B*L, r + 2N)
        Bm, Cm = _bc(x_dbl, Bsz, L, r, N)
        u, delta, z = _scan_inputs(conv, x_dbl, dt_proj_weight, xz, Bsz, L, d, r)

        rs = None
        if seq32 is not None:
            b_idx, t_idx = _fused()._doc_starts(seq_idx)  # cached per seq_idx object: one host sync per batch
            if b_idx.numel():
                rs = _reset_inputs_(u, delta, A, dt_proj_bias, b_idx, t_idx)
        out, scan_x, out_z = selective_scan_cuda.fwd(u, delta, A, Bm, Cm, D, z, dt_proj_bias, True)[:3]
        if rs is not None and D is not None:  # the skip term D u at the starts (without D nothing to correct)
            b_idx, t_idx = rs.b, rs.t
            out_r = _rows(out, b_idx, t_idx).float() + D * (rs.u_r.float() - rs.u_new.float())
            out[b_idx, :, t_idx] = out_r.to(out.dtype)  # the pre-gate output the backward's dz reads
            out_z[b_idx, :, t_idx] = (out_r * F.silu(_rows(z, b_idx, t_idx).float())).to(out_z.dtype)

        ctx.has_reset = rs is not None
        ctx.dims = (Bsz, L, d, r, N)
        ctx.save_for_backward(xz, conv_w, conv_bias, x_dbl, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D,
                              Bm, Cm, scan_x, out, seq32, *(rs.tensors() if rs is not None else ()))
        ctx.conv_weight_shape = conv_weight.shape
        return out_z.transpose(1, 2)  # (B, L, D) for out_proj

    @staticmethod
    @_custom_bwd
    def backward(ctx, dy):
        import selective_scan_cuda
        from causal_conv1d.cpp_functions import causal_conv1d_bwd_function, causal_conv1d_fwd_function

        (xz, conv_w, conv_bias, x_dbl, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D, Bm, Cm, scan_x, out,
         seq32, *rest) = ctx.saved_tensors
        Bsz, L, d, r, N = ctx.dims
        x_cl = xz[..., :d].transpose(1, 2)
        # recompute (checkpoint_lvl=1): conv output, delta, the L-contiguous u and z, and the reset rewrite
        conv = causal_conv1d_fwd_function(x_cl, conv_w, conv_bias, seq32, None, None, True)
        u, delta, z = _scan_inputs(conv, x_dbl, dt_proj_weight, xz, Bsz, L, d, r)
        rs = _Reset(*rest) if ctx.has_reset else None
        if rs is not None:
            _reapply_(u, delta, rs)
        dout = dy.transpose(1, 2).contiguous()  # (B, D, L), L-contiguous as the kernel wants
        du, ddelta, dA, dB, dC, dD, ddelta_bias, dz = selective_scan_cuda.bwd(
            u, delta, A, Bm, Cm, D, z, dt_proj_bias, dout, scan_x, out, None, True, False)[:8]

        if rs is not None:
            b_idx, t_idx = rs.b, rs.t
            g = _rows(dout, b_idx, t_idx).float() * F.silu(_rows(z, b_idx, t_idx).float())  # d L / d out (pre-gate)
            du_new = _rows(du, b_idx, t_idx).float()
            u_r = rs.u_r.float()
            if D is not None:
                du_new = du_new - D * g
            dt_old = F.softplus(rs.pre)
            du_r = du_new * (dt_old / rs.dt_new)
            if D is not None:
                du_r = du_r + D * g
                dD = dD + (g * (u_r - rs.u_new.float())).sum(0)
            softplus_grad = torch.where(rs.pre > 20.0, 1.0, torch.sigmoid(rs.pre))
            ddelta_r = du_new * u_r / rs.dt_new * softplus_grad
            if ddelta_bias is not None:
                ddelta_bias = ddelta_bias + (ddelta_r - _rows(ddelta, b_idx, t_idx).float()).sum(0)
            du[b_idx, :, t_idx] = du_r.to(du.dtype)
            ddelta[b_idx, :, t_idx] = ddelta_r.to(ddelta.dtype)

        dxz = torch.empty_like(xz)
        dxz[..., d:].copy_(dz.transpose(1, 2))
        ddelta_m = ddelta.transpose(0, 1).reshape(d, Bsz * L)  # ddelta has delta's (D, B, L)-major layout: a view
        dt_low = x_dbl[:, :r]
        d_dt_proj_weight = ddelta_m @ dt_low
        dx_dbl = torch.empty_like(x_dbl)
        dx_dbl[:, :r] = ddelta_m.t() @ dt_proj_weight
        dx_dbl[:, r:r + N] = dB.view(Bsz, N, L).transpose(1, 2).reshape(Bsz * L, N)
        dx_dbl[:, r + N:] = dC.view(Bsz, N, L).transpose(1, 2).reshape(Bsz * L, N)
        conv_m = conv.transpose(1, 2).reshape(Bsz * L, d)
        d_x_proj_weight = dx_dbl.t() @ conv_m
        dconv = (dx_dbl @ x_proj_weight).view(Bsz, L, d)
        dconv.add_(du.transpose(1, 2))
        _, dconv_w, dconv_b, _ = causal_conv1d_bwd_function(
            x_cl, conv_w, conv_bias, dconv.transpose(1, 2), seq32, None, None, dxz[..., :d].transpose(1, 2),
            False, True)
        return (dxz, dconv_w.reshape(ctx.conv_weight_shape), dconv_b, d_x_proj_weight, d_dt_proj_weight,
                ddelta_bias, dA, dD, None)


def _bc(x_dbl: Tensor, Bsz: int, L: int, r: int, N: int):
    """B and C as the kernel's (B, 1, N, L) L-contiguous tensors."""
    Bm = x_dbl[:, r:r + N].view(Bsz, L, 1, N).permute(0, 2, 3, 1).contiguous()
    Cm = x_dbl[:, r + N:].view(Bsz, L, 1, N).permute(0, 2, 3, 1).contiguous()
    return Bm, Cm


def _scan_inputs(conv: Tensor, x_dbl: Tensor, dt_proj_weight: Tensor, xz: Tensor, Bsz: int, L: int, d: int, r: int):
    """u (the conv output), delta (dt_proj without its bias, which goes in as delta_bias) and z, each (B, D, L) with
    stride(-1) == 1. delta comes out of the matmul (D, B*L)-major: a free view, as in mamba_inner_fn."""
    u = conv.contiguous()
    delta = (dt_proj_weight @ x_dbl[:, :r].t()).view(d, Bsz, L).transpose(0, 1)
    z = xz[..., d:].transpose(1, 2).contiguous()
    return u, delta, z


def mamba1_inner(xz: Tensor, conv_weight: Tensor, conv_bias: Optional[Tensor], x_proj_weight: Tensor,
                 dt_proj_weight: Tensor, dt_proj_bias: Optional[Tensor], A: Tensor, D: Optional[Tensor] = None,
                 seq_idx: Optional[Tensor] = None) -> Tensor:
    """The Mamba-1 mixer between in_proj and out_proj, with exact document resets (see the module docstring).

    xz (B, L, 2 D): in_proj's output (x then z); conv_weight (D, 1, W) or (D, W), W in 2..4; conv_bias (D,);
    x_proj_weight (R + 2 N, D); dt_proj_weight (D, R); dt_proj_bias (D,) (applied before the softplus);
    A (D, N) (negative); D (D,); seq_idx (B, L) non-decreasing document ids or None. Returns y (B, L, D) for
    out_proj: (conv -> x_proj -> dt_proj -> scan + D skip) * silu(z)."""
    d = xz.shape[-1] // 2
    W = conv_weight.shape[-1]
    if d % 8 or not 2 <= W <= 4:
        raise ValueError(f"fused mamba1_inner needs d_inner % 8 == 0 and conv width 2..4, got d_inner={d}, "
                         f"width={W}; use the op-by-op path (Mamba.use_inner_fn=False) or backend='reference'")
    A = A.float()
    D = D.float() if D is not None else None
    bias = dt_proj_bias.float() if dt_proj_bias is not None else None
    if xz.dtype == torch.float16:
        # u * dt_old / dt_new can underflow fp16 and dt_new overflow it (bf16 and fp32 share fp32's exponent
        # range): run in fp32, as ops/fused.py selective_scan does
        with torch.autocast(device_type=xz.device.type, enabled=False):
            y = _Mamba1Inner.apply(xz.float(), conv_weight.float(),
                                   conv_bias.float() if conv_bias is not None else None, x_proj_weight.float(),
                                   dt_proj_weight.float(), bias, A, D, seq_idx)
        return y.to(torch.float16)
    return _Mamba1Inner.apply(xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, bias, A, D, seq_idx)


__all__ = ["mamba1_inner"]
