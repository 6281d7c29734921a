"""Crash and resume, with real subprocesses killed by SIGKILL (CPU).

A run killed at any point and restarted with checkpoint.resume=auto must reproduce the uninterrupted run's
per-step losses bit for bit. The kill comes from the test hook MAMBA_DIST_FAULT=<point>, at which the process
SIGKILLs itself (see mamba_dist.checkpoint.fault_point): after a training step, or in the middle of writing a
checkpoint (model file written, the rest not), or with the checkpoint complete but not yet renamed into place.
"""

import functools
import os
import signal
from pathlib import Path

import pytest

from _train_utils import losses, ok, run_train, scratch_dir, tiny_args
from mamba_dist import checkpoint as ckpt

STEPS = 8


@functools.lru_cache(maxsize=None)
def reference_run() -> tuple[dict, dict]:
    """The uninterrupted run: per-step train losses and validation losses."""
    run = Path(scratch_dir("mamba-dist-ref-")) / "run"
    ok(run_train(tiny_args(run, **{"train.max_steps": STEPS})))
    return losses(run), losses(run, "val", "val_loss")


def _killed(proc) -> None:
    assert proc.returncode == -signal.SIGKILL, f"rc={proc.returncode}\n{proc.stderr[-4000:]}"


def _assert_bit_identical(run_dir) -> None:
    ref_train, ref_val = reference_run()
    got_train, got_val = losses(run_dir), losses(run_dir, "val", "val_loss")
    assert sorted(got_train) == sorted(ref_train) == list(range(1, STEPS + 1))
    for s in ref_train:
        assert got_train[s] == ref_train[s], f"step {s}: {got_train[s]!r} != {ref_train[s]!r}"
    assert got_val == ref_val


def test_sigkill_after_step_then_resume_is_bit_identical(tmp_path):
    run = tmp_path / "run"
    args = tiny_args(run, **{"train.max_steps": STEPS, "logging.tensorboard": "true"})
    _killed(run_train(args, env={"MAMBA_DIST_FAULT": "after_step_5"}))
    assert ckpt.latest_checkpoint(run / "checkpoints").endswith("step_00000004")
    assert max(losses(run)) == 5  # it did get to step 5 before dying
    proc = ok(run_train(args))  # checkpoint.resume=auto
    assert "resumed from" in proc.stderr and "step_00000004" in proc.stderr
    _assert_bit_identical(run)
    # TensorBoard: the killed run's step 5 is purged, the resumed run's replaces it (one point per step)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run / "tensorboard"))
    ea.Reload()
    events = ea.Scalars("train/loss")
    assert [e.step for e in events] == list(range(1, STEPS + 1))
    assert [e.value for e in events] == pytest.approx([reference_run()[0][s] for s in range(1, STEPS + 1)])


def test_sigterm_checkpoints_at_the_end_of_the_step_and_resume_is_bit_identical(tmp_path):
    """A preemption notice (SIGTERM) during step 3: the run finishes the step, checkpoints it and exits cleanly."""
    run = tmp_path / "run"
    args = tiny_args(run, **{"train.max_steps": STEPS})
    proc = ok(run_train(args, env={"MAMBA_DIST_FAULT": "sigterm:after_step_3"}))
    assert "stopped early: 3 steps" in proc.stdout and "stopping at step 3 on a termination signal" in proc.stderr
    assert ckpt.latest_checkpoint(run / "checkpoints").endswith("step_00000003")
    ok(run_train(args))
    _assert_bit_identical(run)


def test_sigterm_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    """Under torchrun, only rank 1 is told to stop: both ranks agree, checkpoint step 3 together, and exit 0."""
    run = tmp_path / "run"
    proc = ok(run_train(tiny_args(run, **{"train.max_steps": STEPS}), nproc=2,
                        env={"MAMBA_DIST_FAULT": "sigterm:after_step_3", "MAMBA_DIST_FAULT_RANK": "1"}))
    assert "stopped early: 3 steps" in proc.stdout
    latest = ckpt.latest_checkpoint(run / "checkpoints")
    assert latest.endswith("step_00000003")
    assert set(ckpt.read_meta(latest)["files"]) == {"model.pt", "optim.pt", "rank00000.pt", "rank00001.pt"}


@pytest.mark.parametrize("point", ["checkpoint_write_4", "checkpoint_before_rename_4"])
def test_sigkill_during_checkpoint_write_keeps_previous_checkpoint(tmp_path, point):
    run = tmp_path / "run"
    args = tiny_args(run, **{"train.max_steps": STEPS})
    _killed(run_train(args, env={"MAMBA_DIST_FAULT": point}))
    ckdir = run / "checkpoints"
    assert os.path.isdir(ckdir / ".tmp-step_00000004")  # the half-written one
    latest = ckpt.latest_checkpoint(ckdir)
    assert latest.endswith("step_00000002")  # the previous checkpoint is still the latest ...
    meta = ckpt.read_meta(latest)  # ... and loads
    assert meta["step"] == 2 and ckpt.load_file(latest, "model.pt")
    proc = ok(run_train(args))
    assert "step_00000002" in proc.stderr
    assert not any(n.startswith(".tmp-") for n in os.listdir(ckdir))  # cleaned up by the next save
    _assert_bit_identical(run)


def test_resume_from_explicit_path_and_extending_max_steps(tmp_path):
    """resume=<path> loads that checkpoint; a finished run extended with a larger max_steps continues it."""
    run = tmp_path / "run"
    ok(run_train(tiny_args(run, **{"train.max_steps": 4})))
    step2 = run / "checkpoints" / "step_00000002"
    other = tmp_path / "other"
    proc = ok(run_train(tiny_args(other, **{"train.max_steps": 4, "checkpoint.resume": str(step2)})))
    assert "resumed from" in proc.stderr
    a, b = losses(run), losses(other)
    assert sorted(b) == [3, 4] and b[3] == a[3] and b[4] == a[4]
    # resume=none starts from scratch even though checkpoints exist
    fresh = ok(run_train(tiny_args(other, **{"train.max_steps": 4, "checkpoint.resume": "none"})))
    assert "resumed from" not in fresh.stderr


def test_resume_with_another_number_of_ranks(tmp_path):
    """A checkpoint written by 2 DDP ranks resumes on 1 process (same global batch): the loader continues at the
    same global position, so the losses continue those of the uninterrupted 1-process run (to fp32 rounding)."""
    run = tmp_path / "run"
    args = tiny_args(run, **{"train.max_steps": STEPS})
    ok(run_train(args, nproc=2, env={"MAMBA_DIST_FAULT": "sigterm:after_step_4"}))  # stops after step 4
    proc = ok(run_train(args))
    assert "written by 2 processes, resuming on 1" in proc.stderr
    ref, got = reference_run()[0], losses(run)
    assert sorted(got) == list(range(1, STEPS + 1))
    for s in range(1, STEPS + 1):
        assert abs(got[s] - ref[s]) <= 1e-5, (s, got[s], ref[s])
