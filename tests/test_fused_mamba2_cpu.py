"""CPU check of the fused Mamba-2 mixer's one-function path (ops/fused.py mamba2_inner -> mamba_ssm's
mamba_split_conv1d_scan_combined, its `use_mem_eff_path`), with that function replaced by an emulator: its
signature, its shape asserts and its semantics as mamba_ssm 2.3 writes them (split [zx0 | z | xBC | dt]; conv with
seq_idx; SSD scan with z inside when there is no RMSNorm; gated RMSNorm over groups of d_ssm / ngroups; silu(z0) x0
in front; out_proj), computed with ops/reference.py. What is checked is our wiring: which weight goes where, D's
shape and headdim, the norm's eps and norm_before_gate, dt_limit, the MLP part, against the mixer's op-by-op path on
the reference backend (the twin), outputs and every gradient, on packed rows. The real function runs in
tests/test_gpu_fused.py (the Mamba-2 model, fused vs reference, packed == per-document)."""

import sys
import types

import pytest
import torch
import torch.nn.functional as F

from mamba_dist.model.mamba2 import Mamba2
from mamba_dist.model.ops import fused_mamba1, fused_mamba2, reference as ref
from mamba_dist.model.packing import seq_idx_from_lengths
from test_fused_mamba1_cpu import _conv_bwd, _conv_fwd  # the causal_conv1d emulators (signatures, layouts)

