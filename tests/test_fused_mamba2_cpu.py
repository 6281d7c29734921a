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
from mamba_dist.model.ops import reference as ref
from mamba_dist.model.packing import seq_idx_from_lengths

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
    xBC = ref.causal_conv1d(xBC.transpose(1, 2), conv1d_weight, conv1d_bias, seq_idx,
                            "silu" if activation else None).transpose(1, 2)
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


@pytest.fixture
def emulated(monkeypatch):
    mods = {}
    for name in ("mamba_ssm", "mamba_ssm.ops", "mamba_ssm.ops.triton", "mamba_ssm.ops.triton.ssd_combined"):
        mods[name] = types.ModuleType(name)
    mods["mamba_ssm.ops.triton.ssd_combined"].mamba_split_conv1d_scan_combined = \
        _emulated_split_conv1d_scan_combined
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)


VARIANTS = {
    "default": {},
    "groups_mlp_hdimD": dict(ngroups=2, d_ssm=32, D_has_hdim=True),  # d_ssm < d_inner: the gated MLP part
    "norm_before_gate_dtlimit": dict(norm_before_gate=True, dt_limit=(0.01, 0.5), bias=True),
    "no_rmsnorm": dict(rmsnorm=False),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_mixer_inner_fn_equals_op_by_op(emulated, variant):
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


def test_use_mem_eff_path_is_the_switch():
    from mamba_dist.model import MambaConfig, MambaLMHeadModel

    def mixers(**ssm):
        cfg = MambaConfig(d_model=16, n_layer=2, vocab_size=16,
                          ssm_cfg={"layer": "Mamba2", "d_state": 8, "headdim": 8, **ssm})
        return [m for m in MambaLMHeadModel(cfg).modules() if isinstance(m, Mamba2)]

    assert [m.use_inner_fn for m in mixers()] == [True, True]
    assert [m.use_inner_fn for m in mixers(use_mem_eff_path=False)] == [False, False]
