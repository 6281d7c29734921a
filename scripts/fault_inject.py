"""Fault-injection runner (issue 14): a small job under torchrun on CPU, random ranks SIGKILLed at random steps K
times; the final weights are compared with an uninterrupted run's.

Run from the repository root (CPU; about 10 s per attempt on 2 cores):
    python scripts/fault_inject.py --kills 3 --seed 0
    python scripts/fault_inject.py --kills 5 --nproc 2 --steps 24 --seed 7 --out /tmp/fault-inject

What it does:
  1. prepares a tiny dataset (Python's pydoc topics, byte tokenizer: no download) under --out, once;
  2. trains a ~30k-parameter Mamba-1 for --steps steps on --nproc gloo ranks (checkpoint every 2 steps), once
     uninterrupted and once under `torchrun --max-restarts K` (K = --kills: exactly enough restarts);
  3. during the second job, kill i (seeded: a random rank and a random step, sorted by step) waits until that rank
     of attempt i reports the step in its heartbeat file (<run>/heartbeat/rank_R, mamba_dist/watchdog.py), waits a
     random fraction of a step more, so the kill lands anywhere inside a step or a checkpoint save, and SIGKILLs
     the process; torchrun restarts every rank and the trainer resumes from the latest complete checkpoint;
  4. prints the kill schedule, what each kill hit, and PASS when the job finished with the final model and
     optimizer files byte-identical to the uninterrupted run's (and the per-step losses equal), else FAIL.
Exit code 0 on PASS, 1 on FAIL. The training loop is the trainer's own (python -m mamba_dist.train).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

SEQ = 64


def tiny_overrides(run_dir: str, data: str, steps: int) -> list[str]:
    """The job: 16 rows of 64 tokens per step over all ranks, checkpoints every 2 steps, no validation."""
    over = {
        "model.mixer": "Mamba1", "model.d_model": 32, "model.n_layer": 2, "model.vocab_size": 257,
        "model.ssm_cfg": "{d_state: 8}", "model.backend": "reference",
        "data.path": data, "data.seq_len": SEQ, "data.tokenizer": "byte", "data.num_workers": 0,
        "optim.lr": "3e-3", "optim.grad_clip": 0.5, "schedule.warmup_steps": 2,
        "train.global_batch_tokens": 16 * SEQ, "train.micro_batch_size": 4, "train.max_steps": steps,
        "train.val_tokens": 0, "train.threads": 1,
        "checkpoint.every": 2, "checkpoint.keep_last": 0, "parallel.timeout_s": 60,
        "logging.run_dir": run_dir, "logging.progress": "false", "logging.tensorboard": "false",
    }
    return [f"{k}={v}" for k, v in over.items()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, max_restarts: int, overrides: list[str], log_path: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "--max-restarts", str(max_restarts),
           "-m", "mamba_dist.train", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    log = open(log_path, "w")
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def read_beat(run_dir: str, rank: int):
    from mamba_dist.watchdog import heartbeat_dir, read_beat as read

    return read(os.path.join(heartbeat_dir(run_dir), f"rank_{rank}"))


def killer(run_dir: str, schedule: list[tuple[int, int, float]], job: subprocess.Popen, hits: list) -> None:
    """Kill i: in attempt i, once rank r's heartbeat shows step >= s (this attempt's token: it is training), wait
    `delay` seconds and SIGKILL it."""
    for attempt, (rank, step, delay) in enumerate(schedule):
        while job.poll() is None:
            beat = read_beat(run_dir, rank)
            if (beat and beat.get("attempt") == attempt and beat.get("token") and not beat.get("done")
                    and beat["step"] >= step):
                time.sleep(delay)
                now = read_beat(run_dir, rank) or beat
                try:
                    os.kill(beat["pid"], signal.SIGKILL)
                except ProcessLookupError:
                    break
                hits.append((attempt, rank, step, now["step"], beat["pid"]))
                break
            time.sleep(0.005)


def final_state(run_dir: str, steps: int):
    from mamba_dist import checkpoint as ckpt

    path = os.path.join(run_dir, "checkpoints", ckpt.step_dir_name(steps))
    meta = ckpt.verify(path)
    return path, {f: meta["checksums"][f] for f in ("model.pt", "optim.pt")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=3, help="how many times a rank is killed (K)")
    p.add_argument("--nproc", type=int, default=2, help="ranks (gloo, CPU)")
    p.add_argument("--steps", type=int, default=12, help="training steps (checkpoints every 2; kills before the "
                   "last one)")
    p.add_argument("--seed", type=int, default=0, help="seeds the kill schedule")
    p.add_argument("--out", default="/tmp/mamba-dist-fault-inject", help="work directory (runs are replaced)")
    p.add_argument("--timeout", type=float, default=900, help="seconds before the faulty job is given up")
    args = p.parse_args(argv)
    if args.kills < 0 or args.nproc < 2 or args.steps < 3:
        p.error("--kills >= 0, --nproc >= 2 and --steps >= 3 are needed")

    from mamba_dist.data.prepare import prepare
    from mamba_dist.metrics import read_jsonl

    data = os.path.join(args.out, "data-pydoc-byte-64")
    if not os.path.isfile(os.path.join(data, "manifest.json")):
        prepare(["builtin:pydoc"], data, tokenizer="byte", seq_len=SEQ, val_fraction=0.1, workers=0,
                progress=False)
    rng = random.Random(args.seed)
    # (rank, step, fraction): kill attempt i's rank once it has done `step` steps, `fraction` of a step later
    schedule = sorted(((rng.randrange(args.nproc), rng.randrange(1, args.steps - 1), rng.random())
                       for _ in range(args.kills)), key=lambda k: k[1])
    print(f"kill schedule (seed {args.seed}): " + (", ".join(
        f"attempt {i}: rank {r} after step {s} + {f:.2f} of a step" for i, (r, s, f) in enumerate(schedule))
        or "none"), flush=True)

    runs = {name: os.path.join(args.out, name) for name in ("uninterrupted", "faulty")}
    for path in runs.values():
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path)
    t0 = time.monotonic()
    ref = torchrun(args.nproc, 0, tiny_overrides(runs["uninterrupted"], data, args.steps),
                   os.path.join(args.out, "uninterrupted.log"))
    ref_rc = ref.wait(timeout=args.timeout)
    times = [r["step_time_s"] for r in read_jsonl(os.path.join(runs["uninterrupted"], "metrics.jsonl"), "train")]
    step_s = statistics.median(times) if times else 0.1
    print(f"uninterrupted run: exit {ref_rc} in {time.monotonic() - t0:.0f} s ({step_s * 1e3:.0f} ms a step)",
          flush=True)
    schedule = [(r, s, f * step_s) for r, s, f in schedule]

    t0 = time.monotonic()
    job = torchrun(args.nproc, args.kills, tiny_overrides(runs["faulty"], data, args.steps),
                   os.path.join(args.out, "faulty.log"))
    hits = []
    watcher = threading.Thread(target=killer, args=(runs["faulty"], schedule, job, hits), daemon=True)
    watcher.start()
    try:
        rc = job.wait(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        rc = None
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)  # torchrun; its ranks are in their own sessions:
            job.wait()
        for rank in range(args.nproc):  # ... kill any rank the launcher left behind
            beat = read_beat(runs["faulty"], rank)
            if beat and not beat.get("done"):
                try:
                    os.kill(beat["pid"], signal.SIGKILL)
                except ProcessLookupError:
                    pass
    watcher.join(timeout=5)
    for attempt, rank, step, at, pid in hits:
        print(f"killed rank {rank} (pid {pid}) in attempt {attempt}: scheduled after step {step}, its heartbeat "
              f"said step {at} when the SIGKILL was sent", flush=True)
    print(f"faulty run: exit {rc} in {time.monotonic() - t0:.0f} s (log: {os.path.join(args.out, 'faulty.log')})")

    problems = []
    if ref_rc != 0:
        problems.append(f"the uninterrupted run failed (exit {ref_rc}; see {args.out}/uninterrupted.log)")
    if rc != 0:
        problems.append(f"the faulty job did not finish (exit {rc})")
    if len(hits) != args.kills:
        problems.append(f"{len(hits)} of {args.kills} kills happened (the job ended first)")
    if not problems:
        resumes = [r["step"] for r in read_jsonl(os.path.join(runs["faulty"], "metrics.jsonl"), "resume")]
        print(f"resumed {len(resumes)} times, from steps {resumes}")
        (_, want), (path, got) = final_state(runs["uninterrupted"], args.steps), final_state(runs["faulty"],
                                                                                             args.steps)
        for f in want:
            if got[f] != want[f]:
                problems.append(f"{f} of the final checkpoint differs ({got[f]} vs {want[f]})")

        def losses(run):
            return {r["step"]: r["loss"] for r in read_jsonl(os.path.join(run, "metrics.jsonl"), "train")}

        if losses(runs["faulty"]) != losses(runs["uninterrupted"]):
            problems.append("the per-step losses differ from the uninterrupted run's")
        leftovers = [n for n in os.listdir(os.path.join(runs["faulty"], "checkpoints")) if n.startswith(".")]
        if leftovers:
            problems.append(f"left behind in the checkpoint directory: {leftovers}")
    if problems:
        print("FAIL: " + "; ".join(problems))
        return 1
    print(f"PASS: {args.kills} kills of {args.nproc}-rank job survived; the final model.pt and optim.pt (step "
          f"{args.steps}) are byte-identical to the uninterrupted run's ({json.dumps(got)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
