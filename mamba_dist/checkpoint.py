"""Atomic training checkpoints and `resume=auto`.

Layout of a checkpoint directory (<checkpoint.dir>/step_00000100/):
  model.pt, optim.pt   model and optimizer state (written by the trainer's save hook; model-tpNN.pt ... under TP)
  zero/, latest, zero_to_fp32.py   instead, under DeepSpeed ZeRO: its sharded model/optimizer files, tag `zero`
  rank00000.pt ...     per rank: data-loader state and every RNG state (python, numpy, torch CPU, CUDA)
  meta.json            step, tokens seen, data epoch, world size, the resolved config, the size and content checksum
                       of every file, and a checksum of meta.json's own content

Atomicity: every rank writes into `.tmp-step_00000100/` in the same parent and fsyncs its files; after a barrier
rank 0 writes meta.json last, fsyncs, and renames the directory to `step_00000100` (an atomic rename on POSIX),
then fsyncs the parent. A crash at any point before the rename leaves only a `.tmp-*` directory, which
`resume=auto` ignores and the next save removes, so the previous checkpoint stays the latest. Old checkpoints
are first renamed to `.trash-*` and then deleted, so a crash mid-delete never leaves a half-deleted `step_*`.
The checkpoint directory must be on a filesystem every rank sees (shared storage on multi-node runs).

Integrity: `torch.load` does not check the zip CRC, so a flipped byte would load silently. Every file's checksum
(xxh3-128 when the `xxhash` package is installed, else blake2b-128 from hashlib) is computed while it is written
(`save_file` hashes the bytes torch.save streams through `HashingWriter`); each rank hands its checksums to rank 0
in a small `.checksums-rankNNNNN.json` in the temporary directory, and rank 0 puts them into meta.json. `verify`
re-reads and checks every file; `resolve_resume("auto")` falls back to the previous checkpoint when the latest
fails it (and logs why); `mamba-dist checkpoint verify DIR` does the same check offline.

Failed writes (a full disk, a permission error): every rank reports whether its writes succeeded at the syncs of
`begin_save` / `commit_save`, so all ranks abort the save together with `CheckpointWriteError`; the temporary
directory is removed and the previous checkpoints are untouched.

Errors a user can hit (missing, truncated or corrupt files, config mismatch) raise `CheckpointError` with a
one-line message naming the checkpoint and the problem.

Run the offline check:
    mamba-dist checkpoint verify runs/demo/checkpoints              # every complete checkpoint there
    mamba-dist checkpoint verify runs/demo/checkpoints/step_00000100
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
from typing import Any, Callable, Optional

import numpy as np
import torch

try:
    import xxhash  # optional: ~10x faster than blake2b
except ImportError:  # pragma: no cover - depends on the environment
    xxhash = None

log = logging.getLogger("mamba_dist.checkpoint")

STEP_RE = re.compile(r"^step_(\d{8,})$")
META = "meta.json"
FORMAT_VERSION = 2  # 2: meta.json records checksums (version 1 checkpoints, sizes only, still load)
HASH = "xxh3_128" if xxhash is not None else "blake2b"
CHECKSUMS_SIDECAR = ".checksums-rank{rank:05d}.json"  # a rank's checksums, merged into meta.json by rank 0


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used. The message is one line naming the checkpoint and the problem."""


class CheckpointWriteError(RuntimeError):
    """A save failed on some rank (e.g. a full disk); it was aborted on every rank, the previous checkpoints are
    intact. The message is one line."""


