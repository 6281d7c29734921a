"""Training a sweep's runs: one after another here (`local`), or launch scripts for torchrun / a slurm job array.

`local` starts the trainer's own entry point (`python -m mamba_dist.train --config DIR/runs/<name>/config.yaml`)
once per run, as a child process: a run that fails (bad config, NaN, out of memory) is reported and the sweep goes
on with the next one. Every run config has checkpoint.resume=auto, so a run killed midway continues from its last
checkpoint, and finished runs (final checkpoint + final validation logged) are skipped. A lock file keeps two sweeps
from training the same directory at once; the child dies with this process (PR_SET_PDEATHSIG), so killing the
sweep never leaves an orphan training that a re-run would race.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from .spec import Run, SweepError, run_state, write_atomic

REPO = Path(__file__).resolve().parents[2]


def _die_with_parent() -> None:  # runs in the child between fork and exec (Linux; a no-op elsewhere)
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except OSError:
        pass


def _fmt_time(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class SweepLock:
    """An exclusive flock on DIR/.sweep.lock for as long as the local sweep runs (released when the process dies)."""

    def __init__(self, out_dir: str):
        self.path = os.path.join(out_dir, ".sweep.lock")
        self.fd = None

    def __enter__(self):
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = Path(self.path).read_text().strip() or "?"
            os.close(self.fd)
            raise SweepError(f"{os.path.dirname(self.path)}: another sweep (pid {other}) is training here") from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, str(os.getpid()).encode())
        return self

    def __exit__(self, *exc):
        os.close(self.fd)


def run_local(runs: list[Run], out_dir: str, log=print) -> list[str]:
    """Train every unfinished run in order. Returns the names of runs that failed."""
    failed = []
    with SweepLock(out_dir):
        states = {r.name: run_state(r.config.logging.run_dir, r.steps)[0] for r in runs}
        todo = [r for r in runs if states[r.name] != "done"]
        n_done = len(runs) - len(todo)
        if n_done:
            log(f"sweep: {n_done}/{len(runs)} runs already finished, skipped")
        spent_s, spent_flops = 0.0, 0.0
        for i, run in enumerate(todo):
            left_flops = sum(r.flops for r in todo[i:])
            eta = f"ETA {_fmt_time(spent_s / spent_flops * left_flops)}" if spent_flops else "ETA after the first run"
            how = "resuming" if states[run.name] == "partial" else "starting"
            log(f"sweep: [{n_done + i + 1}/{len(runs)}] {how} {run.name} ({run.params / 1e6:.3g}M params, "
                f"{run.tokens:,} tokens, {run.flops:.3g} FLOPs, lr {run.lr:.3g}); {n_done + i} done, {eta}")
            t0 = time.perf_counter()
            cmd = [sys.executable, "-m", "mamba_dist.train", "--config",
                   os.path.join(run.config.logging.run_dir, "config.yaml")]
            proc = subprocess.Popen(cmd, cwd=os.getcwd(), preexec_fn=_die_with_parent)
            try:
                rc = proc.wait()
            except KeyboardInterrupt:
                proc.send_signal(signal.SIGINT)
                proc.wait()
                raise
            dt = time.perf_counter() - t0
            state, loss = run_state(run.config.logging.run_dir, run.steps)
            if rc != 0 or state != "done":
                failed.append(run.name)
                log(f"sweep: {run.name} FAILED (exit code {rc}, {state}); the sweep goes on, re-run it to retry")
                continue
            # the rate of this machine, from whole runs, for the ETA (a resumed run did only part of its FLOPs)
            if how == "starting":
                spent_s, spent_flops = spent_s + dt, spent_flops + run.flops
            log(f"sweep: {run.name} done in {_fmt_time(dt)}, final val loss {loss:.4f}")
    return failed


# ------------------------------------------------------------------------------------------- cluster launch scripts
def _q(p: str) -> str:
    return shlex.quote(str(p))


def write_torchrun_script(runs: list[Run], out_dir: str, sweep_file: str) -> str:
    """DIR/launch/torchrun.sh: the runs one after another through launch/torchrun.sh (any number of GPUs/nodes;
    its environment variables apply), finished ones skipped; then collect and fit."""
    out = os.path.abspath(out_dir)
    lines = ["#!/usr/bin/env bash",
             f"# Sweep {sweep_file}: {len(runs)} runs, one after another, each through launch/torchrun.sh.",
             "# Run it from anywhere, as often as needed: finished runs are skipped, killed ones resume from their",
             "# last checkpoint. Environment: that of launch/torchrun.sh (NPROC_PER_NODE, NNODES, NODE_RANK,",
             "# MASTER_ADDR, ...); on several nodes run this same script on every node.",
             "set -euo pipefail",
             f"cd {_q(REPO)}",
             f"VENV=${{VENV:-{_q(REPO / '.venv')}}}",
             'source "$VENV/bin/activate"',
             f"SWEEP={_q(out)}",
             "for RUN in \\"]
    lines += [f"    {_q(r.name)} \\" for r in runs]
    lines += ["; do",
              '  if mamba-dist sweep status "$SWEEP" --run "$RUN" >/dev/null; then echo "sweep: $RUN finished, skipped"; '
              "continue; fi",
              '  echo "sweep: training $RUN"',
              '  launch/torchrun.sh --config "$SWEEP/runs/$RUN/config.yaml"',
              "done",
              'if [[ "${NODE_RANK:-0}" == 0 ]]; then',
              '  mamba-dist sweep collect "$SWEEP" && mamba-dist sweep fit "$SWEEP/results.csv" --out "$SWEEP"',
              "fi", ""]
    path = os.path.join(out, "launch", "torchrun.sh")
    write_atomic(path, "\n".join(lines))
    os.chmod(path, 0o755)
    return path


SLURM_DEFAULTS = {"nodes": 1, "gpus_per_node": 8, "cpus_per_task": 32, "time": "24:00:00", "partition": None,
                  "account": None, "max_parallel": None, "extra": []}


def write_slurm_scripts(runs: list[Run], out_dir: str, sweep_file: str, opts: Optional[dict] = None) -> str:
    """DIR/launch/sweep.sbatch (a job array: task i trains run i through the project's launch/slurm.sbatch, i.e.
    srun + torchrun with SIGUSR1 preemption), DIR/launch/collect.sbatch (collect + fit) and DIR/launch/submit.sh,
    which submits the array and then collect.sbatch after it (afterany: partial results are still fitted).
    The `slurm:` section of the sweep file sets nodes, gpus_per_node, cpus_per_task, time, partition, account,
    max_parallel (the array's %N throttle) and extra (more #SBATCH lines)."""
    o = dict(SLURM_DEFAULTS)
    for k, v in (opts or {}).items():
        if k not in SLURM_DEFAULTS:
            raise SweepError(f"{sweep_file}: slurm.{k}: unknown key (valid: {', '.join(SLURM_DEFAULTS)})")
        o[k] = v
    out = os.path.abspath(out_dir)
    launch = os.path.join(out, "launch")
    write_atomic(os.path.join(launch, "runs.txt"), "".join(f"{r.name}\n" for r in runs))
    throttle = f"%{o['max_parallel']}" if o["max_parallel"] else ""
    head = ["#!/bin/bash",
            f"# Sweep {sweep_file}: job array, task i trains line i+1 of runs.txt through launch/slurm.sbatch.",
            "# Submit with submit.sh (it queues collect + fit after the array). Re-submitting is safe: finished runs",
            "# exit at once, killed or preempted ones resume from their last checkpoint (checkpoint.resume=auto).",
            "#SBATCH --job-name=mamba-sweep",
            f"#SBATCH --array=0-{len(runs) - 1}{throttle}",
            f"#SBATCH --nodes={o['nodes']}",
            "#SBATCH --ntasks-per-node=1",
            f"#SBATCH --gpus-per-node={o['gpus_per_node']}",
            f"#SBATCH --cpus-per-task={o['cpus_per_task']}",
            f"#SBATCH --time={o['time']}",
            "#SBATCH --signal=USR1@600",
            f"#SBATCH --output={out}/runs/slurm-%A_%a.out"]
    if o["partition"]:
        head.append(f"#SBATCH --partition={o['partition']}")
    if o["account"]:
        head.append(f"#SBATCH --account={o['account']}")
    head += [f"#SBATCH {x}" for x in o["extra"]]
    body = ["set -euo pipefail",
            f"cd {_q(REPO)}",
            f"export VENV=${{VENV:-{_q(REPO / '.venv')}}}",
            'source "$VENV/bin/activate"',
            f"SWEEP={_q(out)}",
            'RUN=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" "$SWEEP/launch/runs.txt")',
            'if mamba-dist sweep status "$SWEEP" --run "$RUN" >/dev/null; then echo "sweep: $RUN finished"; exit 0; fi',
            'exec bash launch/slurm.sbatch --config "$SWEEP/runs/$RUN/config.yaml"', ""]
    write_atomic(os.path.join(launch, "sweep.sbatch"), "\n".join(head + body))
    collect = ["#!/bin/bash", "# Collect the sweep's results and fit the law (queued by submit.sh after the array).",
               "#SBATCH --job-name=mamba-sweep-fit", "#SBATCH --nodes=1", "#SBATCH --ntasks=1",
               "#SBATCH --cpus-per-task=4", "#SBATCH --time=01:00:00", f"#SBATCH --output={out}/fit-%j.out"]
    if o["partition"]:
        collect.append(f"#SBATCH --partition={o['partition']}")
    if o["account"]:
        collect.append(f"#SBATCH --account={o['account']}")
    collect += ["set -euo pipefail", f"cd {_q(REPO)}", f"source ${{VENV:-{_q(REPO / '.venv')}}}/bin/activate",
                f"mamba-dist sweep collect {_q(out)}",
                f"mamba-dist sweep fit {_q(out)}/results.csv --out {_q(out)}", ""]
    write_atomic(os.path.join(launch, "collect.sbatch"), "\n".join(collect))
    submit = ["#!/usr/bin/env bash", "# Submit the sweep's job array, then collect + fit once every task has ended.",
              "set -euo pipefail", f"cd {_q(launch)}",
              "JOB=$(sbatch --parsable sweep.sbatch)",
              "FIT=$(sbatch --parsable --dependency=afterany:${JOB%%;*} collect.sbatch)",
              'echo "submitted array $JOB and collect/fit job $FIT"', ""]
    path = os.path.join(launch, "submit.sh")
    write_atomic(path, "\n".join(submit))
    os.chmod(path, 0o755)
    return path


def check_runs(runs: list[Run]) -> None:
    """The trainer's own start-up checks (config, launch size 1, data manifest, TP layout, the checkpoint it would
    resume) for every run, before the first one trains: a mistake in the grid fails now, in one line."""
    from mamba_dist.train import _user_errors, prepare_config

    errors = _user_errors()
    for run in runs:
        try:
            prepare_config(os.path.join(run.config.logging.run_dir, "config.yaml"), [], 1)
        except errors as e:
            raise SweepError(f"run {run.name}: {e}") from None
