"""Config: precedence, types, one-line errors, derived sizes, and every file in configs/ (loaded, validated, and
instantiated on the meta device to count parameters)."""

from pathlib import Path

import pytest
import torch

from mamba_dist.config import (Config, ConfigError, config_from_dict, load_config, save_config, validate_config,
                               validate_runtime)

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
BASE = ["data.path=/some/data", "train.max_steps=10"]


def test_precedence_defaults_yaml_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  lr: 1.0e-3\n  weight_decay: 0.05\ntrain:\n  max_steps: 7\ndata:\n  path: /d\n")
    cfg = load_config(str(f), ["optim.lr=2e-3", "model.ssm_cfg.d_state=32", "optim.betas=[0.8, 0.9]"])
    assert cfg.optim.lr == 2e-3  # override beats YAML
    assert cfg.optim.weight_decay == 0.05  # YAML beats default
    assert cfg.optim.eps == Config().optim.eps  # default
    assert cfg.train.max_steps == 7 and cfg.model.ssm_cfg == {"d_state": 32} and cfg.optim.betas == [0.8, 0.9]


def test_yaml_1_1_numbers_and_strings_coerce():
    # PyYAML reads "3e-4" (no dot) as a string; float fields accept it, int fields accept integral floats.
    cfg = config_from_dict({"data": {"path": "/d"}, "optim": {"lr": "3e-4"},
                            "train": {"max_tokens": 1e9, "global_batch_tokens": "524_288"}})
    assert cfg.optim.lr == 3e-4 and cfg.train.max_tokens == 10**9 and cfg.train.global_batch_tokens == 524288
    assert load_config(None, BASE + ["logging.tensorboard=false"]).logging.tensorboard is False


@pytest.mark.parametrize("overrides, message", [
    (["optim.lrr=1"], "optim.lrr: unknown key (valid keys in optim: lr, betas, eps, weight_decay, grad_clip)"),
    (["nosection.x=1"], "nosection: unknown key"),
    (["optim.lr=abc"], "optim.lr: expected a float, got 'abc'"),
    (["train.max_steps=1.5"], "train.max_steps: expected an integer, got 1.5"),
    (["logging.tensorboard=maybe"], "logging.tensorboard: expected true/false, got 'maybe'"),
    (["optim.betas=0.9"], "optim.betas: expected a list, got 0.9"),
    (["optim.lr=-1"], "optim.lr: must be > 0, got -1.0"),
    (["optim.betas=[0.9, 1.5]"], "optim.betas: must be two numbers in [0, 1)"),
    (["model.mixer=Mamba3"], "model.mixer: must be one of Mamba1, Mamba2; got 'Mamba3'"),
    (["model.ssm_cfg.layer=Mamba2"], "model.ssm_cfg.layer: 'Mamba2' conflicts with model.mixer='Mamba1'"),
    (["model.mixer=Mamba2", "model.ssm_cfg.headdim=60"], "model.ssm_cfg.headdim: 60 does not divide d_ssm=1536"),
    (["model.ssm_cfg.d_state=0"], "model.ssm_cfg.d_state: must be a positive integer, got 0"),
    (["train.max_steps=0"], "train.max_steps: set train.max_steps or train.max_tokens"),
    (["train.ac_fraction=2"], "train.ac_fraction: must be in [0, 1], got 2.0"),
    (["schedule.decay=step"], "schedule.decay: must be one of cosine, linear, constant; got 'step'"),
    (["parallel.zero_stage=4"], "parallel.zero_stage: must be 0, 1, 2 or 3, got 4"),
    (["parallel.timeout_s=0"], "parallel.timeout_s: must be > 0 seconds, got 0.0"),
    (["train.spike_factor=0.5"], "train.spike_factor: must be 0 (off) or > 1, got 0.5"),
    (["train.spike_factor=3", "parallel.zero_stage=2"], "train.spike_factor: needs parallel.zero_stage=0"),
    (["data.path="], "data.path: required"),
    (["optim.lr"], "optim.lr: overrides are key=value"),
    (["train.max_steps.x=1"], "train.max_steps.x: train.max_steps has no sub-keys"),
    (["model.attn_layer_idx=[1]"], "model.attn_cfg.num_heads: required when model.attn_layer_idx is set"),
    (["model.attn_layer_idx=[1, 24]", "model.attn_cfg.num_heads=8"],
     "model.attn_layer_idx: 24 is not a layer index (0..23)"),
    (["model.attn_layer_idx=[1]", "model.attn_cfg.num_heads=8", "model.attn_cfg.num_heads_kv=3"],
     "model.attn_cfg.num_heads_kv: 3 does not divide num_heads=8"),
    (["model.attn_layer_idx=[1]", "model.attn_cfg.num_heads=8", "model.attn_cfg.n_heads_kv=2"],
     "model.attn_cfg.n_heads_kv: not an argument of the attention layer"),
    (["model.attn_layer_idx=[1]", "model.attn_cfg.num_heads=8", "model.attn_cfg.rotary_emb_dim=200"],
     "model.attn_cfg.rotary_emb_dim: must be even and <= head_dim=96, got 200"),
])
def test_bad_values_fail_with_one_line_naming_the_field(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, BASE + overrides)
    text = str(e.value)
    assert message in text and "\n" not in text


