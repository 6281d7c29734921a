"""Pure-PyTorch kernels: the `reference` backend, and the twin every fused kernel is tested against.

Same signatures as `ops/fused.py` (see DESIGN.md). All run on any device, in fp32 or bf16; the scans compute in
fp32 internally and return the input dtype, as mamba_ssm's kernels do.

Packed rows: `seq_idx` (batch, seqlen) int32, non-decreasing, is the document id of each token. Every kernel
restarts its state where seq_idx changes, exactly (decays are set to exactly 0 across a document start and conv
taps that reach into a previous document are zeroed), so each document's output equals running it alone.

No Python loop runs over time steps:
- Mamba-1 (`selective_scan`) solves the linear recurrence h_t = a_t h_{t-1} + b_t, a_t = exp(dt_t A), per
  (channel, state) with a work-efficient (Blelloch) parallel scan, in place inside chunks of CHUNK steps, then the
  same scan over the chunks' boundary states (recursively): O(L) work, O(log L) Python steps. Why not the SSD-style
  segsum inside a chunk: Mamba-1's decay differs per (channel, state), so the (T x T) decay matrix would be
  (B, L, T, D, N) floats, T times the state; and the cheaper exp(cum_t) * exp(-cum_s) factorisation overflows once
  |sum dt*A| over a chunk passes ~88. Products of decays in [0, 1] cannot overflow; a document start sets a_t to
  exactly 0. One autograd node (`_S6`) with a hand-written backward (the reverse recurrence
  G_t = g_t + a_{t+1} G_{t+1}, by the same scan run backwards) keeps only h: one (B, L, D, N) fp32 tensor.
- Mamba-2 (`ssd_scan`) is SSD chunking (mamba_ssm's ssd_minimal / the SSD paper's Listing 1): a masked
  quadratic form inside each chunk from segment sums of log decays (taken in fp64, see `_SegSum`), plus a state
  passed between chunks with the parallel scan above. seq_idx masks the intra-chunk decay matrix, the chunk states,
  the state passing and the state-to-output term.
- Attention (hybrid models' MHA, `attention`): SDPA with a dense mask built from seq_idx (same document, causal).
The `*_sequential` twins are the per-time-step oracles the tests compare against.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

CHUNK = 64  # Mamba-1 scan chunk (a power of two); the scan's Python loop count is 2*log2(CHUNK) per level
# Largest SSD chunk the reference uses. The result does not depend on the chunk (up to rounding): the intra-chunk
# quadratic work grows with it, the state passing shrinks. Measured on CPU (fwd+bwd, L=2048, N=64, 16 heads):
# 64 -> 0.14 s, 256 (mamba_ssm's default, tuned for GPUs) -> 0.37 s; at N=128, 64 and 128 tie.
SSD_CHUNK = 64


# --------------------------------------------------------------------------------------------- helpers


def _no_autocast(fn):
    """Run a kernel with autocast off: under a bf16 autocast region torch would otherwise run its convs, matmuls
    and einsums in bf16, while the kernels promise fp32 compute (as mamba_ssm's do)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        x = next(t for t in (*args, *kwargs.values()) if torch.is_tensor(t))
        with torch.autocast(device_type=x.device.type, enabled=False):
            return fn(*args, **kwargs)

    return wrapper


def doc_start(seq_idx: Tensor) -> Tensor:
    """(B, L) bool: True where a token starts a new document within the row (not at t=0: nothing precedes it)."""
    start = torch.zeros_like(seq_idx, dtype=torch.bool)
    start[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    return start


def _blelloch_(a: Tensor, x: Tensor, reverse: bool) -> None:
    """In place along dim 2 of (B, C, T, R) tensors, T a power of two. Forward: afterwards x[:, :, t] is the state
    h_t of h_t = a_t h_{t-1} + x_t started from zero in each chunk, and a[:, :, t] = prod_{s<=t} a_s.
    Reverse: h_t = a_t h_{t+1} + x_t started from zero after each chunk's end, a[:, :, t] = prod_{s>=t} a_s."""
    T = x.shape[2]
    levels = T.bit_length() - 1
    # up-sweep: in each pair the later (forward) / earlier (reverse) element absorbs the other; recurse on it
    recv, donor = (0, 1) if reverse else (1, 0)
    av, xv = a, x
    for _ in range(levels):
        av, xv = av.unflatten(2, (-1, 2)), xv.unflatten(2, (-1, 2))
        xv[:, :, :, recv].addcmul_(av[:, :, :, recv], xv[:, :, :, donor])
        av[:, :, :, recv].mul_(av[:, :, :, donor])
        av, xv = av[:, :, :, recv], xv[:, :, :, recv]
    # down-sweep: the elements at odd multiples of 2^k (forward: block ends; reverse: block starts) hold a segment of
    # length 2^k; combine each with the full prefix (suffix) of its neighbouring block, known from the level above
    for k in range(levels - 2, -1, -1):
        step = 1 << k
        if not reverse:
            av = a[:, :, step - 1::step].unflatten(2, (-1, 2))
            xv = x[:, :, step - 1::step].unflatten(2, (-1, 2))
            xv[:, :, 1:, 0].addcmul_(av[:, :, 1:, 0], xv[:, :, :-1, 1])
            av[:, :, 1:, 0].mul_(av[:, :, :-1, 1])
        else:
            av = a[:, :, ::step].unflatten(2, (-1, 2))
            xv = x[:, :, ::step].unflatten(2, (-1, 2))
            xv[:, :, :-1, 1].addcmul_(av[:, :, :-1, 1], xv[:, :, 1:, 0])
            av[:, :, :-1, 1].mul_(av[:, :, 1:, 0])


def _buffers(like: Tensor, Bsz: int, L: int, R: int) -> tuple:
    """Uninitialised scan buffers (A, X) of shape (B, L', R), L' = L rounded up to whole chunks, and the chunk T."""
    T = min(CHUNK, 1 << max(L - 1, 0).bit_length())
    Lp = -(-L // T) * T
    return like.new_empty(Bsz, Lp, R), like.new_empty(Bsz, Lp, R), T


def _scan_(A: Tensor, X: Tensor, T: int, reverse: bool = False) -> Tensor:
    """The scan in place on (B, L', R) buffers from _buffers (decays in A, inputs in X; padded steps hold a=1, b=0,
    after the data, harmless). Returns X, now the states."""
    Bsz, Lp, R = X.shape
    nc = Lp // T
    A, X = A.view(Bsz, nc, T, R), X.view(Bsz, nc, T, R)
    _blelloch_(A, X, reverse)
    if nc > 1:
        # carry between chunks: the same recurrence over chunks (chunk decay, chunk-local boundary state)
        if not reverse:
            ends = _scan(A[:, :-1, -1], X[:, :-1, -1])  # full states at the ends of chunks 0 .. nc-2
            X[:, 1:].addcmul_(A[:, 1:], ends[:, :, None])
        else:
            starts = _scan(A[:, 1:, 0], X[:, 1:, 0], reverse=True)  # full states at the starts of chunks 1 ..
            X[:, :-1].addcmul_(A[:, :-1], starts[:, :, None])
    return X.view(Bsz, Lp, R)


def _scan(a: Tensor, b: Tensor, reverse: bool = False, shift_a: bool = False) -> Tensor:
    """h_t = a_t h_{t-1} + b_t (reverse: h_t = a_t h_{t+1} + b_t) along dim 1 of (B, L, R) fp32 tensors, from a zero
    state. shift_a uses a_{t+1} in place of a_t (the backward pass's recurrence). Inputs are not modified."""
    Bsz, L, R = b.shape
    A, X, T = _buffers(b, Bsz, L, R)
    n = L - 1 if shift_a else L
    A[:, :n].copy_(a[:, L - n:])
    A[:, n:].fill_(1.0)
    X[:, :L].copy_(b)
    X[:, L:].zero_()
    return _scan_(A, X, T, reverse)[:, :L]


class _LinearScan(torch.autograd.Function):
    """h_t = exp(log_a_t) * h_{t-1} + b_t (decay exactly 0 where reset), (B, L, R) fp32."""

    @staticmethod
    def forward(ctx, log_a, b, reset):
        a = torch.exp(log_a)
        if reset is not None:
            a.masked_fill_(reset[:, :, None], 0.0)
        h = _scan(a, b)
        ctx.save_for_backward(a, h)
        return h

    @staticmethod
    def backward(ctx, g):
        a, h = ctx.saved_tensors
        # G_t = dL/dh_t (total) = g_t + a_{t+1} G_{t+1}: the same recurrence, backwards in time
        G = _scan(a, g, reverse=True, shift_a=True)
        d_log_a = torch.empty_like(G)  # = G_t h_{t-1} a_t (h_{-1} = 0); a reset step has a_t = 0
        d_log_a[:, 0] = 0
        torch.mul(G[:, 1:], h[:, :-1], out=d_log_a[:, 1:])
        d_log_a[:, 1:].mul_(a[:, 1:])
        return d_log_a, G, None


def linear_scan(log_a: Tensor, b: Tensor, reset: Optional[Tensor] = None) -> Tensor:
    """Differentiable h_t = exp(log_a_t) * h_{t-1} + b_t along dim 1 of (B, L, R) tensors (computed in fp32);
    `reset` (B, L) bool sets the decay into step t to exactly 0 (a document start)."""
    return _LinearScan.apply(log_a.float(), b.float(), reset)


# --------------------------------------------------------------------------------------------- conv


@_no_autocast
def causal_conv1d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, seq_idx: Optional[Tensor] = None,
                  activation: Optional[str] = None) -> Tensor:
    """Depthwise causal conv: out[:, c, t] = bias[c] + sum_j weight[c, W-1-j] * x[:, c, t-j], where taps with
    t-j < 0 or in a previous document (seq_idx[t-j] != seq_idx[t]) are zero. x (B, C, L), weight (C, W).

    torch's depthwise conv does the bulk; the few outputs whose window reaches into a previous document (the first
    W-1 tokens of each later document) are then recomputed from their own document's taps and written over it."""
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"causal_conv1d: activation must be None or 'silu', got {activation!r}")
    dtype = x.dtype
    C, W = weight.shape
    L = x.shape[-1]
    xf, w = x.float(), weight.float()
    bf = bias.float() if bias is not None else None
    out = F.conv1d(xf, w[:, None, :], bf, padding=W - 1, groups=C)[..., :L]
    if seq_idx is not None and W > 1:
        t = torch.arange(L, device=x.device)
        start = torch.where(doc_start(seq_idx), t, 0).cummax(dim=1).values  # first token of each token's document
        pos = t - start  # position within the document
        bi, ti = ((pos < W - 1) & (start > 0)).nonzero(as_tuple=True)
        if bi.numel():
            j = torch.arange(W, device=x.device)  # tap offset: x[t - j] * weight[:, W-1-j]
            cols = (ti[:, None] - j).clamp(min=0)  # (K, W)
            valid = j <= pos[bi, ti][:, None]  # (K, W): taps inside the token's own document
            taps = xf[bi[:, None], :, cols] * valid[..., None]  # (K, W, C)
            vals = (taps * w.flip(-1).t()).sum(1)
            if bf is not None:
                vals = vals + bf
            out = out.transpose(1, 2).index_put((bi, ti), vals).transpose(1, 2)
    if activation is not None:
        out = F.silu(out)
    return out.to(dtype)


def causal_conv1d_sequential(x, weight, bias=None, seq_idx=None, activation=None):
    """Oracle: one output step at a time, each from the window of its own document."""
    B, C, L = x.shape
    W = weight.shape[-1]
    out = torch.empty(B, C, L, dtype=torch.float32, device=x.device)
    for b in range(B):
        for t in range(L):
            acc = torch.zeros(C, dtype=torch.float32, device=x.device) if bias is None else bias.float().clone()
            for j in range(W):
                s = t - j
                if s < 0 or (seq_idx is not None and seq_idx[b, s] != seq_idx[b, t]):
                    break
                acc = acc + weight[:, W - 1 - j].float() * x[b, :, s].float()
            out[b, :, t] = acc
    if activation is not None:
        out = F.silu(out)
    return out.to(x.dtype)


# --------------------------------------------------------------------------------------------- Mamba-1


def _dt(delta: Tensor, bias: Optional[Tensor], softplus: bool) -> Tensor:
    dt = delta.float()
    if bias is not None:
        dt = dt + bias.float()
    return F.softplus(dt) if softplus else dt


class _S6(torch.autograd.Function):
    """y_t = C_t . h_t with h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t (decay 0 where reset), time-major fp32:
    dt, u (B, L, D), A (D, N), Bm, Cm (B, L, N) -> y (B, L, D).

    One autograd node with a hand-written backward, so that only the states h (one (B, L, D, N) tensor) are kept
    (the decays are recomputed, one exp pass), and decays and inputs are written straight into the scan's buffers:
      G_t = C_t gy_t + a_{t+1} G_{t+1}  (dL/dh_t),   dlog_a_t = G_t h_{t-1} a_t,
      ddt = sum_n dlog_a A + u sum_n G B,  du = dt sum_n G B,  dA = sum_{b,t} dlog_a dt,
      dB = sum_d G dt u,  dC = sum_d gy h."""

    @staticmethod
    def _decay(out, dt, A, reset):
        """exp(dt A) (0 at a reset) into out (B, L, D, N)."""
        torch.mul(dt[..., None], A, out=out).exp_()
        if reset is not None:
            out.masked_fill_(reset[:, :, None, None], 0.0)
        return out

    @staticmethod
    def forward(ctx, dt, u, A, Bm, Cm, reset):
        Bsz, L, Dm = dt.shape
        N = A.shape[-1]
        Ab, Xb, T = _buffers(dt, Bsz, L, Dm * N)
        _S6._decay(Ab[:, :L].view(Bsz, L, Dm, N), dt, A, reset)
        Ab[:, L:].fill_(1.0)
        torch.mul((dt * u)[..., None], Bm[:, :, None, :], out=Xb[:, :L].view(Bsz, L, Dm, N))
        Xb[:, L:].zero_()
        h = _scan_(Ab, Xb, T)[:, :L].view(Bsz, L, Dm, N)
        del Ab
        ctx.save_for_backward(dt, u, A, Bm, Cm, h, reset)
        return (h @ Cm[..., None]).squeeze(-1)

    @staticmethod
    def backward(ctx, gy):
        dt, u, A, Bm, Cm, h, reset = ctx.saved_tensors
        Bsz, L, Dm, N = h.shape
        gy = gy.contiguous()
        a = _S6._decay(torch.empty_like(h), dt, A, reset)
        Ab, Xb, T = _buffers(dt, Bsz, L, Dm * N)
        Ab[:, :L - 1].copy_(a[:, 1:].view(Bsz, L - 1, Dm * N))  # G's recurrence uses a_{t+1}
        Ab[:, L - 1:].fill_(1.0)
        torch.mul(gy[..., None], Cm[:, :, None, :], out=Xb[:, :L].view(Bsz, L, Dm, N))
        Xb[:, L:].zero_()
        # reverse scan: zero beyond L; the whole padded buffer keeps the (B * L', D, N) views below copy-free
        Gp = _scan_(Ab, Xb, T, reverse=True)
        del Ab
        Lp = Gp.shape[1]
        Gp = Gp.view(Bsz, Lp, Dm, N)
        G = Gp[:, :L]
        dC = (gy[:, :, None, :] @ h).squeeze(-2)
        GB = (G @ Bm[..., None]).squeeze(-1)  # (B, L, D)
        dB = ((dt * u)[:, :, None, :] @ G).squeeze(-2)
        # G becomes dlog_a in place: G_t h_{t-1} a_t, 0 at t = 0 (and 0 in the padding)
        G[:, 1:].mul_(h[:, :-1]).mul_(a[:, 1:])
        G[:, 0] = 0
        del a
        dla = Gp.view(Bsz * Lp, Dm, N).transpose(0, 1)  # (D, B*L', N) strided view
        d_dt = torch.bmm(dla, A[:, :, None]).view(Dm, Bsz, Lp)[:, :, :L].permute(1, 2, 0) + GB * u
        dt_p = F.pad(dt, (0, 0, 0, Lp - L)).view(Bsz * Lp, Dm)
        dA = torch.bmm(dt_p.t()[:, None, :], dla).squeeze(1)
        return d_dt, GB * dt, dA, dB, dC, None


@_no_autocast
def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                   z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                   seq_idx: Optional[Tensor] = None) -> Tensor:
    """Mamba-1 selective scan (mamba_ssm's selective_scan_fn with input-dependent B, C).
    u, delta, z (B, D, L); A (D, N) fp32; B, C (B, N, L); D, delta_bias (D,). Returns (B, D, L) in u's dtype.
      dt = softplus(delta + delta_bias); h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t; y_t = C_t h_t + D u_t;
      out = y * silu(z)."""
    dtype = u.dtype
    # time-major (B, L, D): the (B, L, D, N) state tensors are then contiguous per time step
    uf = u.float().transpose(1, 2).contiguous()
    dt = _dt(delta.transpose(1, 2).contiguous(), delta_bias, delta_softplus)
    reset = doc_start(seq_idx) if seq_idx is not None else None
    y = _S6.apply(dt, uf, A.float(), B.float().transpose(1, 2).contiguous(), C.float().transpose(1, 2).contiguous(),
                  reset)
    if D is not None:
        y = y + uf * D.float()
    if z is not None:
        y = y * F.silu(z.float().transpose(1, 2))
    return y.transpose(1, 2).to(dtype)


