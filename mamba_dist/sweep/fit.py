"""Fitting L(N, D) = E + A / N^alpha + B / D^beta to a sweep (Chinchilla's approach 3), with bootstrap intervals,
IsoFLOP minima (approach 2) and the compute-optimal allocation.

    from mamba_dist.sweep.fit import fit_law, bootstrap, isoflop_minima
    law = fit_law(N, D, L)                 # dict: E, A, B, alpha, beta, a, b, G, objective, ...

The fit (Hoffmann et al. 2022, appendix D.2): minimise sum_i Huber_delta(LSE(a - alpha log N_i, b - beta log D_i, e)
- log L_i) with delta = 1e-3 over (a, b, e, alpha, beta), A = exp(a), B = exp(b), E = exp(e), by L-BFGS (scipy)
from every start of the grid alpha, beta in {0, 0.5, ..., 2}, e in {-1, -0.5, ..., 1}, a, b in {0, 5, ..., 25}
(4,500 starts), keeping the best: L-BFGS runs from all starts side by side (`lbfgs_batch`, vectorised), and the
16 best distinct optima are run on to a tight tolerance by scipy's L-BFGS-B. The objective is divided by delta (same minimiser) so that its gradient is O(1):
with scipy's default tolerances on the raw objective (gradients ~1e-3) L-BFGS stops after a few iterations, which
is the early stop Besiroglu et al. (Epoch AI, 2024) found in the published fit. Tolerances are tight and the
analytic gradient is used.

Compute-optimal allocation with C = k N D (k = training FLOPs per parameter per token, 6 for a transformer's
6ND; for a sweep it is the median of flops / (params x tokens) over the runs, which folds in the LM head and the
SSM scan): N_opt(C) = G (C/k)^a, D_opt(C) = (C/k)^b / G, a = beta / (alpha + beta), b = alpha / (alpha + beta),
G = (alpha A / (beta B))^(1 / (alpha + beta)).

Bootstrap: resample the runs with replacement, refit (from the full fit's best optima, see `bootstrap`), and take
the 5th and 95th percentiles of every parameter: the 90% interval. Few runs give wide intervals; `warnings` says so.
"""

from __future__ import annotations

import itertools
import math
from typing import Optional

import numpy as np
from scipy.optimize import minimize

HUBER_DELTA = 1e-3
START_GRID = {"alpha": np.arange(0.0, 2.01, 0.5), "beta": np.arange(0.0, 2.01, 0.5),
              "e": np.arange(-1.0, 1.01, 0.5), "a": np.arange(0.0, 25.1, 5.0), "b": np.arange(0.0, 25.1, 5.0)}
LBFGS_OPTIONS = {"maxiter": 5000, "maxfun": 20000, "ftol": 1e-13, "gtol": 1e-9, "maxcor": 20}  # final runs
POLISH = 16  # distinct screened optima run on to LBFGS_OPTIONS
PARAMS = ("E", "A", "B", "alpha", "beta", "a", "b")


def start_grid() -> np.ndarray:
    """The 4,500 starts as rows (a, b, e, alpha, beta)."""
    g = START_GRID
    return np.array([(a, b, e, al, be) for al, be, e, a, b in
                     itertools.product(g["alpha"], g["beta"], g["e"], g["a"], g["b"])])


def _objective(theta: np.ndarray, logN: np.ndarray, logD: np.ndarray, logL: np.ndarray, delta: float):
    """Huber(LSE(...) - log L) / delta summed over runs, and its gradient in (a, b, e, alpha, beta)."""
    a, b, e, alpha, beta = theta
    t1 = a - alpha * logN
    t2 = b - beta * logD
    m = np.maximum(np.maximum(t1, t2), e)
    w1, w2, w3 = np.exp(t1 - m), np.exp(t2 - m), np.exp(e - m)
    s = w1 + w2 + w3
    r = m + np.log(s) - logL  # residual of log L; d pred / d t_i = w_i / s
    ar = np.abs(r)
    f = np.sum(np.where(ar <= delta, 0.5 * r * r, delta * (ar - 0.5 * delta))) / delta
    g = np.clip(r, -delta, delta) / (delta * s)
    g1, g2 = g * w1, g * w2
    grad = np.array([g1.sum(), g2.sum(), (g * w3).sum(), -(g1 @ logN), -(g2 @ logD)])
    if not (math.isfinite(f) and np.all(np.isfinite(grad))):
        return 1e30, np.zeros(5)
    return f, grad


