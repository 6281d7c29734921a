"""Our MambaLMHeadModel (reference backend) against HF transformers' pure-torch MambaForCausalLM /
Mamba2ForCausalLM loaded with the same weights (CPU, fp32).

The only state-dict rename is HF's own (its load hook): `backbone.embedding.` -> `backbone.embeddings.`.
Metric: relative error = max|ours - hf| / max|hf| over all logits, required <= 1e-5."""

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mamba_dist.model import MambaConfig, MambaLMHeadModel  # noqa: E402

TOL = 1e-5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def hf_state_dict(model) -> dict:
    return {k.replace("backbone.embedding.", "backbone.embeddings."): v for k, v in model.state_dict().items()}


def hf_mamba1(cfg: MambaConfig, m):
    ssm = cfg.ssm_cfg
    mixer = m.backbone.layers[0].mixer
    hf_cfg = transformers.MambaConfig(
        vocab_size=cfg.padded_vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layer,
        state_size=mixer.d_state, expand=mixer.expand, conv_kernel=mixer.d_conv, time_step_rank=mixer.dt_rank,
        use_bias=ssm.get("bias", False), use_conv_bias=ssm.get("conv_bias", True), layer_norm_epsilon=1e-5,
        residual_in_fp32=cfg.residual_in_fp32, tie_word_embeddings=cfg.tie_embeddings, use_mambapy=False,
        use_associative_scan=False, use_cache=False)
    return transformers.MambaForCausalLM(hf_cfg)


def hf_mamba2(cfg: MambaConfig, m):
    mixer = m.backbone.layers[0].mixer
    assert mixer.d_ssm == mixer.d_inner and not mixer.D_has_hdim and mixer.rmsnorm and not mixer.norm_before_gate
    hf_cfg = transformers.Mamba2Config(
        vocab_size=cfg.padded_vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layer,
        state_size=mixer.d_state, expand=mixer.expand, conv_kernel=mixer.d_conv, num_heads=mixer.nheads,
        head_dim=mixer.headdim, n_groups=mixer.ngroups, chunk_size=mixer.chunk_size,
        time_step_limit=mixer.dt_limit, use_bias=cfg.ssm_cfg.get("bias", False),
        use_conv_bias=cfg.ssm_cfg.get("conv_bias", True), layer_norm_epsilon=1e-5,
        residual_in_fp32=cfg.residual_in_fp32, tie_word_embeddings=cfg.tie_embeddings, use_cache=False)
    return transformers.Mamba2ForCausalLM(hf_cfg)


def compare(cfg: MambaConfig, hf_builder, batch: int, seqlen: int, seed: int):
    torch.manual_seed(seed)
    ours = MambaLMHeadModel(cfg, backend="reference").eval()
    # perturb A_log, D, norms away from their init so that a mis-mapped parameter cannot go unnoticed
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith(("A_log", ".D", "norm.weight", "norm_f.weight")):
                p.add_(0.1 * torch.randn_like(p))
    hf = hf_builder(cfg, ours).eval()
    missing, unexpected = hf.load_state_dict(hf_state_dict(ours), strict=True)
    assert not missing and not unexpected
    ids = torch.randint(0, cfg.vocab_size, (batch, seqlen))
    with torch.no_grad():
        a = ours(ids)
        b = hf(ids, use_cache=False).logits
    assert a.shape == b.shape == (batch, seqlen, cfg.padded_vocab_size)
    err = rel_err(a, b)
    assert err <= TOL, f"max rel err {err:.3g}"
    return err


MAMBA1_CASES = [
    # (d_model, n_layer, vocab, ssm_cfg, batch, seqlen)
    (32, 2, 100, {"d_state": 16}, 2, 33),
    (48, 3, 77, {"d_state": 64, "expand": 2, "d_conv": 4}, 1, 70),
    (40, 2, 50, {"d_state": 8, "d_conv": 3, "dt_rank": 5, "conv_bias": False}, 3, 1),
    (64, 2, 120, {"d_state": 16, "bias": True}, 2, 129),
]


@pytest.mark.parametrize("d_model,n_layer,vocab,ssm,batch,seqlen", MAMBA1_CASES)
def test_mamba1_matches_hf(d_model, n_layer, vocab, ssm, batch, seqlen):
    cfg = MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=vocab, ssm_cfg={"layer": "Mamba1", **ssm})
    compare(cfg, hf_mamba1, batch, seqlen, seed=d_model + seqlen)


