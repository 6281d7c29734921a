"""GPU: hybrid models (attention layers among Mamba layers). Skipped without CUDA and the fused kernels.

1. The fused attention kernel (flex_attention with the document block mask) equals its pure-torch twin (SDPA with
   the dense document mask), forward and every input gradient, GQA, rows not a multiple of the 128-token block:
   fp32 <= 1e-4 norm-wise; bf16 against the fp32 truth within 2 x the twin's own bf16 error + 1e-3 (the bf16 rule
   of tests/test_gpu_fused.py).
2. The whole hybrid stack on the fused backend: packed rows equal each document alone (logits and gradients of the
   summed per-document losses, fp32, <= 1e-4).
3. mamba_ssm agreement: a hybrid written by `export-mamba-ssm` loads into mamba_ssm's MambaLMHeadModel (config.json
   + pytorch_model.bin, as its from_pretrained does) and, on rows holding one document each (mamba_ssm's MHA cannot
   mask), gives our logits and gradients within tests/test_gpu_mamba_ssm.py's bounds (1e-5 / 1e-4, fp32), with
   either backend; ours also with seq_idx = 0 everywhere (the flex path) within 1e-4. mamba_ssm's rotary needs
   flash_attn: the rotary case is skipped where it is not installed.

Run (device machine, kernels staged as for scripts/gpu_check.sh):
    TRITON_F32_DEFAULT=ieee python3 -m pytest -q -s -m gpu tests/test_gpu_hybrid.py
"""

import importlib.util
import json
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
DEV = "cuda"
SEQ = 57
LAYOUTS = [[1, 20, 1, 35], [16, 16, 25]]
# Mamba-2 head sizes of tests/test_gpu_mamba_ssm.py (each new set costs minutes of Triton autotuning)
SSM = {"layer": "Mamba2", "d_state": 32, "headdim": 16, "ngroups": 2, "chunk_size": 16}
ATTN = {"num_heads": 4, "num_heads_kv": 2, "head_dim": 16, "d_conv": 4, "qkv_proj_bias": False,
        "out_proj_bias": False, "causal": True}


@pytest.fixture(scope="module", autouse=True)
def _short_autotune():
    from _gpu_autotune import limit_triton_autotune
    limit_triton_autotune()


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _attn_inputs(dtype, L=300):
    g = torch.Generator(DEV).manual_seed(0)
    q = torch.randn(2, L, 8, 64, generator=g, device=DEV)
    k = torch.randn(2, L, 2, 64, generator=g, device=DEV)
    v = torch.randn(2, L, 2, 64, generator=g, device=DEV)
    w = torch.randn(2, L, 8, 64, generator=g, device=DEV)
    seq_idx = seq_idx_from_lengths([[7, 150, 1, 142], [L]], device=DEV)
    return [t.to(dtype).requires_grad_() for t in (q, k, v)], w, seq_idx


def _attn_run(fn, dtype, causal=True):
    (q, k, v), w, seq_idx = _attn_inputs(dtype)
    out = fn(q, k, v, seq_idx, causal, None)
    (out.float() * w).sum().backward()
    return [out.detach().float()] + [t.grad.float() for t in (q, k, v)]


@pytest.mark.parametrize("causal", [True, False])
def test_flex_attention_equals_sdpa_with_mask(causal):
    from mamba_dist.model.ops import fused, reference

    truth = _attn_run(reference.sdpa_attention, torch.float32, causal)
    flex32 = _attn_run(fused.attention, torch.float32, causal)
    sdpa16 = _attn_run(reference.sdpa_attention, torch.bfloat16, causal)
    flex16 = _attn_run(fused.attention, torch.bfloat16, causal)
    names = ["out", "dq", "dk", "dv"]
    for n, a, b, s16, f16 in zip(names, flex32, truth, sdpa16, flex16):
        e32, es, ef = rel(a, b), rel(s16, b), rel(f16, b)
        print(f"ERR | flex vs sdpa+mask causal={causal} | {n} | fp32 {e32:.3e} | bf16 flex {ef:.3e} sdpa {es:.3e}")
        assert e32 <= 1e-4, (n, e32)
        assert ef <= 2 * es + 1e-3, (n, ef, es)


