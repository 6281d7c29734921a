"""Hangs and restarts with NCCL (issue 14), on 2 GPUs: the CPU tests (test_train_elastic.py) cover gloo.

A 2-rank torchrun job (one GPU per rank, NCCL, parallel.timeout_s=20, --max-restarts 2): rank 1 stops itself
(SIGSTOP) after step 3 of attempt 0, and is SIGKILLed after step 5 of attempt 1. Expected: rank 0 fails within the
timeout, naming rank 1 (our heartbeat watchdog) or the collective (NCCL's own watchdog, which may abort the
process first); the stopped process does not outlive the test; the restarted attempts connect (the trainer's
per-attempt store prefix) and resume; the job finishes.

Run (a machine with 2 GPUs):  python -m pytest -q -s tests/test_gpu_faults.py
"""

from __future__ import annotations

import os
import signal
import sys

import pytest
import torch

from _launch_utils import zero_args
from _train_utils import REPO, free_port
from mamba_dist import checkpoint as ckpt
from test_train_elastic import _alive, _stream

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2,
                                                  reason="needs 2 GPUs (one NCCL rank on each)")]


def test_nccl_sigstop_then_kill_restarts_and_finishes(tmp_path):
    run = tmp_path / "run"
    timeout_s = 20
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "NPROC_PER_NODE": "2",
           "MASTER_PORT": str(free_port()), "MAX_RESTARTS": "2", "CUDA_VISIBLE_DEVICES": "0,1",
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
           "MAMBA_DIST_FAULT": "sigstop:after_step_3@0,after_step_5@1", "MAMBA_DIST_FAULT_RANK": "1"}
    args = zero_args(run, **{"parallel.timeout_s": timeout_s, "train.device": "cuda",
                             "parallel.dist_backend": "nccl", "train.threads": 0})
    stopped_pid = None
    try:
        rc, lines = _stream(["bash", str(REPO / "launch" / "torchrun.sh"), *args], env, timeout=480)
        text = "\n".join(line for _, line in lines)
        stop = [(t, ln) for t, ln in lines if "stops itself (SIGSTOP) at after_step_3" in ln]
        assert len(stop) == 1, text[-6000:]
        stopped_pid = int(stop[0][1].split("(pid ")[1].split(")")[0])
        ours = [(t, ln) for t, ln in lines if ln.startswith("mamba-dist train: error: ") and "rank 1" in ln]
        nccl = [(t, ln) for t, ln in lines if "Watchdog caught collective operation timeout" in ln]
        first = min(ours[:1] + nccl[:1], default=None)
        assert first is not None, text[-6000:]
        waited = first[0] - stop[0][0]
        print(f"SIGSTOP -> first failure report after {waited:.1f} s (timeout {timeout_s} s): {first[1]}")
        assert waited <= timeout_s + 10, (waited, first[1])
        assert not _alive(stopped_pid)
        assert rc == 0, text[-6000:]
        assert text.count("resumed from ") == 2, text[-6000:]
        assert ckpt.verify(ckpt.latest_checkpoint(run / "checkpoints"))["step"] == 6
    finally:
        if stopped_pid is not None and _alive(stopped_pid):
            os.kill(stopped_pid, signal.SIGKILL)