L = 48
LAYOUTS = [[1, 15, 32], [3, 45], [L]]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _emulated_split_conv1d_scan_combined(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size,
                                         initial_states=None, seq_idx=None, dt_limit=(0.0, float("inf")),
                                         return_final_states=False, activation="silu", rmsnorm_weight=None,
                                         rmsnorm_eps=1e-6, outproj_weight=None, outproj_bias=None, headdim=None,
                                         ngroups=1, norm_before_gate=True):
    # the asserts of mamba_ssm's MambaSplitConv1dScanCombinedFn.forward
    assert activation in [None, "silu", "swish"]
    if D.dim() == 1:
        assert headdim is not None
        nheads, = D.shape
    else:
        nheads, headdim = D.shape
    batch, seqlen, _ = zxbcdt.shape
    dim = nheads * headdim
    assert nheads % ngroups == 0
    assert conv1d_weight.dim() == 2
    dstate = (conv1d_weight.shape[0] - dim) // ngroups // 2
    d_nonssm = (zxbcdt.shape[-1] - 2 * dim - 2 * ngroups * dstate - nheads) // 2
    assert d_nonssm >= 0
    assert zxbcdt.shape == (batch, seqlen, 2 * d_nonssm + 2 * dim + 2 * ngroups * dstate + nheads)
    assert dt_bias.shape == (nheads,) and A.shape == (nheads,)
    assert initial_states is None and not return_final_states
    assert seq_idx is None or (seq_idx.dtype == torch.int32 and seq_idx.is_contiguous())
    zx0, z, xBC, dt = torch.split(zxbcdt, [2 * d_nonssm, dim, dim + ngroups * dstate * 2, nheads], dim=-1)
    assert activation == "silu"
    xBC = _ModuleConv.apply(xBC, conv1d_weight, conv1d_bias, seq_idx)
    x, B, C = torch.split(xBC, [dim, ngroups * dstate, ngroups * dstate], dim=-1)
    zr = z.reshape(batch, seqlen, nheads, headdim)
    y = ref.ssd_scan(x.reshape(batch, seqlen, nheads, headdim), dt, A, B.reshape(batch, seqlen, ngroups, dstate),
                     C.reshape(batch, seqlen, ngroups, dstate), chunk_size, D,
                     zr if rmsnorm_weight is None else None, dt_bias, True, seq_idx, dt_limit=dt_limit)
    y = y.reshape(batch, seqlen, dim)
    if rmsnorm_weight is not None:
        y = ref.rms_norm_gated(y, z, rmsnorm_weight, rmsnorm_eps, dim // ngroups, norm_before_gate)
    if d_nonssm > 0:
        z0, x0 = zx0.split([d_nonssm, d_nonssm], dim=-1)
        y = torch.cat([F.silu(z0) * x0, y], dim=-1)
    return F.linear(y, outproj_weight, outproj_bias) if outproj_weight is not None else y


class _ModuleConv(torch.autograd.Function):
    """The conv as mamba_ssm's combined function runs it: through its module's globals causal_conv1d_fwd_function
    / causal_conv1d_bwd_function (looked up at call time, so ops/fused_mamba2.py's wrappers take the calls once
    installed), on the channel-last (b, d, s) view of xBC, with a backward buffer of its own for dout."""

    @staticmethod
    def forward(ctx, xBC, weight, bias, seq_idx):
        mod = sys.modules["mamba_ssm.ops.triton.ssd_combined"]
        x = (xBC if xBC.stride(1) % 8 == 0 else xBC.contiguous()).transpose(1, 2)  # its ensure_stride
        ctx.save_for_backward(x, weight, bias, seq_idx)
        return mod.causal_conv1d_fwd_function(x, weight, bias, seq_idx, None, None, True).transpose(1, 2)

    @staticmethod
    def backward(ctx, dout):
        mod = sys.modules["mamba_ssm.ops.triton.ssd_combined"]
        x, weight, bias, seq_idx = ctx.saved_tensors
        dout = dout.contiguous().transpose(1, 2)  # (b, d, s) channel-last, a buffer of its own
        dx, dw, db, _ = mod.causal_conv1d_bwd_function(x, weight, bias, dout, seq_idx, None, None, None, False, True)
        return dx.transpose(1, 2), dw, db, None


CONV_CALLS = []  # the seq_idx argument of every emulated conv kernel call: None on the fast path


def _spy(fn, pos):
    def call(*args):
        CONV_CALLS.append(args[pos])
        return fn(*args)
    return call


@pytest.fixture
def emulated(monkeypatch):
    mods = {}
    for name in ("mamba_ssm", "mamba_ssm.ops", "mamba_ssm.ops.triton", "mamba_ssm.ops.triton.ssd_combined"):
        mods[name] = types.ModuleType(name)
    ssd = mods["mamba_ssm.ops.triton.ssd_combined"]
    ssd.mamba_split_conv1d_scan_combined = _emulated_split_conv1d_scan_combined
    ssd.causal_conv1d_fwd_function = _spy(_conv_fwd, 3)
    ssd.causal_conv1d_bwd_function = _spy(_conv_bwd, 4)
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    CONV_CALLS.clear()
    fused_mamba1._packing_cache[0] = fused_mamba2._registered[0] = fused_mamba2._seq32_cache[0] = None
    yield
    fused_mamba1._packing_cache[0] = fused_mamba2._registered[0] = fused_mamba2._seq32_cache[0] = None


VARIANTS = {
    "default": {},
    "groups_mlp_hdimD": dict(ngroups=2, d_ssm=32, D_has_hdim=True),  # d_ssm < d_inner: the gated MLP part
    "norm_before_gate_dtlimit": dict(norm_before_gate=True, dt_limit=(0.01, 0.5), bias=True),
    "no_rmsnorm": dict(rmsnorm=False),
}


@pytest.mark.parametrize("fixups", ["1", "0"], ids=["conv-fast-path", "conv-seq_idx"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_mixer_inner_fn_equals_op_by_op(emulated, variant, fixups, monkeypatch):
    monkeypatch.setenv("MAMBA_DIST_CONV_FIXUPS", fixups)
    torch.manual_seed(0)
    kw = dict(d_state=8, headdim=8, chunk_size=16, **VARIANTS[variant])
    fast = Mamba2(24, backend="fused", **kw)  # d_inner 48
    slow = Mamba2(24, backend="reference", **kw)
    slow.load_state_dict(fast.state_dict())
    assert fast.use_inner_fn and slow.use_inner_fn  # the reference backend takes the op-by-op path anyway
    h = torch.randn(len(LAYOUTS), L, 24)
    seq_idx = seq_idx_from_lengths(LAYOUTS)
    outs = []
    for m in (fast, slow):
        x = h.clone().requires_grad_()
        y = m(x, seq_idx)
        (y * torch.linspace(-1, 1, 24)).square().sum().backward()
        outs.append((y, x.grad, {n: p.grad for n, p in m.named_parameters()}))
    (y_f, dh_f, g_f), (y_s, dh_s, g_s) = outs
    assert rel(y_f, y_s) <= 1e-5 and rel(dh_f, dh_s) <= 1e-5
    for n in g_s:
        assert rel(g_f[n], g_s[n]) <= 1e-5, n
    # forward and backward each called the kernel once, with seq_idx only where the fast path is off
    assert len(CONV_CALLS) == 2 and all((s is None) == (fixups == "1") for s in CONV_CALLS), CONV_CALLS


# ------------------------------------------------------------------ the conv fast path itself (ops/fused_mamba2.py)
# rows of L = 40 with documents starting inside the first conv window (positions 1, 2, 3), 1-token documents,
# a start at 4, and a row with one document
CONV_LAYOUTS = [[1, 15, 1, 1, 22], [2, 2, 36], [3, 37], [4, 16, 20], [40]]


def _channel_last(x_blc, lo, hi):
    """x[..., lo:hi] of a (B, L, C') tensor as the (B, C, L) channel-last view the combined function hands in."""
    return x_blc[..., lo:hi].transpose(1, 2)


@pytest.mark.parametrize("packing", ["exact", "static", pytest.param("static-compiled", marks=pytest.mark.slow)])
def test_conv_fast_path_equals_the_seq_idx_kernel(emulated, packing, monkeypatch):
    from mamba_dist.model.ops.fused_mamba1 import StaticPacking

    if packing == "static-compiled":  # the fix-up helpers through torch.compile, as on CUDA (inductor's C++ here)
        monkeypatch.setattr(fused_mamba1, "_COMPILE_ON_CPU", True)

    g = torch.Generator().manual_seed(3)
    Bsz, L, C, W = len(CONV_LAYOUTS), 40, 24, 4
    seq_idx = seq_idx_from_lengths(CONV_LAYOUTS)
    seq32 = fused_mamba2.seq_idx_int32(seq_idx)
    if packing.startswith("static"):
        sp = StaticPacking.sized_for(seq_idx, W, "cpu")
        assert sp.fill_(seq_idx)
        sp.bind(seq_idx)
    fused_mamba2.register(seq32, seq_idx, W)
    if packing.startswith("static"):
        assert fused_mamba1._packing_cache[0][3] is sp

    x = _channel_last(torch.randn(Bsz, L, 40, generator=g), 8, 8 + C)  # strides (L * 40, 1, 40)
    w, b = torch.randn(C, W, generator=g), torch.randn(C, generator=g)
    dout_blc = torch.randn(Bsz, L, C, generator=g)
    fwd, bwd = _spy(_conv_fwd, 3), _spy(_conv_bwd, 4)

    want = _conv_fwd(x, w, b, seq32, None, None, True)
    got = fused_mamba2.conv_fwd(fwd, x, w, b, seq32, None, None, True)
    assert got.stride() == want.stride()
    want_dx, want_dw, want_db, _ = _conv_bwd(x, w, b, dout_blc.clone().transpose(1, 2), seq32, None, None, None,
                                             False, True)
    dx_buf = torch.empty(Bsz, L, 40)  # as dzxbcdt's xBC slice: the gradient is written there
    got_dx, got_dw, got_db, _ = fused_mamba2.conv_bwd(bwd, x, w, b, dout_blc.clone().transpose(1, 2), seq32, None,
                                                      None, _channel_last(dx_buf, 8, 8 + C), False, True)
    assert CONV_CALLS == [None, None]  # the kernel ran without seq_idx both ways
    assert got_dx.data_ptr() == dx_buf[..., 8:].data_ptr()  # in the handed-in buffer
    for name, a, e in (("out", got, want), ("dx", got_dx, want_dx), ("dweight", got_dw, want_dw),
                       ("dbias", got_db, want_db)):
        assert rel(a, e) <= 1e-6, (name, rel(a, e))
    # the guard: without the fix-ups the kernel's output and gradients are not the per-document ones
    plain = _conv_fwd(x, w, b, None, None, None, True)
    plain_dx = _conv_bwd(x, w, b, dout_blc.clone().transpose(1, 2), None, None, None, None, False, True)[0]
    assert rel(plain, want) > 1e-2 and rel(plain_dx, want_dx) > 1e-2
    if packing == "static-compiled":
        assert fused_mamba1.compile_failures() == []
        for name in ("_conv_fix_values", "_window_values", "_conv_fix_grads"):
            assert fused_mamba1._COMPILED_SMALL[name]["compiled"] is not None, name


def test_conv_fast_path_leaves_other_calls_alone(emulated):
    seq_idx = seq_idx_from_lengths(CONV_LAYOUTS)
    fused_mamba2.register(fused_mamba2.seq_idx_int32(seq_idx), seq_idx, 4)
    other = seq_idx_from_lengths(CONV_LAYOUTS)  # equal values, not the registered tensor
    x = torch.randn(len(CONV_LAYOUTS), 40, 24).transpose(1, 2)
    w = torch.randn(24, 4)
    fwd = _spy(_conv_fwd, 3)
    fused_mamba2.conv_fwd(fwd, x, w, None, other, None, None, True)
    fused_mamba2.conv_fwd(fwd, x, w, None, None, None, None, True)
    assert CONV_CALLS[0] is other and CONV_CALLS[1] is None  # passed through as they came


def test_static_packing_covers_the_mamba2_conv(monkeypatch):
    from mamba_dist.model.ops.fused_mamba1 import static_packing_for

    model = torch.nn.Sequential(*(Mamba2(16, d_state=8, headdim=8, backend="fused") for _ in range(2)))
    seq_idx = seq_idx_from_lengths(CONV_LAYOUTS)
    assert static_packing_for(model, seq_idx) is not None  # a CUDA graph must capture the packing's buffers
    monkeypatch.setenv("MAMBA_DIST_CONV_FIXUPS", "0")
    assert static_packing_for(model, seq_idx) is None  # the seq_idx kernel needs none


def test_use_mem_eff_path_is_the_switch():
    from mamba_dist.model import MambaConfig, MambaLMHeadModel

    def mixers(**ssm):
        cfg = MambaConfig(d_model=16, n_layer=2, vocab_size=16,
                          ssm_cfg={"layer": "Mamba2", "d_state": 8, "headdim": 8, **ssm})
        return [m for m in MambaLMHeadModel(cfg).modules() if isinstance(m, Mamba2)]

    assert [m.use_inner_fn for m in mixers()] == [True, True]
    assert [m.use_inner_fn for m in mixers(use_mem_eff_path=False)] == [False, False]
