"""model/flops.py against a direct count: torch's FlopCounterMode counts every matmul, batched matmul, einsum and
convolution the reference backend actually runs in a forward pass; that per-token count must equal the matmul work
flops.py claims, at two sizes per mixer. The parts of flops.py's count that the reference kernels do not run as
matmuls are named and subtracted explicitly (elementwise scan terms), and the parts the reference runs on top
(the conv's W-1 padded output positions it discards, the zero incoming state of the first SSD chunk) added."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mamba_dist.model import MambaConfig, MambaLMHeadModel
from mamba_dist.model.flops import flops_per_token

SIZES = {
    "Mamba1": [dict(d_model=32, n_layer=2, ssm_cfg={"layer": "Mamba1", "d_state": 8}),
               dict(d_model=80, n_layer=3, ssm_cfg={"layer": "Mamba1", "d_state": 16, "d_conv": 3})],
    "Mamba2": [dict(d_model=32, n_layer=2, ssm_cfg={"layer": "Mamba2", "d_state": 16, "headdim": 16,
                                                     "chunk_size": 16}),
               dict(d_model=96, n_layer=3, ssm_cfg={"layer": "Mamba2", "d_state": 32, "headdim": 24, "ngroups": 2,
                                                     "chunk_size": 32})],
}
BATCH, SEQ = 2, 64


def counted_forward_flops(cfg: MambaConfig) -> float:
    torch.manual_seed(0)
    model = MambaLMHeadModel(cfg, backend="reference").eval()
    ids = torch.randint(0, cfg.vocab_size, (BATCH, SEQ))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(ids)
    return counter.get_total_flops() / (BATCH * SEQ)


@pytest.mark.parametrize("mixer,size", [(m, i) for m in SIZES for i in range(2)])
def test_per_token_flops_match_the_models_matmul_work(mixer, size):
    kw = SIZES[mixer][size]
    cfg = MambaConfig(vocab_size=300, pad_vocab_size_multiple=8, **kw)
    f = flops_per_token(cfg.to_dict(), SEQ)
    ssm = kw["ssm_cfg"]
    d_inner, N, W, n_layer = 2 * kw["d_model"], ssm["d_state"], ssm.get("d_conv", 4), kw["n_layer"]
    if mixer == "Mamba1":
        # of the 9 d_inner d_state scan FLOPs only y = C . h (2 d_inner d_state) is a contraction; the rest
        # (exp(dt A), dt B u, the recurrence, the D skip) is elementwise
        scan_matmul = n_layer * 2 * d_inner * N
        conv_channels = d_inner
    else:
        H, P, G, Q = d_inner // ssm["headdim"], ssm["headdim"], ssm.get("ngroups", 1), ssm["chunk_size"]
        n_chunks = SEQ // Q
        # C B^T, scores @ x and the chunk states are einsums; passing states between chunks (2 HPN / Q) is an
        # elementwise scan; the state output (2 HPN) is skipped for the first chunk, whose incoming state is 0
        per_layer = f.scan / n_layer - 2 * H * P * N / Q - 2 * H * P * N / n_chunks
        assert per_layer == pytest.approx(2 * Q * G * N + 2 * Q * H * P + 2 * H * P * N
                                          + 2 * H * P * N * (n_chunks - 1) / n_chunks)
        scan_matmul = n_layer * per_layer
        conv_channels = d_inner + 2 * G * N
    # F.conv1d with padding W-1 computes L + W - 1 outputs per row; the reference keeps the first L
    conv_counted = f.conv * (SEQ + W - 1) / SEQ
    assert f.conv == n_layer * 2 * conv_channels * W
    expected = f.matmul + f.lm_head + conv_counted + scan_matmul
    assert counted_forward_flops(cfg) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("mixer", ["Mamba1", "Mamba2"])
def test_training_is_three_forwards(mixer):
    """flops.train() = 3 x forward: the backward of every projection and of the LM head is two matmuls of the
    forward's size (grad of input, grad of weight), counted directly in a forward + backward pass."""
    kw = SIZES[mixer][1]
    cfg = MambaConfig(vocab_size=300, pad_vocab_size_multiple=8, **kw)
    model = MambaLMHeadModel(cfg, backend="reference")
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    ids = torch.randint(0, cfg.vocab_size, (BATCH, SEQ))
    counts = {}
    for phase in ("forward", "train"):
        with FlopCounterMode(display=False) as counter:
            out = model(ids)
            if phase == "train":
                out.float().square().mean().backward()
        # the linear layers' share: every mm/addmm on a Linear's weight shape
        counts[phase] = sum(v for k, v in counter.get_flop_counts()["Global"].items()
                            if str(k) in ("aten.mm", "aten.addmm", "aten.mm.default", "aten.addmm.default"))
    f = flops_per_token(cfg.to_dict(), SEQ)
    assert len(linears) >= 2 * kw["n_layer"] + 1  # in_proj, out_proj (+ x_proj, dt_proj), the head
    assert counts["forward"] / (BATCH * SEQ) == pytest.approx(f.matmul + f.lm_head, rel=1e-9)
    assert counts["train"] / (BATCH * SEQ) == pytest.approx(3 * (f.matmul + f.lm_head), rel=1e-9)


