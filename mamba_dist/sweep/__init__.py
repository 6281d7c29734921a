"""Scaling-law sweeps: a grid of model sizes x budgets -> runs -> results.csv -> a fitted law -> plots.

    mamba-dist sweep run configs/sweeps/demo.yaml --out runs/sweep-demo            # train here, then collect + fit
    mamba-dist sweep run SWEEP.yaml --out DIR --launcher torchrun                  # write DIR/launch/torchrun.sh
    mamba-dist sweep run SWEEP.yaml --out DIR --launcher slurm                     # write a job array + submit.sh
    mamba-dist sweep status DIR [--run NAME]                                       # done / partial / pending
    mamba-dist sweep collect DIR                                                   # -> DIR/results.csv
    mamba-dist sweep fit DIR/results.csv --out DIR                                 # -> fit.json, fit.md, plots/

Files: DIR/runs/<name>/{config.yaml, run.json, metrics.jsonl, checkpoints/}, DIR/results.csv, DIR/fit.json,
DIR/fit.md, DIR/plots/*.png. The sweep file format is described in mamba_dist/sweep/spec.py; the fit in fit.py.
Errors in the sweep file, the directory or the CSV are one line and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from .spec import SweepError

USAGE_EPILOG = __doc__.split("\n\n")[1]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mamba-dist sweep", description="Scaling-law sweeps: run a grid, collect "
                                "the final losses, fit L(N, D) = E + A/N^alpha + B/D^beta.",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=USAGE_EPILOG)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{run,collect,fit,status}")
    r = sub.add_parser("run", help="expand the grid, train the runs (or write launch scripts), collect and fit")
    r.add_argument("sweep", help="sweep YAML (see configs/sweeps/demo.yaml)")
    r.add_argument("--out", default=None, help="sweep directory (default: runs/sweep-<file name>)")
    r.add_argument("--launcher", choices=("local", "torchrun", "slurm"), default="local",
                   help="local: train here one run after another; torchrun / slurm: write launch scripts and return")
    r.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the intervals")
    r.add_argument("--dry-run", action="store_true", help="write the run configs and list the runs; train nothing")
    c = sub.add_parser("collect", help="gather the finished runs' final validation losses into DIR/results.csv")
    c.add_argument("dir")
    f = sub.add_parser("fit", help="fit the law to a CSV with columns params, tokens, loss (+ flops)")
    f.add_argument("csv")
    f.add_argument("--out", required=True, help="directory for fit.json, fit.md and plots/")
    f.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the 90%% intervals")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--isoflop-tol", type=float, default=0.1,
                   help="runs within this relative compute of each other share an IsoFLOP level")
    s = sub.add_parser("status", help="list the runs of a sweep directory and their state")
    s.add_argument("dir")
    s.add_argument("--run", default=None, help="exit 0 if this run has finished, 1 if not")
    return p


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cmd_run(args) -> int:
    from .runner import run_local, write_slurm_scripts, write_torchrun_script
    from .spec import expand, load_sweep, write_runs

    spec = load_sweep(args.sweep)
    out = args.out or os.path.join("runs", "sweep-" + os.path.splitext(os.path.basename(args.sweep))[0])
    runs = expand(spec, out, where=args.sweep)
    write_runs(runs, out)
    total = sum(r.flops for r in runs)
    _log(f"sweep: {len(runs)} runs ({len({r.d_model for r in runs})} sizes x {len({r.budget for r in runs})} "
         f"budgets), {total:.3g} training FLOPs in all -> {os.path.join(out, 'runs')}")
    if args.dry_run:
        for r in runs:
            _log(f"  {r.name:<22} N={r.params:>10,}  total={r.params_total:>10,}  steps={r.steps:>6}  "
                 f"tokens={r.tokens:>12,}  C={r.flops:.3g}  lr={r.lr:.3g}")
        return 0
    if args.launcher == "torchrun":
        path = write_torchrun_script(runs, out, args.sweep)
        _log(f"sweep: wrote {path}; run it (on every node) to train the runs, then it collects and fits")
        return 0
    if args.launcher == "slurm":
        path = write_slurm_scripts(runs, out, args.sweep, spec.get("slurm"))
        _log(f"sweep: wrote a {len(runs)}-task job array in {os.path.dirname(path)}; submit it with: bash {path}")
        return 0
    from .runner import check_runs

    check_runs(runs)  # every run's config, data and checkpoint checked before hours of training
    try:
        failed = run_local(runs, out, log=_log)
    except KeyboardInterrupt:
        _log("sweep: interrupted; run the same command again to continue (finished runs are kept)")
        return 130
    from .collect import collect
    from .report import run_fit

    csv_path = collect(out, log=_log)
    try:
        run_fit(csv_path, out, n_boot=args.bootstrap, log=_log)
    except SweepError as e:
        _log(f"sweep: no fit: {e}")
    if failed:
        _log(f"sweep: {len(failed)} run(s) failed: {', '.join(failed)}")
        return 1
    return 0


def cmd_status(args) -> int:
    from .collect import sweep_status

    rows = sweep_status(args.dir)
    if args.run is not None:
        match = [s for rec, s, _ in rows if rec["name"] == args.run]
        if not match:
            raise SweepError(f"{args.dir}: no run named {args.run}")
        print(match[0])
        return 0 if match[0] == "done" else 1
    for rec, state, loss in rows:
        print(f"{rec['name']:<24} {state:<8} {'' if loss is None else f'{loss:.4f}'}")
    n = sum(s == "done" for _, s, _ in rows)
    print(f"{n}/{len(rows)} runs finished")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.cmd == "run":
            return cmd_run(args)
        if args.cmd == "collect":
            from .collect import collect

            collect(args.dir, log=_log)
            return 0
        if args.cmd == "fit":
            from .report import run_fit

            run_fit(args.csv, args.out, n_boot=args.bootstrap, seed=args.seed,
                    isoflop_tol=args.isoflop_tol, log=_log)
            return 0
        return cmd_status(args)
    except SweepError as e:
        print(f"mamba-dist sweep {args.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
