"""CPU check of ops/fused_mamba1.py (the Mamba-1 mixer, in_proj to out_proj, as one autograd function), with
the CUDA entry points it calls replaced by emulators: selective_scan_cuda.fwd / bwd and causal_conv1d's
cpp_functions.causal_conv1d_fwd_function / causal_conv1d_bwd_function. Each emulator has the signature, the
return tuple, the input checks (dtypes, strides, channel-last constraints) and the output layouts
(torch.empty_like of the same argument) of the real one in mamba_ssm 2.3.2 / causal_conv1d 1.7.0, and the
kernel's math taken from ops/reference.py: no resets in the scan, the pre-gate `out` the backward reads for dz.

The function's own work (the feature-major layouts, the projections and their gradients, recomputation, the conv's
fix-up columns and the scan's exact reset at the start positions with their hand-written gradients) is checked in fp32 against the pure-PyTorch twin
ops/reference_mamba1.py with true resets, and against running each document alone. The real kernels are checked
the same way in tests/test_gpu_fused_mamba1.py."""

import sys
import types

import pytest
import torch
import torch.nn.functional as F

from mamba_dist.model.mamba1 import Mamba
from mamba_dist.model.ops import fused, fused_mamba1, reference as ref, reference_mamba1
from mamba_dist.model.packing import seq_idx_from_lengths

# rows of L = 40: 1-token documents; documents starting at positions 1, 2, 3 (inside the conv window of width 4)
# and 4; a start at a power of two; one document per row
L = 40
LAYOUTS = [[1, 15, 1, 1, 22], [1, 1, 1, 37], [2, 2, 36], [3, 37], [4, 16, 20], [L]]
TOL = 1e-5


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


# --------------------------------------------------------------------------------------------- emulators

def _stamp(u, delta):
    # what the emulated fwd writes into its chunk-state tensor: the backward must get the same (reset-rewritten)
    # u and delta back, or the real kernel would recompute a different scan from the saved chunk states
    return torch.stack([u.float().sum(-1), delta.float().sum(-1)], -1)


def _check_scan_args(u, delta, A, B, C, D, z, delta_bias):
    # selective_scan.cpp's TORCH_CHECKs for real A and variable (B, G, N, L) B / C
    assert u.dtype in (torch.float32, torch.float16, torch.bfloat16) and A.dtype == torch.float32
    assert delta.dtype == u.dtype and B.dtype == u.dtype and C.dtype == u.dtype
    assert B.dim() == 4 and C.dim() == 4
    bsz, dim, seqlen = u.shape
    assert delta.shape == u.shape and A.shape == (dim, A.shape[1]) and A.shape[1] <= 256
    assert B.shape == (bsz, B.shape[1], A.shape[1], seqlen) and C.shape == B.shape and B.shape[1] == 1
    for t in (u, delta, B, C):
        assert t.stride(-1) == 1 or t.size(-1) == 1, t.stride()
    for t in (D, delta_bias):
        assert t is None or (t.dtype == torch.float32 and t.shape == (dim,) and t.stride(-1) == 1)
    if z is not None:
        assert z.dtype == u.dtype and z.shape == u.shape and (z.stride(-1) == 1 or z.size(-1) == 1)


