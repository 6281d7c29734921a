"""FLOPs per token for MFU (mamba_dist/model/flops.py): hand counts, agreement with the model's actual layer
shapes, and the peak-FLOP/s sources."""

import math

import pytest
import torch

from mamba_dist.metrics import measure_cpu_matmul_flops
from mamba_dist.model.flops import flops_per_token, peak_flops_for


def test_mamba1_hand_count():
    # d=64, di=128, R=4, N=16, conv 4, vocab 257 -> 264, 2 layers
    cfg = {"d_model": 64, "n_layer": 2, "vocab_size": 257, "ssm_cfg": {"layer": "Mamba1"}}
    f = flops_per_token(cfg, seq_len=128)
    per_layer_matmul = 2 * (64 * 256 + 128 * (4 + 32) + 4 * 128 + 128 * 64)
    assert f.matmul == 2 * per_layer_matmul
    assert f.conv == 2 * (2 * 128 * 4)
    assert f.scan == 2 * (9 * 128 * 16)
    assert f.lm_head == 2 * 64 * 264
    assert f.forward == f.matmul + f.conv + f.scan + f.lm_head
    assert f.train() == 3 * f.forward
    assert f.hardware(1) == f.train() + f.per_layer[0] and f.hardware(0) == f.train()


def test_mamba2_ssd_terms_and_chunk_clamp():
    # d=64 -> di=128, headdim 32 -> H=4, G=2, N=16, chunk 64
    ssm = {"layer": "Mamba2", "d_state": 16, "headdim": 32, "ngroups": 2, "chunk_size": 64}
    cfg = {"d_model": 64, "n_layer": 1, "vocab_size": 100, "ssm_cfg": ssm, "pad_vocab_size_multiple": 16}
    H, P, G, N = 4, 32, 2, 16
    for seq_len, Q in ((256, 64), (16, 16)):  # a sequence shorter than a chunk is one chunk of its length
        f = flops_per_token(cfg, seq_len)
        expect = 2 * Q * G * N + 2 * Q * H * P + 4 * H * P * N + 2 * H * P * N / Q
        assert f.scan == pytest.approx(expect)
    f = flops_per_token(cfg, 256)
    assert f.matmul == 2 * (64 * (2 * 128 + 2 * G * N + H) + 128 * 64)
    assert f.conv == 2 * (128 + 2 * G * N) * 4
    assert f.lm_head == 2 * 64 * 112


@pytest.mark.parametrize("mixer", ["Mamba1", "Mamba2"])
def test_matmul_and_conv_counts_match_the_model(mixer):
    """2 FLOPs per weight of every Linear (the tied head included once) and per conv tap, from the real model."""
    from mamba_dist.model import MambaConfig, MambaLMHeadModel

    ssm = {"layer": mixer, "d_state": 16} | ({"headdim": 16, "ngroups": 2, "chunk_size": 32} if mixer == "Mamba2"
                                              else {})
    cfg = MambaConfig(d_model=48, n_layer=3, vocab_size=300, ssm_cfg=ssm, pad_vocab_size_multiple=8)
    model = MambaLMHeadModel(cfg, backend="reference", device="meta")
    linear = sum(m.weight.numel() for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and not n.startswith("lm_head"))
    conv = sum(m.weight.numel() for n, m in model.named_modules() if n.endswith("conv1d"))
    f = flops_per_token(cfg.to_dict(), seq_len=64)
    assert f.matmul == 2 * linear
    assert f.conv == 2 * conv
    assert f.lm_head == 2 * model.lm_head.weight.numel()


def test_released_sizes_are_dominated_by_matmuls_but_scan_counts():
    m1 = flops_per_token({"d_model": 768, "n_layer": 24, "vocab_size": 50277, "ssm_cfg": {}}, 2048)
    m2 = flops_per_token({"d_model": 768, "n_layer": 24, "vocab_size": 50277, "pad_vocab_size_multiple": 16,
                          "ssm_cfg": {"layer": "Mamba2"}}, 2048)
    # projections: 2 FLOPs per non-embedding weight (89.65M of them at mamba-130m)
    assert m1.matmul == 2 * 24 * (4 * 768**2 + 1536 * (48 + 32) + 48 * 1536 + 2 * 768**2)
    assert 0.01 < m1.scan / m1.forward < 0.05  # the S6 scan: ~2% at 130M
    assert 0.1 < m2.scan / m2.forward < 0.2  # SSD with d_state 128, chunk 256: ~13%


def test_peak_flops_sources():
    assert peak_flops_for("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert peak_flops_for("NVIDIA H200", "bf16") == 989e12
    assert peak_flops_for("Some Unknown GPU", "bf16") is None
    state = torch.get_rng_state()
    measured = measure_cpu_matmul_flops(n=256, reps=2)
    assert math.isfinite(measured) and measured > 1e8
    assert torch.equal(state, torch.get_rng_state())  # must not disturb the RNG (bit-exact resume)
