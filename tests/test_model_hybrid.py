"""Hybrid models (attention layers among Mamba layers, model/mha.py), CPU, fp32.

- Packed equals separate for the whole hybrid stack (Mamba-1 and Mamba-2, attention at 2 of 4 layers, GQA,
  rotary, the attention conv, mamba_ssm's in-attention MLP and d_intermediate MLPs): per-document logits and every
  parameter gradient within 1e-5 (relative to the largest entry), as test_model_packing.py does for pure Mamba.
- Guard: with the document mask off in the attention layers (mamba_ssm's behaviour; the Mamba layers still reset)
  later documents see earlier ones.
- The reference attention kernel against a per-query oracle (GQA, causal and not, masks), the fused wrapper's
  flex_attention block mask (eager flex on CPU) against the reference, rotary positions restarting per document,
  and mamba_ssm's MHA parameter names and shapes.
"""

import pytest
import torch
from _packing_check import check_packed_equals_separate, rel_err

from mamba_dist.model import MambaConfig, MambaLMHeadModel
from mamba_dist.model.mha import MHA, apply_rotary, positions_in_document
from mamba_dist.model.ops import fused, reference
from mamba_dist.model.packing import seq_idx_from_lengths

TOL = 1e-5
SEQ = 24
LAYOUTS = [[1, 7, 8, 8], [13, 1, 10], [SEQ]]  # a 1-token document first and in the middle; a full row

ATTN = {"num_heads": 4, "num_heads_kv": 2, "head_dim": 8, "rotary_emb_dim": 4, "qkv_proj_bias": True,
        "out_proj_bias": True}


def hybrid_config(mixer: str) -> MambaConfig:
    if mixer == "Mamba1":
        # attention with its own conv (d_conv 4) and interleaved rotary; GatedMLPs after every mixer
        ssm = {"layer": "Mamba1", "d_state": 8}
        attn = {**ATTN, "d_conv": 4, "rotary_emb_interleaved": True}
        d_intermediate = 40
    else:
        # mamba_ssm's in-attention MLP (mlp_dim, rounded up to 256) and a rotary on half of each head
        ssm = {"layer": "Mamba2", "d_state": 16, "headdim": 8, "ngroups": 2, "chunk_size": 8}
        attn = {**ATTN, "mlp_dim": 64, "softmax_scale": 0.3}
        d_intermediate = 0
    return MambaConfig(d_model=32, n_layer=4, vocab_size=64, ssm_cfg=ssm, attn_layer_idx=[1, 3], attn_cfg=attn,
                       d_intermediate=d_intermediate)


def build(mixer: str) -> MambaLMHeadModel:
    torch.manual_seed(0)
    return MambaLMHeadModel(hybrid_config(mixer), backend="reference")


@pytest.mark.parametrize("mixer", ["Mamba1", "Mamba2"])
def test_hybrid_packed_equals_separate(mixer, monkeypatch):
    monkeypatch.setattr(reference, "CHUNK", 8)
    model = build(mixer)
    assert [type(layer.mixer).__name__ for layer in model.backbone.layers][1::2] == ["MHA", "MHA"]
    g_sep = check_packed_equals_separate(model, LAYOUTS, SEQ, TOL)
    assert any(".mixer.in_proj." in n for n in g_sep if n.startswith("backbone.layers.1."))


@pytest.mark.parametrize("mixer", ["Mamba1", "Mamba2"])
def test_without_the_attention_mask_documents_leak(mixer, monkeypatch):
    """Guard: seq_idx still resets the Mamba layers, but attention layers without the document mask (what
    mamba_ssm's MHA does) let the second document of the row see the first."""
    monkeypatch.setattr(reference, "CHUNK", 8)
    model = build(mixer)
    ids = torch.randint(0, 64, (1, SEQ))
    seq_idx = seq_idx_from_lengths([[10, SEQ - 10]])
    with torch.no_grad():
        alone = model(ids[:, 10:])
        masked = model(ids, seq_idx)
        for layer in model.backbone.layers:
            if isinstance(layer.mixer, MHA):
                layer.mixer.mask_documents = False
        leaked = model(ids, seq_idx)
    assert rel_err(masked[:, 10:], alone) <= TOL
    assert rel_err(leaked[:, 10:], alone) > 1e-3


@pytest.mark.parametrize("causal", [True, False])
def test_reference_attention_matches_the_per_query_oracle(causal):
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 11, 6, 4, generator=g)
    k, v = torch.randn(2, 11, 3, 4, generator=g), torch.randn(2, 11, 3, 4, generator=g)
    for seq_idx in (None, seq_idx_from_lengths([[3, 1, 7], [11]])):
        out = reference.attention(q, k, v, seq_idx, causal, 0.7)
        assert rel_err(out, reference.attention_sequential(q, k, v, seq_idx, causal, 0.7)) <= 1e-6


