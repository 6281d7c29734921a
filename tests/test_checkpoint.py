"""Checkpoint directory mechanics: atomic commit, latest/resume selection, pruning, corruption detection, RNG
state, config compatibility. (Killing a real training run mid-write is in test_train_resume.py.)"""

import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from mamba_dist import checkpoint as ckpt


def _noop(failed=False):
    return failed


def _save(ckdir, step, keep_last=0, payload=None):
    tmp = ckpt.begin_save(str(ckdir), step, 0, _noop)
    ckpt.save_file(payload if payload is not None else {"w": torch.full((4,), float(step))},
                   os.path.join(tmp, "model.pt"))
    ckpt.save_rank_state(tmp, 0, {"epoch": 0, "position": step})
    return ckpt.commit_save(str(ckdir), tmp, step, {"tokens": step * 10, "world_size": 1, "config": {}}, 0, _noop,
                            keep_last)


def test_commit_creates_complete_step_dirs_and_latest(tmp_path):
    assert ckpt.latest_checkpoint(str(tmp_path / "none")) is None
    for s in (1, 2, 10):
        _save(tmp_path, s)
    assert [s for s, _ in ckpt.list_checkpoints(str(tmp_path))] == [1, 2, 10]
    latest = ckpt.latest_checkpoint(str(tmp_path))
    assert latest.endswith("step_00000010")
    meta = ckpt.read_meta(latest)
    assert meta["step"] == 10 and meta["tokens"] == 100
    assert set(meta["files"]) == {"model.pt", "rank00000.pt"}
    assert torch.equal(ckpt.load_file(latest, "model.pt")["w"], torch.full((4,), 10.0))
    assert ckpt.load_rank_state(latest, 0)["loader"] == {"epoch": 0, "position": 10}


def test_keep_last_prunes_oldest(tmp_path):
    for s in range(1, 6):
        _save(tmp_path, s, keep_last=2)
    assert sorted(os.listdir(tmp_path)) == ["step_00000004", "step_00000005"]


def test_incomplete_dirs_are_ignored_and_cleaned(tmp_path):
    _save(tmp_path, 2)
    # a crash left: a temp dir, a half-deleted trash dir, and a step dir without meta.json (not from us)
    (tmp_path / ".tmp-step_00000004").mkdir()
    (tmp_path / ".trash-step_00000001").mkdir()
    (tmp_path / "step_00000009").mkdir()
    assert ckpt.latest_checkpoint(str(tmp_path)).endswith("step_00000002")
    _save(tmp_path, 4)
    names = sorted(os.listdir(tmp_path))
    assert ".tmp-step_00000004" not in names and ".trash-step_00000001" not in names
    assert ckpt.latest_checkpoint(str(tmp_path)).endswith("step_00000004")


def test_resave_same_step_replaces(tmp_path):
    _save(tmp_path, 3, payload={"w": torch.zeros(2)})
    _save(tmp_path, 3, payload={"w": torch.ones(2)})
    assert torch.equal(ckpt.load_file(ckpt.latest_checkpoint(str(tmp_path)), "model.pt")["w"], torch.ones(2))


def test_resolve_resume(tmp_path):
    assert ckpt.resolve_resume("auto", str(tmp_path)) is None  # nothing yet: fresh start
    p = _save(tmp_path, 5)
    assert ckpt.resolve_resume("auto", str(tmp_path)) == p
    assert ckpt.resolve_resume("none", str(tmp_path)) is None
    assert ckpt.resolve_resume(p, "/elsewhere") == p
    assert ckpt.resolve_resume(str(tmp_path), "/elsewhere") == p  # a checkpoint directory: its latest
    with pytest.raises(ckpt.CheckpointError, match="no such checkpoint directory"):
        ckpt.resolve_resume(str(tmp_path / "nope"), str(tmp_path))
    (tmp_path / ".tmp-step_00000007").mkdir()
    with pytest.raises(ckpt.CheckpointError, match="is incomplete \\(no meta.json\\)"):
        ckpt.resolve_resume(str(tmp_path / ".tmp-step_00000007"), str(tmp_path))


