"""`mamba-dist sweep collect DIR`: each finished run's final validation loss into DIR/results.csv.

Columns: name, params (non-embedding), params_total, tokens (trained), flops (training FLOPs from model/flops.py,
SSM scan terms included), loss (validation loss at the last step), then d_model, n_layer, mixer, lr, steps.
Runs that have not finished are listed and left out; the file is replaced atomically.
"""

from __future__ import annotations

import csv
import io
import os

from .spec import SweepError, read_run, run_state, write_atomic

COLUMNS = ["name", "params", "params_total", "tokens", "flops", "loss", "d_model", "n_layer", "mixer", "lr", "steps"]


def sweep_status(out_dir: str) -> list[tuple[dict, str, float | None]]:
    """[(run.json record, state, final loss)] for every run directory of the sweep, in name order."""
    runs_dir = os.path.join(out_dir, "runs")
    if not os.path.isdir(runs_dir):
        raise SweepError(f"{out_dir}: not a sweep directory (no runs/ inside; `mamba-dist sweep run` writes it)")
    rows = []
    for name in sorted(os.listdir(runs_dir)):
        rec = read_run(os.path.join(runs_dir, name))
        if rec is None:
            continue
        state, loss = run_state(os.path.join(runs_dir, name), rec["steps"])
        rows.append((rec, state, loss))
    if not rows:
        raise SweepError(f"{out_dir}: runs/ holds no run (no runs/<name>/run.json)")
    return rows


def collect(out_dir: str, log=print) -> str:
    rows = sweep_status(out_dir)
    done = [(rec, loss) for rec, state, loss in rows if state == "done"]
    missing = [f"{rec['name']} ({state})" for rec, state, _ in rows if state != "done"]
    if not done:
        raise SweepError(f"{out_dir}: no finished run yet ({len(rows)} runs: {', '.join(missing[:4])}"
                         f"{' ...' if len(missing) > 4 else ''})")
    done.sort(key=lambda x: (x[0]["params"], x[0]["tokens"]))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(COLUMNS)
    for rec, loss in done:
        w.writerow([rec["name"], rec["params"], rec["params_total"], rec["tokens"], f"{rec['flops']:.6g}",
                    f"{loss:.6f}", rec["d_model"], rec["n_layer"], rec["mixer"], f"{rec['lr']:.6g}", rec["steps"]])
    path = os.path.join(out_dir, "results.csv")
    write_atomic(path, buf.getvalue())
    log(f"sweep collect: {len(done)}/{len(rows)} runs finished -> {path}")
    if missing:
        log(f"sweep collect: not finished (left out): {', '.join(missing)}")
    return path
