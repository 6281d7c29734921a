"""`mamba-dist sweep fit CSV --out DIR`: the fit, its intervals, IsoFLOP minima, fit.json, fit.md and the plots.

Reads any CSV with the columns params, tokens, loss (flops and name are used when present; without flops, C = 6ND).
Writes (each file atomically):
  DIR/fit.json                  E, A, B, alpha, beta, a, b, G, k, ci90 {param: [lo, hi]}, isoflop {...}, warnings, ...
  DIR/fit.md                    the parameters with their intervals, the IsoFLOP minima, the runs with the fit's
                                residuals, and the warnings
  DIR/plots/loss_vs_compute.png loss against compute per model size, with the fitted curves and the frontier
  DIR/plots/isoflop.png         loss against size on each FLOP level, the parabolas and their minima
  DIR/plots/frontier.png        N_opt(C) and D_opt(C) with the bootstrap 90% band and the IsoFLOP minima
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import numpy as np

from . import fit as F
from .spec import SweepError, write_atomic

REQUIRED = ("params", "tokens", "loss")


def read_results(path: str) -> dict:
    if not Path(path).is_file():
        raise SweepError(f"{path}: no such file")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        missing = [c for c in REQUIRED if c not in cols]
        if missing:
            raise SweepError(f"{path}: missing column(s) {', '.join(missing)} (need {', '.join(REQUIRED)}; "
                             f"found {', '.join(cols) or 'none'})")
        rows = list(reader)
    data = {"name": [], "params": [], "tokens": [], "loss": [], "flops": []}
    for i, row in enumerate(rows, start=2):
        try:
            vals = {c: float(row[c]) for c in REQUIRED}
            fl = float(row["flops"]) if row.get("flops") not in (None, "") else 6.0 * vals["params"] * vals["tokens"]
        except (TypeError, ValueError):
            raise SweepError(f"{path}: line {i}: params, tokens, loss (and flops) must be numbers") from None
        if not all(math.isfinite(v) and v > 0 for v in (*vals.values(), fl)):
            raise SweepError(f"{path}: line {i}: params, tokens, loss and flops must be finite and > 0")
        data["name"].append(row.get("name") or f"row{i}")
        for c in REQUIRED:
            data[c].append(vals[c])
        data["flops"].append(fl)
    if len(data["loss"]) < 5:
        raise SweepError(f"{path}: {len(data['loss'])} runs; the law has 5 parameters, fitting needs at least 5 "
                         f"(better 15+)")
    return {k: (np.array(v) if k != "name" else v) for k, v in data.items()}


def _finite(x):
    return None if x is None or not math.isfinite(float(x)) else float(x)


def run_fit(csv_path: str, out_dir: str, *, n_boot: int = 200, seed: int = 0,
            isoflop_tol: float = 0.1, log=print) -> dict:
    d = read_results(csv_path)
    N, D, L, C = d["params"], d["tokens"], d["loss"], d["flops"]
    k = float(np.median(C / (N * D)))
    log(f"sweep fit: {len(L)} runs, approach 3 from {len(F.start_grid())} L-BFGS starts, {n_boot} bootstrap "
        f"resamples ...")
    law = F.fit_law(N, D, L, k=k, keep=8)
    boot = F.bootstrap(N, D, L, law, n_boot=n_boot, seed=seed, k=k)
    iso = F.isoflop_minima(N, D, L, C, k, rel_tol=isoflop_tol)
    warnings = F.fit_warnings(law, boot["ci90"], N, D, L, iso, boot["n_boot"])
    pred = F.predict(law, N, D)
    result = {p: _finite(law[p]) for p in F.PARAMS}
    result.update(
        G=_finite(law["G"]), k=k, ci90={p: [_finite(x) for x in boot["ci90"][p]] for p in F.PARAMS},
        law="L(N, D) = E + A / N^alpha + B / D^beta; N_opt = G (C/k)^a, D_opt = (C/k)^b / G",
        method={"approach": 3, "huber_delta": F.HUBER_DELTA, "objective": "Huber on log L, LSE form",
                "optimizer": "L-BFGS (batched over the starts), finished by scipy L-BFGS-B",
                "starts": len(F.start_grid()),
                "objective_value": law["objective"], "converged": law["converged"],
                "bootstrap": boot["n_boot"], "seed": seed},
        n_runs=int(len(L)),
        rms_log_residual=float(np.sqrt(np.mean((np.log(pred) - np.log(L)) ** 2))),
        isoflop={"a": iso["a"], "b": iso["b"], "levels_used": iso["n_levels_used"],
                 "levels": [{"C": lv["C"], "n_points": lv["n_points"], "N_opt": lv["N_opt"], "D_opt": lv["D_opt"],
                             "loss_min": lv["loss_min"], "inside": lv["inside"]} for lv in iso["levels"]]},
        warnings=warnings, source=os.path.abspath(csv_path))
    cmax = float(C.max())
    result["compute_optimal"] = []
    if result["a"] is not None:
        for c in (cmax, 10 * cmax, 100 * cmax):
            n_opt, d_opt = F.optimal_allocation(law, c)
            result["compute_optimal"].append({"C": c, "N_opt": float(n_opt), "D_opt": float(d_opt),
                                              "tokens_per_param": float(d_opt / n_opt)})
    os.makedirs(out_dir, exist_ok=True)
    write_atomic(os.path.join(out_dir, "fit.json"), json.dumps(result, indent=1) + "\n")
    plots = make_plots(d, law, boot, iso, os.path.join(out_dir, "plots"))
    write_atomic(os.path.join(out_dir, "fit.md"), markdown(result, d, pred, plots, out_dir))
    result["plots"] = plots
    _log_summary(result, out_dir, log)
    return result


def _ci(result, p, fmt="{:.3g}") -> str:
    lo, hi = result["ci90"][p]
    v = result[p]
    if v is None:
        return "n/a"
    return f"{fmt.format(v)} [{fmt.format(lo) if lo is not None else '?'}, {fmt.format(hi) if hi is not None else '?'}]"


def _log_summary(r: dict, out_dir: str, log) -> None:
    log(f"sweep fit: L = {_ci(r, 'E')} + {_ci(r, 'A')} / N^{_ci(r, 'alpha')} + {_ci(r, 'B')} / D^{_ci(r, 'beta')}"
        f"   (90% intervals)")
    log(f"sweep fit: compute-optimal N_opt ~ C^{_ci(r, 'a')}, D_opt ~ C^{_ci(r, 'b')}")
    iso = r["isoflop"]
    if iso["a"] is not None:
        log(f"sweep fit: IsoFLOP (approach 2, {iso['levels_used']} levels): a = {iso['a']:.3g}, b = {iso['b']:.3g}")
    for w in r["warnings"]:
        log(f"sweep fit: warning: {w}")
    log(f"sweep fit: wrote {os.path.join(out_dir, 'fit.json')}, fit.md and plots/")


def markdown(r: dict, d: dict, pred, plots: dict, out_dir: str) -> str:
    lines = ["# Scaling-law fit", "", f"{r['n_runs']} runs from `{r['source']}`. "
             f"L(N, D) = E + A / N^α + B / D^β fitted by Chinchilla's approach 3 (Huber δ = {F.HUBER_DELTA} on "
             f"log L, L-BFGS from {r['method']['starts']} starts); 90% intervals from {r['method']['bootstrap']} "
             f"bootstrap resamples of the runs. C = k N D with k = {r['k']:.3g}.", "",
             "| parameter | fit | 90% interval |", "|---|---|---|"]
    names = {"E": "E", "A": "A", "B": "B", "alpha": "α", "beta": "β", "a": "a (N_opt ∝ C^a)", "b": "b (D_opt ∝ C^b)"}
    for p in F.PARAMS:
        lo, hi = r["ci90"][p]
        fmt = (lambda x: "n/a" if x is None else f"{x:.4g}")
        lines.append(f"| {names[p]} | {fmt(r[p])} | [{fmt(lo)}, {fmt(hi)}] |")
    lines += ["", f"RMS residual of log L: {r['rms_log_residual']:.4f}", ""]
    iso = r["isoflop"]
    if iso["levels"]:
        lines += ["## IsoFLOP minima (approach 2)", "", "| C (FLOPs) | runs | N_opt | D_opt | min loss | inside grid |",
                  "|---|---|---|---|---|---|"]
        for lv in iso["levels"]:
            f = (lambda x: "–" if x is None else f"{x:.3g}")
            lines.append(f"| {lv['C']:.3g} | {lv['n_points']} | {f(lv['N_opt'])} | {f(lv['D_opt'])} | "
                         f"{f(lv['loss_min'])} | {'yes' if lv['inside'] else 'no'} |")
        if iso["a"] is not None:
            lines += ["", f"Approach 2 exponents: a = {iso['a']:.3g}, b = {iso['b']:.3g} "
                          f"(approach 3: a = {r['a']:.3g}, b = {r['b']:.3g})."]
        lines.append("")
    if r["compute_optimal"]:
        lines += ["## Compute-optimal allocation (approach 3)", "", "| C (FLOPs) | N_opt | D_opt | tokens / param |",
                  "|---|---|---|---|"]
        for c in r["compute_optimal"]:
            lines.append(f"| {c['C']:.3g} | {c['N_opt']:.3g} | {c['D_opt']:.3g} | {c['tokens_per_param']:.3g} |")
        lines.append("")
    lines += ["## Runs", "", "| name | N (non-emb.) | D (tokens) | C (FLOPs) | loss | fit | residual |",
              "|---|---|---|---|---|---|---|"]
    for i in np.argsort(d["flops"]):
        lines.append(f"| {d['name'][i]} | {d['params'][i]:.4g} | {d['tokens'][i]:.4g} | {d['flops'][i]:.3g} | "
                     f"{d['loss'][i]:.4f} | {pred[i]:.4f} | {d['loss'][i] - pred[i]:+.4f} |")
    if r["warnings"]:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in r["warnings"]]
    lines += ["", "## Plots", ""] + [f"![{k}]({os.path.relpath(v, out_dir)})" for k, v in plots.items()] + [""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------ plots
def _save(fig, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}.png"
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)


def _log_axes(ax, x=True, y=False) -> None:
    """Log scale, labelled at 1, 2 and 5 x each power of ten (matplotlib's default labels every minor tick on a
    range under a decade, and they overlap)."""
    from matplotlib.ticker import LogFormatterSciNotation, LogLocator

    for on, axis, setter in ((x, ax.xaxis, ax.set_xscale), (y, ax.yaxis, ax.set_yscale)):
        if on:
            setter("log")
            axis.set_minor_locator(LogLocator(base=10, subs=(2.0, 5.0)))
            axis.set_minor_formatter(LogFormatterSciNotation(labelOnlyBase=False))


def make_plots(d: dict, law: dict, boot: dict, iso: dict, plot_dir: str) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(plot_dir, exist_ok=True)
    N, D, L, C = d["params"], d["tokens"], d["loss"], d["flops"]
    sizes = np.unique(N)
    cmap = plt.get_cmap("viridis")
    colors = {n: cmap(i / max(1, len(sizes) - 1) * 0.9) for i, n in enumerate(sizes)}
    cgrid = np.logspace(np.log10(C.min()) - 0.3, np.log10(C.max()) + 0.5, 200)
    have_opt = all(math.isfinite(law[p]) for p in ("a", "b", "G"))
    paths = {}

    # 1. loss against compute, one colour per size, fitted L(N, C / (k N)) through each
    fig, ax = plt.subplots(figsize=(7, 4.8))
    for n in sizes:
        m = N == n
        ax.scatter(C[m], L[m], color=colors[n], s=28, zorder=3, label=f"N = {n:.3g}")
        ax.plot(cgrid, F.predict(law, n, cgrid / (law["k"] * n)), color=colors[n], lw=1.2, alpha=0.8)
    if have_opt:
        n_opt, d_opt = F.optimal_allocation(law, cgrid)
        ax.plot(cgrid, F.predict(law, n_opt, d_opt), "k--", lw=1.3, label="compute-optimal frontier")
    _log_axes(ax)
    ax.set_xlabel("training compute C (FLOPs)")
    ax.set_ylabel("final validation loss")
    ax.set_title(f"Loss vs compute: fit E={law['E']:.3g}, α={law['alpha']:.3g}, β={law['beta']:.3g}")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(True, which="both", alpha=0.25)
    paths["loss_vs_compute"] = os.path.join(plot_dir, "loss_vs_compute.png")
    _save(fig, paths["loss_vs_compute"])
    plt.close(fig)

    # 2. IsoFLOP curves: loss against N on each FLOP level, the parabola in log N and its minimum
    fig, ax = plt.subplots(figsize=(7, 4.8))
    levels = F.flop_levels(C, iso["rel_tol"])
    lcol = plt.get_cmap("plasma")
    fitted = {tuple(lv["names_idx"]): lv for lv in iso["levels"]}
    for j, g in enumerate(levels):
        col = lcol(j / max(1, len(levels) - 1) * 0.85)
        cl = float(np.exp(np.mean(np.log(C[g]))))
        o = np.argsort(N[g])
        ax.plot(N[g][o], L[g][o], "o", color=col, label=f"C = {cl:.2g}")
        lv = fitted.get(tuple(int(i) for i in g))
        if lv is not None:
            xs = np.linspace(np.log(N[g].min()) - 0.3, np.log(N[g].max()) + 0.3, 100)
            ax.plot(np.exp(xs), np.polyval(lv["coef"], xs), "-", color=col, lw=1)
            if lv["N_opt"] is not None and lv["inside"]:
                ax.plot(lv["N_opt"], lv["loss_min"], "*", color=col, ms=13, mec="k", zorder=4)
            elif lv["N_opt"] is not None and N.min() / 30 < lv["N_opt"] < N.max() * 30:
                # a vertex outside the sampled sizes: shown hollow, not used for approach 2
                ax.plot(lv["N_opt"], lv["loss_min"], "*", color="none", ms=13, mec=col, zorder=4)
        # the law's own IsoFLOP curve, for comparison
        ns = np.logspace(np.log10(N.min()) - 0.2, np.log10(N.max()) + 0.2, 100)
        ax.plot(ns, F.predict(law, ns, cl / (law["k"] * ns)), ":", color=col, lw=1)
    _log_axes(ax)
    ax.set_xlabel("non-embedding parameters N")
    ax.set_ylabel("final validation loss")
    title = "IsoFLOP curves: runs, parabola in log N, minima (stars; hollow: outside the sizes), dotted: fitted law"
    if not iso["levels"]:
        title = "IsoFLOP: no FLOP level with 3+ sizes (dotted: approach-3 law at each run's compute)"
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.25)
    paths["isoflop"] = os.path.join(plot_dir, "isoflop.png")
    _save(fig, paths["isoflop"])
    plt.close(fig)

    # 3. the compute-optimal frontier N_opt(C), D_opt(C) with the bootstrap band
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    if have_opt:
        band = F.frontier_band(law, boot, cgrid)
        for ax, key, lab in ((axes[0], "N", "N_opt (parameters)"), (axes[1], "D", "D_opt (tokens)")):
            ax.plot(cgrid, band[f"{key}_opt"], "k-", lw=1.5,
                    label=f"approach 3: ∝ C^{law['a' if key == 'N' else 'b']:.3g}")
            if f"{key}_lo" in band:
                ax.fill_between(cgrid, band[f"{key}_lo"], band[f"{key}_hi"], color="tab:blue", alpha=0.25,
                                label="bootstrap 90% band")
            pts = [lv for lv in iso["levels"] if lv["inside"]]
            if pts:
                ax.plot([lv["C"] for lv in pts], [lv[f"{key}_opt"] for lv in pts], "*", color="tab:red", ms=12,
                        mec="k", label="IsoFLOP minima (approach 2)")
            ax.scatter(C, N if key == "N" else D, s=10, color="gray", alpha=0.6, label="runs")
            _log_axes(ax, y=True)
            ax.set_xlabel("training compute C (FLOPs)")
            ax.set_ylabel(lab)
            ax.grid(True, which="both", alpha=0.25)
            ax.legend(fontsize=7)
        fig.suptitle("Compute-optimal frontier")
    else:
        for ax in axes:
            ax.text(0.5, 0.5, "no compute-optimal allocation\n(alpha or beta <= 0)", ha="center", va="center",
                    transform=ax.transAxes)
    paths["frontier"] = os.path.join(plot_dir, "frontier.png")
    _save(fig, paths["frontier"])
    plt.close(fig)
    return paths