def test_corruption_is_reported_in_one_line(tmp_path):
    p = _save(tmp_path, 1)
    model = os.path.join(p, "model.pt")
    size = os.path.getsize(model)
    with open(model, "r+b") as f:
        f.truncate(size - 7)
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.read_meta(p)
    assert str(e.value) == f"checkpoint {p} is corrupt: model.pt has {size - 7} bytes, meta.json recorded {size}"
    with pytest.raises(ckpt.CheckpointError, match="is corrupt: cannot read model.pt"):
        ckpt.load_file(p, "model.pt")
    os.remove(model)
    with pytest.raises(ckpt.CheckpointError, match="is corrupt: model.pt is missing"):
        ckpt.read_meta(p)
    with open(os.path.join(p, "meta.json"), "w") as f:
        f.write("[1, 2")
    with pytest.raises(ckpt.CheckpointError, match="meta.json is not valid JSON"):
        ckpt.read_meta(p)


def test_state_dict_mismatch_is_named():
    m = torch.nn.Linear(3, 2)
    with pytest.raises(ckpt.CheckpointError, match=r"weight has shape \(2, 4\) in the checkpoint, \(2, 3\)"):
        ckpt.load_state_dict_strict(m, {"weight": torch.zeros(2, 4), "bias": torch.zeros(2)}, "/c")
    with pytest.raises(ckpt.CheckpointError, match=r"missing 1 keys \(e.g. bias\); unexpected 1 keys \(e.g. b\)"):
        ckpt.load_state_dict_strict(m, {"weight": torch.zeros(2, 3), "b": torch.zeros(2)}, "/c")


def test_config_compatibility():
    saved = {"config": {"model": {"d_model": 64, "backend": "fused", "ssm_cfg": {"d_state": 16}},
                        "optim": {"lr": 1e-3}, "data": {"seq_len": 64}}, "world_size": 2}
    same_but_lr_backend = {"model": {"d_model": 64, "backend": "reference", "ssm_cfg": {"d_state": 16}},
                           "optim": {"lr": 5e-4}, "data": {"seq_len": 64}}
    ckpt.check_compatible("/c", saved, same_but_lr_backend)  # lr, backend and world size may change on resume
    with pytest.raises(ckpt.CheckpointError, match=r"model.ssm_cfg is \{'d_state': 16\} in the checkpoint, "
                                                   r"\{'d_state': 32\} in the config"):
        ckpt.check_compatible("/c", saved, {**same_but_lr_backend,
                                            "model": {"d_model": 64, "ssm_cfg": {"d_state": 32}}})
    with pytest.raises(ckpt.CheckpointError, match="data.seq_len is 64 in the checkpoint, 128 in the config"):
        ckpt.check_compatible("/c", saved, {**same_but_lr_backend, "data": {"seq_len": 128}})


