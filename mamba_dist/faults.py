"""Fault handling in the training loop: non-finite steps, loss spikes, refusing to save a non-finite state, failed
saves. (Hangs and lost ranks: mamba_dist/watchdog.py.)

- A step whose loss or gradient norm is non-finite on any rank is skipped on every rank (TorchPath.step; the loss
  is summed over ranks so they agree), counted and logged. `train.max_skipped_in_row` consecutive skips are
  tolerated; the next one halts the run (`RunHalted`, exit code 3) with the last good checkpoint intact. The
  optional loss-spike guard (`train.spike_factor`) skips and counts a step whose loss spikes the same way.
- Before every save the model/optimizer state is checked for non-finite values on every rank; a non-finite state
  is never written (the run halts instead).
- A save that fails with an OSError on any rank (`checkpoint.CheckpointWriteError`) halts the run
  (`checkpoint.on_error=stop`) or is logged and training goes on (`continue`); either way the previous
  checkpoint is untouched.

Exit code 3 (not 2, which means bad input) so a launcher or a person can tell "the run cannot go on" apart.
"""

from __future__ import annotations

import collections
import logging
import math
import statistics
from typing import Optional

import torch

from mamba_dist import checkpoint as ckpt

log = logging.getLogger("mamba_dist.faults")

HALT_EXIT_CODE = 3


class RunHalted(RuntimeError):
    """Training cannot go on (too many non-finite steps in a row, a non-finite state, a failed save with
    on_error=stop). One-line message; the last good checkpoint is intact."""


def sync_any(dims, device: torch.device):
    """A `checkpoint.Sync` for these ranks: a barrier that returns whether any rank passed failed=True."""

    def sync(failed: bool = False) -> bool:
        if not dims.distributed:
            return failed
        import torch.distributed as dist

        flag = torch.tensor([float(failed)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    return sync


def state_is_finite(optimizer: torch.optim.Optimizer, sync) -> bool:
    """Whether every parameter the optimizer steps (DeepSpeed: its fp32 partitions) and every tensor of its state
    is finite, on every rank. One host sync: the per-tensor checks are stacked on the device."""
    checks = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            checks.append(torch.isfinite(p.detach()).all())
            for v in optimizer.state.get(p, {}).values():
                if torch.is_tensor(v) and v.is_floating_point():
                    checks.append(torch.isfinite(v).all())
    local_ok = bool(torch.stack(checks).all()) if checks else True
    return not sync(not local_ok)


class NonFiniteGuard:
    """Counts skipped steps (non-finite, or a loss spike) and halts after more than `max_in_row` in a row.

    Loss-spike guard (`train.spike_factor` k > 0, off by default; the idea of Megatron's --check-for-spiky-loss): once
    the last `spike_window` applied steps' losses are known, a step whose loss exceeds k x their median is skipped
    like a non-finite one. `loss_limit()` is that bound (inf while off), which the loop hands to the path's step
    (TorchPath.loss_limit) before the update; the window is saved in meta.json (`recent_losses`) so a resumed run
    makes the same decisions."""

    def __init__(self, max_in_row: int, in_row: int = 0, spike_factor: float = 0.0, spike_window: int = 50,
                 recent_losses=()):
        self.max_in_row, self.in_row = max_in_row, in_row
        self.spike_factor = spike_factor
        self.recent = collections.deque((float(x) for x in recent_losses), maxlen=spike_window)
        self.spikes_in_row = 0

    def loss_limit(self) -> float:
        if not self.spike_factor or len(self.recent) < self.recent.maxlen:
            return math.inf
        return self.spike_factor * statistics.median(self.recent)

    def update(self, step: int, applied: bool, loss: float, grad_norm: float, skipped_total: int,
               limit: float = math.inf) -> None:
        """After step `step`: `limit` is the loss_limit() its update was checked against."""
        if applied:
            self.in_row = self.spikes_in_row = 0
            if self.spike_factor:
                self.recent.append(loss)
            return
        self.in_row += 1
        if math.isfinite(loss) and math.isfinite(grad_norm):  # finite, so the path refused it as a spike
            self.spikes_in_row += 1
            log.warning("step %d: loss spike (loss %s > train.spike_factor=%g x the median %s of the last %d "
                        "steps); update skipped (%d in a row, %d in all)", step, loss, self.spike_factor,
                        statistics.median(self.recent), len(self.recent), self.in_row, skipped_total)
        else:
            log.warning("step %d: non-finite %s (loss %s, grad norm %s); update skipped (%d in a row, %d in all)",
                        step, "loss" if not math.isfinite(loss) else "gradient norm", loss, grad_norm, self.in_row,
                        skipped_total)
        if self.in_row > self.max_in_row:
            what = "non-finite" if not self.spikes_in_row else "skipped (non-finite or loss-spike)"
            raise RunHalted(f"step {step}: {self.in_row} {what} steps in a row (train.max_skipped_in_row="
                            f"{self.max_in_row}); halted, the last good checkpoint is intact")

    def state(self) -> dict:
        """For meta.json: what a resumed run needs to count and judge the same way."""
        return {"skipped_in_row": self.in_row, **({"recent_losses": list(self.recent)} if self.spike_factor else {})}


def check_before_save(optimizer: torch.optim.Optimizer, sync, step: int, ckpt_dir: str) -> None:
    if not state_is_finite(optimizer, sync):
        prev = ckpt.latest_checkpoint(ckpt_dir)
        raise RunHalted(f"step {step}: the model/optimizer state holds non-finite values; not saved "
                        f"(last good checkpoint: {prev or 'none'})")


def inject_test_faults(training, step: int) -> None:
    """Test hooks (MAMBA_DIST_FAULT): `nan_loss_at_N` makes step N's loss NaN (before backward, so its gradients
    are NaN too); `spike_loss_at_N` multiplies step N's loss by 100; `nan_weights_at_N` puts a NaN into a weight
    before step N (the state becomes non-finite)."""
    training.loss_fault = (float("nan") if ckpt.fault_active(f"nan_loss_at_{step}") else
                           100.0 if ckpt.fault_active(f"spike_loss_at_{step}") else None)
    if ckpt.fault_active(f"nan_weights_at_{step}"):
        with torch.no_grad():
            training.optimizer.param_groups[0]["params"][0].view(-1)[0] = float("nan")


def handle_save_error(e: ckpt.CheckpointWriteError, on_error: str) -> None:
    if on_error == "stop":
        raise RunHalted(f"{e} (checkpoint.on_error=stop)") from None
    log.error("%s; training continues (checkpoint.on_error=continue)", e)


def guard_for(train_cfg, meta: Optional[dict]) -> NonFiniteGuard:
    """The skip guard of a run, continuing the counts (and the loss window) of the checkpoint it resumes, if any."""
    meta = meta or {}
    return NonFiniteGuard(train_cfg.max_skipped_in_row, int(meta.get("skipped_in_row", 0)), train_cfg.spike_factor,
                          train_cfg.spike_window, meta.get("recent_losses", ()))
