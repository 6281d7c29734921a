"""Training metrics: TensorBoard scalars and the same records as JSON lines in <run_dir>/metrics.jsonl.

Only rank 0 writes (pass enabled=False elsewhere). Each JSONL line is one event, e.g.
  {"step": 12, "kind": "train", "loss": 3.21, "lr": 0.0006, "grad_norm": 0.8, "tokens": 98304, ...}
  {"step": 20, "kind": "val", "val_loss": 3.05}
Lines are flushed as written, so a run killed mid-way keeps every record up to the kill. A resumed run appends
after a {"kind": "resume"} line, re-logging the steps after its checkpoint: for a step logged twice the later
record is the valid one. A fresh start in the same run dir appends after a {"kind": "start"} line. Floats are
written with repr, so reading them back gives the same bits.
"""

from __future__ import annotations

import json
import os
import resource
import time
from typing import Optional

import torch


class MetricsLogger:
    def __init__(self, run_dir: str, tensorboard: bool = True, jsonl: bool = True, enabled: bool = True,
                 resume_step: Optional[int] = None):
        """resume_step: the step a resumed run continues from; TensorBoard events a killed run wrote after it are
        purged (the resumed run writes them again). JSONL keeps everything; later records supersede."""
        self.enabled = enabled
        self.tb = None
        self.jsonl = None
        self.tb_dir = os.path.join(run_dir, "tensorboard")
        self.jsonl_path = os.path.join(run_dir, "metrics.jsonl")
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(self.tb_dir, purge_step=None if resume_step is None else resume_step + 1)
        if jsonl:
            self.jsonl = open(self.jsonl_path, "a")

    def log(self, step: int, kind: str, values: dict) -> None:
        """Write `values` (name -> number) at `step`. TensorBoard tags are `<kind>/<name>`."""
        if not self.enabled:
            return
        values = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in values.items() if v is not None}
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{kind}/{k}", v, step)
        if self.jsonl is not None:
            rec = {"step": step, "kind": kind, "time": round(time.time(), 3), **values}
            self.jsonl.write(json.dumps(rec) + "\n")
            self.jsonl.flush()

    def event(self, step: int, kind: str, **info) -> None:
        """A non-scalar record (resume, checkpoint saved, ...): JSONL only."""
        if self.enabled and self.jsonl is not None:
            self.jsonl.write(json.dumps({"step": step, "kind": kind, "time": round(time.time(), 3), **info}) + "\n")
            self.jsonl.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
            self.tb = None
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None


def read_jsonl(path: str, kind: Optional[str] = None, last_run: bool = False) -> list[dict]:
    """Records of a metrics.jsonl file (of one kind, if given). A torn last line (killed mid-write) is skipped.
    last_run: only the records since the last fresh start ({"kind": "start"}) in this file."""
    out = []
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if last_run and rec.get("kind") == "start":
                out = []
            if kind is None or rec.get("kind") == kind:
                out.append(rec)
    return out


def memory_gb(device: torch.device) -> dict:
    """Peak memory: CUDA allocator peak on GPU (reset per call), process peak RSS on CPU."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
        return {"mem_gb": round(peak, 3)}
    # ru_maxrss is KiB on Linux
    return {"rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}


def measure_cpu_matmul_flops(threads: Optional[int] = None, n: int = 1024, reps: int = 4) -> float:
    """Measured fp32 matmul FLOP/s of this process on CPU: the MFU denominator on CPU, where no datasheet peak
    applies. About 0.3 s. It is an achieved, not a theoretical, peak, so CPU MFU reads high."""
    a = torch.full((n, n), 0.5)  # not randn: must not advance the global RNG (bit-exact resume)
    b = torch.full((n, n), 0.25)
    torch.mm(a, b)  # warm-up
    t0 = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b)
    dt = time.perf_counter() - t0
    return 2.0 * n**3 * reps / dt