def _hybrid(backend, rotary=0, seed=0):
    attn = {**ATTN, **({"rotary_emb_dim": rotary} if rotary else {})}
    cfg = MambaConfig(d_model=64, n_layer=4, vocab_size=211, ssm_cfg=SSM, attn_layer_idx=[1, 3], attn_cfg=attn)
    torch.manual_seed(seed)
    model = MambaLMHeadModel(cfg, backend=backend, device=DEV)
    with torch.no_grad():  # biases and norms away from their init
        for n, p in model.named_parameters():
            if n.endswith(("dt_bias", "norm.weight", "norm_f.weight", "conv1d.bias")):
                p.add_(torch.randn_like(p) * 0.3)
    return model


def test_fused_hybrid_packed_equals_documents():
    model = _hybrid("fused", rotary=8)
    g = torch.Generator(DEV).manual_seed(1)
    ids = torch.randint(0, 211, (len(LAYOUTS), SEQ), generator=g, device=DEV)
    labels = torch.randint(0, 211, (len(LAYOUTS), SEQ), generator=g, device=DEV)
    model.zero_grad(set_to_none=True)
    packed = model(ids, seq_idx=seq_idx_from_lengths(LAYOUTS, device=DEV))
    F.cross_entropy(packed.flatten(0, 1), labels.flatten(), reduction="sum").backward()
    g_packed = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    errs = {}
    for r, row in enumerate(LAYOUTS):
        start = 0
        for n in row:
            doc = model(ids[r:r + 1, start:start + n])
            errs[f"logits r{r} @{start}"] = rel(packed[r:r + 1, start:start + n], doc)
            F.cross_entropy(doc.flatten(0, 1), labels[r, start:start + n], reduction="sum").backward()
            start += n
    errs.update({n: rel(g_packed[n], p.grad) for n, p in model.named_parameters()})
    for n, e in errs.items():
        print(f"ERR | fused hybrid packed vs documents | {n} | {e:.3e}")
    assert max(errs.values()) <= 1e-4, max(errs.items(), key=lambda kv: kv[1])


@pytest.mark.parametrize("rotary", [0, 16], ids=["no-rotary", "rotary"])
@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_exported_hybrid_equals_mamba_ssm(tmp_path, backend, rotary):
    if rotary and importlib.util.find_spec("flash_attn") is None:
        pytest.skip("mamba_ssm's MHA needs flash_attn for rotary embeddings")
    from mamba_ssm.models.config_mamba import MambaConfig as SSMConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel as SSMLMHeadModel

    from mamba_dist.convert import export_mamba_ssm, target

    ours = _hybrid(backend, rotary)
    ck = str(tmp_path / "ck")
    target.write_checkpoint(ck, ours.config, 1, ((n, t.cpu()) for n, t in ours.state_dict().items()))
    out = export_mamba_ssm(ck, str(tmp_path / "ms"), tokenizer="byte", progress=False)
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["attn_cfg"]["causal"] is True
    theirs = SSMLMHeadModel(SSMConfig(**config), device=DEV, dtype=torch.float32)
    theirs.load_state_dict(torch.load(os.path.join(out, "pytorch_model.bin"), map_location=DEV))  # strict
    assert type(theirs.backbone.layers[1].mixer).__name__ == "MHA"

    g = torch.Generator(DEV).manual_seed(2)
    ids = torch.randint(0, 211, (2, SEQ), generator=g, device=DEV)
    labels = torch.randint(0, 211, (2, SEQ), generator=g, device=DEV)

    def fwd_bwd(model, theirs_, **kw):
        model.zero_grad(set_to_none=True)
        logits = model(ids, **kw)
        logits = logits.logits if theirs_ else logits
        F.cross_entropy(logits.flatten(0, 1), labels.flatten()).backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    lt, gt = fwd_bwd(theirs, True)
    lo, go = fwd_bwd(ours, False)
    lz, gz = fwd_bwd(ours, False, seq_idx=torch.zeros_like(ids, dtype=torch.int32))  # one document per row
    assert set(go) == set(gt)
    errs = {"logits": (rel(lo, lt), 1e-5), "logits seq_idx=0": (rel(lz, lt), 1e-4)}
    errs.update({n: (rel(go[n], gt[n]), 1e-4) for n in go})
    errs.update({f"{n} seq_idx=0": (rel(gz[n], gt[n]), 1e-3) for n in go})
    failures = []
    for n, (e, tol) in errs.items():
        print(f"ERR | hybrid vs mamba_ssm {backend} rotary={rotary} | {n} | {e:.3e} | {tol:.0e}")
        if not e <= tol:
            failures.append((n, e, tol))
    assert not failures, failures
