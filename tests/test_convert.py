"""`mamba-dist convert` and `mamba-dist generate` in one process (CPU, fp32): HF config fields one by one,
refusals, the byte tokenizer as a `tokenizers` JSON, lossless HF / mamba_ssm round trips, the offline TP layout
against apply_tp, and generation with the recurrent step (against the full forward and HF's generate, with a
constant state size). The trainer-made checkpoints (TP x DP x ZeRO under torchrun) are in test_convert_dist.py."""

import json
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mamba_dist.convert import ConvertError, export_hf, export_mamba_ssm, import_model, reshard  # noqa: E402
from mamba_dist.convert import formats, layout, source, target  # noqa: E402
from mamba_dist.convert.generate import cache_bytes, filter_logits, generate, load_model  # noqa: E402
from mamba_dist.convert.tokenizer_files import byte_tokenizer_json  # noqa: E402
from mamba_dist.model import MambaConfig, MambaLMHeadModel  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5

# every HF-mapped field away from its default
M1_FIELDS = dict(d_model=40, n_layer=2, vocab_size=257, pad_vocab_size_multiple=8, residual_in_fp32=False,
                 tie_embeddings=False,
                 ssm_cfg={"layer": "Mamba1", "d_state": 12, "d_conv": 3, "expand": 3, "dt_rank": 5, "bias": True,
                          "conv_bias": False, "dt_min": 0.002, "dt_max": 0.2, "dt_init_floor": 2e-4,
                          "dt_scale": 1.5, "dt_init": "constant"})
M2_FIELDS = dict(d_model=32, n_layer=2, vocab_size=257, pad_vocab_size_multiple=16, residual_in_fp32=True,
                 tie_embeddings=True,
                 ssm_cfg={"layer": "Mamba2", "d_state": 16, "d_conv": 3, "expand": 2, "headdim": 8, "ngroups": 4,
                          "chunk_size": 16, "dt_limit": (0.01, 0.4), "bias": True, "conv_bias": False,
                          "dt_min": 0.002, "dt_max": 0.2, "dt_init_floor": 2e-4})
HF_EXPECT = {
    "Mamba1": dict(hidden_size=40, num_hidden_layers=2, vocab_size=264, state_size=12, conv_kernel=3, expand=3,
                   time_step_rank=5, use_bias=True, use_conv_bias=False, residual_in_fp32=False,
                   tie_word_embeddings=False, layer_norm_epsilon=1e-5, time_step_min=0.002, time_step_max=0.2,
                   time_step_floor=2e-4, time_step_scale=1.5, time_step_init_scheme="constant",
                   intermediate_size=120, eos_token_id=256, bos_token_id=256, pad_token_id=256),
    "Mamba2": dict(hidden_size=32, num_hidden_layers=2, vocab_size=272, state_size=16, conv_kernel=3, expand=2,
                   num_heads=8, head_dim=8, n_groups=4, chunk_size=16, time_step_limit=(0.01, 0.4), use_bias=True,
                   use_conv_bias=False, residual_in_fp32=True, tie_word_embeddings=True, layer_norm_epsilon=1e-5,
                   time_step_min=0.002, time_step_max=0.2, time_step_floor=2e-4, eos_token_id=256),
}


def perturbed_model(cfg: MambaConfig, seed: int = 0) -> MambaLMHeadModel:
    """A model whose A_log, D, dt biases and norms are away from their init (a mis-mapped one then shows)."""
    torch.manual_seed(seed)
    m = MambaLMHeadModel(cfg, backend="reference").eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith(("A_log", ".D", "norm.weight", "norm_f.weight", "dt_bias", "dt_proj.bias", ".bias")):
                p.add_(0.2 * torch.randn_like(p))
    return m


