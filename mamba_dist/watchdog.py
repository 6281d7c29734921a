"""Hangs in multi-process runs: a heartbeat file per rank, a watchdog over its neighbours' files, and one-line
reports of failed collectives (issue 14).

- Heartbeat: a background thread on every rank rewrites `<run_dir>/heartbeat/rank_K` (JSON: rank, host, pid, the
  step the loop is at, a beat counter, the attempt's token) every `interval` seconds and when the step changes. It
  beats while the main thread computes, saves or waits in a collective, so only a process that stops answering as
  a whole (SIGSTOP, a frozen node, swapped out) falls silent; a slow step, a long save or a first-step compile do
  not.
- Watchdog: the same thread reads the files of the rank's two ring neighbours (K-1 and K+1 mod world size: every
  rank is watched twice, and the reads stay O(world size) in all). A neighbour whose beat counter has not changed
  for `parallel.timeout_s`, measured on this rank's own monotonic clock (no clock skew between hosts), is reported
  by rank number, step, host and pid, and this process exits with code 4, so the launcher (torchrun
  --max-restarts) restarts the job. A *stopped* neighbour on the same host (state T in /proc) is SIGKILLed after
  the report: a stopped process cannot act on the launcher's SIGTERM, so torchrun would otherwise wait its 30 s
  grace period before the restart, and without a launcher it would stay stopped forever.
- Attempts: rank 0 draws a token after the process group exists and broadcasts it; a neighbour is watched only
  once its file shows this attempt's token, so a file left by a killed attempt is never mistaken for a silent
  rank. A neighbour whose file never appears (a run directory that is not on storage every node sees) is not
  watched, with one warning.
- Collectives: the process group's timeout is `parallel.timeout_s` too (init_process_group; gloo and NCCL both
  apply it to every collective), which catches what heartbeats cannot: a rank alive but stuck elsewhere (a
  deadlock, a rank that took another branch). `collective_failure` reports gloo's / NCCL's error in one line
  with the neighbours' heartbeat ages, so it names the silent rank when there is one.

Hand-written because nothing in torch does this for gloo and names the rank: torch elastic's file timer
(TORCHELASTIC_ENABLE_FILE_TIMER) works only under torchrun and needs a deadline around every region of work; the
NCCL watchdog (TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC) exists only for NCCL and watches its own process.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from typing import Optional

from mamba_dist.checkpoint import restart_count

log = logging.getLogger("mamba_dist.watchdog")

PEER_EXIT_CODE = 4  # "a peer rank stopped answering / a collective failed": restartable, unlike 2 (bad input)
STOPPED_NOTE = " (it is stopped (SIGSTOP): killing it so that the launcher can restart the job at once)"


class PeerFailure(RuntimeError):
    """A collective failed or timed out (a peer died, stopped or hangs). Already reported on stderr, in one line,
    when it was made (`collective_failure`); exit code 4."""


def is_collective_failure(err: BaseException) -> bool:
    """Whether an exception out of the loop is a failed collective (gloo raises RuntimeError, NCCL DistError)."""
    import torch.distributed as dist

    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    msg = str(err)  # gloo's errors are plain RuntimeErrors (ours, CheckpointError, RunHalted, are subclasses)
    return type(err) is RuntimeError and any(s in msg for s in (
        "gloo", "NCCL", "ProcessGroup", "Connection reset by peer", "Connection closed by peer", "Timed out waiting"))


def collective_failure(err: BaseException, heartbeat, timeout_s: float) -> PeerFailure:
    """Report a failed collective at once, in one line with the neighbours' heartbeats, then kill a stopped
    neighbour on this host (the launcher may SIGTERM this process as soon as a peer is gone, so the line comes
    first); returns the exception for the loop to raise."""
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    first = first.split("] ", 1)[-1] if first.startswith("[") else first  # drop gloo's source path
    peers, stopped = heartbeat.neighbours_status()
    msg = (f"a collective failed on rank {os.environ.get('RANK', '0')} ({type(err).__name__}: {first}; "
           f"parallel.timeout_s={timeout_s:g}); {peers}")
    print(f"mamba-dist train: error: {msg}", file=sys.stderr, flush=True)
    for beat in stopped:
        _kill(beat["pid"])
    return PeerFailure(msg)


def _state(pid: int) -> Optional[str]:
    """The process state letter from /proc (R, S, D, T, t, Z, ...), or None if there is no such process here."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


