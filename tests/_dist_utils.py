"""Spawn helpers for multi-process CPU/gloo tests.

`run_ranks(fn, world_size, *args)` starts `world_size` processes (spawn start method), each with the usual
launcher environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and an initialized gloo process group
(`backend="nccl"`: NCCL, one GPU per rank, cuda:<rank> made the current device first), runs
`fn(rank, world_size, *args)` and returns the list of return values in rank order. An exception on any rank fails
the caller with that rank's traceback; a hang fails after `timeout` seconds instead of blocking the suite.
`fn` must be a module-level function (it is pickled by reference) and should return plain Python values: a
tensor crosses the queue as a shared-memory handle that dies with its rank.
"""

from __future__ import annotations

import os
import queue
import socket
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, world_size, port, results, args, backend):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # ranks share 2 cores
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, rank=rank, world_size=world_size)
        out = fn(rank, world_size, *args)
        dist.barrier()
        results.put((rank, "ok", out))
    except BaseException:  # noqa: BLE001 - reported to the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], world_size: int, *args, timeout: float = 300.0, backend: str = "gloo") -> list:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world_size, port, results, args, backend), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    outs: dict[int, Any] = {}
    errors: list[str] = []
    try:
        for _ in range(world_size):
            rank, status, payload = results.get(timeout=timeout)
            if status == "ok":
                outs[rank] = payload
            else:
                errors.append(f"--- rank {rank} failed:\n{payload}")
                break  # peers are probably blocked in a collective now
    except queue.Empty:
        errors.append(f"timed out after {timeout}s waiting for ranks {sorted(set(range(world_size)) - set(outs))}")
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 60)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise AssertionError("\n".join(errors))
    return [outs[r] for r in range(world_size)]