def _scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    _check_scan_args(u, delta, A, B, C, D, z, delta_bias)
    bsz, dim, seqlen = u.shape
    out = torch.empty_like(delta)  # as the kernel: delta's layout
    out.copy_(ref.selective_scan(u, delta, A, B[:, 0], C[:, 0], D, None, delta_bias, delta_softplus))
    x = torch.zeros(bsz, dim, (seqlen + 2047) // 2048, 2 * A.shape[1])
    x[:, :, 0, :2] = _stamp(u, delta)
    result = [out, x]
    if z is not None:
        out_z = torch.empty_like(z)
        out_z.copy_(out.float() * F.silu(z.float()))
        result.append(out_z)
    return result


def _scan_bwd(u, delta, A, B, C, D, z, delta_bias, dout, x, out, dz, delta_softplus, recompute_out_z):
    _check_scan_args(u, delta, A, B, C, D, z, delta_bias)
    assert dout.dtype == u.dtype and dout.shape == u.shape and (dout.stride(-1) == 1 or dout.size(-1) == 1)
    bsz, dim, seqlen = u.shape
    assert x is not None and x.dtype == torch.float32 and x.is_contiguous()
    assert x.shape == (bsz, dim, (seqlen + 2047) // 2048, 2 * A.shape[1])
    assert torch.equal(x[:, :, 0, :2], _stamp(u, delta)), "backward got other u / delta than the forward"
    g = dout.float()
    if z is not None:
        assert out is not None and out.dtype == u.dtype and out.shape == u.shape
        assert out.stride(-1) == 1 or out.size(-1) == 1
        zf = z.float()
        sig = torch.sigmoid(zf)
        dz_vals = g * out.float() * sig * (1 + zf * (1 - sig))  # from the `out` handed in, as the kernel
        g = g * zf * sig
        if dz is None:
            dz = torch.empty_like(z)
        dz.copy_(dz_vals)
    names = ["u", "delta", "A", "B", "C", "D", "delta_bias"]
    vals = [u, delta, A, B, C, D, delta_bias]
    leaves = {n: v.detach().clone().requires_grad_() for n, v in zip(names, vals) if v is not None}
    with torch.enable_grad():
        y = ref.selective_scan(leaves["u"], leaves["delta"], leaves["A"], leaves["B"][:, 0], leaves["C"][:, 0],
                               leaves.get("D"), None, leaves.get("delta_bias"), delta_softplus)
        grads = dict(zip(leaves, torch.autograd.grad(y, list(leaves.values()), g.to(y.dtype))))
    du = torch.empty_like(u).copy_(grads["u"])
    ddelta = torch.empty_like(delta).copy_(grads["delta"])
    dB = torch.zeros_like(B, dtype=torch.float32).copy_(grads["B"]).to(B.dtype)
    dC = torch.zeros_like(C, dtype=torch.float32).copy_(grads["C"]).to(C.dtype)
    result = [du, ddelta, grads["A"], dB, dC, grads.get("D"), grads.get("delta_bias")]
    if z is not None:
        result.append(dz)
    if recompute_out_z:  # torch::empty_like(out): out's layout
        result.append(None if z is None else torch.empty_like(out).copy_(out.float() * F.silu(z.float())))
    return result


def _check_conv_layout(x, weight, bias, seq_idx):
    # causal_conv1d.cpp's TORCH_CHECKs
    bsz, dim, seqlen = x.shape
    assert weight.shape == (dim, weight.shape[-1]) and 2 <= weight.shape[-1] <= 4
    assert x.stride(2) == 1 or x.stride(1) == 1
    channel_last = x.stride(1) == 1 and x.stride(2) > 1
    if channel_last:
        assert dim % 8 == 0 and x.stride(2) % 8 == 0 and x.stride(0) % 8 == 0, x.stride()
    assert bias is None or (bias.dtype == weight.dtype and bias.stride(-1) == 1 and bias.shape == (dim,))
    if seq_idx is not None:
        assert channel_last, "seq_idx is only supported for channel last layout"
        assert seq_idx.dtype == torch.int32 and seq_idx.is_contiguous() and seq_idx.shape == (bsz, seqlen)
    return channel_last


def _conv_fwd(x, weight, bias, seq_idx, initial_states, final_states_out, silu_activation):
    _check_conv_layout(x, weight, bias, seq_idx)
    assert initial_states is None and final_states_out is None
    out = torch.empty_like(x)  # as cpp_functions.causal_conv1d_fwd_function
    out.copy_(ref.causal_conv1d(x, weight, bias, seq_idx, "silu" if silu_activation else None))
    return out


def _conv_bwd(x, weight, bias, dout, seq_idx, initial_states, dfinal_states, dx, return_dinitial_states,
              silu_activation):
    channel_last = _check_conv_layout(x, weight, bias, seq_idx)
    assert initial_states is None and dfinal_states is None and not return_dinitial_states
    assert dout.shape == x.shape
    if channel_last:
        if dout.stride(1) != 1:
            dout = dout.transpose(-1, -2).contiguous().transpose(-1, -2)
        assert dout.stride(2) % 8 == 0 and dout.stride(0) % 8 == 0
    if dx is None:
        dx = torch.empty_like(x)
    assert dx.dtype == x.dtype and dx.shape == x.shape
    assert dx.stride(1) == 1 if channel_last else dx.stride(2) == 1
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight) + ((bias,) if bias is not None else ())]
    with torch.enable_grad():
        out = ref.causal_conv1d(leaves[0], leaves[1], leaves[2] if bias is not None else None, seq_idx,
                                "silu" if silu_activation else None)
        grads = torch.autograd.grad(out, leaves, dout)
    dx.copy_(grads[0])  # in place, as the kernel writes a handed-in dx
    dbias = grads[2].float().type_as(bias) if bias is not None else None
    return dx, grads[1].float().type_as(weight), dbias, None


