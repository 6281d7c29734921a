"""The trainer under DeepSpeed ZeRO (real `python -m mamba_dist.train` subprocesses, torchrun + gloo on CPU, fp32).

- ZeRO-1/2/3 at TP=1 x DP=2, ZeRO-2 and ZeRO-3 (+ sequence parallelism + recomputation) at TP=2 x DP=2, and
  ZeRO-3 in a single process give the plain single-process trainer's per-step losses, gradient norms, learning
  rates and validation losses within 1e-5, with gradient clipping active at every step (DeepSpeed clips,
  divides by the accumulation steps and steps the LR schedule; the trainer's loop is the same one).
- A TP=2 x DP=2 ZeRO-2 run SIGKILLed after step 5 resumes (resume=auto, latest = step 4) to the same losses, bit
  for bit, as the uninterrupted run; so does a single-process ZeRO-3 run killed while writing a checkpoint (the
  previous checkpoint stays the latest; a missing ZeRO shard is reported in one line).
- precision=bf16 under ZeRO (DeepSpeed's torch_autocast) trains with fp32 weights.
"""

import math
import os
import signal

import pytest
import torch

from _launch_utils import CLIP, STEPS, TOL, assert_losses_close, losses, ok, uninterrupted, zero_args
from _train_utils import error_line, run_train
from mamba_dist import checkpoint as ckpt
from mamba_dist.metrics import read_jsonl

pytestmark = pytest.mark.slow

SP_AC = (("parallel.sequence_parallel", "true"), ("train.ac_fraction", 0.5))
LAYOUTS = {  # name: (zero_stage, tp, processes, extra overrides)
    "zero1-tp1xdp2": (1, 1, 2, ()),
    "zero2-tp1xdp2": (2, 1, 2, ()),
    "zero3-tp1xdp2": (3, 1, 2, ()),
    "zero2-tp2xdp2": (2, 2, 4, ()),
    "zero3-tp2xdp2-sp-ac": (3, 2, 4, SP_AC),
    "zero3-one-process": (3, 1, 1, ()),
}


def _train_records(run):
    return {r["step"]: r for r in read_jsonl(os.path.join(run, "metrics.jsonl"), "train")}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_zero_trainer_equals_plain_trainer(layout):
    stage, tp, nproc, extra = LAYOUTS[layout]
    ref, run = uninterrupted(), uninterrupted(stage, tp, nproc, extra)
    ref_rec, rec = _train_records(ref), _train_records(run)
    assert min(r["grad_norm"] for r in ref_rec.values()) > CLIP  # clipping is active at every step
    assert ref_rec[STEPS]["loss"] < ref_rec[1]["loss"]  # it trains
    assert_losses_close(losses(run), losses(ref))
    assert_losses_close(losses(run, "train", "grad_norm"), losses(ref, "train", "grad_norm"))
    assert_losses_close(losses(run, "val", "val_loss"), losses(ref, "val", "val_loss"))
    assert [rec[s]["lr"] for s in sorted(rec)] == pytest.approx([ref_rec[s]["lr"] for s in sorted(ref_rec)],
                                                                rel=1e-12)
    # the checkpoint holds DeepSpeed's shards next to the trainer's per-rank loader/RNG state, all recorded in
    # meta.json (read_meta checks each one's size)
    latest = ckpt.latest_checkpoint(run / "checkpoints")
    files = ckpt.read_meta(latest)["files"]
    assert {f"rank{r:05d}.pt" for r in range(nproc)} <= set(files)
    shards = [f for f in files if f.startswith("zero/") and "optim_states" in f]
    assert len(shards) == nproc, files  # every rank's optimizer partition
    assert not any(n in files for n in ("model.pt", "optim.pt"))


def test_zero2_tp2xdp2_sigkill_then_resume_is_exact(tmp_path):
    run = tmp_path / "run"
    args = zero_args(run, zero_stage=2, tp=2)
    killed = run_train(args, nproc=4, env={"MAMBA_DIST_FAULT": "after_step_5"})
    assert killed.returncode != 0
    assert ckpt.latest_checkpoint(run / "checkpoints").endswith("step_00000004")
    assert max(losses(run)) == 5  # it got to step 5 before dying
    proc = ok(run_train(args, nproc=4))
    assert "resumed from" in proc.stderr and "step_00000004" in proc.stderr
    full = uninterrupted(2, 2, 4)
    assert losses(run) == losses(full)  # bit for bit, steps 1-6 (5 and 6 from the resumed run)
    assert losses(run, "val", "val_loss") == losses(full, "val", "val_loss")


def test_zero3_crash_while_writing_checkpoint_keeps_previous_one(tmp_path):
    run = tmp_path / "run"
    args = zero_args(run, zero_stage=3)
    proc = run_train(args, env={"MAMBA_DIST_FAULT": "checkpoint_write_4"})  # ZeRO files written, rank state not
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    ckdir = run / "checkpoints"
    assert any(n.startswith("zero_pp_rank_0") for n in os.listdir(ckdir / ".tmp-step_00000004" / "zero"))
    latest = ckpt.latest_checkpoint(ckdir)
    assert latest.endswith("step_00000002") and ckpt.read_meta(latest)["step"] == 2
    proc = ok(run_train(args))
    assert "step_00000002" in proc.stderr
    assert not any(n.startswith(".tmp-") for n in os.listdir(ckdir))
    full = uninterrupted(3, 1, 1)
    assert losses(run) == losses(full) and losses(run, "val", "val_loss") == losses(full, "val", "val_loss")

    # a ZeRO shard missing from the latest checkpoint: resuming from it fails in one line naming it, before any
    # training (resume=auto would fall back to the previous checkpoint: test_train_faults.py)
    latest = ckpt.latest_checkpoint(ckdir)
    shard = next(f for f in ckpt.read_meta(latest)["files"] if f.startswith("zero/") and "optim" in f)
    os.remove(os.path.join(latest, shard))
    line = error_line(run_train(zero_args(run, zero_stage=3, **{"train.max_steps": STEPS + 2,
                                                                "checkpoint.resume": latest})))
    assert f"checkpoint {latest} is corrupt: {shard} is missing" in line


def test_zero2_bf16_trains_with_fp32_weights(tmp_path):
    run = tmp_path / "run"
    ok(run_train(zero_args(run, zero_stage=2, **{"precision.dtype": "bf16", "train.max_steps": 3,
                                                 "checkpoint.every": 0, "train.val_tokens": 0})))
    got, ref = losses(run), losses(uninterrupted())
    assert sorted(got) == [1, 2, 3] and got[3] < got[1]
    assert all(math.isfinite(v) and abs(v - ref[s]) < 2e-2 for s, v in got.items()), (got, ref)
    assert any(abs(v - ref[s]) > TOL for s, v in got.items())  # bf16 matmuls really ran
    step = ckpt.latest_checkpoint(run / "checkpoints")
    state = torch.load(os.path.join(step, "zero", "mp_rank_00_model_states.pt"), weights_only=False)["module"]
    assert state and all(t.dtype == torch.float32 for t in state.values())
