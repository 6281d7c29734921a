"""Launchers and multi-node jobs on one machine (real launcher subprocesses, gloo over loopback, CPU), training
with DeepSpeed ZeRO. Every run is compared with the uninterrupted single-node torchrun run of the same config
(tests/_launch_utils.py), which itself equals the plain single-process trainer within 1e-5 (test_train_zero.py).

- torchrun, 2 "nodes": two `torchrun --nnodes 2 --node_rank {0,1} --master_addr 127.0.0.1` invocations, started
  concurrently. The pair trains, is stopped by a preemption signal after step 3 (checkpoint, clean exit), and a
  second pair resumes with resume=auto: per-step losses equal the uninterrupted run bit for bit.
- the deepspeed launcher: `deepspeed --num_gpus 2` (DeepSpeed's CPU accelerator), and launch/deepspeed.sh with a
  one-host hostfile, then with its no-ssh multi-node mode (2 nodes x 1 process) resuming that run.
- launch/slurm.sbatch, with `srun` and `scontrol` replaced by shims that start the srun command once per node on
  this machine: 2 torchrun agents meet at the c10d rendezvous and train.
- launch/torchrun.sh passes SIGUSR1 (Slurm's warning before the time limit) on to the ranks: they checkpoint the
  step they are in and exit.
"""

import os
import stat
import sys

import pytest

from _launch_utils import (REPO, STEPS, free_port, losses, ok, run_nodes, train_env, uninterrupted, zero_args)
from mamba_dist import checkpoint as ckpt

pytestmark = pytest.mark.slow


def _torchrun_node(node_rank: int, port: int, args: list[str]) -> list[str]:
    return ["torchrun", "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node_rank),
            "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "mamba_dist.train", *args]


def _assert_same_run(run, full) -> None:
    assert losses(run) == losses(full), (losses(run), losses(full))
    assert losses(run, "val", "val_loss") == losses(full, "val", "val_loss")


def test_two_nodes_over_loopback_train_checkpoint_and_resume(tmp_path):
    run = tmp_path / "run"
    args = zero_args(run, zero_stage=2)
    # the preemption notice reaches only node 1's rank; the ranks agree on it, checkpoint step 3 and exit cleanly
    port = free_port()
    first = run_nodes([_torchrun_node(r, port, args) for r in (0, 1)],
                      [train_env(MAMBA_DIST_FAULT="sigterm:after_step_3", MAMBA_DIST_FAULT_RANK="1")] * 2)
    for p in first:
        ok(p)
    assert "stopped early: 3 steps" in first[0].stdout and "2 ranks (dp 2, tp 1)" in first[0].stderr
    latest = ckpt.latest_checkpoint(run / "checkpoints")
    assert latest.endswith("step_00000003")
    assert {"rank00000.pt", "rank00001.pt"} <= set(ckpt.read_meta(latest)["files"])

    port = free_port()
    second = run_nodes([_torchrun_node(r, port, args) for r in (0, 1)], [train_env()] * 2)
    for p in second:
        ok(p)
    assert "resumed from" in second[0].stderr and "step_00000003" in second[0].stderr
    assert f"done: {STEPS} steps" in second[0].stdout
    _assert_same_run(run, uninterrupted(2, 1, 2))


def test_deepspeed_launcher_num_gpus_2_on_cpu(tmp_path):
    """DeepSpeed's CPU accelerator: the launcher starts 2 ranks with --local_rank, which the trainer accepts."""
    run = tmp_path / "run"
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "--module", "mamba_dist.train",
           *zero_args(run, zero_stage=1)]
    (proc,) = run_nodes([cmd], [train_env()])
    ok(proc)
    assert "--local_rank=1" in proc.stdout and "2 ranks (dp 2, tp 1)" in proc.stderr
    _assert_same_run(run, uninterrupted(1, 1, 2))


