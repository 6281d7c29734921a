"""Parallel layouts that cannot work fail early with one line; shard/unshard round-trips. Single process."""

import pytest
import torch

from mamba_dist.parallel.dims import ParallelDims, ParallelLayoutError, check_model_layout


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and msg
    return msg


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(tp=4, world_size=6), "world size 6 is not divisible by tp=4"),
        (dict(tp=2, dp=3, world_size=4), "tp=2 x dp=3 = 6 does not equal the world size 4"),
        (dict(tp=0, world_size=4), "parallel.tp must be a positive integer"),
    ],
)
def test_bad_world_layout(kwargs, needle):
    with pytest.raises(ParallelLayoutError) as e:
        ParallelDims(**kwargs)
    assert needle in _one_line(e)


def test_good_world_layout_infers_dp():
    d = ParallelDims(tp=2, world_size=8)
    assert (d.tp, d.dp) == (2, 4)
    assert ParallelDims(tp=1, sequence_parallel=True, world_size=2).sequence_parallel is False


def test_from_env_reads_world_size(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")

    class Cfg:
        tp = 2
        dp = -1
        sequence_parallel = True
        zero_stage = 2  # ignored by ParallelDims

    d = ParallelDims.from_env(Cfg())
    assert (d.world_size, d.tp, d.dp, d.sequence_parallel) == (4, 2, 2, True)
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ParallelLayoutError, match="world size 3 is not divisible by tp=2"):
        ParallelDims.from_env(Cfg())


def _cfg(layer, d_model=64, vocab=1000, mult=8, **ssm):
    return {"d_model": d_model, "n_layer": 2, "vocab_size": vocab, "pad_vocab_size_multiple": mult,
            "ssm_cfg": {"layer": layer, **ssm}}


@pytest.mark.parametrize(
    "cfg, tp, needle",
    [
        (_cfg("Mamba1", d_model=36, expand=1), 8, "tp=8 does not divide Mamba-1 d_inner=36"),
        (_cfg("Mamba2", d_model=64, headdim=16, ngroups=1), 2, "tp=2 does not divide Mamba-2 ngroups=1"),
        (_cfg("Mamba2", d_model=64, headdim=16, ngroups=2), 4, "tp=4 does not divide Mamba-2 ngroups=2"),
        (_cfg("Mamba1", vocab=1001, mult=1), 2, "padded vocab size 1001 is not divisible by tp=2"),
        ({**_cfg("Mamba1"), "attn_layer_idx": [1], "attn_cfg": {"num_heads": 8, "num_heads_kv": 2}}, 4,
         "tp=4 does not divide the attention layers' num_heads_kv=2"),
    ],
)
def test_bad_model_layout(cfg, tp, needle):
    with pytest.raises(ParallelLayoutError) as e:
        check_model_layout(cfg, tp)
    assert needle in _one_line(e)


def test_good_model_layouts():
    check_model_layout(_cfg("Mamba1"), 4)
    check_model_layout(_cfg("Mamba2", headdim=16, ngroups=4), 4)
    check_model_layout(_cfg("Mamba2", headdim=16, ngroups=1), 1)


def test_shard_unshard_roundtrip():
    from mamba_dist.parallel.layers import shard_tensor, unshard_tensors

    full = torch.arange(2 * 12 * 3, dtype=torch.float32).view(24, 3)
    segments = (8, 8, 4, 4)
    for world in (1, 2, 4):
        shards = [shard_tensor(full, 0, segments, r, world) for r in range(world)]
        assert all(s.shape == (24 // world, 3) for s in shards)
        assert torch.equal(unshard_tensors(shards, 0, segments), full)
    # rank 1 of 2 holds the second half of every segment, in segment order
    expect = torch.cat([full[4:8], full[12:16], full[18:20], full[22:24]])
    assert torch.equal(shard_tensor(full, 0, segments, 1, 2), expect)
    with pytest.raises(ValueError, match="not divisible by tp=3"):
        shard_tensor(full, 0, segments, 0, 3)


def test_ac_layer_selection():
    from mamba_dist.parallel.ac import selected_layers

    assert selected_layers(4, 0.0) == []
    assert selected_layers(4, 0.5) == [0, 1]
    assert selected_layers(4, 1.0) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="must be in"):
        selected_layers(4, 1.5)


def _model(**kw):
    from mamba_dist.model import MambaConfig, MambaLMHeadModel

    base = dict(d_model=32, n_layer=1, vocab_size=64, pad_vocab_size_multiple=8, ssm_cfg={"layer": "Mamba1"})
    base.update(kw)
    return MambaLMHeadModel(MambaConfig(**base), backend="reference")


class _FakeDims:
    """What apply_tp reads before it touches any process group."""

    def __init__(self, tp):
        self.tp, self.tp_enabled, self.sequence_parallel, self.tp_group = tp, tp > 1, False, None


@pytest.mark.parametrize(
    "kw, tp, needle",
    [
        (dict(d_model=36, pad_vocab_size_multiple=40), 5, "tp=5 does not divide Mamba-1 d_inner=72"),
        (dict(ssm_cfg={"layer": "Mamba2", "headdim": 16, "ngroups": 1, "d_state": 8}), 2,
         "tp=2 does not divide Mamba-2 ngroups=1"),
        (dict(vocab_size=61, pad_vocab_size_multiple=1), 2, "padded vocab size 61 is not divisible by tp=2"),
        (dict(n_layer=2, attn_layer_idx=[1], attn_cfg={"num_heads": 4, "num_heads_kv": 1}), 2,
         "tp=2 does not divide the attention layers' num_heads_kv=1"),
    ],
)
def test_apply_tp_rejects_bad_layout_before_touching_the_model(kw, tp, needle):
    from mamba_dist.parallel.tp import apply_tp

    model = _model(**kw)
    with pytest.raises(ParallelLayoutError) as e:
        apply_tp(model, _FakeDims(tp))
    assert needle in _one_line(e)
    assert type(model.backbone.embedding) is torch.nn.Embedding  # nothing was swapped
