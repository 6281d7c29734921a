"""Atomic training checkpoints and `resume=auto`.

Layout of a checkpoint directory (<checkpoint.dir>/step_00000100/):
  model.pt, optim.pt   model and optimizer state (written by the trainer's save hook; model-tpNN.pt ... under TP)
  zero/, latest, zero_to_fp32.py   instead, under DeepSpeed ZeRO: its sharded model/optimizer files, tag `zero`
  rank00000.pt ...     per rank: data-loader state and every RNG state (python, numpy, torch CPU, CUDA)
  meta.json            step, tokens seen, data epoch, world size, the resolved config, and the size of every file

Atomicity: every rank writes into `.tmp-step_00000100/` in the same parent and fsyncs its files; after a barrier
rank 0 writes meta.json last, fsyncs, and renames the directory to `step_00000100` (an atomic rename on POSIX),
then fsyncs the parent. A crash at any point before the rename leaves only a `.tmp-*` directory, which
`resume=auto` ignores and the next save removes, so the previous checkpoint stays the latest. Old checkpoints
are first renamed to `.trash-*` and then deleted, so a crash mid-delete never leaves a half-deleted `step_*`.
The checkpoint directory must be on a filesystem every rank sees (shared storage on multi-node runs).

Errors a user can hit (missing, truncated or corrupt files, config mismatch) raise `CheckpointError` with a
one-line message naming the checkpoint and the problem.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import time
from typing import Any, Callable, Optional

import numpy as np
import torch

STEP_RE = re.compile(r"^step_(\d{8,})$")
META = "meta.json"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used. The message is one line naming the checkpoint and the problem."""


def fault_point(name: str) -> None:
    """Test hook for crash tests: if MAMBA_DIST_FAULT equals `name` (and MAMBA_DIST_FAULT_RANK, if set, equals this
    process's RANK), the process SIGKILLs itself here, as a power cut or OOM killer would; if it equals
    `sigterm:<name>`, it sends itself SIGTERM (a scheduler's preemption notice). A no-op otherwise."""
    fault = os.environ.get("MAMBA_DIST_FAULT")
    if fault not in (name, f"sigterm:{name}"):
        return
    want = os.environ.get("MAMBA_DIST_FAULT_RANK")
    if want is not None and want != os.environ.get("RANK", "0"):
        return
    os.kill(os.getpid(), signal.SIGKILL if fault == name else signal.SIGTERM)


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
        return latest_checkpoint(ckpt_dir)
    path = resume
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, META)):
        latest = latest_checkpoint(path)  # a checkpoint *directory* was given: take its latest
        if latest is not None:
            return latest
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint.resume: no such checkpoint directory: {path}")
    if not os.path.isfile(os.path.join(path, META)):
        raise CheckpointError(f"checkpoint {path} is incomplete (no {META}): it was not fully written")
    return path


# ------------------------------------------------------------------------------------------- writing
def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_file(obj: Any, path: str) -> None:
    """torch.save + flush + fsync, so the bytes are on disk before the directory is renamed into place."""
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _write_json(obj: Any, path: str) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def begin_save(ckpt_dir: str, step: int, rank: int, barrier: Callable[[], None]) -> str:
    """Create (on rank 0) a fresh temporary directory for step `step`; returns its path on every rank."""
    tmp = os.path.join(ckpt_dir, ".tmp-" + step_dir_name(step))
    if rank == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
        for name in os.listdir(ckpt_dir):  # leftovers of a crashed save or delete
            if name.startswith((".tmp-", ".trash-")):
                shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    return tmp


def commit_save(ckpt_dir: str, tmp: str, step: int, meta: dict, rank: int, barrier: Callable[[], None],
                keep_last: int = 0) -> str:
    """After every rank has written its files into `tmp`: meta.json last, then the atomic rename (rank 0)."""
    barrier()  # every rank's files are fsynced
    final = os.path.join(ckpt_dir, step_dir_name(step))
    if rank == 0:
        files = {}  # every file, also inside sub-directories (DeepSpeed's zero/), so read_meta checks them all
        for root, _, names in os.walk(tmp):
            for name in names:
                fp = os.path.join(root, name)
                files[os.path.relpath(fp, tmp)] = os.path.getsize(fp)
        files = dict(sorted(files.items()))
        meta = {**meta, "format": FORMAT_VERSION, "step": step, "files": files, "saved_at": time.time()}
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
    barrier()
    return final


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
    for name, size in meta["files"].items():
        fp = os.path.join(path, name)
        if not os.path.exists(fp):
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} is missing")
        if os.path.isfile(fp) and os.path.getsize(fp) != size:
            raise CheckpointError(
                f"checkpoint {path} is corrupt: {name} has {os.path.getsize(fp)} bytes, {META} recorded {size}")
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


def save_rank_state(tmp: str, rank: int, loader_state: Any, extra: Optional[dict] = None) -> None:
    save_file({"rng": rng_state(), "loader": loader_state, **(extra or {})}, os.path.join(tmp, rank_file(rank)))


def load_rank_state(path: str, rank: int) -> dict:
    # Written by this program (python/numpy RNG states are plain objects, not tensors): trusted like the code.
    return load_file(path, rank_file(rank), weights_only=False)