def test_attention_flops_match_counted_work():
    """Attention layers (GQA, conv, in-attention MLP): projections, conv and QK^T + AV as FlopCounterMode counts
    them. Non-causal rows without seq_idx, where SDPA computes exactly the pairs flops.py counts (the full square);
    causal and packed rows change only the context (checked against the mask below)."""
    attn = {"num_heads": 4, "num_heads_kv": 2, "head_dim": 8, "d_conv": 4, "mlp_dim": 100, "causal": False,
            "rotary_emb_dim": 4}
    cfg = MambaConfig(d_model=32, n_layer=2, vocab_size=300, attn_layer_idx=[0, 1], attn_cfg=attn)
    f = flops_per_token(cfg.to_dict(), SEQ)
    q, qkv, mlp = 32, 8 * (4 + 2 * 2), 256
    assert f.matmul == 2 * 2 * (32 * (qkv + mlp) + (q + mlp // 2) * 32)
    assert f.scan == 2 * 4 * q * SEQ and f.attn_context == SEQ
    conv_counted = f.conv * (SEQ + 3) / SEQ  # F.conv1d's W-1 padded outputs, as above
    assert counted_forward_flops(cfg) == pytest.approx(f.matmul + f.lm_head + conv_counted + f.scan, rel=1e-9)


@pytest.mark.parametrize("causal", [True, False])
def test_attention_context_is_the_masks_share(causal):
    """The mean keys per query flops.py uses (causal half, document mask) equals the count of allowed pairs in the
    attention mask the reference kernel builds."""
    from mamba_dist.model.flops import attention_context
    from mamba_dist.model.ops.reference import document_mask
    from mamba_dist.model.packing import doc_lengths, seq_idx_from_lengths

    rows = [[10, 1, 53], [64], [32, 32]]
    seq_idx = seq_idx_from_lengths(rows)
    assert doc_lengths(seq_idx) == rows
    allowed = document_mask(seq_idx, 64, causal).sum().item() / seq_idx.numel()
    assert attention_context(64, rows, causal) == pytest.approx(allowed, rel=1e-12)
    if causal:
        assert attention_context(64) == 65 / 2  # one document per row: half the square (and the diagonal)
    attn = {"num_heads": 4, "causal": causal}
    cfg = {"d_model": 32, "n_layer": 3, "vocab_size": 64, "attn_layer_idx": [1], "attn_cfg": attn}
    packed, whole = flops_per_token(cfg, 64, rows), flops_per_token(cfg, 64)
    assert packed.scan - whole.scan == pytest.approx(4 * 32 * (allowed - whole.attn_context), rel=1e-9)
    assert whole.with_attention_context(allowed).forward == pytest.approx(packed.forward, rel=1e-12)
    assert packed.per_layer[1] - whole.per_layer[1] == pytest.approx(4 * 32 * (allowed - whole.attn_context))
    assert packed.per_layer[0] == whole.per_layer[0]  # Mamba layers do not depend on the packing