@pytest.fixture
def emulated_kernels(monkeypatch):
    scan = types.ModuleType("selective_scan_cuda")
    scan.fwd, scan.bwd = _scan_fwd, _scan_bwd
    conv = types.ModuleType("causal_conv1d")
    cpp = types.ModuleType("causal_conv1d.cpp_functions")
    cpp.causal_conv1d_fwd_function, cpp.causal_conv1d_bwd_function = _conv_fwd, _conv_bwd
    conv.cpp_functions = cpp
    for name, mod in {"selective_scan_cuda": scan, "causal_conv1d": conv, "causal_conv1d.cpp_functions": cpp}.items():
        monkeypatch.setitem(sys.modules, name, mod)
    fused._starts_cache[0] = fused_mamba1._packing_cache[0] = None
    yield
    fused._starts_cache[0] = fused_mamba1._packing_cache[0] = None


# --------------------------------------------------------------------------------------------- inputs

D_MODEL = 8


def _weights(d=16, N=4, r=3, W=4, seed=0, conv_bias=True, dt_bias=True, with_D=True, proj_bias=False):
    g = torch.Generator().manual_seed(seed)
    w = {
        "in_proj_weight": torch.randn(2 * d, D_MODEL, generator=g) * D_MODEL ** -0.5,
        "in_proj_bias": torch.randn(2 * d, generator=g) * 0.2 if proj_bias else None,
        "conv_weight": torch.randn(d, 1, W, generator=g) * 0.5,
        "conv_bias": torch.randn(d, generator=g) * 0.2 if conv_bias else None,
        "x_proj_weight": torch.randn(r + 2 * N, d, generator=g) * d ** -0.5,
        "dt_proj_weight": torch.randn(d, r, generator=g) * r ** -0.5,
        "dt_proj_bias": torch.randn(d, generator=g) * 0.5 - 2.0 if dt_bias else None,
        # some |A| < 1 (the reset dt scales with 1 / min |A|), some large
        "A_log": torch.randn(d, N, generator=g) * 1.5,
        "D": torch.randn(d, generator=g) if with_D else None,
        "out_proj_weight": torch.randn(D_MODEL, d, generator=g) * d ** -0.5,
        "out_proj_bias": torch.randn(D_MODEL, generator=g) * 0.2 if proj_bias else None,
    }
    if dt_bias:
        w["dt_proj_bias"][0] = 25.0  # softplus pass-through (> 20) at the start positions too
    return {k: v.requires_grad_() for k, v in w.items() if v is not None}


def _args(w):
    return (w["in_proj_weight"], w.get("in_proj_bias"), w["conv_weight"], w.get("conv_bias"), w["x_proj_weight"],
            w["dt_proj_weight"], w.get("dt_proj_bias"), w["out_proj_weight"], w.get("out_proj_bias"),
            -torch.exp(w["A_log"]), w.get("D"))