MAMBA2_CASES = [
    (32, 2, 100, {"d_state": 16, "headdim": 8, "ngroups": 1, "chunk_size": 16}, 2, 37),
    (32, 2, 64, {"d_state": 64, "headdim": 16, "ngroups": 2, "chunk_size": 8}, 1, 45),
    (48, 3, 90, {"d_state": 16, "headdim": 12, "ngroups": 4, "chunk_size": 32, "expand": 2}, 2, 64),
    (32, 2, 100, {"d_state": 32, "headdim": 8, "ngroups": 8, "chunk_size": 16, "dt_limit": (0.01, 0.5)}, 2, 21),
]


@pytest.mark.parametrize("d_model,n_layer,vocab,ssm,batch,seqlen", MAMBA2_CASES)
def test_mamba2_matches_hf(d_model, n_layer, vocab, ssm, batch, seqlen):
    cfg = MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=vocab, ssm_cfg={"layer": "Mamba2", **ssm})
    compare(cfg, hf_mamba2, batch, seqlen, seed=d_model + seqlen)


def test_a_wrong_weight_is_detected():
    """The comparison is sharp: perturbing one of HF's A_log entries breaks agreement."""
    cfg = MambaConfig(d_model=32, n_layer=2, vocab_size=100,
                      ssm_cfg={"layer": "Mamba2", "d_state": 16, "headdim": 8, "ngroups": 2, "chunk_size": 16})
    torch.manual_seed(0)
    ours = MambaLMHeadModel(cfg, backend="reference").eval()
    hf = hf_mamba2(cfg, ours).eval()
    hf.load_state_dict(hf_state_dict(ours))
    with torch.no_grad():
        hf.backbone.layers[1].mixer.A_log[0] += 0.05
    ids = torch.randint(0, 100, (1, 40))
    with torch.no_grad():
        assert rel_err(ours(ids), hf(ids, use_cache=False).logits) > 1e-4


def test_init_matches_mamba_ssm_recipe():
    """Initialisation as mamba_ssm 2.3 does it."""
    n_layer = 4
    for mixer in ("Mamba1", "Mamba2"):
        ssm = {"layer": mixer, "d_state": 16} if mixer == "Mamba1" else {"layer": mixer, "d_state": 16, "headdim": 16}
        cfg = MambaConfig(d_model=64, n_layer=n_layer, vocab_size=1000, ssm_cfg=ssm)
        m = MambaLMHeadModel(cfg, backend="reference")
        emb = m.backbone.embedding.weight
        assert m.lm_head.weight is emb and emb.shape == (1000, 64)
        assert abs(emb.std().item() - 0.02) < 0.002
        for layer in m.backbone.layers:
            mx = layer.mixer
            assert mx.A_log.dtype == mx.D.dtype == torch.float32
            assert torch.equal(mx.D, torch.ones_like(mx.D))
            dt_b = mx.dt_proj.bias if mixer == "Mamba1" else mx.dt_bias
            dt = torch.nn.functional.softplus(dt_b.detach())
            assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001
            A = torch.exp(mx.A_log.detach())
            if mixer == "Mamba1":
                assert torch.allclose(A, torch.arange(1, 17.0).repeat(mx.d_inner, 1))
            else:
                assert A.min() >= 1 and A.max() <= 16 and A.shape == (mx.nheads,)
            # out_proj: kaiming-uniform bound 1/sqrt(fan_in), scaled by 1/sqrt(n_layer)
            bound = 1 / math.sqrt(mx.out_proj.in_features) / math.sqrt(n_layer)
            w = mx.out_proj.weight.detach()
            assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
        pad = MambaLMHeadModel(MambaConfig(d_model=16, n_layer=1, vocab_size=50277, ssm_cfg=ssm | {"d_state": 4}),
                               backend="reference")
        assert pad.lm_head.weight.shape[0] == 50280


def test_no_weight_decay_names():
    cfg = MambaConfig(d_model=32, n_layer=2, vocab_size=64, ssm_cfg={"layer": "Mamba1", "bias": True})
    m = MambaLMHeadModel(cfg, backend="reference")
    nwd = m.no_weight_decay()
    names = dict(m.named_parameters())
    assert nwd <= set(names)
    for n in names:
        expect = n.endswith(("A_log", ".D", "bias")) or "norm" in n
        assert (n in nwd) == expect, n
    cfg2 = MambaConfig(d_model=32, n_layer=1, vocab_size=64,
                       ssm_cfg={"layer": "Mamba2", "headdim": 8, "d_state": 8}, d_intermediate=48)
    nwd2 = MambaLMHeadModel(cfg2, backend="reference").no_weight_decay()
    assert {"backbone.layers.0.mixer.dt_bias", "backbone.layers.0.mixer.norm.weight",
            "backbone.layers.0.norm2.weight", "backbone.layers.0.mixer.A_log"} <= nwd2
    assert "backbone.layers.0.mlp.fc1.weight" not in nwd2


