"""Fault tolerance of the trainer (issue 14), with real `mamba-dist train` subprocesses on CPU:

- Corruption: one byte flipped (same size) in a checkpoint's model.pt, optim.pt, rank file or a DeepSpeed ZeRO
  shard makes the load fail with one line naming the file; resume=auto falls back to the previous checkpoint, says
  why, and the continued run reproduces the uninterrupted run's losses bit for bit.
- Non-finite steps (MAMBA_DIST_FAULT=nan_loss_at_N): skipped, counted, logged; more than train.max_skipped_in_row in
  a row halt the run (exit 3) with the last good checkpoint intact; a non-finite state (nan_weights_at_N) is never
  saved. Under 2 DDP ranks a NaN on one rank is skipped on both.
- Failed writes (MAMBA_DIST_FAULT=enospc:checkpoint_write_N, a full disk mid-save): the previous checkpoint stays
  the latest and loads; checkpoint.on_error=stop halts (exit 3), continue goes on, also when only one rank fails.
- checkpoint.async=true: the same files as synchronous saves; a SIGKILL mid-write leaves the previous latest.
"""

import math
import os
import shutil

import pytest
import torch

from _launch_utils import STEPS, uninterrupted, zero_args
from _train_utils import error_line, losses, ok, run_train
from mamba_dist import checkpoint as ckpt

pytestmark = pytest.mark.slow


