"""checkpoint.async=true: the training loop goes on while a checkpoint is written.

At the save step the state to write (model, optimizer, schedule, this rank's loader + RNG state) is copied to CPU
memory (pinned on CUDA, so the device-to-host copies run at full speed; one stream sync; the buffers are kept for
the next save, see Staging); a background thread
then torch.saves the copies into the checkpoint's `.tmp-step_*` directory. The commit (every rank's checksums,
meta.json, the atomic rename: checkpoint.commit_save) needs every rank, so it runs on the main thread: `poll()`,
called once per step, asks all ranks (one all-reduce of a flag while a save is in flight) whether their writes are
done and commits when they all are. So a checkpoint becomes `latest` only once complete, exactly as a synchronous
one, and a crash before the commit leaves the previous checkpoint as the latest. At most one save is in flight:
`start` first finishes the previous one (waiting for its thread), and so does `wait` at the end of training.

The thread does no collectives (those stay on the main thread, in step order), so it cannot interleave with the
training step's. DeepSpeed's ZeRO save is itself collective and writes its own files: it stays synchronous.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Optional

import torch

from mamba_dist import checkpoint as ckpt


class Staging:
    """The host buffers snapshots are copied into, kept from one save to the next: one uint8 buffer per distinct
    storage, in the order the state is walked (the same at every save of a run). An async save of a 370M model's
    4.46 GB stalled the loop 2.2 s on an H200, where the device-to-host copies alone move tens of GB/s: allocating
    and pinning the buffers afresh (cudaHostAlloc of each) is the likely bulk, and is paid once this way (not yet
    measured). The cost: the host memory of one checkpoint stays allocated.
    A buffer may be reused only once the previous save's writer is done with it (AsyncCheckpointer.start waits)."""

    def __init__(self):
        self.buffers: list[torch.Tensor] = []
        self.next = 0

    def begin(self) -> None:
        self.next = 0

    def take(self, nbytes: int, pin: bool) -> torch.Tensor:
        i, self.next = self.next, self.next + 1
        if i < len(self.buffers) and self.buffers[i].numel() == nbytes and self.buffers[i].is_pinned() == pin:
            return self.buffers[i]
        self.buffers[i:i + 1] = [torch.empty(nbytes, dtype=torch.uint8, device="cpu", pin_memory=pin)]
        return self.buffers[i]


def snapshot(obj: Any, pin: bool, memo: Optional[dict] = None, staging: Optional[Staging] = None) -> Any:
    """A copy of a (nested dict/list/tuple) state with every tensor copied to CPU memory (pinned when `pin`; into
    `staging`'s buffers when given). Tensors sharing a storage (tied weights) still share one."""
    memo = {} if memo is None else memo
    if torch.is_tensor(obj):
        # one CPU copy per storage, a buffer of its own; every tensor a view of it as before (so tied weights stay
        # tied and torch.save, which writes whole storages, writes the same bytes as from the live state)
        t = obj.detach()
        st = t.untyped_storage()
        key = (st.data_ptr(), t.device)
        if key not in memo:
            src = torch.empty(0, dtype=torch.uint8, device=t.device).set_(st)
            buf = (staging.take(st.nbytes(), pin) if staging is not None
                   else torch.empty(st.nbytes(), dtype=torch.uint8, device="cpu", pin_memory=pin))
            memo[key] = buf.copy_(src, non_blocking=pin).untyped_storage()
        return torch.empty(0, dtype=t.dtype).set_(memo[key], t.storage_offset(), t.shape, t.stride())
    if isinstance(obj, (dict, list, tuple)):
        if id(obj) in memo:  # a container referenced twice (param groups' betas) stays one object, as pickled
            return memo[id(obj)]
        if isinstance(obj, dict):
            out = type(obj)((k, snapshot(v, pin, memo, staging)) for k, v in obj.items())
            if hasattr(obj, "_metadata"):  # a module state_dict's per-module versions (used by load_state_dict)
                out._metadata = obj._metadata
        else:
            out = type(obj)(snapshot(v, pin, memo, staging) for v in obj)
        memo[id(obj)] = out
        return out
    return obj  # numbers, strings, RNG tuples: immutable, or built afresh by the state_dict() calls


class AsyncCheckpointer:
    def __init__(self, ckpt_dir: str, rank: int, sync: ckpt.Sync, keep_last: int = 0):
        self.ckpt_dir, self.rank, self.sync, self.keep_last = ckpt_dir, rank, sync, keep_last
        self.pending: Optional[dict] = None  # step, tmp, meta, thread, error of the save in flight
        self.staging = Staging()

    def start(self, step: int, files: dict[str, Any], meta: dict) -> Optional[str]:
        """Snapshot `files` ({file name: state}) and write them in the background. Finishes the previous save
        first; returns its path if it was committed now (CheckpointWriteError if it failed)."""
        done = self.wait()
        tmp = ckpt.begin_save(self.ckpt_dir, step, self.rank, self.sync)
        pin = torch.cuda.is_available() and any(
            torch.is_tensor(t) and t.is_cuda for t in _tensors(files))
        self.staging.begin()  # safe: wait() above joined the writer that read these buffers
        copies = snapshot(files, pin, staging=self.staging)
        if pin:
            torch.cuda.current_stream().synchronize()  # the non-blocking device-to-host copies have landed
        job = {"step": step, "tmp": tmp, "meta": meta, "error": None}
        job["thread"] = threading.Thread(target=self._write, args=(job, copies), daemon=True,
                                         name=f"checkpoint-{step}")
        self.pending = job
        job["thread"].start()
        return done

    @staticmethod
    def _write(job: dict, copies: dict[str, Any]) -> None:
        try:
            for i, (name, state) in enumerate(copies.items()):
                ckpt.save_file(state, os.path.join(job["tmp"], name))
                if i == 0:
                    ckpt.fault_point(f"checkpoint_write_{job['step']}")  # crash tests: one file written
        except OSError as e:  # reported to every rank at the commit; other exceptions are bugs: re-raised there
            job["error"] = e
        except BaseException as e:  # noqa: BLE001 - carried to the main thread
            job["fatal"] = e

    def poll(self) -> Optional[str]:
        """Once per step on every rank: commit the save in flight if every rank has written its files. Returns the
        committed checkpoint's path, or None (none in flight, or still writing)."""
        if self.pending is None or self.sync(self.pending["thread"].is_alive()):
            return None
        return self._commit()

    def wait(self) -> Optional[str]:
        """Finish the save in flight (every rank waits for its writer, then the commit). Its path, or None."""
        if self.pending is None:
            return None
        self.pending["thread"].join()
        return self._commit()

    @property
    def pending_step(self) -> Optional[int]:
        return None if self.pending is None else self.pending["step"]

    def _commit(self) -> str:
        job, self.pending = self.pending, None
        job["thread"].join()
        if "fatal" in job:
            raise job["fatal"]
        return ckpt.commit_save(self.ckpt_dir, job["tmp"], job["step"], job["meta"], self.rank, self.sync,
                                self.keep_last, job["error"])


def _tensors(obj: Any):
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)
