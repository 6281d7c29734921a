"""Helpers for the ZeRO trainer and launcher tests: trainer runs under each layout, made once per test session and
shared between test files (the uninterrupted runs that resumed / multi-node / launcher runs are compared with)."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _train_utils import REPO, free_port, losses, ok, run_train, tiny_args

STEPS = 6
CLIP = 0.5  # below every step's gradient norm of the tiny run (0.89 ... 1.41), so clipping is active
TOL = 1e-5


def zero_args(run_dir, zero_stage: int = 0, tp: int = 1, **over) -> list[str]:
    """The tiny trainer run (6 steps, checkpoints every 2, validation at 0/3/6) with a clipping norm that is
    active at every step, under ZeRO stage `zero_stage` (0: the plain torch path) and tensor parallel degree tp."""
    return tiny_args(run_dir, **{"train.max_steps": STEPS, "optim.grad_clip": CLIP,
                                 "parallel.zero_stage": zero_stage, "parallel.tp": tp, **over})


@functools.lru_cache(maxsize=None)
def uninterrupted(zero_stage: int = 0, tp: int = 1, nproc: int = 1, extra: tuple = ()) -> Path:
    """Run dir of an uninterrupted run of zero_args(...) on nproc processes (torchrun when > 1), made once."""
    run = Path(tempfile.mkdtemp(prefix=f"mamba-dist-z{zero_stage}-tp{tp}-n{nproc}-")) / "run"
    ok(run_train(zero_args(run, zero_stage, tp, **dict(extra)), nproc=nproc))
    return run


def train_env(**extra) -> dict:
    """Environment for launcher subprocesses: one thread per process, the venv's launchers on PATH."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""), **extra}


def run_nodes(commands: list[list[str]], envs: list[dict], timeout: float = 240) -> list[subprocess.CompletedProcess]:
    """Start one launcher invocation per "node" concurrently (as a job scheduler would) and wait for all of them;
    on a timeout every one still running is killed so that no rank outlives the test."""
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True) for cmd, env in zip(commands, envs)]
    results = []
    try:
        for cmd, p in zip(commands, procs):
            out, err = p.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(cmd, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)  # the launcher's own process group: it and the ranks it started
                p.wait()
    return results


def assert_losses_close(got: dict, ref: dict, tol: float = TOL, steps=None) -> None:
    steps = sorted(ref) if steps is None else steps
    assert sorted(got) == steps, (sorted(got), steps)
    for s in steps:
        assert abs(got[s] - ref[s]) <= tol * max(1.0, abs(ref[s])), f"step {s}: {got[s]!r} vs {ref[s]!r}"


__all__ = ["STEPS", "CLIP", "TOL", "zero_args", "uninterrupted", "train_env", "run_nodes", "assert_losses_close",
           "free_port", "losses", "ok", "REPO"]
