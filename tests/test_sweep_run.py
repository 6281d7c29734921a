"""`mamba-dist sweep run` end to end on CPU: a 3 sizes x 2 FLOP budgets grid of tiny models trained through the
real trainer, the sweep SIGKILLed (process group: the sweep and its training child) in the middle of its fourth
run, then run again: the three finished runs are not trained again (their metrics and checkpoints are untouched),
the killed one resumes from its checkpoint, and the sweep ends with results.csv, fit.json and the plots."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from _train_utils import REPO, SEQ, tiny_data
from mamba_dist.checkpoint import list_checkpoints
from mamba_dist.metrics import read_jsonl
from mamba_dist.sweep.spec import expand, load_sweep, run_state


def _sweep_file(tmp_path) -> str:
    spec = {
        "set": {"data.path": tiny_data(), "data.seq_len": SEQ, "data.tokenizer": "byte", "data.num_workers": 0,
                "model.mixer": "Mamba2", "model.vocab_size": 257, "model.backend": "reference",
                "model.ssm_cfg": {"headdim": 8, "d_state": 8, "chunk_size": 16},
                "train.global_batch_tokens": 4 * SEQ, "train.micro_batch_size": 4, "train.val_tokens": 4 * SEQ,
                "train.threads": 1, "checkpoint.every": 4, "checkpoint.keep_last": 1,
                "logging.tensorboard": False, "logging.progress": False, "optim.lr": 5e-3},
        "models": {"d_model": [16, 24, 32], "n_layer": 1},
        "budgets": {"flops": [4e8, 8e8]},
        "warmup_fraction": 0.1,
    }
    p = tmp_path / "tiny-sweep.yaml"
    p.write_text(yaml.safe_dump(spec))
    return str(p)


def _snapshot(run_dir: Path) -> dict:
    files = {}
    for p in sorted(run_dir.rglob("*")):
        if p.is_file():
            st = p.stat()
            files[str(p.relative_to(run_dir))] = (st.st_mtime_ns, st.st_size)
    return files


@pytest.mark.slow
def test_sweep_killed_midway_resumes_without_rework_then_fits(tmp_path):
    spec_path = _sweep_file(tmp_path)
    out = tmp_path / "sweep"
    runs = expand(load_sweep(spec_path), str(out))
    assert len(runs) == 6 and min(r.steps for r in runs) >= 8
    victim = runs[3]
    victim_dir = Path(victim.config.logging.run_dir)
    cmd = [sys.executable, "-m", "mamba_dist.cli", "sweep", "run", spec_path, "--out", str(out), "--bootstrap", "20"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

    # 1. run until the fourth run has written a checkpoint, then SIGKILL the sweep and its child
    log1 = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log1, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 900  # generous: CI boxes are busy
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        ckpts = list_checkpoints(str(victim_dir / "checkpoints"))
        if ckpts and run_state(str(victim_dir), victim.steps)[0] != "done":
            os.killpg(proc.pid, signal.SIGKILL)
            killed_at = ckpts[-1][0]
            break
        time.sleep(0.02)
    proc.wait()
    log1.close()
    assert killed_at is not None, (tmp_path / "first.log").read_text()[-3000:]
    assert 0 < killed_at < victim.steps
    states = [run_state(r.config.logging.run_dir, r.steps)[0] for r in runs]
    assert states[:3] == ["done"] * 3 and states[3] == "partial", states
    finished = {r.name: _snapshot(Path(r.config.logging.run_dir)) for r in runs[:3]}

    # 2. the same command again: finishes the sweep without re-training the finished runs
    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-4000:]
    assert "3/6 runs already finished, skipped" in second.stderr
    assert f"[4/6] resuming {victim.name}" in second.stderr
    for r in runs[:3]:  # not one file of a finished run was touched: no training, no checkpoint, no log line
        assert _snapshot(Path(r.config.logging.run_dir)) == finished[r.name], r.name
        events = [e["kind"] for e in read_jsonl(os.path.join(r.config.logging.run_dir, "metrics.jsonl"))]
        assert events.count("start") == 1 and "resume" not in events
    victim_events = read_jsonl(str(victim_dir / "metrics.jsonl"))
    starts = [e for e in victim_events if e["kind"] == "start"]
    resumes = [e for e in victim_events if e["kind"] == "resume"]
    assert len(starts) == 1 and len(resumes) == 1 and resumes[0]["step"] == killed_at
    assert all(run_state(r.config.logging.run_dir, r.steps)[0] == "done" for r in runs)

    # 3. the collected table, the fit and the plots
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [c for c in ("name", "params", "params_total", "tokens", "flops", "loss") if c not in rows[0]] == []
    assert sorted(r["name"] for r in rows) == sorted(r.name for r in runs)
    by_name = {r.name: r for r in runs}
    for row in rows:
        run = by_name[row["name"]]
        vals = [v for v in read_jsonl(os.path.join(run.config.logging.run_dir, "metrics.jsonl"), "val")
                if v["step"] == run.steps]
        assert float(row["loss"]) == pytest.approx(vals[-1]["val_loss"], abs=1e-6)
        assert int(row["params"]) == run.params < int(row["params_total"]) == run.params_total
        assert int(row["tokens"]) == run.tokens and float(row["flops"]) == pytest.approx(run.flops, rel=1e-5)
    fit = json.loads((out / "fit.json").read_text())
    assert {"E", "A", "B", "alpha", "beta", "a", "b", "ci90", "isoflop", "warnings"} <= set(fit)
    assert set(fit["ci90"]) >= {"E", "A", "B", "alpha", "beta", "a", "b"}
    assert fit["n_runs"] == 6 and fit["warnings"]  # six tiny runs: it must say the data supports little
    assert len(fit["isoflop"]["levels"]) == 2  # two FLOP levels of three sizes each
    for name in ("loss_vs_compute", "isoflop", "frontier"):
        assert (out / "plots" / f"{name}.png").stat().st_size > 10_000
    assert "| name |" in (out / "fit.md").read_text()