def make_checkpoint(tmp_path, model: MambaLMHeadModel, tp: int = 1, name: str = "ckpt") -> str:
    """A weights-only trainer checkpoint of `model` (the byte tokenizer is passed to the exports explicitly)."""
    out = str(tmp_path / name)
    target.write_checkpoint(out, model.config, tp, model.state_dict().items())
    return out


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# --------------------------------------------------------------------------------------------- HF config fields
@pytest.mark.parametrize("mixer", ["Mamba1", "Mamba2"])
def test_export_hf_maps_every_config_field_and_logits_match(tmp_path, mixer):
    cfg = MambaConfig(**(M1_FIELDS if mixer == "Mamba1" else M2_FIELDS))
    ours = perturbed_model(cfg)
    out = export_hf(make_checkpoint(tmp_path, ours), str(tmp_path / "hf"), tokenizer="byte", progress=False)
    hf_cfg = transformers.AutoConfig.from_pretrained(out)
    for field, want in HF_EXPECT[mixer].items():
        got = getattr(hf_cfg, field)
        got = tuple(got) if isinstance(got, list) else got
        assert got == pytest.approx(want) if isinstance(want, (float, tuple)) else got == want, (field, got, want)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == ("MambaForCausalLM" if mixer == "Mamba1" else "Mamba2ForCausalLM")
    ids = torch.randint(0, 257, (2, 37))
    with torch.no_grad():
        err = rel(ours(ids), hf(ids, use_cache=False).logits)
    assert err <= TOL, err
    gen = json.load(open(os.path.join(out, "generation_config.json")))
    assert gen["eos_token_id"] == gen["bos_token_id"] == gen["pad_token_id"] == 256
    # import restores our exact config (HF cannot hold the unpadded vocab, the padding multiple, dt_init ...)
    back = import_model(out, str(tmp_path / "back"), progress=False)
    restored = source.open_checkpoint(back).model_config
    assert restored.resolved_ssm_cfg() == cfg.resolved_ssm_cfg()  # (JSON has lists where cfg had tuples)
    assert {k: v for k, v in restored.to_dict().items() if k != "ssm_cfg"} == \
        {k: v for k, v in cfg.to_dict().items() if k != "ssm_cfg"}


def test_export_hf_bf16(tmp_path):
    cfg = MambaConfig(**M2_FIELDS)
    ours = perturbed_model(cfg)
    out = export_hf(make_checkpoint(tmp_path, ours), str(tmp_path / "hf"), dtype="bf16", tokenizer="byte",
                    progress=False)
    assert {t.dtype for t in _safetensors(out).values()} == {torch.bfloat16}
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert json.load(open(os.path.join(out, "config.json")))["dtype"] == "bfloat16"
    ids = torch.randint(0, 257, (1, 20))
    with torch.no_grad():
        assert rel(ours(ids), hf(ids, use_cache=False).logits) < 3e-2  # bf16 weights: 8 mantissa bits


def test_hf_refuses_what_it_cannot_represent(tmp_path):
    m2 = {"layer": "Mamba2", "d_state": 8, "headdim": 8, "ngroups": 2, "chunk_size": 16}
    cases = {
        "d_intermediate": dict(d_model=32, n_layer=1, vocab_size=64, d_intermediate=64, ssm_cfg={"d_state": 8}),
        "rms_norm=False": dict(d_model=32, n_layer=1, vocab_size=64, rms_norm=False, ssm_cfg={"d_state": 8}),
        "D_has_hdim": dict(d_model=32, n_layer=1, vocab_size=64, ssm_cfg={**m2, "D_has_hdim": True}),
        "d_ssm": dict(d_model=32, n_layer=1, vocab_size=64, ssm_cfg={**m2, "d_ssm": 32}),
        "rmsnorm=False": dict(d_model=32, n_layer=1, vocab_size=64, ssm_cfg={**m2, "rmsnorm": False}),
        "norm_before_gate": dict(d_model=32, n_layer=1, vocab_size=64, ssm_cfg={**m2, "norm_before_gate": True}),
    }
    for what, kw in cases.items():
        cfg = MambaConfig(**kw)
        ck = make_checkpoint(tmp_path, MambaLMHeadModel(cfg, backend="reference"), name=what)
        with pytest.raises(formats.RefusedError, match=what.split("=")[0]):
            export_hf(ck, str(tmp_path / f"hf-{what}"), tokenizer="byte", progress=False)
        assert not os.path.exists(tmp_path / f"hf-{what}")  # nothing half-written
        # mamba_ssm holds every one of them
        export_mamba_ssm(ck, str(tmp_path / f"ms-{what}"), tokenizer="byte", progress=False)