def test_deepspeed_script_hostfile_then_no_ssh_two_nodes_resume(tmp_path):
    """launch/deepspeed.sh: a one-host hostfile (2 slots) trains to a preemption after step 3; the script's no-ssh
    mode, one invocation per node (NNODES=2, NODE_RANK=0/1), resumes it to the end."""
    run = tmp_path / "run"
    args = zero_args(run, zero_stage=2)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# one host\nlocalhost slots=2\n")
    script = ["bash", str(REPO / "launch" / "deepspeed.sh"), *args]
    (first,) = run_nodes([script], [train_env(HOSTFILE=str(hostfile), MASTER_PORT=str(free_port()),
                                              MAMBA_DIST_FAULT="sigterm:after_step_3")])
    ok(first)
    assert "stopped early: 3 steps" in first.stdout
    assert ckpt.latest_checkpoint(run / "checkpoints").endswith("step_00000003")

    env = dict(NNODES="2", NUM_GPUS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    second = run_nodes([script] * 2, [train_env(NODE_RANK=str(r), **env) for r in (0, 1)])
    for p in second:
        ok(p)
    out0 = second[0].stdout + second[0].stderr
    assert "resumed from" in out0 and f"done: {STEPS} steps" in out0
    _assert_same_run(run, uninterrupted(2, 1, 2))


def _shim(path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_slurm_script_two_nodes_with_srun_shim(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # srun: drop its options, start the command once per node (SLURM_NNODES) on this machine, fail if any fails
    _shim(bin_dir / "srun", "#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\npids=()\n"
                            "for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_NODEID=$i \"$@\" & pids+=($!); done\n"
                            "rc=0; for p in \"${pids[@]}\"; do wait $p || rc=$?; done; exit $rc\n")
    _shim(bin_dir / "scontrol", "#!/bin/bash\necho localhost\n")  # `scontrol show hostnames <list>`
    run = tmp_path / "run"
    env = train_env(PATH=f"{bin_dir}{os.pathsep}{train_env()['PATH']}", SLURM_NNODES="2", SLURM_JOB_ID="4242",
                    SLURM_JOB_NODELIST="localhost", SLURM_GPUS_ON_NODE="1", SLURM_CPUS_PER_TASK="1",
                    RDZV_PORT=str(free_port()), VENV=os.path.dirname(os.path.dirname(sys.executable)))
    (proc,) = run_nodes([["bash", str(REPO / "launch" / "slurm.sbatch"), *zero_args(run, zero_stage=2)]], [env])
    ok(proc)
    assert "2 nodes x 1 GPUs, rendezvous at localhost:" in proc.stdout and "2 ranks (dp 2, tp 1)" in proc.stderr
    _assert_same_run(run, uninterrupted(2, 1, 2))


def test_torchrun_script_passes_a_preemption_signal_to_the_trainer(tmp_path):
    """SIGUSR1 to the torchrun agent (what Slurm's --signal sends before the time limit) reaches the ranks, which
    finish the step, agree, write a (ZeRO) checkpoint of it and exit; torchrun itself exits non-zero."""
    import json
    import signal
    import subprocess
    import time

    run = tmp_path / "run"
    args = zero_args(run, zero_stage=2, **{"train.max_steps": 500, "checkpoint.every": 0, "train.val_tokens": 0})
    proc = subprocess.Popen(["bash", str(REPO / "launch" / "torchrun.sh"), *args], cwd=REPO, text=True,
                            env=train_env(NPROC_PER_NODE="2", MASTER_PORT=str(free_port())),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if (run / "metrics.jsonl").exists() and len(losses(run)) >= 2:  # training is under way
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGUSR1)  # bash exec'd torchrun: this is the agent's pid
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
    assert proc.returncode != 0 and "got signal: 10" in err, err[-3000:]
    step = max(losses(run))
    assert 2 <= step < 500 and f"stopped early: {step} steps" in out, out
    assert err.count(f"stopping at step {step} on a termination signal") == 2  # both ranks, the same step
    latest = ckpt.latest_checkpoint(run / "checkpoints")
    assert latest.endswith(f"step_{step:08d}")
    meta = json.loads((run / "checkpoints" / f"step_{step:08d}" / "meta.json").read_text())
    assert {"rank00000.pt", "rank00001.pt"} <= set(meta["files"]) and any(f.startswith("zero/") for f in meta["files"])