def _run(fn, h, w, seq_idx, wout):
    h = h.detach().clone().requires_grad_()
    y = fn(h, *_args(w), seq_idx)
    leaves = {"h": h, **w}
    grads = torch.autograd.grad((y * wout).sum(), list(leaves.values()))
    return y, dict(zip(leaves, grads))


@pytest.mark.parametrize("variant", ["packed", "packed_no_D", "packed_no_biases", "packed_proj_biases",
                                     "packed_width_2", "unpacked"])
def test_inner_matches_reference_twin(emulated_kernels, variant):
    torch.manual_seed(0)
    w = _weights(with_D=variant != "packed_no_D", conv_bias=variant != "packed_no_biases",
                 dt_bias=variant != "packed_no_biases", proj_bias=variant == "packed_proj_biases",
                 W=2 if variant == "packed_width_2" else 4)
    seq_idx = None if variant == "unpacked" else seq_idx_from_lengths(LAYOUTS)
    h = torch.randn(len(LAYOUTS), L, D_MODEL)
    wout = torch.randn(len(LAYOUTS), L, D_MODEL)
    y_f, g_f = _run(fused_mamba1.mamba1_inner, h, w, seq_idx, wout)
    y_r, g_r = _run(reference_mamba1.mamba1_inner, h, w, seq_idx, wout)
    assert y_f.shape == y_r.shape == (len(LAYOUTS), L, D_MODEL)
    assert rel(y_f, y_r) <= TOL, rel(y_f, y_r)
    errs = {k: rel(g_f[k], g_r[k]) for k in g_r}
    assert max(errs.values()) <= TOL, errs


def test_inner_packed_equals_each_document_alone(emulated_kernels):
    # an oracle independent of the reference twin: the packed row against its documents run one by one
    torch.manual_seed(1)
    w = _weights(seed=1)
    layout = LAYOUTS[0]
    h, wout = torch.randn(1, L, D_MODEL), torch.randn(1, L, D_MODEL)
    y_p, g_p = _run(fused_mamba1.mamba1_inner, h, w, seq_idx_from_lengths([layout]), wout)
    start, sums = 0, {k: torch.zeros_like(v) for k, v in w.items()}
    for n in layout:
        span = slice(start, start + n)
        y_d, g_d = _run(fused_mamba1.mamba1_inner, h[:, span], w, None, wout[:, span])
        assert rel(y_p[:, span], y_d) <= TOL
        assert rel(g_p["h"][:, span], g_d["h"]) <= TOL
        for k in sums:
            sums[k] += g_d[k]
        start += n
    for k in sums:
        assert rel(g_p[k], sums[k]) <= TOL, k


def test_inner_reset_drops_a_huge_state_exactly(emulated_kernels):
    # a state 1e8 times the next document's must not leak into it at all (exp(dt_new A) exactly 0)
    w = _weights(seed=2)
    with torch.no_grad():
        w["A_log"][:, 0] = -8.0  # |A| ~ 3e-4: the reset dt must scale up to 200 / |A|
    h = torch.randn(1, L, D_MODEL)
    h[:, :5] *= 1e8
    seq_idx = seq_idx_from_lengths([[5, L - 5]])
    y = fused_mamba1.mamba1_inner(h, *_args(w), seq_idx)
    alone = reference_mamba1.mamba1_inner(h[:, 5:], *_args(w), None)
    assert rel(y[:, 5:], alone) <= TOL


@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_mixer_inner_fn_equals_op_by_op_path(emulated_kernels, backend):
    # Mamba.forward through ops.mamba1_inner (use_inner_fn, the default) against its op-by-op path on the
    # reference backend: the wiring (in_proj halves, conv weight, dt_proj bias as delta_bias, A, D) is right
    torch.manual_seed(3)
    fast = Mamba(8, d_state=4, d_conv=4, backend=backend)  # d_inner 16, dt_rank 1
    slow = Mamba(8, d_state=4, d_conv=4, backend="reference")
    slow.load_state_dict(fast.state_dict())
    slow.use_inner_fn = False
    assert fast.use_inner_fn
    h = torch.randn(len(LAYOUTS), L, 8)
    seq_idx = seq_idx_from_lengths(LAYOUTS)
    outs = []
    for m in (fast, slow):
        y = m(h, seq_idx)
        y.square().sum().backward()
        outs.append((y, {n: p.grad for n, p in m.named_parameters()}))
    (y_f, g_f), (y_s, g_s) = outs
    assert rel(y_f, y_s) <= TOL
    for n in g_s:
        assert rel(g_f[n], g_s[n]) <= TOL, n


