"""Conversion of hybrid models (attention layers among Mamba layers), CPU, fp32:
- a mamba_ssm hybrid directory (config.json with attn_layer_idx / attn_cfg + pytorch_model.bin) imports at tp=2 and
  exports back bit for bit; the imported checkpoint's model gives the source model's logits;
- export-mamba-ssm always writes attn_cfg.causal (mamba_ssm's MHA defaults to false), and an import of a
  mamba_ssm config without it keeps mamba_ssm's meaning (bidirectional) with a warning;
- `mamba-dist convert export-hf` refuses a hybrid: one line, exit code 2, nothing written.
"""

import json
import logging
import os
import subprocess
import sys

import torch

from mamba_dist.convert import export_mamba_ssm, import_model, source, target
from mamba_dist.model import MambaConfig, MambaLMHeadModel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ATTN = {"num_heads": 4, "num_heads_kv": 2, "head_dim": 8, "rotary_emb_dim": 8, "d_conv": 4, "qkv_proj_bias": False,
        "out_proj_bias": False, "causal": True}


def hybrid(mixer="Mamba2", **attn):
    ssm = {"layer": "Mamba2", "d_state": 8, "headdim": 8, "ngroups": 2, "chunk_size": 16} if mixer == "Mamba2" \
        else {"layer": "Mamba1", "d_state": 8}
    return MambaConfig(d_model=32, n_layer=4, vocab_size=100, ssm_cfg=ssm, attn_layer_idx=[1, 3],
                       attn_cfg={**ATTN, **attn})


def perturbed(cfg):
    torch.manual_seed(0)
    m = MambaLMHeadModel(cfg, backend="reference").eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith(("A_log", ".D", "norm.weight", "dt_bias", ".bias")):
                p.add_(0.2 * torch.randn_like(p))
    return m


def mamba_ssm_dir(path, model, config_dict):
    os.makedirs(path)
    torch.save(model.state_dict(), os.path.join(path, "pytorch_model.bin"))  # as save_pretrained
    json.dump(config_dict, open(os.path.join(path, "config.json"), "w"), indent=4)
    return str(path)


def test_mamba_ssm_hybrid_import_export_is_lossless(tmp_path):
    cfg = hybrid()
    model = perturbed(cfg)
    src = mamba_ssm_dir(tmp_path / "ssm", model, cfg.to_dict())
    ck = import_model(src, str(tmp_path / "imported"), tp=2, progress=False)
    # the imported (TP=2) checkpoint consolidates to the source weights and computes the source logits
    state = source.full_state_dict(source.open_checkpoint(ck), progress=False)
    again = MambaLMHeadModel(source.open_checkpoint(ck).model_config, backend="reference").eval()
    again.load_state_dict(state)
    ids = torch.randint(0, 100, (2, 20))
    seq_idx = torch.tensor([[0] * 7 + [1] * 13, [0] * 20], dtype=torch.int32)
    with torch.no_grad():
        assert torch.equal(again(ids, seq_idx), model(ids, seq_idx))
    out = export_mamba_ssm(ck, str(tmp_path / "again"), tokenizer="byte", progress=False)
    a = torch.load(os.path.join(src, "pytorch_model.bin"), weights_only=True)
    b = torch.load(os.path.join(out, "pytorch_model.bin"), weights_only=True)
    assert a.keys() == b.keys() and any(".mixer.conv1d." in k for k in a if k.startswith("backbone.layers.1."))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.load(open(os.path.join(out, "config.json"))) == json.load(open(os.path.join(src, "config.json")))


def test_export_writes_causal_and_import_keeps_mamba_ssms_default(tmp_path, caplog):
    attn = {k: v for k, v in ATTN.items() if k != "causal"}
    cfg = MambaConfig(**{**hybrid("Mamba1").to_dict(), "attn_cfg": attn})  # causal left out: true here
    model = perturbed(cfg)
    ck = str(tmp_path / "ck")
    target.write_checkpoint(ck, cfg, 1, model.state_dict().items())
    out = export_mamba_ssm(ck, str(tmp_path / "ms"), tokenizer="byte", progress=False)
    assert json.load(open(os.path.join(out, "config.json")))["attn_cfg"]["causal"] is True
    # a mamba_ssm directory whose attn_cfg has no "causal" is bidirectional there: imported as such, loudly
    src = mamba_ssm_dir(tmp_path / "ssm", model, cfg.to_dict())
    with caplog.at_level(logging.WARNING):
        imported = import_model(src, str(tmp_path / "imp"), progress=False)
    assert source.open_checkpoint(imported).model_config.attn_cfg["causal"] is False
    assert any("causal=false" in r.getMessage() for r in caplog.records)


def test_export_hf_refuses_a_hybrid_in_one_line(tmp_path):
    cfg = hybrid()
    ck = str(tmp_path / "ck")
    target.write_checkpoint(ck, cfg, 1, perturbed(cfg).state_dict().items())
    p = subprocess.run([sys.executable, "-m", "mamba_dist.cli", "convert", "export-hf", ck, str(tmp_path / "hf"),
                        "--tokenizer", "byte"], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       capture_output=True, text=True, timeout=120)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2, p.stderr
    assert "attention layers [1, 3]" in lines[-1] and "export-mamba-ssm" in lines[-1], p.stderr
    assert not any("Traceback" in ln for ln in lines)
    assert not os.path.exists(tmp_path / "hf")


def test_generate_runs_on_a_hybrid_export(tmp_path):
    """`mamba-dist generate` on an exported hybrid: the greedy continuation equals the argmax of full forwards."""
    cfg = MambaConfig(**{**hybrid("Mamba1").to_dict(), "vocab_size": 257})
    model = perturbed(cfg)
    ck = str(tmp_path / "ck")
    target.write_checkpoint(ck, cfg, 1, model.state_dict().items())
    out = export_mamba_ssm(ck, str(tmp_path / "ms"), tokenizer="byte", progress=False)
    p = subprocess.run([sys.executable, "-m", "mamba_dist.cli", "generate", out, "--prompt", "ab",
                        "--max-new-tokens", "6", "--temperature", "0", "--no-stop-at-eos", "--tokenizer", "byte"],
                       cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    ids = list(b"ab")
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(model(torch.tensor([ids]))[0, -1, :256].argmax()))
    assert p.stdout == bytes(i for i in ids[2:] if i < 256).decode("utf-8", errors="replace") + "\n", (p.stdout, ids)