def test_flex_block_mask_matches_the_reference():
    """The fused backend's flex_attention path (eager flex on CPU, forward only there: the same BlockMask and
    mask_mod the compiled CUDA kernel reads; backward is checked in tests/test_gpu_hybrid.py), GQA, against SDPA
    with the dense mask."""
    g = torch.Generator().manual_seed(3)
    L = 160  # more than one 128-token block
    seq_idx = seq_idx_from_lengths([[5, 100, 55], [130, 30]])
    q = torch.randn(2, L, 4, 16, generator=g)
    k, v = torch.randn(2, L, 2, 16, generator=g), torch.randn(2, L, 2, 16, generator=g)
    for causal in (True, False):
        assert rel_err(fused.attention(q, k, v, seq_idx, causal, 0.2),
                       reference.attention(q, k, v, seq_idx, causal, 0.2)) <= 1e-5
    mask = fused.document_block_mask(seq_idx, True)
    assert fused.document_block_mask(seq_idx, True) is mask  # cached per seq_idx object
    # two documents of one 128-token block each: the second query block visits one key block (its own), not two
    two = fused.document_block_mask(seq_idx_from_lengths([[128, 128]]), True)
    assert (two.kv_num_blocks + two.full_kv_num_blocks)[0, 0].tolist() == [1, 1]


def test_rotary_positions_restart_at_each_document():
    seq_idx = seq_idx_from_lengths([[3, 1, 4]])
    assert positions_in_document(seq_idx, 1, 8, "cpu").tolist() == [[0, 1, 2, 0, 0, 1, 2, 3]]
    x = torch.randn(1, 8, 2, 8)
    pos = positions_in_document(None, 1, 8, "cpu")
    out = apply_rotary(x, pos, 4, 10000.0)
    assert torch.equal(out[..., 4:], x[..., 4:])  # channels past rotary_emb_dim pass through
    assert torch.allclose(out[:, 0], x[:, 0])  # position 0: identity
    # a rotation: norms kept; relative: <R(m) q, R(n) k> depends only on m - n
    assert torch.allclose(out.norm(dim=-1), x.norm(dim=-1), atol=1e-6)
    q, k = torch.randn(1, 1, 1, 8).expand(1, 8, 1, 8), torch.randn(1, 1, 1, 8).expand(1, 8, 1, 8)
    rq, rk = apply_rotary(q, pos, 8, 100.0), apply_rotary(k, pos, 8, 100.0)
    assert torch.allclose((rq[0, 5] * rk[0, 3]).sum(), (rq[0, 2] * rk[0, 0]).sum(), atol=1e-5)


def test_parameter_names_and_shapes_are_mamba_ssms():
    m = MHA(32, num_heads=4, num_heads_kv=2, head_dim=8, mlp_dim=100, d_conv=4, qkv_proj_bias=False)
    qkv = 8 * (4 + 2 * 2)
    shapes = {n: tuple(p.shape) for n, p in m.named_parameters()}
    assert shapes == {"in_proj.weight": (qkv + 256, 32), "conv1d.weight": (qkv, 1, 4), "conv1d.bias": (qkv,),
                      "out_proj.weight": (32, 32 + 128), "out_proj.bias": (32,)}
    assert not list(m.buffers())  # rotary frequencies are computed, not stored (flash_attn's are non-persistent)
    assert MHA(32, num_heads=4).causal  # our default (mamba_ssm's is False)
    with pytest.raises(ValueError, match="num_heads_kv"):
        MHA(32, num_heads=4, num_heads_kv=3)


def test_hybrid_config_errors_and_defaults():
    cfg = hybrid_config("Mamba2")
    assert MambaConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.resolved_attn_cfg()["causal"] is True and cfg.resolved_attn_cfg()["d_conv"] == 0
    with pytest.raises(ValueError, match="num_heads is required"):
        MambaConfig(d_model=32, n_layer=2, vocab_size=64, attn_layer_idx=[1])
    with pytest.raises(ValueError, match="attn_layer_idx"):
        MambaConfig(d_model=32, n_layer=2, vocab_size=64, attn_layer_idx=[2], attn_cfg={"num_heads": 4})
    with pytest.raises(ValueError, match="attn_cfg"):
        MambaLMHeadModel(MambaConfig(d_model=32, n_layer=2, vocab_size=64, attn_layer_idx=[1],
                                     attn_cfg={"num_heads": 4, "n_heads_kv": 2}), backend="reference")


@pytest.mark.parametrize("mixer", ["Mamba1", "Mamba2"])
def test_recurrent_step_equals_the_full_forward(mixer):
    """Generation through a hybrid: the recurrent step (KV cache for the attention layers, grown twice from 4
    positions; conv windows; SSM states) gives the full forward's logits at every position."""
    model = build(mixer).eval()
    ids = torch.randint(0, 64, (2, 13))
    with torch.no_grad():
        full = model(ids)
    cache = model.allocate_inference_cache(2, max_seqlen=4)
    steps = torch.stack([model.step(ids[:, t], cache) for t in range(ids.shape[1])], dim=1)
    assert rel_err(steps, full) <= TOL
    assert cache[1][1].shape[1] == 16 and int(cache[1][2]) == 13  # KV cache grown 4 -> 8 -> 16, 13 tokens seen