def test_cli_errors_are_one_line(tmp_path):
    cfg = MambaConfig(d_model=32, n_layer=1, vocab_size=64,
                      ssm_cfg={"layer": "Mamba2", "d_state": 8, "headdim": 8, "ngroups": 2, "chunk_size": 16})
    ck = make_checkpoint(tmp_path, MambaLMHeadModel(cfg, backend="reference"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for args, expect in [(["convert", "reshard", ck, str(tmp_path / "r"), "--tp", "4"], "ngroups=2"),
                         (["convert", "export-hf", str(tmp_path / "nope"), str(tmp_path / "h")], "does not exist")]:
        p = subprocess.run([sys.executable, "-m", "mamba_dist.cli", *args], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=120)
        errors = [ln for ln in p.stderr.splitlines() if "error" in ln.lower() or "Traceback" in ln]
        assert p.returncode == 2 and len(errors) == 1 and expect in errors[0], p.stderr
        assert errors[0] == p.stderr.strip().splitlines()[-1]
    assert not os.path.exists(tmp_path / "r")


# --------------------------------------------------------------------------------------------- tokenizer
def test_byte_tokenizer_json_reproduces_byte_ids(tmp_path):
    from mamba_dist.data.tokenizer import load_tokenizer

    ck = make_checkpoint(tmp_path, MambaLMHeadModel(MambaConfig(d_model=16, n_layer=1, vocab_size=257,
                                                                ssm_cfg={"d_state": 4}), backend="reference"))
    out = export_hf(ck, str(tmp_path / "hf"), tokenizer="byte", progress=False)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    byte = load_tokenizer("byte")
    texts = ["Hello, world!", "héllo ☃ 🙂 — ü\u00a0", "<|endoftext|> is text here", "<0x41> <s> </s>",
             "a\nb\tc  d\r\n", "", "\x00\x01\x7f", "日本語のテキスト", "  leading spaces"]
    for t in texts:
        assert tok.encode(t, add_special_tokens=False) == byte.encode(t), t
        assert tok.decode(byte.encode(t)) == t
    assert tok.eos_token_id == 256 and tok.decode([72, 105, 256], skip_special_tokens=True) == "Hi"
    assert len(tok) == 257
    # the JSON alone (tokenizers library) gives the same ids
    from tokenizers import Tokenizer as HFTokenizer

    raw = HFTokenizer.from_str(byte_tokenizer_json())
    raw.encode_special_tokens = True
    assert all(raw.encode(t, add_special_tokens=False).ids == byte.encode(t) for t in texts)


# --------------------------------------------------------------------------------------------- lossless round trips
def _hf_dir(tmp_path, mixer: str) -> str:
    """An HF directory as transformers itself writes it (save_pretrained), with the byte tokenizer files."""
    common = dict(vocab_size=264, hidden_size=32, num_hidden_layers=2, state_size=8, eos_token_id=256,
                  bos_token_id=256, pad_token_id=256)
    if mixer == "Mamba1":
        hf_cfg = transformers.MambaConfig(**common, expand=2, time_step_rank=3, use_bias=True)
        model = transformers.MambaForCausalLM(hf_cfg)
    else:
        hf_cfg = transformers.Mamba2Config(**common, expand=2, num_heads=8, head_dim=8, n_groups=2, chunk_size=16,
                                           time_step_limit=(0.0, 0.5), tie_word_embeddings=False)
        model = transformers.Mamba2ForCausalLM(hf_cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    out = str(tmp_path / f"hf-{mixer}")
    model.save_pretrained(out)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=__import__("tokenizers").Tokenizer.from_str(
        byte_tokenizer_json()), eos_token="<|endoftext|>")
    tok.save_pretrained(out)
    return out


def _safetensors(path):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))