def test_bad_yaml_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  lr: [\n")
    with pytest.raises(ConfigError, match=r"c.yaml: not valid YAML \(line \d+\)"):
        load_config(str(f))
    f.write_text("- just a list\n")
    with pytest.raises(ConfigError, match="config: expected a mapping of fields"):
        load_config(str(f))
    with pytest.raises(ConfigError, match="--config: no such file"):
        load_config(str(tmp_path / "missing.yaml"))


def test_gradient_accumulation_derived_or_clear_error():
    cfg = load_config(None, BASE + ["data.seq_len=512", "train.micro_batch_size=4", "train.global_batch_tokens=65536",
                                    "train.val_tokens=4096"])
    d = validate_runtime(cfg, world_size=4)
    assert (d.dp_size, d.grad_accum, d.total_steps) == (4, 8, 10)
    assert d.val_batches == 1  # 4096 tokens / (4 x 512 x 4)
    with pytest.raises(ConfigError, match=r"train.global_batch_tokens: 65536 is not a multiple of micro_batch_size x "
                                          r"seq_len x dp = 4 x 512 x 3 = 6144"):
        validate_runtime(cfg, world_size=3)
    tp2 = load_config(None, BASE + ["data.seq_len=512", "train.micro_batch_size=4", "train.global_batch_tokens=65536",
                                    "parallel.tp=2"])
    assert validate_runtime(tp2, world_size=4).grad_accum == 16  # dp = 2
    with pytest.raises(ConfigError, match="parallel.tp: 2 does not divide the world size 3"):
        validate_runtime(tp2, world_size=3)


def test_stop_by_token_budget():
    cfg = load_config(None, ["data.path=/d", "train.max_tokens=10000000", "train.global_batch_tokens=524288",
                             "data.seq_len=2048", "train.micro_batch_size=8"])
    assert validate_runtime(cfg, 1).total_steps == 20  # ceil(1e7 / 524288)
    both = load_config(None, ["data.path=/d", "train.max_tokens=10000000", "train.max_steps=5",
                              "train.global_batch_tokens=524288", "data.seq_len=2048", "train.micro_batch_size=8"])
    assert validate_runtime(both, 1).total_steps == 5  # whichever comes first


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, BASE + ["model.ssm_cfg.d_state=32", "optim.lr=1e-3"])
    save_config(cfg, str(tmp_path / "config.yaml"))
    again = load_config(str(tmp_path / "config.yaml"))
    assert again == cfg


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_file_loads_and_validates(path):
    cfg = load_config(str(path))
    validate_config(cfg)
    # every shipped config runs on one process and on 8 (except the CPU demos, which are sized for 1-2)
    for world in ((1, 2) if "tiny" in path.name else (1, 8)):
        validate_runtime(cfg, world)
    assert cfg.model.mamba_config_dict()["ssm_cfg"]["layer"] == cfg.model.mixer


# Parameter counts from mamba_ssm's layer shapes (tied embeddings; vocab 50277 padded to 50280 for Mamba-1, to 50288
# for Mamba-2). Mamba-1 per layer: in_proj 4d^2, conv 5*di, x_proj di*(R+32), dt_proj R*di+di, A_log 16*di, D di,
# out_proj 2d^2, norm d (di = 2d, R = ceil(d/16)); e.g. 129,135,360 for mamba-130m. Mamba-2 per layer: in_proj
# d*(2*di+2*128+H), conv (di+256)*5, dt_bias/A_log/D 3H, gated norm di, out_proj di*d, norm d (H = di/64).
RELEASED = {"mamba-130m": 129135360, "mamba-370m": 371516416, "mamba-790m": 793204224, "mamba-1.4b": 1372178432,
            "mamba-2.8b": 2768345600, "mamba2-130m": 128989632, "mamba2-370m": 368346624, "mamba2-780m": 780161280,
            "mamba2-1.3b": 1343757312, "mamba2-2.7b": 2702599680,
            # mamba2-2.7b with 6 of its 64 Mamba-2 layers (40,216,560 parameters each) replaced by attention
            # (39,381,760 each: in_proj 2560 x 128*(30+2*30), conv1d 11520*(4+1), out_proj 3840 x 2560, norm 2560)
            "mamba2attn-2.7b": 2702599680 - 6 * (40216560 - 39381760)}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_builds_the_model(path):
    from mamba_dist.model import MambaLMHeadModel

    cfg = load_config(str(path))
    name = path.stem
    if "tiny" in name:
        model = MambaLMHeadModel(cfg.model.to_mamba_config(), backend="reference")  # real weights: it is small
        ids = torch.randint(0, cfg.model.vocab_size, (1, 16))
        logits = model(ids)
        assert logits.shape == (1, 16, cfg.model.padded_vocab_size) and torch.isfinite(logits).all()
        assert sum(p.numel() for p in model.parameters()) < 5e6
        return
    model = MambaLMHeadModel(cfg.model.to_mamba_config(), backend="reference", device="meta")
    n = sum(p.numel() for p in model.parameters())
    assert n == RELEASED[name], (name, n)
    assert model.backbone.embedding.weight.shape[0] == cfg.model.padded_vocab_size