# ------------------------------------------------------------------------------------------- test hooks
def restart_count() -> int:
    """Which attempt of a restarted job this process belongs to: torchrun sets TORCHELASTIC_RESTART_COUNT,
    launch/deepspeed.sh MAMBA_DIST_RESTART_COUNT; 0 without a restarting launcher."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or os.environ.get("MAMBA_DIST_RESTART_COUNT") or 0)


def _faults() -> list[str]:
    """MAMBA_DIST_FAULT (comma-separated points) when MAMBA_DIST_FAULT_RANK is unset or equals this RANK. A point
    `<point>@N` is active only in restart attempt N (restart_count()), so that a restarted job, which has the same
    environment, does not meet the same fault again."""
    want = os.environ.get("MAMBA_DIST_FAULT_RANK")
    if want is not None and want != os.environ.get("RANK", "0"):
        return []
    out = []
    for f in os.environ.get("MAMBA_DIST_FAULT", "").split(","):
        point, _, attempt = f.strip().partition("@")
        if point and (not attempt or int(attempt) == restart_count()):
            out.append(point)
    return out


def fault_active(name: str) -> bool:
    """Test hook for faults that are not crashes (e.g. `nan_loss_at_5`): whether MAMBA_DIST_FAULT names it."""
    return name in _faults()


def fault_point(name: str) -> None:
    """Test hook for crash tests: if MAMBA_DIST_FAULT names `name` (and MAMBA_DIST_FAULT_RANK, if set, equals this
    process's RANK), the process SIGKILLs itself here, as a power cut or OOM killer would; `sigterm:<name>` sends
    itself SIGTERM (a scheduler's preemption notice); `sigstop:<name>` stops itself (SIGSTOP: a hung rank that
    answers nothing); `enospc:<name>` raises OSError(ENOSPC), as a full disk would. A no-op otherwise."""
    faults = _faults()
    if name in faults:
        os.kill(os.getpid(), signal.SIGKILL)
    elif f"sigterm:{name}" in faults:
        os.kill(os.getpid(), signal.SIGTERM)
    elif f"sigstop:{name}" in faults:
        print(f"MAMBA_DIST_FAULT: rank {os.environ.get('RANK', '0')} (pid {os.getpid()}) stops itself (SIGSTOP) at "
              f"{name}", file=sys.stderr, flush=True)  # tests time the hang from this line
        os.kill(os.getpid(), signal.SIGSTOP)
    elif f"enospc:{name}" in faults:
        raise OSError(errno.ENOSPC, f"No space left on device (injected at {name})")


# ------------------------------------------------------------------------------------------- checksums
def _new_hash(algo: str):
    if algo == "xxh3_128":
        if xxhash is None:
            raise CheckpointError("this checkpoint records xxh3_128 checksums: pip install xxhash to verify it")
        return xxhash.xxh3_128()
    if algo == "blake2b":
        return hashlib.blake2b(digest_size=16)
    raise CheckpointError(f"unknown checksum algorithm {algo!r}")


class HashingWriter:
    """A binary file wrapper that hashes the bytes as they are written. torch.save streams its zip archive through
    write() alone (torch.serialization._open_zipfile_writer_buffer: write + flush, no seeks), so the checksum
    covers exactly the bytes on disk without reading them back."""

    def __init__(self, f, algo: str = HASH):
        self.f, self.algo, self.h = f, algo, _new_hash(algo)

    def write(self, data) -> int:
        self.h.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()

    def checksum(self) -> str:
        return f"{self.algo}:{self.h.hexdigest()}"


def file_checksum(path: str, algo: str = HASH) -> str:
    """Checksum of a file by reading it (verification, and files written by other libraries)."""
    h = _new_hash(algo)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return f"{algo}:{h.hexdigest()}"


def meta_checksum(meta: dict) -> str:
    body = json.dumps({k: v for k, v in meta.items() if k != "meta_checksum"}, sort_keys=True)
    return "blake2b:" + hashlib.blake2b(body.encode(), digest_size=16).hexdigest()


# tmp dir -> {file name relative to it: checksum} of the files this process wrote there (threads may save)
_written: dict[str, dict[str, str]] = {}
_written_lock = threading.Lock()


def _record(path: str, checksum: str) -> None:
    path = os.path.abspath(path)
    with _written_lock:
        for tmp, sums in _written.items():
            if path.startswith(tmp + os.sep):
                sums[os.path.relpath(path, tmp)] = checksum
                return


def record_files(tmp: str, paths: list[str]) -> None:
    """Checksum files another library wrote into the temporary directory `tmp` (DeepSpeed's shards), by reading
    them back: their writer cannot be wrapped. Recorded like save_file's."""
    for p in paths:
        _record(p, file_checksum(p))


# ------------------------------------------------------------------------------------------- finding checkpoints
def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(ckpt_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints (a `step_N` directory holding meta.json) as (step, path), oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    out = []
    for name in os.listdir(ckpt_dir):
        m = STEP_RE.match(name)
        path = os.path.join(ckpt_dir, name)
        if m and os.path.isfile(os.path.join(path, META)):
            out.append((int(m.group(1)), path))
    return sorted(out)


def latest_checkpoint(ckpt_dir: str) -> Optional[str]:
    ckpts = list_checkpoints(ckpt_dir)
    return ckpts[-1][1] if ckpts else None


def resolve_resume(resume: str, ckpt_dir: str) -> Optional[str]:
    """checkpoint.resume -> the checkpoint directory to load, or None to start fresh."""
    if resume == "none":
        return None
    if resume == "auto":
        return latest_verified(ckpt_dir)
    path = resume
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, META)):
        latest = latest_checkpoint(path)  # a checkpoint *directory* was given: take its latest
        if latest is not None:
            verify(latest)
            return latest
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint.resume: no such checkpoint directory: {path}")
    if not os.path.isfile(os.path.join(path, META)):
        raise CheckpointError(f"checkpoint {path} is incomplete (no {META}): it was not fully written")
    verify(path)
    return path


def latest_verified(ckpt_dir: str) -> Optional[str]:
    """The newest complete checkpoint that passes `verify`; a newer one that fails is skipped with a warning (so
    every rank, checking the same files, picks the same one). None if there are none; CheckpointError if there
    are some but none passes (starting from scratch over them would silently throw the run away)."""
    ckpts = list_checkpoints(ckpt_dir)
    first_error = None
    for _, path in reversed(ckpts):
        try:
            verify(path)
            return path
        except CheckpointError as e:
            first_error = first_error or e
            log.warning("%s; falling back to the previous checkpoint", e)
    if first_error is not None:
        raise CheckpointError(f"no checkpoint in {ckpt_dir} passes verification (latest: {first_error}); "
                              f"set checkpoint.resume=none to start from scratch")
    return None


# ------------------------------------------------------------------------------------------- writing
def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_file(obj: Any, path: str) -> str:
    """torch.save + flush + fsync, so the bytes are on disk before the directory is renamed into place. Returns the
    content checksum, computed while writing and recorded for meta.json when `path` is inside a save's tmp dir."""
    with open(path, "wb") as f:
        w = HashingWriter(f)
        torch.save(obj, w)
        f.flush()
        os.fsync(f.fileno())
    _record(path, w.checksum())
    return w.checksum()


def _write_json(obj: Any, path: str) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


# `sync(failed) -> bool` is a barrier over all ranks that returns whether any rank passed failed=True (train.py:
# an all-reduce of the flag); `local_sync` is the one-process version.
Sync = Callable[[bool], bool]


def local_sync(failed: bool = False) -> bool:
    return failed


def _abort(ckpt_dir: str, tmp: str, step: int, rank: int, err: Optional[BaseException]) -> None:
    with _written_lock:
        _written.pop(os.path.abspath(tmp), None)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    why = f"{type(err).__name__}: {err}" if err is not None else "another rank failed to write its files"
    prev = latest_checkpoint(ckpt_dir)
    raise CheckpointWriteError(f"checkpoint save at step {step} failed ({why}); "
                               + (f"the previous checkpoint {prev} is intact" if prev else "no earlier checkpoint"))


def remove_leftovers(ckpt_dir: str) -> list[str]:
    """Delete what a crashed save or delete left behind (`.tmp-*`, `.trash-*`: never a complete checkpoint, ignored by
    resume); returns their names. Rank 0 only, while no save of this job is in flight (at start-up and in
    begin_save)."""
    names = sorted(n for n in os.listdir(ckpt_dir) if n.startswith((".tmp-", ".trash-"))) if os.path.isdir(
        ckpt_dir) else []
    for name in names:
        shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)
    return names


