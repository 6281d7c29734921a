"""CPU check of the fused backend's wrapper logic, with the CUDA kernels replaced by emulators that have the
kernels' semantics and input checks (no resets in the Mamba-1 scan; channel-last layout for the conv with
seq_idx; one input dtype, fp32 A / D / delta_bias).

The Mamba-1 document-reset construction in ops/fused.py (dt override, u rescale, D skip correction, delta_bias
gradient cancellation) is pure algebra around the kernel; here it is checked exactly against the reference's true
resets in fp32, forward and every input gradient, so CI catches a regression without a GPU. The real kernels are
checked the same way in tests/test_gpu_fused.py (through the device tool)."""

import sys
import types

import pytest
import torch

from mamba_dist.model.ops import fused, reference as ref
from mamba_dist.model.packing import seq_idx_from_lengths

# packed layouts (document lengths per row, L = 40): 1-token documents, a document ending where another starts
# at a power-of-two position, long documents
LAYOUTS = [[1, 15, 1, 1, 22], [16, 16, 8], [40], [7, 25, 1, 7]]


seq_idx_of = seq_idx_from_lengths


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _emulated_selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    # selective_scan_cuda's input checks, then its math: one sequence per row, no resets
    assert delta.dtype == u.dtype and B.dtype == u.dtype and C.dtype == u.dtype
    assert z is None or z.dtype == u.dtype
    assert A.dtype == torch.float32 and (D is None or D.dtype == torch.float32)
    assert delta_bias is None or delta_bias.dtype == torch.float32
    return ref.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, None)


def _emulated_causal_conv1d_fn(x, weight, bias=None, seq_idx=None, activation=None):
    channel_last = x.stride(1) == 1 and x.stride(2) > 1
    if channel_last:  # the kernel's constraints on that layout
        assert x.shape[1] % 8 == 0 and x.stride(0) % 8 == 0 and x.stride(2) % 8 == 0, x.stride()
    if seq_idx is not None:  # seq_idx: channel-last only
        assert channel_last and seq_idx.dtype == torch.int32 and seq_idx.is_contiguous()
    return ref.causal_conv1d(x, weight, bias, seq_idx, activation)


@pytest.fixture
def emulated_kernels(monkeypatch):
    mods = {name: types.ModuleType(name) for name in
            ["mamba_ssm", "mamba_ssm.ops", "mamba_ssm.ops.selective_scan_interface", "causal_conv1d"]}
    mods["mamba_ssm.ops.selective_scan_interface"].selective_scan_fn = _emulated_selective_scan_fn
    mods["causal_conv1d"].causal_conv1d_fn = _emulated_causal_conv1d_fn
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    fused._starts_cache[0] = None
    yield
    fused._starts_cache[0] = None


@pytest.mark.parametrize("mode", ["bias_in_kernel", "bias_folded", "no_softplus", "no_D_no_z"])
def test_selective_scan_resets_exact(emulated_kernels, mode):
    torch.manual_seed(0)
    Bsz, Dm, N, L = len(LAYOUTS), 6, 5, 40
    seq_idx = seq_idx_of(LAYOUTS)
    u = torch.randn(Bsz, Dm, L)
    delta = torch.randn(Bsz, Dm, L) * 0.5 - 1.0
    A = -torch.exp(torch.randn(Dm, N) * 0.5)  # some |A| < 1: the reset dt scales with 1/min|A|
    Bm, Cm = torch.randn(Bsz, N, L), torch.randn(Bsz, N, L)
    D, z, bias = torch.randn(Dm), torch.randn(Bsz, Dm, L), torch.randn(Dm) * 0.5 - 2.0
    inputs = dict(u=u, delta=delta, A=A, B=Bm, C=Cm, D=D, z=z, delta_bias=bias)
    softplus = mode != "no_softplus"
    if mode == "bias_folded":
        inputs["delta_bias"] = None
    if mode == "no_softplus":
        inputs["delta"], inputs["delta_bias"] = delta.abs() * 0.1, bias.abs() * 0.1  # dt > 0 without softplus
    if mode == "no_D_no_z":
        inputs["D"] = inputs["z"] = None
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items() if v is not None}

    def run(fn):
        args = {k: leaves.get(k) for k in inputs}
        out = fn(**args, delta_softplus=softplus, seq_idx=seq_idx)
        w = torch.randn_like(out, generator=torch.Generator().manual_seed(1))
        grads = torch.autograd.grad((out * w).sum(), list(leaves.values()))
        return out, dict(zip(leaves, grads))

    out_f, g_f = run(fused.selective_scan)
    out_r, g_r = run(ref.selective_scan)
    assert rel(out_f, out_r) <= 1e-5
    for k in leaves:
        assert rel(g_f[k], g_r[k]) <= 1e-5, (k, rel(g_f[k], g_r[k]))


