"""Helpers for the end-to-end trainer tests: a tiny prepared dataset and `mamba-dist train` run as a real
subprocess (one process, or 2 gloo ranks under torchrun)."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from mamba_dist.metrics import read_jsonl

REPO = Path(__file__).resolve().parents[1]
SEQ = 64


def scratch_dir(prefix: str) -> str:
    """A temporary directory removed when the test process exits (for data shared by several tests)."""
    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


@functools.lru_cache(maxsize=None)
def tiny_data() -> str:
    """Python's pydoc topics (no download), byte tokenizer, rows of 64 tokens: ~7k train rows, ~170 val rows.
    Prepared once per test process."""
    from mamba_dist.data.prepare import prepare

    out = Path(scratch_dir("mamba-dist-test-data-")) / "pydoc-byte-64"
    prepare(["builtin:pydoc"], out, tokenizer="byte", seq_len=SEQ, val_fraction=0.1, workers=0, progress=False)
    return str(out)


def tiny_args(run_dir, **over) -> list[str]:
    """Overrides for a ~0.1M-parameter Mamba-1 on the tiny data: 16 rows x 64 tokens per step (4 micro-batches
    of 4 on one process, 2 per rank on two)."""
    args = {
        "model.mixer": "Mamba1", "model.d_model": 32, "model.n_layer": 2, "model.vocab_size": 257,
        "model.ssm_cfg": "{d_state: 8}", "model.backend": "reference",
        "data.path": tiny_data(), "data.seq_len": SEQ, "data.tokenizer": "byte", "data.num_workers": 0,
        "optim.lr": "3e-3", "schedule.warmup_steps": 2,
        "train.global_batch_tokens": 16 * SEQ, "train.micro_batch_size": 4, "train.max_steps": 6,
        "train.val_every": 3, "train.val_tokens": 2 * 4 * SEQ, "train.threads": 1,
        "checkpoint.every": 2, "checkpoint.keep_last": 0,
        "logging.run_dir": str(run_dir), "logging.progress": "false", "logging.tensorboard": "false",
    }
    args.update(over)
    return [f"{k}={v}" for k, v in args.items()]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_train(args: list[str], nproc: int = 1, env: dict | None = None, timeout: float = 300,
              config: str | None = None) -> subprocess.CompletedProcess:
    """`python -m mamba_dist.train` (nproc=1), or nproc processes through launch/torchrun.sh (torchrun)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    launcher = [sys.executable, "-m", "mamba_dist.train"]
    if nproc > 1:
        launcher = ["bash", str(REPO / "launch" / "torchrun.sh")]
        full_env.update(NPROC_PER_NODE=str(nproc), MASTER_PORT=str(free_port()),
                        PATH=os.path.dirname(sys.executable) + os.pathsep + full_env.get("PATH", ""))
    if config:
        launcher += ["--config", config]
    return subprocess.run(launcher + args, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"rc={proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"
    return proc


def losses(run_dir, kind: str = "train", key: str = "loss") -> dict[int, float]:
    """step -> value from metrics.jsonl; a step logged twice (re-run after a resume) keeps its last value."""
    return {r["step"]: r[key] for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl"), kind)}


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The error a failed run printed: exactly one line on stderr, and the last one; before it only our own
    timestamped progress log lines (no traceback)."""
    assert proc.returncode == 2, f"rc={proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower() or "traceback" in ln.lower()]
    assert len(errors) == 1 and errors[0] == lines[-1], f"expected one error line, got:\n{proc.stderr}"
    assert all(" [rank " in ln for ln in lines[:-1]), f"unexpected output before the error:\n{proc.stderr}"
    assert lines[-1].startswith("mamba-dist train: error: "), lines[-1]
    return lines[-1]