@pytest.mark.parametrize("mixer", ["Mamba1", "Mamba2"])
def test_hf_import_export_is_lossless(tmp_path, mixer):
    src = _hf_dir(tmp_path, mixer)
    ck = import_model(src, str(tmp_path / "imported"), tp=2, progress=False)
    out = export_hf(ck, str(tmp_path / "again"), progress=False)  # tokenizer: the one stored by import
    a, b = _safetensors(src), _safetensors(out)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    ca, cb = (json.load(open(os.path.join(d, "config.json"))) for d in (src, out))
    for k in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "state_size", "expand", "use_bias",
              "conv_kernel", "time_step_rank", "num_heads", "head_dim", "n_groups", "chunk_size", "time_step_limit",
              "tie_word_embeddings", "residual_in_fp32"):
        assert ca.get(k) == cb.get(k), k
    assert transformers.AutoTokenizer.from_pretrained(out).encode("hé") == [104, 195, 169]


def test_mamba_ssm_import_export_is_lossless(tmp_path):
    cfg = MambaConfig(d_model=32, n_layer=2, vocab_size=100, d_intermediate=48,
                      ssm_cfg={"layer": "Mamba2", "d_state": 8, "headdim": 8, "ngroups": 2, "chunk_size": 16,
                               "D_has_hdim": True})
    model = perturbed_model(cfg)
    src = str(tmp_path / "ssm")
    os.makedirs(src)
    # what mamba_ssm's MambaLMHeadModel.save_pretrained writes
    torch.save(model.state_dict(), os.path.join(src, "pytorch_model.bin"))
    json.dump(cfg.to_dict(), open(os.path.join(src, "config.json"), "w"), indent=4)
    ck = import_model(src, str(tmp_path / "imported"), tp=2, progress=False)
    out = export_mamba_ssm(ck, str(tmp_path / "again"), tokenizer="byte", progress=False)
    a = torch.load(os.path.join(src, "pytorch_model.bin"), weights_only=True)
    b = torch.load(os.path.join(out, "pytorch_model.bin"), weights_only=True)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert b["lm_head.weight"].data_ptr() == b["backbone.embedding.weight"].data_ptr()  # tied, stored once
    assert json.load(open(os.path.join(out, "config.json"))) == json.load(open(os.path.join(src, "config.json")))
    assert set(json.load(open(os.path.join(out, "config.json")))) == set(MambaConfig().to_dict())


# --------------------------------------------------------------------------------------------- TP layout
LAYOUT_CONFIGS = [
    dict(d_model=32, n_layer=2, vocab_size=64, d_intermediate=64, ssm_cfg={"layer": "Mamba1", "d_state": 8,
                                                                         "bias": True}),
    dict(d_model=32, n_layer=1, vocab_size=64, d_intermediate=128,
         ssm_cfg={"layer": "Mamba2", "d_state": 8, "headdim": 8, "ngroups": 4, "d_ssm": 32, "D_has_hdim": True,
                  "bias": True}),
    dict(d_model=32, n_layer=1, vocab_size=64, ssm_cfg={"layer": "Mamba2", "d_state": 8, "headdim": 8,
                                                        "ngroups": 4, "conv_bias": False}),
    # a hybrid: attention (GQA, its conv, in-attention MLP, biases) between Mamba-1 layers
    dict(d_model=32, n_layer=3, vocab_size=64, ssm_cfg={"layer": "Mamba1", "d_state": 8}, attn_layer_idx=[1],
         attn_cfg={"num_heads": 8, "num_heads_kv": 4, "head_dim": 4, "d_conv": 4, "mlp_dim": 32,
                   "rotary_emb_dim": 4}),
]


