"""Bad input to `mamba-dist train` fails with one clear line on stderr (exit code 2), no traceback."""

import json
import os

import pytest

from _train_utils import REPO, error_line, ok, run_train, tiny_args
from mamba_dist import checkpoint as ckpt


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1e-3", "optim.lrr: unknown key (valid keys in optim: lr, betas, eps, weight_decay, grad_clip)"),
    ("optim.lr=fast", "optim.lr: expected a float, got 'fast'"),
    ("train.micro_batch_size=0", "train.micro_batch_size: must be > 0, got 0"),
    ("precision.dtype=fp16", "precision.dtype: must be one of fp32, bf16; got 'fp16'"),
    ("train.global_batch_tokens=1000",
     "train.global_batch_tokens: 1000 is not a multiple of micro_batch_size x seq_len x dp = 4 x 64 x 1 = 256"),
    ("model.ssm_cfg.headdim=8", "model.ssm_cfg.headdim: not an argument of Mamba1"),
])
def test_bad_config_one_line(tmp_path, override, message):
    line = error_line(run_train(tiny_args(tmp_path / "run") + [override]))
    assert message in line
    assert not (tmp_path / "run").exists()  # failed before writing anything


def test_bad_yaml_file_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_steps: [1\n")
    assert "not valid YAML" in error_line(run_train(tiny_args(tmp_path / "run"), config=str(bad)))
    assert "--config: no such file: nope.yaml" in error_line(run_train([], config="nope.yaml"))


def test_missing_data_path_one_line(tmp_path):
    line = error_line(run_train(tiny_args(tmp_path / "run", **{"data.path": str(tmp_path / "nodata")})))
    assert f"data.path: no manifest.json in {tmp_path / 'nodata'} (the directory does not exist)" in line


def test_data_seq_len_mismatch_one_line(tmp_path):
    line = error_line(run_train(tiny_args(tmp_path / "run", **{"data.seq_len": 128})))
    assert "data.seq_len: 128 but" in line and "prepared with seq_len=64" in line


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("trained") / "run"
    ok(run_train(tiny_args(run, **{"train.max_steps": 2, "train.val_tokens": 0})))
    return run


def _copy_run(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_truncated_checkpoint_one_line(trained, tmp_path):
    run = _copy_run(trained, tmp_path / "run")
    model = run / "checkpoints" / "step_00000002" / "model.pt"
    size = model.stat().st_size
    with open(model, "r+b") as f:
        f.truncate(size // 2)
    line = error_line(run_train(tiny_args(run, **{"train.max_steps": 4})))
    assert f"step_00000002 is corrupt: model.pt has {size // 2} bytes, meta.json recorded {size}" in line


def test_garbage_checkpoint_file_one_line(trained, tmp_path):
    run = _copy_run(trained, tmp_path / "run")
    optim = run / "checkpoints" / "step_00000002" / "optim.pt"
    optim.write_bytes(b"\0" * optim.stat().st_size)  # same size, unreadable content
    line = error_line(run_train(tiny_args(run, **{"train.max_steps": 4})))
    # the checksum in meta.json catches it before torch.load would (no other checkpoint to fall back to)
    assert "no checkpoint in" in line and "passes verification" in line
    assert "step_00000002 is corrupt: optim.pt does not match its checksum in meta.json" in line


def test_corrupt_meta_one_line(trained, tmp_path):
    run = _copy_run(trained, tmp_path / "run")
    (run / "checkpoints" / "step_00000002" / "meta.json").write_text("{not json")
    line = error_line(run_train(tiny_args(run, **{"train.max_steps": 4})))
    assert "step_00000002 is corrupt: meta.json is not valid JSON" in line


def test_incompatible_checkpoint_one_line(trained, tmp_path):
    run = _copy_run(trained, tmp_path / "run")
    line = error_line(run_train(tiny_args(run, **{"train.max_steps": 4, "model.d_model": 48})))
    assert "step_00000002 is incompatible: model.d_model is 32 in the checkpoint, 48 in the config" in line


def test_checkpoint_with_other_shapes_one_line(trained, tmp_path):
    """Config check passed (meta edited) but the tensors do not fit: the shape check names the tensor."""
    run = _copy_run(trained, tmp_path / "run")
    meta_path = run / "checkpoints" / "step_00000002" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["config"]["model"]["d_model"] = 48
    meta["meta_checksum"] = ckpt.meta_checksum(meta)  # an edit that also forges meta.json's own checksum
    meta_path.write_text(json.dumps(meta))
    line = error_line(run_train(tiny_args(run, **{"train.max_steps": 4, "model.d_model": 48})))
    assert "step_00000002 does not fit the model: backbone.embedding.weight has shape (264, 32) in the " \
           "checkpoint, (264, 48) in the model" in line


def test_missing_resume_path_one_line(tmp_path):
    line = error_line(run_train(tiny_args(tmp_path / "run", **{"checkpoint.resume": str(tmp_path / "nope")})))
    assert f"checkpoint.resume: no such checkpoint directory: {tmp_path / 'nope'}" in line


def test_cli_dispatches_train_and_prepare(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "mamba_dist.cli", "--help"], capture_output=True, text=True,
                         cwd=REPO)
    assert out.returncode == 0 and "train" in out.stdout and "prepare" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "mamba_dist.cli", "trian"], capture_output=True, text=True,
                         cwd=REPO)
    assert bad.returncode == 2 and "unknown command 'trian'" in bad.stderr
    via_cli = subprocess.run([sys.executable, "-m", "mamba_dist.cli", "train"] + tiny_args(tmp_path / "r") +
                             ["optim.lr=fast"], capture_output=True, text=True, cwd=REPO,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert via_cli.returncode == 2 and "optim.lr: expected a float, got 'fast'" in via_cli.stderr
    prep = subprocess.run([sys.executable, "-m", "mamba_dist.cli", "prepare", "--help"], capture_output=True,
                          text=True, cwd=REPO)
    assert prep.returncode == 0 and "--seq-len" in prep.stdout
