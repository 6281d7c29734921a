"""GPU: our MambaLMHeadModel equals mamba_ssm's MambaLMHeadModel (2.3, its own fused paths: mamba_inner_fn for
Mamba-1, mamba_split_conv1d_scan_combined for Mamba-2, Triton fused add + RMSNorm) loaded with our state dict,
with either of our backends. fp32; run through the device tool with scripts/gpu_check.sh; skipped elsewhere.

Bound: norm-wise relative error <= 1e-5 on the logits. Both sides compute the same function in fp32, partly with
the same kernels, so the difference is rounding (~1e-7 .. 1e-6); a wrong weight mapping, init-independent
structure error or dropped term is O(1). Triton fp32 dot products are pinned to IEEE fp32 (TRITON_F32_DEFAULT=ieee)
so that the comparison with the reference backend does not measure tf32. Gradients are compared too (<= 1e-4:
they sum over every token, and mamba_ssm's backward recomputes parts in another order)."""

import os

os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")  # before any Triton kernel compiles

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mamba_dist.model import MambaConfig, MambaLMHeadModel  # noqa: E402
from mamba_dist.model.backend import fused_unavailable_reason  # noqa: E402
from mamba_dist.model.packing import seq_idx_from_lengths  # noqa: E402

_why = fused_unavailable_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_why is not None, reason=f"fused kernels unavailable: {_why}")]


@pytest.fixture(scope="module", autouse=True)
def _short_autotune():
    from _gpu_autotune import limit_triton_autotune
    limit_triton_autotune()

TOL_LOGITS, TOL_GRADS = 1e-5, 1e-4
DEV = "cuda"

# mamba_ssm's Mamba-2 runs its conv channel-last on a slice of in_proj's output, which needs the in_proj width
# (2 d_inner + 2 ngroups d_state + nheads) to be a multiple of 8. The Mamba-2 head sizes (chunk 16, headdim 16,
# d_state 32, 8 heads) are those of tests/test_gpu_fused.py: each distinct set costs minutes of Triton autotuning.
CONFIGS = {
    "Mamba1": dict(d_model=64, n_layer=3, vocab_size=211, ssm_cfg={"layer": "Mamba1", "d_state": 16}),
    "Mamba1-d64": dict(d_model=64, n_layer=2, vocab_size=100, ssm_cfg={"layer": "Mamba1", "d_state": 64,
                                                                        "expand": 3}),
    "Mamba2": dict(d_model=64, n_layer=3, vocab_size=211,
                   ssm_cfg={"layer": "Mamba2", "d_state": 32, "headdim": 16, "ngroups": 2, "chunk_size": 16}),
    "Mamba2-g1-mlp": dict(d_model=64, n_layer=2, vocab_size=100, d_intermediate=96,
                          ssm_cfg={"layer": "Mamba2", "d_state": 32, "headdim": 16, "chunk_size": 16}),
}
SEQ = 57  # odd, and not a multiple of the chunk sizes
# Mamba-2 in mamba_ssm takes seq_idx too: packed rows compared against it as well (documents crossing chunk
# borders, 1-token documents)
LAYOUTS = [[1, 20, 1, 35], [16, 16, 25]]
assert all(sum(r) == SEQ for r in LAYOUTS)


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def seq_idx_of(layouts):
    return seq_idx_from_lengths(layouts, device=DEV)


def pair(name, backend, config=None):
    from mamba_ssm.models.config_mamba import MambaConfig as SSMConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel as SSMLMHeadModel

    cfg = MambaConfig(**(config or CONFIGS[name]))
    torch.manual_seed(0)
    ours = MambaLMHeadModel(cfg, backend=backend, device=DEV)
    with torch.no_grad():  # move dt away from its init so the weights are not a special case
        for n, p in ours.named_parameters():
            if n.endswith(("dt_proj.bias", "dt_bias", "norm.weight", "norm_f.weight")):
                p.add_(torch.randn_like(p) * 0.3)
    theirs = SSMLMHeadModel(SSMConfig(**cfg.to_dict()), device=DEV, dtype=torch.float32)
    theirs.load_state_dict(ours.state_dict())  # strict: the key sets are equal
    return ours, theirs