def test_inner_rejects_unsupported_shapes(emulated_kernels):
    w = _weights(d=12)  # d_inner % 8 != 0: the kernels' vector loads cannot take it
    with pytest.raises(ValueError, match="d_inner % 8"):
        fused_mamba1.mamba1_inner(torch.randn(1, 8, D_MODEL), *_args(w), None)


def test_inner_bf16_autocast_dtypes(emulated_kernels):
    # the dtype plumbing under bf16 autocast over fp32 weights, as training runs it: the emulators assert the
    # kernels' dtype rules (one bf16 input dtype for u / delta / B / C / z / dout, fp32 A / D / delta_bias, conv
    # bias in the conv weight's dtype); the result must be as close to the fp32 truth as the reference twin's
    # own bf16 run (the bound of tests/test_gpu_fused.py: 2 x its error + 1e-3)
    torch.manual_seed(4)
    w = _weights(seed=4)
    seq_idx = seq_idx_from_lengths(LAYOUTS)
    h, wout = torch.randn(len(LAYOUTS), L, D_MODEL), torch.randn(len(LAYOUTS), L, D_MODEL)

    def run16(fn):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, g = _run(fn, h.bfloat16(), w, seq_idx, wout)
        assert y.dtype == torch.bfloat16 and g["h"].dtype == torch.bfloat16
        assert all(g[k].dtype == torch.float32 for k in w)
        return y, g

    y_t, g_t = _run(reference_mamba1.mamba1_inner, h, w, seq_idx, wout)
    y_r, g_r = run16(reference_mamba1.mamba1_inner)
    y_f, g_f = run16(fused_mamba1.mamba1_inner)
    assert rel(y_f, y_t) <= 2 * rel(y_r, y_t) + 1e-3
    for k in g_t:
        assert rel(g_f[k], g_t[k]) <= 2 * rel(g_r[k], g_t[k]) + 1e-3, (k, rel(g_f[k], g_t[k]), rel(g_r[k], g_t[k]))


def test_use_fast_path_is_the_switch():
    # mamba_ssm's ssm_cfg key use_fast_path (its mamba_inner_fn) switches ours; on by default
    from mamba_dist.model import MambaConfig, MambaLMHeadModel

    def mixers(**ssm):
        cfg = MambaConfig(d_model=8, n_layer=2, vocab_size=16, ssm_cfg={"layer": "Mamba1", "d_state": 4, **ssm})
        return [m for m in MambaLMHeadModel(cfg).modules() if isinstance(m, Mamba)]

    assert [m.use_inner_fn for m in mixers()] == [True, True]
    assert [m.use_inner_fn for m in mixers(use_fast_path=False)] == [False, False]


# --------------------------------------------------------------------------------------------- static packing
# (what CUDA graph capture runs: fixed-capacity packing buffers, padding masked; train.py CudaGraphPath)

