"""configs/hybrid-tiny.yaml (attention at 2 of 6 Mamba-2 layers, document-masked) trains through
`mamba-dist train` on CPU and its loss falls; a TP degree that does not divide num_heads_kv stops at start-up
with one line (exit 2), before any process group."""

import math
import os
import subprocess
import sys

from _train_utils import REPO, SEQ, error_line, losses, ok, tiny_data
from mamba_dist.metrics import read_jsonl

CONFIG = str(REPO / "configs" / "hybrid-tiny.yaml")


def _train(args, env=None):
    return subprocess.run([sys.executable, "-m", "mamba_dist.cli", "train", "--config", CONFIG, *args], cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})},
                          capture_output=True, text=True, timeout=600)


def _args(run, **over):
    # the config's model as it is, on the shared tiny byte data (rows of 64); 20 steps of 16 rows
    args = {"data.path": tiny_data(), "data.seq_len": SEQ, "train.global_batch_tokens": 16 * SEQ,
            "train.micro_batch_size": 8, "train.max_steps": 20, "train.val_every": 10, "train.val_tokens": 8 * SEQ,
            "schedule.warmup_steps": 4, "checkpoint.every": 0, "logging.run_dir": str(run),
            "logging.progress": "false", "logging.tensorboard": "false", "model.backend": "reference"}
    args.update(over)
    return [f"{k}={v}" for k, v in args.items()]


def test_hybrid_tiny_trains_and_its_loss_falls(tmp_path):
    run = tmp_path / "run"
    ok(_train(_args(run)))
    val = losses(run, "val", "val_loss")
    assert sorted(val) == [0, 10, 20]
    assert val[0] > val[10] > val[20] and val[20] < val[0] - 0.5, val  # uniform over 257 bytes: 5.55
    train = read_jsonl(run / "metrics.jsonl", "train")
    assert train[-1]["loss"] < train[0]["loss"] - 0.5
    assert all(math.isfinite(r["mfu"]) and 0 < r["mfu"] < 1 for r in train)  # attention FLOPs counted per step
    assert os.path.isdir(run / "checkpoints" / "step_00000020")


def test_tp_not_dividing_kv_heads_is_one_line_at_start(tmp_path):
    proc = _train(_args(tmp_path / "run", **{"parallel.tp": 4, "model.ssm_cfg.ngroups": 4}),
                  env={"WORLD_SIZE": "4", "RANK": "0", "LOCAL_RANK": "0"})
    line = error_line(proc)
    assert "tp=4 does not divide the attention layers' num_heads_kv=2" in line, line
    assert not (tmp_path / "run").exists()