def test_selective_scan_reset_drops_a_huge_state_exactly(emulated_kernels):
    # |A| far below 1 (A_log trained very negative) needs a proportionally larger reset dt, and a state 1e8 times
    # the next document's must not leak into it at all: exp(dt_new * A) has to be exactly 0, not merely small
    torch.manual_seed(1)
    seq_idx = seq_idx_of([[3, 37]])
    u, delta = torch.randn(1, 2, 40), torch.randn(1, 2, 40)
    u[..., :3] *= 1e8
    A = torch.tensor([[-1e-3, -2.0], [-5e-4, -8.0]])
    Bm, Cm = torch.randn(1, 2, 40), torch.randn(1, 2, 40)
    out_f = fused.selective_scan(u, delta, A, Bm, Cm, None, None, None, True, seq_idx)
    alone = ref.selective_scan(u[..., 3:], delta[..., 3:], A, Bm[..., 3:], Cm[..., 3:], None, None, None, True)
    assert rel(out_f[..., 3:], alone) <= 1e-5


def test_doc_starts_cached_per_seq_idx_object(emulated_kernels):
    s = seq_idx_of(LAYOUTS)
    first = fused._doc_starts(s)
    assert fused._doc_starts(s) is first
    expected = [(b, t) for b, r in enumerate(LAYOUTS) for t in torch.tensor(r).cumsum(0)[:-1].tolist()]
    assert sorted(zip(first[0].tolist(), first[1].tolist())) == sorted(expected)
    s[0, -1] += 1  # an in-place edit invalidates the entry
    assert fused._doc_starts(s) is not first and fused._doc_starts(s)[0].numel() == len(expected) + 1


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "strided_channel_last", "pad_channels", "strided_C20"])
def test_causal_conv1d_layouts(emulated_kernels, layout, packed):
    torch.manual_seed(2)
    seq_idx = seq_idx_of(LAYOUTS) if packed else None
    C = 20 if layout in ("pad_channels", "strided_C20") else 24
    if layout.startswith("strided"):  # what the mixers hand in: a slice of in_proj's output, transposed
        x = torch.randn(len(LAYOUTS), 40, 3 * C)[..., C:2 * C].transpose(1, 2)
    else:
        x = torch.randn(len(LAYOUTS), C, 40)
    x.requires_grad_()
    w, b = torch.randn(C, 4, requires_grad=True), torch.randn(C, requires_grad=True)
    outs = []
    for fn in (fused.causal_conv1d, ref.causal_conv1d):
        out = fn(x, w, b, seq_idx, "silu")
        outs.append((out, torch.autograd.grad(out.square().sum(), (x, w, b))))
    (of, gf), (orf, gr) = outs
    assert of.shape == orf.shape and rel(of, orf) <= 1e-6
    for a, r in zip(gf, gr):
        assert rel(a, r) <= 1e-6


def test_causal_conv1d_rejects_wide_kernel(emulated_kernels):
    with pytest.raises(ValueError, match="widths 2..4"):
        fused.causal_conv1d(torch.randn(1, 8, 5), torch.randn(8, 5), None, None, None)