def forward_backward(model, ids, labels, seq_idx, theirs):
    model.zero_grad(set_to_none=True)
    kw = {} if seq_idx is None else {"seq_idx": seq_idx}
    logits = model(ids, **kw)
    logits = logits.logits if theirs else logits
    F.cross_entropy(logits.flatten(0, 1), labels.flatten()).backward()
    return logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_equals_mamba_ssm(name, backend):
    ours, theirs = pair(name, backend)
    g = torch.Generator(DEV).manual_seed(1)
    V = ours.config.vocab_size
    cases = [("unpacked", 2, None)]
    if "Mamba2" in name:
        cases.append(("packed", len(LAYOUTS), seq_idx_of(LAYOUTS)))
    failures = []
    for label, rows, seq_idx in cases:
        ids = torch.randint(0, V, (rows, SEQ), generator=g, device=DEV)
        labels = torch.randint(0, V, (rows, SEQ), generator=g, device=DEV)
        lo, go = forward_backward(ours, ids, labels, seq_idx, theirs=False)
        lt, gt = forward_backward(theirs, ids, labels, seq_idx, theirs=True)
        assert lo.shape == lt.shape
        errs = {"logits": (rel(lo, lt), TOL_LOGITS)}
        assert set(go) == set(gt)
        errs.update({n: (rel(go[n], gt[n]), TOL_GRADS) for n in go})
        for n, (e, tol) in errs.items():
            print(f"ERR | vs mamba_ssm {name} {backend} {label} | {n} | {e:.3e} | {tol:.3e}")
            if not e <= tol:
                failures.append((label, n, e, tol))
    assert not failures, failures


@pytest.mark.parametrize("packing", ["none", "zeros", "static-zeros"])
def test_mamba1_at_the_130m_shape_equals_mamba_ssm(packing):
    # the mixer of the 130M config at its training shape (d_inner 1536, dt_rank 48, 8 rows of 2048): the kernels
    # pick other launch configurations there than at the small shapes above (one full 2048-token scan chunk,
    # even-length vector loads). seq_idx all zeros (one document per row, as the learning-parity run feeds), plain
    # and through a CUDA-graph StaticPacking made only of masked padding, must give mamba_ssm's function.
    from mamba_dist.model.ops.fused_mamba1 import StaticPacking

    rows, seq = 8, 2048
    ours, theirs = pair("Mamba1", "fused", dict(d_model=768, n_layer=2, vocab_size=512,
                                                ssm_cfg={"layer": "Mamba1", "d_state": 16}))
    g = torch.Generator(DEV).manual_seed(2)
    ids = torch.randint(0, 512, (rows, seq), generator=g, device=DEV)
    labels = torch.randint(0, 512, (rows, seq), generator=g, device=DEV)
    seq_idx = None if packing == "none" else torch.zeros(rows, seq, dtype=torch.int32, device=DEV)
    if packing == "static-zeros":
        sp = StaticPacking.sized_for(seq_idx, 4, seq_idx.device)
        assert sp.fill_(seq_idx)
        sp.bind(seq_idx)
    lo, go = forward_backward(ours, ids, labels, seq_idx, theirs=False)
    lt, gt = forward_backward(theirs, ids, labels, None, theirs=True)
    failures = []
    for n, (e, tol) in {"logits": (rel(lo, lt), TOL_LOGITS), **{k: (rel(go[k], gt[k]), TOL_GRADS) for k in go}}.items():
        print(f"ERR | vs mamba_ssm Mamba1 130M shape {packing} | {n} | {e:.3e} | {tol:.3e}")
        if not e <= tol:
            failures.append((n, e))
    assert not failures, failures