@pytest.mark.parametrize("rank,tp", [(1, 2), (2, 4)])
def test_offline_layout_equals_apply_tp(rank, tp):
    """shard_specs against the real apply_tp of this TP rank (a fake process group: no collective runs while
    sharding), tensor by tensor: which are sharded, along which dim, in which segments, with which values."""
    import types

    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from mamba_dist.parallel.tp import apply_tp

    dist.init_process_group("fake", rank=rank, world_size=tp, store=FakeStore())
    try:
        dims = types.SimpleNamespace(tp_enabled=True, tp=tp, tp_rank=rank, tp_group=dist.group.WORLD,
                                     sequence_parallel=False)
        for kw in LAYOUT_CONFIGS:
            cfg = MambaConfig(**kw)
            full = perturbed_model(cfg)
            ref = {k: v.clone() for k, v in full.state_dict().items()}
            model = apply_tp(full, dims)
            specs = layout.shard_specs(cfg)
            local = model.state_dict()
            assert set(specs) == set(local) == set(ref)
            for name, p in model.named_parameters(remove_duplicate=False):
                got = (p.partition_dim, tuple(p.tp_segments)) if getattr(p, "tensor_model_parallel", False) else None
                assert got == specs[name], name
            for name, t in local.items():
                assert torch.equal(t, layout.shard(ref[name], specs[name], rank, tp)), name
    finally:
        dist.destroy_process_group()