def begin_save(ckpt_dir: str, step: int, rank: int, sync: Sync = local_sync) -> str:
    """Create (on rank 0) a fresh temporary directory for step `step`; returns its path on every rank."""
    tmp = os.path.join(ckpt_dir, ".tmp-" + step_dir_name(step))
    err = None
    if rank == 0:
        try:
            os.makedirs(ckpt_dir, exist_ok=True)
            remove_leftovers(ckpt_dir)
            os.makedirs(tmp)
        except OSError as e:
            err = e
    with _written_lock:
        _written[os.path.abspath(tmp)] = {}
    if sync(err is not None):
        _abort(ckpt_dir, tmp, step, rank, err)
    return tmp


def commit_save(ckpt_dir: str, tmp: str, step: int, meta: dict, rank: int, sync: Sync = local_sync,
                keep_last: int = 0, error: Optional[BaseException] = None) -> str:
    """After every rank has written its files into `tmp` (or failed to: `error`): each rank's checksums, then
    meta.json last and the atomic rename (rank 0). Any rank's failure aborts the save on all of them."""
    with _written_lock:
        sums = _written.pop(os.path.abspath(tmp), {})
    if error is None:
        try:
            if sums:
                _write_json(sums, os.path.join(tmp, CHECKSUMS_SIDECAR.format(rank=rank)))
        except OSError as e:
            error = e
    if sync(error is not None):  # every rank's files are fsynced, or some rank failed
        _abort(ckpt_dir, tmp, step, rank, error)
    final = os.path.join(ckpt_dir, step_dir_name(step))
    if rank == 0:
        try:
            _finish(ckpt_dir, tmp, final, step, meta, keep_last)
        except OSError as e:
            error = e
    if sync(error is not None):
        _abort(ckpt_dir, tmp, step, rank, error)
    return final