def test_config_roundtrip_and_errors():
    cfg = MambaConfig(d_model=32, n_layer=2, vocab_size=64, ssm_cfg={"layer": "Mamba2", "headdim": 8})
    d = cfg.to_dict()
    assert set(d) == {"d_model", "d_intermediate", "n_layer", "vocab_size", "ssm_cfg", "attn_layer_idx", "attn_cfg",
                      "rms_norm", "residual_in_fp32", "fused_add_norm", "pad_vocab_size_multiple", "tie_embeddings"}
    assert MambaConfig.from_dict(d) == cfg
    with pytest.raises(ValueError, match="unknown field"):
        MambaConfig.from_dict({**d, "d_modle": 3})
    with pytest.raises(ValueError, match="Mamba1"):
        MambaConfig(ssm_cfg={"layer": "Mamba3"})
    with pytest.raises(ValueError, match="num_heads is required"):  # hybrids: tests/test_model_hybrid.py
        MambaLMHeadModel(MambaConfig(d_model=32, n_layer=2, vocab_size=64, attn_layer_idx=[1]), backend="reference")
    with pytest.raises(ValueError, match="ssm_cfg"):
        MambaLMHeadModel(MambaConfig(d_model=32, n_layer=1, vocab_size=64, ssm_cfg={"d_stat": 4}),
                         backend="reference")
    m = MambaLMHeadModel(MambaConfig(d_model=16, n_layer=1, vocab_size=64, ssm_cfg={"d_state": 4}),
                         backend="reference")
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="non-decreasing"):
        m(ids, torch.tensor([[0, 1, 0, 1]], dtype=torch.int32))
    with pytest.raises(ValueError, match="shape"):
        m(ids, torch.zeros(1, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="backend"):
        MambaLMHeadModel(cfg, backend="cuda")


@pytest.mark.parametrize("mixer", ["Mamba1", "Mamba2"])
def test_bf16_runs_close_to_fp32(mixer):
    """bf16 autocast (fp32 weights, as the trainer runs) and a bf16-weight model both run forward+backward with
    packed rows and stay near the fp32 logits (bf16 has 8 bits of mantissa: 5e-2 relative)."""
    ssm = {"layer": mixer, "d_state": 16} if mixer == "Mamba1" else \
        {"layer": mixer, "d_state": 16, "headdim": 8, "ngroups": 2, "chunk_size": 8}
    cfg = MambaConfig(d_model=32, n_layer=2, vocab_size=64, ssm_cfg=ssm)
    model = MambaLMHeadModel(cfg, backend="reference")
    ids = torch.randint(0, 64, (2, 29))
    seq_idx = torch.tensor([[0] * 10 + [1] * 19, [0] * 3 + [1] * 26], dtype=torch.int32)
    ref = model(ids, seq_idx).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, seq_idx)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and rel_err(out.float(), ref) < 5e-2
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    m16 = MambaLMHeadModel(cfg, backend="reference", dtype=torch.bfloat16)
    m16.load_state_dict(model.state_dict())
    assert m16.backbone.layers[0].mixer.A_log.dtype == torch.float32  # kept fp32
    out16 = m16(ids, seq_idx)
    out16.float().sum().backward()
    assert out16.dtype == torch.bfloat16 and rel_err(out16.float(), ref) < 5e-2


def test_backend_choice(caplog):
    import logging
    import subprocess
    import sys

    from mamba_dist.model import resolve_backend

    with caplog.at_level(logging.INFO, logger="mamba_dist.model.backend"):
        assert resolve_backend("auto", device="cpu") == "reference"
    assert "model backend: reference" in caplog.text
    with pytest.raises(RuntimeError, match="'fused' is not usable"):
        resolve_backend("fused", device="cpu")
    with pytest.raises(ValueError, match="auto, reference, fused"):
        resolve_backend("triton")
    # a reference model never imports the fused wrappers (mamba_ssm does not import without CUDA)
    code = ("import sys, torch; from mamba_dist.model import MambaConfig, MambaLMHeadModel; "
            "m = MambaLMHeadModel(MambaConfig(d_model=16, n_layer=1, vocab_size=32, ssm_cfg={'d_state': 4}), "
            "backend='auto'); m(torch.zeros(1, 5, dtype=torch.long)).sum().backward(); "
            "assert m.backend == 'reference' or torch.cuda.is_available(); "
            "assert 'mamba_dist.model.ops.fused' not in sys.modules or m.backend == 'fused'; print('ok')")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "ok\n"
