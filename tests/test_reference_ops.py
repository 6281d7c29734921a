"""Chunked / parallel reference kernels (ops.reference) against their per-time-step `*_sequential` oracles:
outputs and input gradients, with and without seq_idx resets; fp32 tight (1e-5 relative, max|a-b|/max|b|),
bf16 loose (inputs rounded to bf16, compared with the fp32 oracle on the same rounded inputs: 2e-2, a few bf16
ulps of the output rounding)."""

import pytest
import torch
import torch.nn.functional as F

from mamba_dist.model.ops import reference as R

FP32_TOL, BF16_TOL = 1e-5, 2e-2


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def random_seq_idx(batch, L, n_docs, gen):
    """Non-decreasing ids with a 1-token document and a mix of lengths."""
    rows = []
    for _ in range(batch):
        cuts = torch.randperm(L - 1, generator=gen)[: n_docs - 1] + 1
        row = torch.zeros(L, dtype=torch.int32)
        for c in cuts.tolist():
            row[c:] += 1
        rows.append(row)
    s = torch.stack(rows)
    s[0, 1:] += 1  # row 0 starts with a 1-token document
    return s


def mamba1_inputs(batch, D, N, L, gen, dtype=torch.float32):
    u = torch.randn(batch, D, L, generator=gen)
    delta = torch.randn(batch, D, L, generator=gen) - 1
    A = -torch.exp(torch.randn(D, N, generator=gen))
    B = torch.randn(batch, N, L, generator=gen)
    C = torch.randn(batch, N, L, generator=gen)
    Dp = torch.randn(D, generator=gen)
    z = torch.randn(batch, D, L, generator=gen)
    bias = torch.randn(D, generator=gen) * 0.5
    cast = lambda t: t.to(dtype)  # noqa: E731
    return dict(u=cast(u), delta=cast(delta), A=A, B=cast(B), C=cast(C), D=Dp, z=cast(z), delta_bias=bias,
                delta_softplus=True)


def mamba2_inputs(batch, L, H, P, G, N, gen, dtype=torch.float32):
    x = torch.randn(batch, L, H, P, generator=gen)
    dt = torch.randn(batch, L, H, generator=gen) - 1
    A = -torch.exp(torch.randn(H, generator=gen))
    B = torch.randn(batch, L, G, N, generator=gen)
    C = torch.randn(batch, L, G, N, generator=gen)
    D = torch.randn(H, generator=gen)
    dt_bias = torch.randn(H, generator=gen) * 0.5
    cast = lambda t: t.to(dtype)  # noqa: E731
    return dict(x=cast(x), dt=cast(dt), A=A, B=cast(B), C=cast(C), D=D, dt_bias=dt_bias, dt_softplus=True)


@pytest.mark.parametrize("L,chunk", [(1, 64), (37, 8), (64, 16), (130, 16)])
@pytest.mark.parametrize("resets", [False, True])
def test_selective_scan_fp32(L, chunk, resets, monkeypatch):
    monkeypatch.setattr(R, "CHUNK", chunk)  # small chunks: several chunks and two levels of the chunk scan
    gen = torch.Generator().manual_seed(L)
    kw = mamba1_inputs(2, 6, 5, L, gen)
    seq_idx = random_seq_idx(2, L, min(5, L), gen) if resets and L > 1 else None
    leaves = {k: v.requires_grad_() for k, v in kw.items() if torch.is_tensor(v)}
    y = R.selective_scan(**kw, seq_idx=seq_idx)
    w = torch.randn(y.shape, generator=gen)
    g1 = torch.autograd.grad((y * w).sum(), list(leaves.values()))
    y0 = R.selective_scan_sequential(**kw, seq_idx=seq_idx)
    g0 = torch.autograd.grad((y0 * w).sum(), list(leaves.values()))
    assert rel_err(y, y0) <= FP32_TOL
    for name, a, b in zip(leaves, g1, g0):
        assert rel_err(a, b) <= FP32_TOL, name


@pytest.mark.parametrize("L,chunk", [(1, 8), (29, 8), (48, 16), (70, 32)])
@pytest.mark.parametrize("resets", [False, True])
def test_ssd_scan_fp32(L, chunk, resets):
    gen = torch.Generator().manual_seed(L)
    kw = mamba2_inputs(2, L, 4, 3, 2, 5, gen)
    kw["z"] = torch.randn(2, L, 4, 3, generator=gen)
    seq_idx = random_seq_idx(2, L, min(6, L), gen) if resets and L > 1 else None
    leaves = {k: v.requires_grad_() for k, v in kw.items() if torch.is_tensor(v)}
    y = R.ssd_scan(**kw, chunk_size=chunk, seq_idx=seq_idx)
    w = torch.randn(y.shape, generator=gen)
    g1 = torch.autograd.grad((y * w).sum(), list(leaves.values()))
    y0 = R.ssd_scan_sequential(**kw, seq_idx=seq_idx)
    g0 = torch.autograd.grad((y0 * w).sum(), list(leaves.values()))
    assert rel_err(y, y0) <= FP32_TOL
    for name, a, b in zip(leaves, g1, g0):
        assert rel_err(a, b) <= FP32_TOL, name