def test_reshard_weights_roundtrip_is_exact(tmp_path):
    cfg = MambaConfig(**LAYOUT_CONFIGS[0])
    model = perturbed_model(cfg)
    ck = make_checkpoint(tmp_path, model, tp=2)
    r4 = reshard(ck, str(tmp_path / "r4"), 4, progress=False)
    r1 = reshard(r4, str(tmp_path / "r1"), 1, progress=False)
    sd = source.full_state_dict(source.open_checkpoint(r1), progress=False)
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())
    assert torch.load(os.path.join(r4, "step_00000000", "model-tp03.pt"), weights_only=True)[
        "backbone.layers.0.mixer.in_proj.weight"].shape == (2 * 64 // 4, 32)


# --------------------------------------------------------------------------------------------- generation
GEN_CONFIGS = {
    "Mamba1": dict(d_model=32, n_layer=2, vocab_size=64, ssm_cfg={"layer": "Mamba1", "d_state": 8}),
    "Mamba2": dict(d_model=32, n_layer=2, vocab_size=64, ssm_cfg={"layer": "Mamba2", "d_state": 8, "headdim": 8,
                                                                  "ngroups": 2, "chunk_size": 8}),
}


@pytest.mark.parametrize("mixer", list(GEN_CONFIGS))
def test_greedy_recurrent_equals_argmax_of_full_forward(mixer):
    model = perturbed_model(MambaConfig(**GEN_CONFIGS[mixer]), seed=1)
    prompt = [3, 17, 42, 5, 9]
    got = generate(model, prompt, 16, temperature=0)
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(16):  # the full forward pass re-run on the growing sequence
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert got == seq[len(prompt):]
    assert len(set(got)) > 1  # not a degenerate constant


@pytest.mark.parametrize("mixer", list(GEN_CONFIGS))
def test_state_size_is_constant_per_token(mixer):
    cfg = MambaConfig(**GEN_CONFIGS[mixer])
    model = perturbed_model(cfg)
    sizes = []
    for n in (1, 8, 64):
        cache = model.allocate_inference_cache(1)
        before = {k: [t.data_ptr() for t in v] for k, v in cache.items()}
        generate(model, [1, 2, 3], n, temperature=0, cache=cache)
        assert {k: [t.data_ptr() for t in v] for k, v in cache.items()} == before  # updated in place
        sizes.append(cache_bytes(cache))
    assert sizes[0] == sizes[1] == sizes[2]
    mixer_mod = model.backbone.layers[0].mixer
    if mixer == "Mamba1":
        per_layer = mixer_mod.d_inner * (mixer_mod.d_conv + mixer_mod.d_state)
    else:
        per_layer = mixer_mod.conv1d.weight.shape[0] * mixer_mod.d_conv + mixer_mod.d_ssm * mixer_mod.d_state
    assert sizes[0] == 4 * cfg.n_layer * per_layer  # fp32: a conv window and an SSM state per layer, nothing else


@pytest.mark.parametrize("mixer", list(GEN_CONFIGS))
def test_greedy_equals_hf_generate_on_the_export(tmp_path, mixer):
    cfg = MambaConfig(**{**GEN_CONFIGS[mixer], "vocab_size": 257})
    ours = perturbed_model(cfg, seed=2)
    out = export_hf(make_checkpoint(tmp_path, ours), str(tmp_path / "hf"), tokenizer="byte", progress=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    prompt = list(b"To be, or not")
    hf.generation_config.eos_token_id = None  # 32 tokens, even if one is EOS (min_new_tokens would mask EOS)
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)
    assert ref.shape[1] == len(prompt) + 32
    loaded, _ = load_model(out)  # what `mamba-dist generate` runs on an export
    assert generate(loaded, prompt, 32, temperature=0) == ref[0, len(prompt):].tolist()


def test_sampling_filters_and_seed():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    assert torch.isinf(filter_logits(logits, 1.0, 2, 1.0)).tolist() == [False, False, True, True, True]
    p = logits.softmax(-1)  # 0.61, 0.22, ...: top-p 0.7 keeps the first two (0.61 < 0.7 before the second)
    assert torch.isfinite(filter_logits(logits, 1.0, 0, 0.7)).tolist() == [True, True, False, False, False]
    assert p[0] < 0.7
    model = perturbed_model(MambaConfig(**GEN_CONFIGS["Mamba2"]))
    a = generate(model, [1, 2], 20, temperature=0.9, top_k=10, seed=3)
    assert a == generate(model, [1, 2], 20, temperature=0.9, top_k=10, seed=3)
    assert a != generate(model, [1, 2], 20, temperature=0.9, top_k=10, seed=4)
    assert generate(model, [1, 2], 10, top_k=1) == generate(model, [1, 2], 10, temperature=0)
    assert generate(model, [1, 2], 10, temperature=0, eos_id=generate(model, [1, 2], 1, temperature=0)[0]) == \
        generate(model, [1, 2], 1, temperature=0)  # stops at EOS


def test_generate_cli_prints_the_greedy_continuation(tmp_path):
    cfg = MambaConfig(**{**GEN_CONFIGS["Mamba1"], "vocab_size": 257})
    model = perturbed_model(cfg, seed=5)
    ck = make_checkpoint(tmp_path, model)
    out = export_mamba_ssm(ck, str(tmp_path / "ms"), tokenizer="byte", progress=False)
    expect = generate(model, list(b"Hi"), 12, temperature=0, vocab_size=257, eos_id=256)
    if expect and expect[-1] == 256:
        expect = expect[:-1]
    p = subprocess.run([sys.executable, "-m", "mamba_dist.cli", "generate", out, "--prompt", "Hi",
                        "--max-new-tokens", "12", "--temperature", "0"], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout == bytes(i for i in expect if i < 256).decode("utf-8", errors="replace") + "\n"


def test_import_refuses_bad_sources(tmp_path):
    with pytest.raises(ConvertError, match="neither"):
        os.makedirs(tmp_path / "empty")
        import_model(str(tmp_path / "empty"), str(tmp_path / "o"))
    src = _hf_dir(tmp_path, "Mamba1")
    cfg = json.load(open(os.path.join(src, "config.json")))
    json.dump({**cfg, "state_size": 4}, open(os.path.join(src, "config.json"), "w"))
    with pytest.raises(ConvertError, match="shape"):
        import_model(src, str(tmp_path / "o2"))
    assert not os.path.exists(tmp_path / "o2")