def _flip_byte(fp):
    size = os.path.getsize(fp)
    with open(fp, "r+b") as f:
        f.seek(size // 2)
        b = f.read(1)
        f.seek(size // 2)
        f.write(bytes([b[0] ^ 0x01]))
    assert os.path.getsize(fp) == size


def _halted(proc) -> str:
    """A halted run: exit code 3 and one error line, the last one."""
    assert proc.returncode == 3, f"rc={proc.returncode}\n{proc.stderr[-4000:]}"
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert lines[-1].startswith("mamba-dist train: error: ") and "Traceback" not in proc.stderr, proc.stderr
    return lines[-1]


def _killed_after_step_5(src_run, dst_run):
    """The checkpoints a run killed after step 5 leaves (2 and 4), in a fresh run directory."""
    shutil.copytree(src_run / "checkpoints", dst_run / "checkpoints")
    shutil.rmtree(dst_run / "checkpoints" / "step_00000006")
    assert ckpt.latest_checkpoint(dst_run / "checkpoints").endswith("step_00000004")


def _all_finite(path) -> bool:
    state = ckpt.load_file(path, "model.pt")
    return all(torch.isfinite(v).all() for v in state.values())


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_corrupt_latest_checkpoint_falls_back_and_continues_exactly(tmp_path, zero_stage):
    ref = uninterrupted(zero_stage)  # 6 steps, checkpoints at 2, 4, 6 (shared with test_train_zero)
    run = tmp_path / "run"
    _killed_after_step_5(ref, run)
    step4 = run / "checkpoints" / "step_00000004"
    files = ckpt.read_meta(step4)["files"]
    if zero_stage:
        targets = [f for f in files if f.startswith("zero/") and f.endswith("optim_states.pt")]
        assert targets, files
    else:
        targets = ["model.pt", "optim.pt", "rank00000.pt"]
    for name in targets[1:]:  # every kind of file: verification names it (the file is restored afterwards)
        keep = (step4 / name).read_bytes()
        _flip_byte(step4 / name)
        with pytest.raises(ckpt.CheckpointError, match=f"{name} does not match its checksum"):
            ckpt.verify(str(step4))
        (step4 / name).write_bytes(keep)
    _flip_byte(step4 / targets[0])
    args = zero_args(run, zero_stage)
    # an explicit resume from it fails in one line naming the file (exit 2) ...
    line = error_line(run_train(args + [f"checkpoint.resume={step4}"]))
    assert f"checkpoint {step4} is corrupt: {targets[0]} does not match its checksum in meta.json" in line
    # ... resume=auto says why, resumes from step 2, and steps 3-6 equal the uninterrupted run's, bit for bit
    proc = ok(run_train(args))
    assert f"{targets[0]} does not match its checksum in meta.json (recorded" in proc.stderr
    assert "falling back to the previous checkpoint" in proc.stderr
    assert "resumed from" in proc.stderr and "step_00000002" in proc.stderr
    got, want = losses(run), losses(ref)
    assert sorted(got) == list(range(3, STEPS + 1))
    assert all(got[s] == want[s] for s in got), (got, want)
    assert losses(run, "val", "val_loss")[STEPS] == losses(ref, "val", "val_loss")[STEPS]
    assert ckpt.verify(str(step4))["step"] == 4  # re-saved over the corrupt one


def test_nan_steps_are_skipped_counted_and_too_many_in_a_row_halt(tmp_path):
    run = tmp_path / "run"
    env = {"MAMBA_DIST_FAULT": "nan_loss_at_3,nan_loss_at_5,nan_loss_at_6,nan_loss_at_7"}
    proc = run_train(zero_args(run, 0, **{"train.max_steps": 8, "train.max_skipped_in_row": 2}), env=env)
    line = _halted(proc)
    assert line.endswith("step 7: 3 non-finite steps in a row (train.max_skipped_in_row=2); halted, the last good "
                         "checkpoint is intact"), line
    assert "step 3: non-finite loss (loss nan, grad norm nan); update skipped (1 in a row, 1 in all)" in proc.stderr
    assert "step 6: non-finite loss (loss nan, grad norm nan); update skipped (2 in a row, 3 in all)" in proc.stderr
    rec = {r["step"]: r for r in __import__("mamba_dist.metrics", fromlist=["x"]).read_jsonl(
        run / "metrics.jsonl", "train")}
    assert [s for s in sorted(rec) if rec[s]["skipped"]] == [3, 5, 6, 7] and rec[7]["skipped_total"] == 4
    ref = losses(uninterrupted())  # steps 1, 2 are the same as without faults; step 4 trains on finite weights
    assert rec[1]["loss"] == ref[1] and rec[2]["loss"] == ref[2] and math.isfinite(rec[4]["loss"])
    ckdir = run / "checkpoints"
    assert [s for s, _ in ckpt.list_checkpoints(ckdir)] == [2, 4, 6]  # step 6: skipped, but a finite state
    for s, path in ckpt.list_checkpoints(ckdir):
        assert ckpt.verify(path) and _all_finite(path)
        adam_steps = {int(v["step"]) for v in ckpt.load_file(path, "optim.pt")["optimizer"]["state"].values()}
        assert adam_steps == {{2: 2, 4: 3, 6: 3}[s]}  # updates applied (1, 2, 4): skipped ones did not
    assert ckpt.read_meta(ckpt.latest_checkpoint(ckdir))["skipped_in_row"] == 2


def test_non_finite_state_is_never_saved(tmp_path):
    run = tmp_path / "run"
    proc = run_train(zero_args(run, 0), env={"MAMBA_DIST_FAULT": "nan_weights_at_3"})
    line = _halted(proc)
    assert line.endswith(f"step 4: the model/optimizer state holds non-finite values; not saved (last good "
                         f"checkpoint: {run / 'checkpoints' / 'step_00000002'})"), line
    ckdir = run / "checkpoints"
    assert [s for s, _ in ckpt.list_checkpoints(ckdir)] == [2] and not any(
        n.startswith(".tmp-") for n in os.listdir(ckdir))
    assert _all_finite(ckpt.verify(str(ckdir / "step_00000002")) and str(ckdir / "step_00000002"))


def test_full_disk_during_save_stops_and_keeps_previous_checkpoint(tmp_path):
    run = tmp_path / "run"
    proc = run_train(zero_args(run, 0), env={"MAMBA_DIST_FAULT": "enospc:checkpoint_write_4"})
    line = _halted(proc)
    prev = run / "checkpoints" / "step_00000002"
    assert line.endswith("checkpoint save at step 4 failed (OSError: [Errno 28] No space left on device (injected at "
                         f"checkpoint_write_4)); the previous checkpoint {prev} is intact "
                         "(checkpoint.on_error=stop)"), line
    assert sorted(os.listdir(run / "checkpoints")) == ["step_00000002"]  # no step 4, no temp dir
    assert ckpt.latest_checkpoint(run / "checkpoints") == str(prev)
    meta = ckpt.verify(str(prev))
    assert meta["step"] == 2 and ckpt.load_file(str(prev), "model.pt") and ckpt.load_rank_state(str(prev), 0)


def test_two_ranks_nan_and_full_disk_on_one_rank(tmp_path):
    """Rank 1 alone sees a NaN loss at step 3 and a full disk when saving step 4: both ranks skip step 3 (their
    losses equal the 1-process run with a NaN at step 3), both abort the step-4 save (no hang), and with
    on_error=continue the run finishes with a good checkpoint at step 6."""
    run = tmp_path / "run"
    env = {"MAMBA_DIST_FAULT": "nan_loss_at_3,enospc:checkpoint_write_4", "MAMBA_DIST_FAULT_RANK": "1"}
    proc = ok(run_train(zero_args(run, 0, **{"checkpoint.on_error": "continue"}), nproc=2, env=env, timeout=240))
    assert "checkpoint save at step 4 failed" in proc.stderr and "training continues" in proc.stderr
    assert [s for s, _ in ckpt.list_checkpoints(run / "checkpoints")] == [2, 6]
    meta = ckpt.verify(str(run / "checkpoints" / "step_00000006"))
    assert meta["skipped"] == 1 and {"rank00000.pt", "rank00001.pt"} <= set(meta["checksums"])
    one = tmp_path / "one"
    ok(run_train(zero_args(one, 0), env={"MAMBA_DIST_FAULT": "nan_loss_at_3"}))
    got, want = losses(run), losses(one)
    assert sorted(got) == list(range(1, STEPS + 1)) and math.isnan(got[3])
    for s in (1, 2, 4, 5, 6):
        assert abs(got[s] - want[s]) <= 1e-5, (s, got[s], want[s])


def test_async_checkpoints_equal_sync_ones_and_a_kill_mid_write_keeps_the_previous(tmp_path):
    """checkpoint.async=true, SIGKILLed while its writer thread is writing step 4: step 2 stays the latest; the
    resumed (async) run reproduces the uninterrupted synchronous run bit for bit, and every async checkpoint
    (2, 4, 6) holds byte-identical model and optimizer files (same checksums)."""
    ref = uninterrupted()
    run = tmp_path / "run"
    args = zero_args(run, 0, **{"checkpoint.async": "true"})
    killed = run_train(args, env={"MAMBA_DIST_FAULT": "checkpoint_write_4"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    ckdir = run / "checkpoints"
    assert os.path.isdir(ckdir / ".tmp-step_00000004")
    assert ckpt.latest_checkpoint(ckdir).endswith("step_00000002")
    proc = ok(run_train(args))
    assert "resumed from" in proc.stderr and "step_00000002" in proc.stderr
    assert losses(run) == losses(ref) and losses(run, "val", "val_loss") == losses(ref, "val", "val_loss")
    for s in (2, 4, 6):
        name = ckpt.step_dir_name(s)
        got, want = ckpt.verify(str(ckdir / name)), ckpt.read_meta(str(ref / "checkpoints" / name))
        # rank00000.pt of steps 4 and 6 come from the resumed process, whose torch CPU RNG state differs from
        # the uninterrupted one's also with synchronous saves (nothing in training draws from it); step 2's is
        # from the first process and is byte-identical too
        same = ("model.pt", "optim.pt") + (("rank00000.pt",) if s == 2 else ())
        assert {f: got["checksums"][f] for f in same} == {f: want["checksums"][f] for f in same}, s
        assert (ckpt.load_rank_state(str(ckdir / name), 0)["loader"]
                == ckpt.load_rank_state(str(ref / "checkpoints" / name), 0)["loader"])