def test_ssd_scan_dt_limit_and_headdim_D():
    gen = torch.Generator().manual_seed(3)
    kw = mamba2_inputs(1, 21, 4, 3, 1, 4, gen)
    kw["D"] = torch.randn(4, 3, generator=gen)
    seq_idx = random_seq_idx(1, 21, 3, gen)
    for lim in [(0.0, float("inf")), (0.05, 0.3)]:
        y = R.ssd_scan(**kw, chunk_size=8, seq_idx=seq_idx, dt_limit=lim)
        y0 = R.ssd_scan_sequential(**kw, seq_idx=seq_idx, dt_limit=lim)
        assert rel_err(y, y0) <= FP32_TOL


@pytest.mark.parametrize("resets", [False, True])
def test_scans_bf16(resets, monkeypatch):
    monkeypatch.setattr(R, "CHUNK", 16)
    gen = torch.Generator().manual_seed(5)
    L = 45
    seq_idx = random_seq_idx(2, L, 4, gen) if resets else None
    kw = mamba1_inputs(2, 8, 4, L, gen, dtype=torch.bfloat16)
    y = R.selective_scan(**kw, seq_idx=seq_idx)
    assert y.dtype == torch.bfloat16
    kw32 = {k: (v.float() if torch.is_tensor(v) else v) for k, v in kw.items()}
    assert rel_err(y, R.selective_scan_sequential(**kw32, seq_idx=seq_idx)) <= BF16_TOL

    kw = mamba2_inputs(2, L, 4, 8, 2, 8, gen, dtype=torch.bfloat16)
    y = R.ssd_scan(**kw, chunk_size=16, seq_idx=seq_idx)
    assert y.dtype == torch.bfloat16
    kw32 = {k: (v.float() if torch.is_tensor(v) else v) for k, v in kw.items()}
    assert rel_err(y, R.ssd_scan_sequential(**kw32, seq_idx=seq_idx)) <= BF16_TOL


def test_selective_scan_extreme_decays_stay_finite(monkeypatch):
    """dt*A summed over a chunk far beyond exp's range (|sum| ~ 1e4): an exp(cumsum) factorisation would give
    inf/nan; products of decays do not."""
    monkeypatch.setattr(R, "CHUNK", 16)
    gen = torch.Generator().manual_seed(7)
    kw = mamba1_inputs(1, 4, 16, 40, gen)
    kw["A"] = -torch.arange(1, 17.0).repeat(4, 1) * 8  # up to -128
    kw["delta"] = kw["delta"] + 6  # dt ~ 5..10
    kw["delta"].requires_grad_()
    y = R.selective_scan(**kw)
    (g,) = torch.autograd.grad(y.sum(), kw["delta"])
    assert torch.isfinite(y).all() and torch.isfinite(g).all()
    assert rel_err(y, R.selective_scan_sequential(**kw)) <= FP32_TOL


@pytest.mark.parametrize("resets", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, FP32_TOL), (torch.bfloat16, BF16_TOL)])
def test_causal_conv1d(resets, dtype, tol):
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 6, 23, generator=gen).to(dtype)
    w = torch.randn(6, 4, generator=gen).to(dtype)
    b = torch.randn(6, generator=gen).to(dtype)
    seq_idx = random_seq_idx(2, 23, 5, gen) if resets else None
    for act in (None, "silu"):
        y = R.causal_conv1d(x, w, b, seq_idx, act)
        y0 = R.causal_conv1d_sequential(x.float(), w.float(), b.float(), seq_idx, act)
        assert y.dtype == dtype and rel_err(y, y0) <= tol
    if seq_idx is None:  # and equals torch's own padded depthwise conv
        ref = F.conv1d(x.float(), w.float()[:, None], b.float(), padding=3, groups=6)[..., :23]
        assert rel_err(R.causal_conv1d(x, w, b), ref) <= tol


def test_causal_conv1d_shorter_than_kernel():
    x, w = torch.randn(1, 3, 2), torch.randn(3, 4)
    assert rel_err(R.causal_conv1d(x, w, None, torch.tensor([[0, 1]], dtype=torch.int32)),
                   R.causal_conv1d_sequential(x, w, None, torch.tensor([[0, 1]], dtype=torch.int32))) <= FP32_TOL


@pytest.mark.parametrize("norm_before_gate", [False, True])
def test_rms_norm_gated(norm_before_gate):
    gen = torch.Generator().manual_seed(2)
    x, z, w = torch.randn(2, 5, 12, generator=gen), torch.randn(2, 5, 12, generator=gen), torch.randn(12, generator=gen)
    out = R.rms_norm_gated(x, z, w, 1e-5, group_size=4, norm_before_gate=norm_before_gate)
    # per group, written out
    expect = torch.empty_like(x)
    for g in range(3):
        sl = slice(4 * g, 4 * g + 4)
        xs = x[..., sl] if norm_before_gate else x[..., sl] * F.silu(z[..., sl])
        n = xs / torch.sqrt(xs.pow(2).mean(-1, keepdim=True) + 1e-5) * w[sl]
        expect[..., sl] = n * F.silu(z[..., sl]) if norm_before_gate else n
    assert rel_err(out, expect) <= FP32_TOL
    with pytest.raises(ValueError, match="group_size"):
        R.rms_norm_gated(x, z, w, 1e-5, group_size=5)