def read_beat(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def heartbeat_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "heartbeat")


class Heartbeat:
    """This rank's heartbeat file and the watchdog over its ring neighbours; see the module docstring.

    start() (before the process group: the first beat is on disk before any peer can wait for this rank), arm()
    (after it: this attempt's token, start watching), `step` (set by the loop), stop()."""

    def __init__(self, run_dir: str, rank: int, world_size: int, timeout_s: float, interval: Optional[float] = None):
        self.dir = heartbeat_dir(run_dir)
        self.rank, self.world_size, self.timeout_s = rank, world_size, float(timeout_s)
        self.interval = interval or min(5.0, max(0.2, self.timeout_s / 10))
        self.path = os.path.join(self.dir, f"rank_{rank}")
        self._step = 0
        self.token = None
        self.beats = 0
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.neighbours = sorted({(rank - 1) % world_size, (rank + 1) % world_size} - {rank})
        self._seen: dict[int, tuple] = {}  # neighbour -> (its beat counter, my monotonic time it changed, its beat)
        self._armed_at = None
        self._warned = set()
        self._stop = threading.Event()
        self._stepped = threading.Event()
        self._lock = threading.Lock()
        self._thread = None

    @property
    def step(self) -> int:
        return self._step

    @step.setter
    def step(self, value: int) -> None:
        """Set by the loop; the thread writes the new step at once (the loop itself never touches the file)."""
        self._step = value
        self._stepped.set()

    # -------------------------------------------------------------------------------- own beats
    def _write(self, done: bool = False) -> None:
        with self._lock:  # the thread beats; arm() and stop() on the main thread too
            self._write_locked(done)

    def _write_locked(self, done: bool) -> None:
        self.beats += 1
        beat = {"rank": self.rank, "host": self.host, "pid": self.pid, "step": self._step, "beat": self.beats,
                "token": self.token, "attempt": restart_count(),
                "time": time.time(), "done": done}
        tmp = f"{self.path}.tmp-{self.pid}"
        try:
            with open(tmp, "w") as f:
                json.dump(beat, f)
            os.replace(tmp, self.path)  # readers see the old beat or the new one, never half of one
        except OSError as e:  # a full disk must not stop training; the neighbours will see the silence
            log.warning("heartbeat %s not written: %s", self.path, e)

    def start(self) -> "Heartbeat":
        os.makedirs(self.dir, exist_ok=True)
        self._write()
        self._thread = threading.Thread(target=self._run, name="mamba-dist-heartbeat", daemon=True)
        self._thread.start()
        return self

    def arm(self, token: str) -> None:
        """Beat with this attempt's token from now on and start watching the neighbours."""
        self.token = token
        self._write()
        self._armed_at = time.monotonic()

    def stop(self) -> None:
        """The last beat says done: the neighbours stop watching a rank that finished (or failed with a message)."""
        self._stop.set()
        self._stepped.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.interval + 1)
        self._write(done=True)

    def _run(self) -> None:
        checked = time.monotonic()
        while not self._stop.is_set():
            self._stepped.wait(self.interval)  # a beat per interval, and one per step (at most every 50 ms)
            self._stepped.clear()
            if self._stop.is_set():
                break
            self._write()
            if self._armed_at is not None and time.monotonic() - checked >= self.interval:
                self._check()
                checked = time.monotonic()
            time.sleep(0.05)

    # -------------------------------------------------------------------------------- watching
    def _check(self) -> None:
        now = time.monotonic()
        for r in self.neighbours:
            beat = read_beat(os.path.join(self.dir, f"rank_{r}"))
            if beat is None or beat.get("token") != self.token:
                if r not in self._seen and now - self._armed_at > self.timeout_s and r not in self._warned:
                    self._warned.add(r)
                    log.warning("no heartbeat of rank %d in %s after %.0f s: it is not watched (is the run "
                                "directory on storage every node sees?)", r, self.dir, now - self._armed_at)
                continue
            if beat.get("done"):
                self._seen.pop(r, None)
                continue
            prev = self._seen.get(r)
            if prev is None or prev[0] != beat["beat"]:
                self._seen[r] = (beat["beat"], now, beat)
            elif now - prev[1] > self.timeout_s:
                self._silent(r, beat, now - prev[1])

    def _stopped_here(self, beat: dict) -> bool:
        return beat.get("host") == self.host and _state(beat["pid"]) in ("T", "t")

    def _silent(self, r: int, beat: dict, age: float) -> None:
        """Report a silent neighbour in one line and exit (the main thread may be blocked in a collective)."""
        stopped = self._stopped_here(beat)
        print(f"mamba-dist train: error: rank {r} (pid {beat['pid']} on {beat['host']}) has not answered for "
              f"{age:.1f} s (parallel.timeout_s={self.timeout_s:g}; its last heartbeat was at step "
              f"{beat.get('step')})" + (STOPPED_NOTE if stopped else "")
              + f"; rank {self.rank} exits so that the launcher can restart the job", file=sys.stderr, flush=True)
        if stopped:
            _kill(beat["pid"])
        os._exit(PEER_EXIT_CODE)

    def neighbours_status(self) -> tuple[str, list]:
        """(the neighbours' heartbeat ages in words, the beats of those silent and stopped on this host)."""
        now = time.monotonic()
        parts, stopped = [], []
        for r in self.neighbours:
            seen = self._seen.get(r)
            beat = read_beat(os.path.join(self.dir, f"rank_{r}"))
            if beat is not None and beat.get("token") == self.token and beat.get("done"):
                parts.append(f"rank {r} has exited")
            elif seen is None:  # not checked yet (the watchdog looks once an interval)
                parts.append(f"rank {r}: last heartbeat at step {beat['step']}" if beat is not None and
                             beat.get("token") == self.token else f"rank {r}: no heartbeat seen")
            else:
                age = now - seen[1]
                silent = age > 2 * self.interval + 0.5
                note = ""
                if silent and self._stopped_here(seen[2]):
                    stopped.append(seen[2])
                    note = STOPPED_NOTE
                parts.append(f"rank {r} {'silent' if silent else 'alive'}, last heartbeat {age:.1f} s ago at step "
                             f"{seen[2].get('step')}{note}")
        return "heartbeats: " + ", ".join(parts), stopped


class NoHeartbeat:
    """One process, or parallel.heartbeat=false: nothing to watch (the same interface, doing nothing)."""

    step = 0

    def stop(self) -> None:
        pass

    def neighbours_status(self) -> tuple[str, list]:
        return "no heartbeats (one process, or parallel.heartbeat=false)", []


def start(run_dir: str, timeout_s: float, enabled: bool = True):
    """The trainer's heartbeat for a multi-process run (a NoHeartbeat for one process or when disabled). Call it
    before the process group is built, and `arm_collectively` after."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if not enabled or world <= 1:
        return NoHeartbeat()
    return Heartbeat(run_dir, int(os.environ.get("RANK", "0")), world, timeout_s).start()


def arm_collectively(hb) -> None:
    """Agree on this attempt's token (rank 0's, broadcast; no RNG is drawn) and start watching."""
    if not isinstance(hb, Heartbeat):
        return
    import torch.distributed as dist

    box = [uuid.uuid4().hex if hb.rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    hb.arm(box[0])