def _finish(ckpt_dir: str, tmp: str, final: str, step: int, meta: dict, keep_last: int) -> None:
    """Rank 0: merge the ranks' checksums, write meta.json, rename tmp -> final, prune old checkpoints."""
    checksums: dict[str, str] = {}
    for name in os.listdir(tmp):
        if name.startswith(".checksums-rank"):
            with open(os.path.join(tmp, name)) as f:
                checksums.update(json.load(f))
            os.remove(os.path.join(tmp, name))
    files = {}  # every file, also inside sub-directories (DeepSpeed's zero/), so read_meta checks them all
    for root, _, names in os.walk(tmp):
        for name in names:
            fp = os.path.join(root, name)
            rel = os.path.relpath(fp, tmp)
            files[rel] = os.path.getsize(fp)
            if rel not in checksums:  # written by other code (DeepSpeed's `latest`, zero_to_fp32.py): read back
                checksums[rel] = file_checksum(fp)
    files = dict(sorted(files.items()))
    meta = {**meta, "format": FORMAT_VERSION, "step": step, "files": files,
            "checksums": {k: checksums[k] for k in files}, "saved_at": time.time()}
    meta["meta_checksum"] = meta_checksum(meta)
    _write_json(meta, os.path.join(tmp, META))
    _fsync_dir(tmp)
    fault_point(f"checkpoint_before_rename_{step}")
    if os.path.exists(final):  # re-saving a step (e.g. a resumed run that saves the same step again)
        trash = os.path.join(ckpt_dir, ".trash-" + step_dir_name(step))
        os.rename(final, trash)
        shutil.rmtree(trash, ignore_errors=True)
    os.rename(tmp, final)
    _fsync_dir(ckpt_dir)
    if keep_last > 0:
        for _, old in list_checkpoints(ckpt_dir)[:-keep_last]:
            trash = os.path.join(ckpt_dir, ".trash-" + os.path.basename(old))
            os.rename(old, trash)
            shutil.rmtree(trash, ignore_errors=True)