def test_rng_state_round_trip():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    state = ckpt.rng_state()
    a = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    ckpt.set_rng_state(state)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_sigkill_before_rename_leaves_previous_latest(tmp_path):
    """A process killed after writing everything (meta.json included) but before the rename."""
    code = textwrap.dedent(f"""
        import os, torch
        from mamba_dist import checkpoint as ckpt
        d = {str(tmp_path)!r}
        for step in (1, 2):
            tmp = ckpt.begin_save(d, step, 0)
            ckpt.save_file({{"w": torch.ones(3) * step}}, os.path.join(tmp, "model.pt"))
            if step == 2:
                os.environ["MAMBA_DIST_FAULT"] = "checkpoint_before_rename_2"
            ckpt.commit_save(d, tmp, step, {{"tokens": 0}}, 0)
        print("not reached")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    assert "not reached" not in proc.stdout
    assert os.path.isfile(tmp_path / ".tmp-step_00000002" / "meta.json")  # fully written, never renamed
    latest = ckpt.latest_checkpoint(str(tmp_path))
    assert latest.endswith("step_00000001")
    assert torch.equal(ckpt.load_file(latest, "model.pt")["w"], torch.ones(3))


# ------------------------------------------------------------------------------------------- integrity (issue 14)
def _flip_byte(fp, offset=None):
    """Change one byte in place (same size): what bit rot or a bad copy does, and what torch.load misses."""
    size = os.path.getsize(fp)
    offset = size // 2 if offset is None else offset
    with open(fp, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))
    assert os.path.getsize(fp) == size


def test_checksums_are_computed_while_writing_and_match_the_bytes_on_disk(tmp_path):
    p = _save(tmp_path, 1, payload={"w": torch.randn(1000), "meta": {"a": [1, 2]}})
    meta = ckpt.read_meta(p)
    assert meta["format"] == 2 and set(meta["checksums"]) == set(meta["files"]) == {"model.pt", "rank00000.pt"}
    for name, want in meta["checksums"].items():  # hashed while torch.save wrote: equals a re-read of the file
        assert want == ckpt.file_checksum(os.path.join(p, name)) and want.startswith(ckpt.HASH + ":")
    assert not any(n.startswith(".checksums-") for n in os.listdir(p))  # the ranks' sidecars are merged away
    assert ckpt.verify(p)["step"] == 1


@pytest.mark.parametrize("name", ["model.pt", "rank00000.pt"])
def test_flipped_byte_fails_verification_naming_the_file(tmp_path, name):
    p = _save(tmp_path, 1)
    fp = os.path.join(p, name)
    _flip_byte(fp)
    ckpt.read_meta(p)  # the size still matches ...
    with pytest.raises(ckpt.CheckpointError) as e:  # ... the checksum does not
        ckpt.verify(p)
    msg = str(e.value)
    assert msg.startswith(f"checkpoint {p} is corrupt: {name} does not match its checksum in meta.json")
    assert "\n" not in msg
    with pytest.raises(ckpt.CheckpointError, match=f"{name} does not match"):  # an explicit resume verifies
        ckpt.resolve_resume(p, str(tmp_path))
    os.remove(fp)
    with pytest.raises(ckpt.CheckpointError, match=f"{name} is missing"):
        ckpt.verify(p)


def test_meta_json_edit_is_detected(tmp_path):
    p = _save(tmp_path, 1)
    fp = os.path.join(p, "meta.json")
    text = open(fp).read()
    assert '"tokens": 10' in text
    with open(fp, "w") as f:
        f.write(text.replace('"tokens": 10', '"tokens": 11'))  # still valid JSON, same keys
    with pytest.raises(ckpt.CheckpointError, match="meta.json does not match its own checksum"):
        ckpt.read_meta(p)


def test_resume_auto_falls_back_to_the_previous_verified_checkpoint(tmp_path, caplog):
    for s in (2, 4, 6):
        _save(tmp_path, s)
    _flip_byte(os.path.join(tmp_path, "step_00000006", "model.pt"))
    _flip_byte(os.path.join(tmp_path, "step_00000004", "rank00000.pt"))
    with caplog.at_level("WARNING", logger="mamba_dist.checkpoint"):
        got = ckpt.resolve_resume("auto", str(tmp_path))
    assert got.endswith("step_00000002")
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2
    assert "step_00000006 is corrupt: model.pt does not match" in warnings[0] and "falling back" in warnings[0]
    assert "step_00000004 is corrupt: rank00000.pt does not match" in warnings[1]
    _flip_byte(os.path.join(tmp_path, "step_00000002", "model.pt"))
    with pytest.raises(ckpt.CheckpointError, match="passes verification .*checkpoint.resume=none"):
        ckpt.resolve_resume("auto", str(tmp_path))


def test_failed_write_aborts_the_save_and_keeps_the_previous_checkpoint(tmp_path):
    import errno

    _save(tmp_path, 2)

    def write(tmp):
        ckpt.save_file({"w": torch.zeros(3)}, os.path.join(tmp, "model.pt"))
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(ckpt.CheckpointWriteError) as e:
        ckpt.save_checkpoint(str(tmp_path), 4, 0, write, {"tokens": 0})
    assert str(e.value) == ("checkpoint save at step 4 failed (OSError: [Errno 28] No space left on device); the "
                            f"previous checkpoint {tmp_path / 'step_00000002'} is intact")
    assert sorted(os.listdir(tmp_path)) == ["step_00000002"]  # no half-written step_4, no temp dir
    assert ckpt.verify(ckpt.latest_checkpoint(str(tmp_path)))["step"] == 2
    # a failure on another rank (its sync reports it) aborts this rank's save too
    with pytest.raises(ckpt.CheckpointWriteError, match="another rank failed to write its files"):
        ckpt.save_checkpoint(str(tmp_path), 4, 0, lambda tmp: None, {"tokens": 0}, sync=lambda failed=False: True)
    assert sorted(os.listdir(tmp_path)) == ["step_00000002"]


def test_verify_command(tmp_path, capsys):
    for s in (1, 2):
        _save(tmp_path, s)
    assert ckpt.main(["verify", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("ok: ") == 2 and "step 2, 2 files" in out
    _flip_byte(os.path.join(tmp_path, "step_00000002", "model.pt"))
    want = (f"mamba-dist checkpoint: error: checkpoint {tmp_path / 'step_00000002'} is corrupt: model.pt does not "
            f"match its checksum in meta.json (recorded {ckpt.HASH}:")
    # the installed command: one line, exit code 2; the good step_1 is still reported
    bad = subprocess.run([sys.executable, "-m", "mamba_dist.cli", "checkpoint", "verify", str(tmp_path)],
                         capture_output=True, text=True)
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(lines) == 1 and lines[0].startswith(want), bad.stderr
    assert bad.stdout.count("ok: ") == 1
    assert ckpt.main(["verify", str(tmp_path / "step_00000002")]) == 2  # a step directory
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(want)
    assert ckpt.main(["verify", str(tmp_path / "nothing")]) == 2
    assert "holds no complete checkpoint" in capsys.readouterr().err



def test_async_snapshot_and_checkpointer(tmp_path):
    """The snapshot keeps tied tensors tied and torch.saves to the same bytes; AsyncCheckpointer commits only when
    the writer is done, keeps at most one save in flight, and its checkpoint verifies like a synchronous one."""
    import io
    import threading

    from mamba_dist.async_checkpoint import AsyncCheckpointer, snapshot
    from mamba_dist.config import load_config

    assert load_config(None, ["checkpoint.async=true", "train.max_steps=1"], validate=False).checkpoint.async_
    w = torch.randn(4, 3)
    state = {"a": w.detach(), "tied": w.detach(), "view": w[1:3].detach(), "betas": (0.9, 0.95)}
    state["again"] = state["betas"]
    copy = snapshot(state, pin=False)
    assert copy["a"].data_ptr() == copy["tied"].data_ptr() != w.data_ptr() and torch.equal(copy["view"], w[1:3])
    live, snap = io.BytesIO(), io.BytesIO()
    torch.save(state, live)
    torch.save(copy, snap)
    assert live.getvalue() == snap.getvalue()  # what a synchronous save of the live state writes
    w.add_(1.0)  # training goes on: the snapshot does not change
    assert not torch.equal(copy["a"], w)

    gate = threading.Event()
    real_save = ckpt.save_file

    def slow_save(obj, path):  # the writer thread blocks until the test lets it go
        gate.wait(10)
        return real_save(obj, path)

    saver = AsyncCheckpointer(str(tmp_path), 0, ckpt.local_sync)
    ckpt.save_file = slow_save
    try:
        assert saver.start(2, {"model.pt": {"w": torch.ones(3)}}, {"tokens": 2}) is None
        assert saver.poll() is None and ckpt.latest_checkpoint(str(tmp_path)) is None  # still writing
        gate.set()
        saver.pending["thread"].join()
        assert saver.poll() == str(tmp_path / "step_00000002")
        first_buffer = saver.staging.buffers[0]
        gate.clear()
        saver.start(4, {"model.pt": {"w": torch.full((3,), 4.0)}}, {"tokens": 4})
        timer = threading.Timer(0.2, gate.set)
        timer.start()
        # the next save first finishes the one in flight
        assert saver.start(6, {"model.pt": {"w": torch.full((3,), 6.0)}}, {"tokens": 6}) == str(
            tmp_path / "step_00000004")
        assert saver.wait() == str(tmp_path / "step_00000006")
        # the host buffer of one save is reused by the next (allocating, and on CUDA pinning, it was the stall)
        assert len(saver.staging.buffers) == 1 and saver.staging.buffers[0] is first_buffer
    finally:
        ckpt.save_file = real_save
    assert [s for s, _ in ckpt.list_checkpoints(str(tmp_path))] == [2, 4, 6]
    for s in (2, 4):  # written before their buffer was reused for the next snapshot
        want = torch.full((3,), float(s)) if s == 4 else torch.ones(3)
        assert torch.equal(ckpt.load_file(str(tmp_path / f"step_0000000{s}"), "model.pt")["w"], want)
    assert torch.equal(ckpt.load_file(ckpt.verify(str(tmp_path / "step_00000006")) and
                                      str(tmp_path / "step_00000006"), "model.pt")["w"], torch.full((3,), 6.0))