def _objective_batch(theta: np.ndarray, logN, logD, logL, delta: float):
    """_objective for many parameter rows at once: theta (S, 5) -> f (S,), grad (S, 5)."""
    a, b, e, alpha, beta = (theta[:, i:i + 1] for i in range(5))
    t1 = a - alpha * logN
    t2 = b - beta * logD
    m = np.maximum(np.maximum(t1, t2), e)
    w1, w2, w3 = np.exp(t1 - m), np.exp(t2 - m), np.exp(e - m)
    s = w1 + w2 + w3
    r = m + np.log(s) - logL
    ar = np.abs(r)
    f = np.sum(np.where(ar <= delta, 0.5 * r * r, delta * (ar - 0.5 * delta)), axis=1) / delta
    g = np.clip(r, -delta, delta) / (delta * s)
    g1, g2 = g * w1, g * w2
    grad = np.stack([g1.sum(1), g2.sum(1), (g * w3).sum(1), -(g1 @ logN), -(g2 @ logD)], axis=1)
    bad = ~(np.isfinite(f) & np.all(np.isfinite(grad), axis=1))
    f[bad], grad[bad] = np.inf, 0.0
    return f, grad


def lbfgs_batch(x0: np.ndarray, logN, logD, logL, delta: float, iters: int = 200, memory: int = 10,
                gtol: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """L-BFGS (two-loop recursion, Armijo backtracking) from every row of x0 at once, vectorised over the rows.
    scipy's L-BFGS-B runs one start at a time, ~10 ms each here, so the 4,500-start grid alone took a minute; run
    side by side the whole grid takes about a second. The best results are then finished by scipy (fit_law)."""
    x = np.array(x0, float)
    f, g = _objective_batch(x, logN, logD, logL, delta)
    S = len(x)
    hist_s = np.zeros((memory, S, 5))
    hist_y = np.zeros((memory, S, 5))
    rho = np.zeros((memory, S))  # 0 marks an empty (or rejected) pair: it drops out of the recursion
    active = np.isfinite(f)
    for it in range(iters):
        q = g.copy()
        alphas = np.zeros((memory, S))
        order = [(it - 1 - j) % memory for j in range(min(it, memory))]  # newest first
        for j in order:
            alphas[j] = rho[j] * np.einsum("sk,sk->s", hist_s[j], q)
            q -= alphas[j][:, None] * hist_y[j]
        if order:
            j = order[0]
            sy, yy = np.einsum("sk,sk->s", hist_s[j], hist_y[j]), np.einsum("sk,sk->s", hist_y[j], hist_y[j])
            gamma = np.where((rho[j] > 0) & (yy > 0), sy / np.where(yy > 0, yy, 1.0), 1e-2)
        else:
            gamma = np.full(S, 1e-2)  # first step: a short gradient step
        q *= gamma[:, None]
        for j in reversed(order):
            beta = rho[j] * np.einsum("sk,sk->s", hist_y[j], q)
            q += hist_s[j] * (alphas[j] - beta)[:, None]
        d = -q
        slope = np.einsum("sk,sk->s", g, d)
        not_descent = slope >= 0
        d[not_descent] = -1e-2 * g[not_descent]
        slope[not_descent] = -1e-2 * np.einsum("sk,sk->s", g[not_descent], g[not_descent])
        d[~active] = 0.0
        step = np.ones(S)
        x_new, f_new, g_new = x.copy(), f.copy(), g.copy()
        todo = active.copy()
        for _ in range(30):  # backtracking: halve the step where the Armijo condition fails
            if not todo.any():
                break
            xt = x[todo] + step[todo, None] * d[todo]
            ft, gt = _objective_batch(xt, logN, logD, logL, delta)
            ok = ft <= f[todo] + 1e-4 * step[todo] * slope[todo]
            idx = np.flatnonzero(todo)
            acc = idx[ok]
            x_new[acc], f_new[acc], g_new[acc] = xt[ok], ft[ok], gt[ok]
            todo[acc] = False
            step[idx[~ok]] *= 0.5
        moved = active & ~todo
        k = it % memory
        hist_s[k] = x_new - x
        hist_y[k] = g_new - g
        sy = np.einsum("sk,sk->s", hist_s[k], hist_y[k])
        rho[k] = np.where(moved & (sy > 1e-12), 1.0 / np.where(sy > 1e-12, sy, 1.0), 0.0)
        f_change = np.abs(f - f_new)
        x, f, g = x_new, f_new, g_new
        active &= moved & (np.abs(g).max(1) > gtol) & (f_change > 1e-12 * np.maximum(1.0, np.abs(f)))
        if not active.any():
            break
    return x, f


def _minimise(theta0, logN, logD, logL, delta, options):
    return minimize(_objective, theta0, args=(logN, logD, logL, delta), jac=True, method="L-BFGS-B",
                    options=options)


def _distinct(results: list, keep: int) -> list:
    """The `keep` best results whose parameters differ (results sorted by objective)."""
    out = []
    for r in results:
        if all(np.max(np.abs(r[1] - o[1])) > 1e-3 for o in out):
            out.append(r)
        if len(out) >= keep:
            break
    return out


def law_from_theta(theta, k: float = 6.0) -> dict:
    a_, b_, e_, alpha, beta = (float(x) for x in theta)
    law = {"E": math.exp(e_), "A": math.exp(a_), "B": math.exp(b_), "alpha": alpha, "beta": beta}
    s = alpha + beta
    if s > 0 and alpha > 0 and beta > 0:
        law["a"], law["b"] = beta / s, alpha / s
        law["G"] = math.exp((math.log(alpha / beta) + a_ - b_) / s)  # (alpha A / (beta B))^(1/(alpha+beta))
    else:  # no interior optimum: one term does not fall with its resource
        law["a"] = law["b"] = law["G"] = float("nan")
    law["k"] = k
    return law


def predict(law: dict, N, D):
    return law["E"] + law["A"] / np.asarray(N, float) ** law["alpha"] + law["B"] / np.asarray(D, float) ** law["beta"]


def optimal_allocation(law: dict, C):
    """(N_opt, D_opt) at compute C (FLOPs), with C = k N D."""
    c = np.asarray(C, float) / law["k"]
    return law["G"] * c ** law["a"], c ** law["b"] / law["G"]


def fit_law(N, D, L, *, k: float = 6.0, delta: float = HUBER_DELTA, starts: Optional[np.ndarray] = None,
            keep: int = 0, polish: int = POLISH) -> dict:
    """Approach 3 from every start (default: the 4,500-point grid); the best optimum as a law dict, plus
    `objective`, `converged`, `n_runs`, and with keep > 0 `optima`: the `keep` best distinct optima (theta rows),
    which `bootstrap` restarts from."""
    logN, logD, logL = (np.log(np.asarray(x, float)) for x in (N, D, L))
    starts = start_grid() if starts is None else np.atleast_2d(starts)
    # Every start runs L-BFGS to a loose tolerance (most of them fall into a few basins, and flat or degenerate
    # directions would otherwise take thousands of iterations each); the best distinct optima are then run on to
    # the tight tolerance, so the one kept has converged.
    xs, fs = lbfgs_batch(starts, logN, logD, logL, delta)
    coarse = [(float(f), x) for f, x in zip(fs, xs) if math.isfinite(f) and np.all(np.isfinite(x))]
    if not coarse:
        raise ValueError("no start reached a finite fit")
    coarse.sort(key=lambda x: x[0])
    results = []
    for _, x in _distinct(coarse, max(polish, keep)):
        res = _minimise(x, logN, logD, logL, delta, LBFGS_OPTIONS)
        # L-BFGS-B may end in a failed line search at machine precision; a vanishing gradient is converged too
        grad = _objective(res.x, logN, logD, logL, delta)[1]
        results.append((float(res.fun), res.x, bool(res.success) or float(np.abs(grad).max()) < 1e-4))
    results.sort(key=lambda x: x[0])
    best_f, best_x, ok = results[0]
    law = law_from_theta(best_x, k)
    law.update(objective=best_f * delta, converged=ok, n_runs=int(len(logL)), theta=[float(x) for x in best_x])
    if keep:
        law["optima"] = np.array([r[1] for r in _distinct(results, keep)])
    return law


def bootstrap(N, D, L, law: dict, *, n_boot: int = 200, seed: int = 0, k: float = 6.0,
              delta: float = HUBER_DELTA) -> dict:
    """Refit on n_boot resamples of the runs (drawn with replacement). Each refit starts from the full fit's best
    distinct optima (law['optima'], or its theta) rather than all 4,500 grid points: a resample's optimum lies near
    the full data's, and 200 x 4,500 L-BFGS runs would take minutes; the best two are finished by scipy. Resamples with fewer than 3 distinct sizes or
    budgets (or fewer than the data has) cannot identify the law and are drawn again. Returns {samples: {param: array}, ci90: {param: [lo, hi]},
    n_boot}."""
    N, D, L = (np.asarray(x, float) for x in (N, D, L))
    starts = law.get("optima")
    starts = np.atleast_2d(law["theta"]) if starts is None else starts
    rng = np.random.default_rng(seed)
    samples = {p: [] for p in PARAMS + ("G",)}
    n, tries = len(L), 0
    need_n, need_d = min(3, len(np.unique(N))), min(3, len(np.unique(D)))
    while len(samples["E"]) < n_boot and tries < 10 * n_boot:
        tries += 1
        idx = rng.integers(0, n, n)
        if len(np.unique(N[idx])) < need_n or len(np.unique(D[idx])) < need_d:
            continue
        b = fit_law(N[idx], D[idx], L[idx], k=k, delta=delta, starts=starts, polish=2)
        for p in samples:
            samples[p].append(b[p])
    samples = {p: np.array(v) for p, v in samples.items()}
    ci = {}
    for p in PARAMS:
        v = samples[p][np.isfinite(samples[p])]
        ci[p] = [float(np.percentile(v, 5)), float(np.percentile(v, 95))] if len(v) else [float("nan")] * 2
    return {"samples": samples, "ci90": ci, "n_boot": int(len(samples["E"]))}


def frontier_band(law: dict, boot: dict, C) -> dict:
    """N_opt(C), D_opt(C) of the fit and the 5-95% band over the bootstrap laws."""
    C = np.asarray(C, float)
    n_opt, d_opt = optimal_allocation(law, C)
    s = boot["samples"]
    ns, ds = [], []
    for i in range(len(s["E"])):
        if not all(math.isfinite(s[p][i]) for p in ("a", "b", "G")):
            continue
        li = {"a": s["a"][i], "b": s["b"][i], "G": s["G"][i], "k": law["k"]}
        ni, di = optimal_allocation(li, C)
        ns.append(ni)
        ds.append(di)
    out = {"C": C, "N_opt": n_opt, "D_opt": d_opt}
    if ns:
        ns, ds = np.array(ns), np.array(ds)
        out.update(N_lo=np.percentile(ns, 5, axis=0), N_hi=np.percentile(ns, 95, axis=0),
                   D_lo=np.percentile(ds, 5, axis=0), D_hi=np.percentile(ds, 95, axis=0))
    return out


# ------------------------------------------------------------------------------------------------------ IsoFLOPs
def flop_levels(C, rel_tol: float = 0.1) -> list[np.ndarray]:
    """Group run indices whose compute lies within rel_tol of the group's smallest (a sweep with FLOP budgets gives
    one group per budget; token budgets rarely share a level)."""
    C = np.asarray(C, float)
    order = np.argsort(C)
    groups, cur = [], [order[0]]
    for i in order[1:]:
        if C[i] <= C[cur[0]] * (1 + rel_tol):
            cur.append(i)
        else:
            groups.append(np.array(cur))
            cur = [i]
    groups.append(np.array(cur))
    return groups


def isoflop_minima(N, D, L, C, k: float, *, rel_tol: float = 0.1, min_points: int = 3) -> dict:
    """Approach 2: on each FLOP level with >= min_points distinct sizes, a parabola of loss in log N; its vertex is
    N_opt(C) (trusted only when it is a minimum inside the sampled sizes), D_opt = C / (k N_opt). With >= 2 trusted
    levels, a and b are the slopes of log N_opt and log D_opt against log C."""
    N, D, L, C = (np.asarray(x, float) for x in (N, D, L, C))
    levels = []
    for g in flop_levels(C, rel_tol):
        if len(np.unique(N[g])) < min_points:
            continue
        x, y = np.log(N[g]), L[g]
        c2, c1, c0 = np.polyfit(x, y, 2)
        c = float(np.exp(np.mean(np.log(C[g]))))
        lev = {"C": c, "n_points": int(len(g)), "names_idx": [int(i) for i in g], "coef": [c2, c1, c0]}
        if c2 > 0:
            xs = -c1 / (2 * c2)
            n_opt = float(np.exp(xs))
            lev.update(N_opt=n_opt, D_opt=c / (k * n_opt), loss_min=float(c0 + c1 * xs + c2 * xs * xs),
                       inside=bool(x.min() <= xs <= x.max()))
        else:
            lev.update(N_opt=None, D_opt=None, loss_min=None, inside=False)
        levels.append(lev)
    out = {"levels": levels, "a": None, "b": None, "rel_tol": rel_tol}
    good = [lv for lv in levels if lv["inside"]]
    if len(good) >= 2:
        lc = np.log([lv["C"] for lv in good])
        out["a"] = float(np.polyfit(lc, np.log([lv["N_opt"] for lv in good]), 1)[0])
        out["b"] = float(np.polyfit(lc, np.log([lv["D_opt"] for lv in good]), 1)[0])
    out["n_levels_used"] = len(good)
    return out


# ------------------------------------------------------------------------------------------------------ warnings
def fit_warnings(law: dict, ci: dict, N, D, L, iso: dict, n_boot: int) -> list[str]:
    """What the data does not support, in words."""
    w = []
    n = len(N)
    if n < 15:
        w.append(f"only {n} runs for 5 parameters: Epoch AI's replication of Chinchilla needed hundreds of runs for "
                 f"narrow intervals; treat these numbers as rough")
    if len(np.unique(N)) < 4 or len(np.unique(D)) < 4:
        w.append(f"{len(np.unique(N))} distinct sizes and {len(np.unique(D))} distinct token counts: alpha and beta "
                 f"are poorly separated")
    if not law.get("converged", True):
        w.append("L-BFGS did not report convergence for the best start")
    E_unidentified = law["E"] < 1e-3 * float(np.min(L))
    if E_unidentified:
        w.append(f"E = {law['E']:.3g}: the fit puts the irreducible loss at ~0, i.e. the runs are far from it and E "
                 f"is not identified (A, B, alpha, beta absorb it); larger runs would pin it down")
    for p in ("alpha", "beta", "a", "b") + (() if E_unidentified else ("E",)):
        lo, hi = ci.get(p, [float("nan")] * 2)
        est = law[p]
        if not (math.isfinite(lo) and math.isfinite(hi) and math.isfinite(est)):
            w.append(f"{p}: no finite bootstrap interval")
            continue
        rel = (hi - lo) / max(abs(est), 1e-12)
        if rel > 0.3:
            w.append(f"{p} = {est:.3g} has a wide 90% interval [{lo:.3g}, {hi:.3g}] ({rel:.0%} of its value)")
        if not lo <= est <= hi:
            w.append(f"{p} = {est:.3g} lies outside its bootstrap interval [{lo:.3g}, {hi:.3g}] (an unstable fit)")
    if not (law["alpha"] > 0 and law["beta"] > 0):
        w.append(f"alpha = {law['alpha']:.3g}, beta = {law['beta']:.3g}: a term does not decrease; no compute-optimal "
                 f"allocation")
    if n_boot < 50:
        w.append(f"only {n_boot} bootstrap resamples")
    if iso["levels"] and iso["a"] is None:
        w.append(f"IsoFLOP: {iso['n_levels_used']} of {len(iso['levels'])} levels have a minimum inside the sampled "
                 f"sizes; approach 2 needs 2 (widen the size range around the optimum)")
    if iso["a"] is not None and math.isfinite(law["a"]) and abs(iso["a"] - law["a"]) > 0.15:
        w.append(f"approach 2 (a = {iso['a']:.3g}) and approach 3 (a = {law['a']:.3g}) disagree")
    return w