@pytest.mark.parametrize("slack", [1, 3])
def test_static_packing_equals_the_exact_one(emulated_kernels, slack):
    # padded to the capacities (slack 3: most entries are padding pointing at (0, 0) / column 0) or exactly full
    # (slack 1 with capacities forced to the counts): the same outputs and gradients as the exact-size packing,
    # including for a second batch filled into the same buffers (a graph replays on new data)
    torch.manual_seed(5)
    w = _weights(seed=5, proj_bias=True)
    h, wout = torch.randn(len(LAYOUTS), L, D_MODEL), torch.randn(len(LAYOUTS), L, D_MODEL)
    other = [[7, 33], [L], [1, 2, 3, 4, 30], [20, 20], [39, 1], [3, 3, 34]]
    for layouts in (LAYOUTS, other):
        seq_idx = seq_idx_from_lengths(layouts)
        fused_mamba1._packing_cache[0] = None
        y_e, g_e = _run(fused_mamba1.mamba1_inner, h, w, seq_idx, wout)
        if layouts is LAYOUTS:
            R, Fn = fused_mamba1.StaticPacking.counts(seq_idx, 4)
            caps = (R, Fn) if slack == 1 else (3 * R + 5, 3 * Fn + 7)
            pk = fused_mamba1.StaticPacking(4, *caps, "cpu")
        assert pk.fill_(seq_idx)
        assert int(pk.valid_s.sum()) == fused_mamba1.StaticPacking.counts(seq_idx, 4)[0]
        pk.bind(seq_idx)
        y_s, g_s = _run(fused_mamba1.mamba1_inner, h, w, seq_idx, wout)
        assert fused_mamba1._packing_cache[0][3] is pk  # the static packing was the one used
        assert rel(y_s, y_e) <= 1e-6
        for k in g_e:
            assert rel(g_s[k], g_e[k]) <= 1e-6, k


def test_static_packing_capacity():
    seq_idx = seq_idx_from_lengths(LAYOUTS)
    R, Fn = fused_mamba1.StaticPacking.counts(seq_idx, 4)
    assert R == sum(len(x) - 1 for x in LAYOUTS)
    pk = fused_mamba1.StaticPacking.sized_for(seq_idx, 4, "cpu")
    assert pk.cap_starts >= 2 * R and pk.cap_fix >= 2 * Fn and pk.cap_starts & (pk.cap_starts - 1) == 0
    assert pk.fill_(seq_idx)
    # a batch with more document starts than the capacity is refused (the caller captures again, bigger)
    many = seq_idx_from_lengths([[1] * L] * 8)
    assert not pk.fill_(many)
    assert pk.fill_(seq_idx)


# --------------------------------------------------------------------------------------------- compiled bookkeeping
# On CUDA the reset bookkeeping runs through torch.compile (fused_mamba1._fused_small). The same functions compiled
# for CPU tensors (inductor's C++ backend) must give what they give eagerly, in bf16 autocast as training runs: a
# compiler that keeps a rounded value unrounded (the reset dt, the stored u_new) would break the reset's exactness.

@pytest.mark.slow
def test_compiled_bookkeeping_equals_eager(emulated_kernels, monkeypatch):
    torch.manual_seed(6)
    w = _weights(seed=6, proj_bias=True)
    seq_idx = seq_idx_from_lengths(LAYOUTS)
    h, wout = torch.randn(len(LAYOUTS), L, D_MODEL), torch.randn(len(LAYOUTS), L, D_MODEL)

    def run(static):
        fused_mamba1._packing_cache[0] = None
        if static:
            fused_mamba1.StaticPacking.sized_for(seq_idx, 4, "cpu").bind(seq_idx)
            fused_mamba1._packing_cache[0][3].fill_(seq_idx)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return _run(fused_mamba1.mamba1_inner, h.bfloat16(), w, seq_idx, wout)

    for static in (False, True):  # exact-size packing (no masks), and a padded StaticPacking (masked)
        y_e, g_e = run(static)
        monkeypatch.setattr(fused_mamba1, "_COMPILE_ON_CPU", True)
        y_c, g_c = run(static)
        monkeypatch.setattr(fused_mamba1, "_COMPILE_ON_CPU", False)
        assert fused_mamba1.compile_failures() == []
        five = ("_conv_fix_values", "_reset_values", "_skip_values", "_reset_grads", "_conv_fix_grads")
        assert all(fused_mamba1._COMPILED_SMALL[n]["compiled"] is not None for n in five)  # all five ran
        assert rel(y_c, y_e) <= 1e-6, rel(y_c, y_e)
        for k in g_e:
            assert rel(g_c[k], g_e[k]) <= 1e-5, (k, rel(g_c[k], g_e[k]))