def save_checkpoint(ckpt_dir: str, step: int, rank: int, write: Callable[[str], None], meta: dict,
                    sync: Sync = local_sync, keep_last: int = 0) -> str:
    """One collective save: begin_save, `write(tmp)` on every rank, commit_save. An OSError in any rank's writes
    (full disk, permissions) aborts it on every rank with CheckpointWriteError; returns the checkpoint's path."""
    tmp = begin_save(ckpt_dir, step, rank, sync)
    error = None
    try:
        write(tmp)
    except OSError as e:
        error = e
    return commit_save(ckpt_dir, tmp, step, meta, rank, sync, keep_last, error)


# ------------------------------------------------------------------------------------------- reading
def read_meta(path: str) -> dict:
    """meta.json of a checkpoint, after checking every recorded file is present with its recorded size."""
    try:
        with open(os.path.join(path, META)) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} is incomplete (no {META}): it was not fully written") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt: {META} is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or "step" not in meta or "files" not in meta:
        raise CheckpointError(f"checkpoint {path} is corrupt: {META} lacks step/files")
    if "meta_checksum" in meta and meta["meta_checksum"] != meta_checksum(meta):
        raise CheckpointError(f"checkpoint {path} is corrupt: {META} does not match its own checksum")
    for name, size in meta["files"].items():
        fp = os.path.join(path, name)
        if not os.path.exists(fp):
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} is missing")
        if os.path.isfile(fp) and os.path.getsize(fp) != size:
            raise CheckpointError(
                f"checkpoint {path} is corrupt: {name} has {os.path.getsize(fp)} bytes, {META} recorded {size}")
    return meta


def verify(path: str) -> dict:
    """read_meta, then every file's content against the checksum meta.json records; returns the meta. Raises a
    one-line CheckpointError naming the first missing or changed file."""
    meta = read_meta(path)
    for name, want in meta.get("checksums", {}).items():  # a format-1 checkpoint has none: sizes only
        fp = os.path.join(path, name)
        if not os.path.isfile(fp):
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} is missing")
        got = file_checksum(fp, want.split(":", 1)[0])
        if got != want:
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} does not match its checksum in {META} "
                                  f"(recorded {want}, found {got})")
    return meta


def load_file(path: str, name: str, map_location: Any = "cpu", weights_only: bool = True) -> Any:
    """torch.load one checkpoint file, turning any failure into a one-line CheckpointError."""
    fp = os.path.join(path, name)
    if not os.path.isfile(fp):
        raise CheckpointError(f"checkpoint {path} is corrupt: {name} is missing")
    try:
        return torch.load(fp, map_location=map_location, weights_only=weights_only)
    except Exception as e:  # zip/pickle errors have many types; all mean the same thing here
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt: cannot read {name} ({first})") from None