def selective_scan_sequential(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                              seq_idx=None):
    """Oracle: the recurrence one time step at a time (mamba_ssm's selective_scan_ref), state zeroed at starts."""
    dtype = u.dtype
    u, B, C = u.float(), B.float(), C.float()
    dt = _dt(delta.transpose(1, 2), delta_bias, delta_softplus).transpose(1, 2)  # (B, D, L)
    A = A.float()
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[-1]):
        if seq_idx is not None and t > 0:
            keep = (seq_idx[:, t] == seq_idx[:, t - 1]).float()[:, None, None]
            h = h * keep
        h = torch.exp(dt[:, :, t, None] * A) * h + (dt[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
        ys.append((h * C[:, None, :, t]).sum(-1))
    y = torch.stack(ys, -1)
    if D is not None:
        y = y + u * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(dtype)


# --------------------------------------------------------------------------------------------- Mamba-2 (SSD)


class _SegSum(torch.autograd.Function):
    """(..., T) inclusive cumsums of log decays -> (..., T, T): out[..., t, s] = cum_t - cum_s = sum_{s<r<=t} log_a_r.
    The difference is taken in fp64 and rounded once to fp32, so its error is relative to the segment's own sum
    (as a direct segment sum would be), not to the size of the cumsums, at a fraction of the cost of a masked
    (T, T) cumsum. Backward: d cum_t = sum_s g[t, s] - sum_s g[s, t]."""

    @staticmethod
    def forward(ctx, cum):
        c = cum.double()
        return (c[..., :, None] - c[..., None, :]).to(cum.dtype)

    @staticmethod
    def backward(ctx, g):
        return g.sum(-1) - g.sum(-2)


def _pad_time(t: Tensor, pad: int) -> Tensor:
    if not pad:
        return t
    return F.pad(t, [0, 0] * (t.dim() - 2) + [0, pad])


@_no_autocast
def ssd_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int, D: Optional[Tensor] = None,
             z: Optional[Tensor] = None, dt_bias: Optional[Tensor] = None, dt_softplus: bool = False,
             seq_idx: Optional[Tensor] = None, dt_limit=(0.0, float("inf"))) -> Tensor:
    """Mamba-2 SSD scan (mamba_ssm's mamba_chunk_scan_combined).
    x (B, L, H, P), dt (B, L, H), A (H,), B, C (B, L, G, N), D (H,) or (H, P), z (B, L, H, P), dt_bias (H,).
      dt = clamp(softplus(dt + dt_bias), dt_limit); h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T (per head);
      y_t = h_t C_t + D x_t; out = y * silu(z). Returns (B, L, H, P) in x's dtype."""
    dtype = x.dtype
    Bsz, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    E = H // G  # heads per group
    T = min(chunk_size, SSD_CHUNK, L)  # see SSD_CHUNK; never longer than the sequence
    xf = x.float()
    dt = _dt(dt, dt_bias, dt_softplus)
    if tuple(dt_limit) != (0.0, float("inf")):
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    pad = (-L) % T
    nc = (L + pad) // T
    # padded steps carry dt = 0: no decay, no input, after the data
    log_a = _pad_time(dt * A.float(), pad).view(Bsz, nc, T, H)
    xdt = _pad_time(xf * dt[..., None], pad).view(Bsz, nc, T, G, E, P)
    Bc = _pad_time(B.float(), pad).view(Bsz, nc, T, G, N)
    Cc = _pad_time(C.float(), pad).view(Bsz, nc, T, G, N)
    if seq_idx is not None:
        s = torch.cat([seq_idx, seq_idx[:, -1:].expand(Bsz, pad)], 1) if pad else seq_idx
        s = s.view(Bsz, nc, T)
    cum = log_a.cumsum(2)  # (B, c, T, H)

    # 1. within chunks: y_l = sum_{s<=l, same doc} (C_l . B_s) exp(sum_{s<r<=l} log_a_r) xdt_s
    seg = _SegSum.apply(cum.permute(0, 1, 3, 2))  # (B, c, H, T, T); above the diagonal masked below
    keep = torch.ones(T, T, device=x.device, dtype=torch.bool).tril()  # causal
    if seq_idx is not None:
        keep = keep & (s[:, :, :, None] == s[:, :, None, :])[:, :, None]  # and same document
    decay = torch.exp(seg.masked_fill(~keep, -math.inf)).view(Bsz, nc, G, E, T, T)
    CB = torch.einsum("bclgn,bcsgn->bcgls", Cc, Bc)
    y = torch.einsum("bcgels,bcsgep->bclgep", CB[:, :, :, None] * decay, xdt)

    if nc > 1:
        # 2. each chunk's own state at its end (only tokens of the document the chunk ends in)
        to_end = torch.exp(cum[:, :, -1:] - cum)  # (B, c, T, H)
        if seq_idx is not None:
            to_end = to_end * (s == s[:, :, -1:])[..., None]
        states = torch.einsum("bclgn,bclgep->bcgepn", Bc, xdt * to_end.view(Bsz, nc, T, G, E, 1))
        # 3. pass states between chunks: S_c = exp(chunk decay) S_{c-1} + states_c, 0 across a document start
        reset = (s[:, 1:, -1] != s[:, :-1, -1]) if seq_idx is not None else None
        chunk_log_a = cum[:, :-1, -1].reshape(Bsz, nc - 1, G, E, 1, 1).expand(-1, -1, -1, -1, P, N)
        R = G * E * P * N
        ends = linear_scan(chunk_log_a.reshape(Bsz, nc - 1, R), states[:, :-1].reshape(Bsz, nc - 1, R),
                           F.pad(reset, (1, 0), value=False)[:, :-1] if reset is not None else None)
        ends = ends.view(Bsz, nc - 1, G, E, P, N)  # state at the end of chunks 0 .. nc-2
        # 4. state entering chunk c -> outputs of chunk c, decayed to each position, same document only
        from_start = torch.exp(cum[:, 1:])  # (B, c-1, T, H)
        if seq_idx is not None:
            from_start = from_start * (s[:, 1:] == s[:, :-1, -1:])[..., None]
        y_off = torch.einsum("bclgn,bcgepn->bclgep", Cc[:, 1:], ends) * from_start.view(Bsz, nc - 1, T, G, E, 1)
        y = torch.cat([y[:, :1], y[:, 1:] + y_off], 1)

    y = y.reshape(Bsz, nc * T, H, P)[:, :L]
    if D is not None:
        y = y + xf * (D.float()[:, None] if D.dim() == 1 else D.float())
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(dtype)


def ssd_scan_sequential(x, dt, A, B, C, chunk_size=None, D=None, z=None, dt_bias=None, dt_softplus=False,
                        seq_idx=None, dt_limit=(0.0, float("inf"))):
    """Oracle: the Mamba-2 recurrence one time step at a time, state zeroed at document starts."""
    dtype = x.dtype
    Bsz, L, H, P = x.shape
    G = B.shape[2]
    xf = x.float()
    dt = _dt(dt, dt_bias, dt_softplus)
    if tuple(dt_limit) != (0.0, float("inf")):
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    Bh = B.float().repeat_interleave(H // G, dim=2)  # (B, L, H, N)
    Ch = C.float().repeat_interleave(H // G, dim=2)
    h = xf.new_zeros(Bsz, H, P, B.shape[3])
    ys = []
    for t in range(L):
        if seq_idx is not None and t > 0:
            h = h * (seq_idx[:, t] == seq_idx[:, t - 1]).float()[:, None, None, None]
        h = torch.exp(dt[:, t] * A.float())[..., None, None] * h \
            + (dt[:, t, :, None] * xf[:, t])[..., None] * Bh[:, t, :, None, :]
        ys.append((h * Ch[:, t, :, None, :]).sum(-1))
    y = torch.stack(ys, 1)
    if D is not None:
        y = y + xf * (D.float()[:, None] if D.dim() == 1 else D.float())
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(dtype)


# --------------------------------------------------------------------------------------------- norm


@_no_autocast
def rms_norm_gated(x: Tensor, z: Optional[Tensor], weight: Tensor, eps: float, group_size: Optional[int] = None,
                   norm_before_gate: bool = False) -> Tensor:
    """mamba_ssm's gated RMSNorm (layernorm_gated.rms_norm_ref, upcast): with norm_before_gate=False,
    out = rmsnorm_per_group(x * silu(z)) * weight; the statistics are per group of `group_size` channels."""
    dtype = x.dtype
    xf = x.float()
    if z is not None and not norm_before_gate:
        xf = xf * F.silu(z.float())
    D = xf.shape[-1]
    gs = D if group_size is None else group_size
    if D % gs:
        raise ValueError(f"rms_norm_gated: group_size {gs} does not divide the last dimension {D}")
    xg = xf.unflatten(-1, (D // gs, gs))
    out = (xg * torch.rsqrt(xg.square().mean(-1, keepdim=True) + eps)).flatten(-2) * weight.float()
    if z is not None and norm_before_gate:
        out = out * F.silu(z.float())
    return out.to(dtype)


def add_norm(x: Tensor, residual: Optional[Tensor], weight: Tensor, bias: Optional[Tensor], eps: float,
             residual_in_fp32: bool = False, is_rms_norm: bool = True) -> tuple[Tensor, Tensor]:
    """residual_out = x + residual (cast to fp32 when residual_in_fp32), then RMSNorm (or LayerNorm with
    is_rms_norm=False) of it in fp32, times weight (+ bias); the output in the weight's dtype.
    Returns (normed, residual_out): mamba_ssm's layer_norm_fn(..., prenorm=True) (layer_norm_ref)."""
    residual_out = x + residual if residual is not None else x
    if residual_in_fp32:
        residual_out = residual_out.float()
    rf = residual_out.float()
    if is_rms_norm:
        out = rf * torch.rsqrt(rf.square().mean(-1, keepdim=True) + eps) * weight.float()
        if bias is not None:
            out = out + bias.float()
    else:
        out = F.layer_norm(rf, rf.shape[-1:], weight.float(), bias.float() if bias is not None else None, eps)
    return out.to(weight.dtype), residual_out


# --------------------------------------------------------------------------------------------- attention


def document_mask(seq_idx: Optional[Tensor], seqlen: int, causal: bool, device=None) -> Optional[Tensor]:
    """(B, 1, L, L) bool, True where query t may attend to key s: same document (seq_idx equal) and, if causal,
    s <= t. None when there is nothing to mask (no seq_idx and not causal)."""
    mask = None
    if causal:
        mask = torch.ones(seqlen, seqlen, dtype=torch.bool, device=device).tril()[None, None]
    if seq_idx is not None:
        same = (seq_idx[:, :, None] == seq_idx[:, None, :])[:, None]
        mask = same if mask is None else same & mask
    return mask


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, seq_idx: Optional[Tensor] = None, causal: bool = True,
                   softmax_scale: Optional[float] = None) -> Tensor:
    """F.scaled_dot_product_attention in the inputs' dtype, with the document mask as a dense boolean mask.
    q (B, L, H, Dh), k and v (B, L, Hkv, Dh) with Hkv | H (query head h reads kv head h // (H / Hkv)) ->
    (B, L, H, Dh). Every query keeps at least itself, so no row of the mask is empty. Without seq_idx a causal
    call takes SDPA's is_causal path (flash / memory-efficient kernels on CUDA)."""
    H, Hkv = q.shape[2], k.shape[2]
    if H != Hkv:
        k = k.repeat_interleave(H // Hkv, dim=2)
        v = v.repeat_interleave(H // Hkv, dim=2)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if seq_idx is None:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, scale=softmax_scale)
    else:
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=document_mask(seq_idx, q.shape[1], causal,
                                                                                 q.device), scale=softmax_scale)
    return out.transpose(1, 2)


@_no_autocast
def attention(q: Tensor, k: Tensor, v: Tensor, seq_idx: Optional[Tensor] = None, causal: bool = True,
              softmax_scale: Optional[float] = None) -> Tensor:
    """Attention with GQA and document masking (see sdpa_attention), computed in fp32, returned in q's dtype."""
    return sdpa_attention(q.float(), k.float(), v.float(), seq_idx, causal, softmax_scale).to(q.dtype)


def attention_sequential(q, k, v, seq_idx=None, causal=True, softmax_scale=None):
    """Per-query oracle: softmax over exactly the keys each query may see, one query at a time (fp64)."""
    Bsz, L, H, Dh = q.shape
    group = H // k.shape[2]
    scale = softmax_scale if softmax_scale is not None else Dh ** -0.5
    out = torch.zeros(Bsz, L, H, Dh, dtype=torch.float64)
    for b in range(Bsz):
        for t in range(L):
            keys = [s for s in range(L) if (not causal or s <= t)
                    and (seq_idx is None or int(seq_idx[b, s]) == int(seq_idx[b, t]))]
            for h in range(H):
                kk, vv = k[b, keys, h // group].double(), v[b, keys, h // group].double()
                w = torch.softmax(kk @ q[b, t, h].double() * scale, dim=0)
                out[b, t, h] = w @ vv
    return out.to(q.dtype)


# --------------------------------------------------------------------------------------------- recurrent step


@_no_autocast
def selective_state_update(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                           D: Optional[Tensor] = None, z: Optional[Tensor] = None, dt_bias: Optional[Tensor] = None,
                           dt_softplus: bool = False) -> Tensor:
    """One recurrent step of the SSM (mamba_ssm's selective_state_update), updating `state` in place.

    state (B, D, N) or (B, H, P, N); x, dt, z (B, D) or (B, H, P); A (D, N) or (H, P, N); B, C (B, N) or
    (B, G, N); D (D,) or (H, P); dt_bias (D,) or (H, P). h = exp(dt A) h + dt B x; y = C.h + D x (* silu(z)).
    -> y like x. Computed in fp32."""
    heads = state.dim() == 4
    if not heads:  # one "head" holding every channel
        state_h, x, dt, A, B, C = state.unsqueeze(1), x.unsqueeze(1), dt.unsqueeze(1), A.unsqueeze(0), \
            B.unsqueeze(1), C.unsqueeze(1)
        D = D.unsqueeze(0) if D is not None else None
        z = z.unsqueeze(1) if z is not None else None
        dt_bias = dt_bias.unsqueeze(0) if dt_bias is not None else None
    else:
        state_h = state
    dtype = x.dtype
    dtf = dt.float() + (dt_bias.float() if dt_bias is not None else 0.0)
    if dt_softplus:
        dtf = F.softplus(dtf)
    H, G = state_h.shape[1], B.shape[1]
    Bh = B.float().repeat_interleave(H // G, dim=1)  # head h reads group h // (H / G)
    Ch = C.float().repeat_interleave(H // G, dim=1)
    xf = x.float()
    new = state_h.float() * torch.exp(dtf.unsqueeze(-1) * A.float()) + (dtf * xf).unsqueeze(-1) * Bh.unsqueeze(2)
    state_h.copy_(new)
    y = (new * Ch.unsqueeze(2)).sum(-1)
    if D is not None:
        y = y + xf * D.float()
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(dtype)
    return y if heads else y.squeeze(1)


from .reference_mamba1 import mamba1_inner  # noqa: E402  (twin of ops/fused_mamba1.py)