def load_state_dict_strict(module: torch.nn.Module, state: dict, path: str, what: str = "model") -> None:
    """module.load_state_dict with shape/key mismatches reported as one line."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys (e.g. {unexpected[0]})")
        raise CheckpointError(f"checkpoint {path} does not fit the {what}: {'; '.join(parts)}")
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise CheckpointError(f"checkpoint {path} does not fit the {what}: {k} has shape "
                                  f"{tuple(state[k].shape)} in the checkpoint, {tuple(v.shape)} in the {what}")
    module.load_state_dict(state)


# Config fields that must agree between a checkpoint and the run resuming it (the rest, e.g. max_steps, lr,
# val_every or logging, may change on resume). Data order depends on seed, seq_len and batch layout.
MUST_MATCH = ("model", "data.seq_len", "train.global_batch_tokens", "train.micro_batch_size", "seed",
              "parallel.tp", "parallel.zero_stage")
MAY_DIFFER = ("model.backend", "model.fused_ce")  # how the model is computed, not what it is


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict) and key != "model.ssm_cfg" and key != "model.attn_cfg":
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def check_compatible(path: str, meta: dict, config: dict) -> None:
    """Raise CheckpointError naming the first field that differs where it matters. The number of data-parallel
    ranks may change (the loader position is global); the TP degree may not (model files are per TP rank)."""
    saved = _flatten(meta.get("config", {}))
    now = _flatten(config)
    for key in sorted(now):
        if key in MAY_DIFFER or not any(key == f or key.startswith(f + ".") for f in MUST_MATCH):
            continue
        if key == "model.ssm_cfg" and key in saved:  # the same mixer, however many defaults each spells out
            from mamba_dist.model.config import resolved_ssm_cfg

            layer = {"layer": now.get("model.mixer", "Mamba1")}
            if resolved_ssm_cfg({**layer, **saved[key]}) == resolved_ssm_cfg({**layer, **now[key]}):
                continue
        if key == "model.attn_cfg" and key in saved:  # likewise for the attention layers' arguments
            from mamba_dist.model.config import resolved_attn_cfg

            if resolved_attn_cfg(saved[key]) == resolved_attn_cfg(now[key]):
                continue
        if key in saved and saved[key] != now[key]:
            raise CheckpointError(f"checkpoint {path} is incompatible: {key} is {saved[key]!r} in the checkpoint, "
                                  f"{now[key]!r} in the config")


# ------------------------------------------------------------------------------------------- RNG state
def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rank_file(rank: int) -> str:
    return f"rank{rank:05d}.pt"


def rank_state(loader_state: Any, extra: Optional[dict] = None) -> dict:
    """What rankNNNNN.pt holds: this rank's loader position and every RNG state, as of now."""
    return {"rng": rng_state(), "loader": loader_state, **(extra or {})}


def save_rank_state(tmp: str, rank: int, loader_state: Any, extra: Optional[dict] = None) -> None:
    save_file(rank_state(loader_state, extra), os.path.join(tmp, rank_file(rank)))


def load_rank_state(path: str, rank: int) -> dict:
    # Written by this program (python/numpy RNG states are plain objects, not tensors): trusted like the code.
    return load_file(path, rank_file(rank), weights_only=False)


# ------------------------------------------------------------------------------------------- offline check
def main(argv: Optional[list[str]] = None) -> int:
    """`mamba-dist checkpoint verify DIR`: check a step directory, or every complete checkpoint in a checkpoint
    directory, against the checksums in meta.json. Exit 0 when all pass; one line per failure and exit 2."""
    p = argparse.ArgumentParser(prog="mamba-dist checkpoint", description="inspect training checkpoints")
    sub = p.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("verify", help="check every file of a checkpoint against its recorded checksum")
    v.add_argument("dir", help="a step_NNNNNNNN directory, or a checkpoint directory holding them")
    args = p.parse_args(argv)
    if os.path.isfile(os.path.join(args.dir, META)):
        targets = [args.dir]
    else:
        targets = [path for _, path in list_checkpoints(args.dir)]
        if not targets:
            print(f"mamba-dist checkpoint: error: {args.dir} holds no complete checkpoint (no {META})",
                  file=sys.stderr)
            return 2
    failed = 0
    for path in targets:
        try:
            meta = verify(path)
        except CheckpointError as e:
            print(f"mamba-dist checkpoint: error: {e}", file=sys.stderr)
            failed += 1
            continue
        n_bytes = sum(meta["files"].values())
        how = "checksums" if "checksums" in meta else "sizes only (format 1, no checksums)"
        print(f"ok: {path} (step {meta['step']}, {len(meta['files'])} files, {n_bytes / 1e6:.1f} MB, {how})")
    return 2 if failed else 0
