"""Estimators behind :func:`splitcem.study.frontier.compare`: the monotone envelope, per-seed gains,
and the additive (cell + seed) model on log MSE and accuracy with pooled residual variance.

Pure numpy; see :mod:`splitcem.study.frontier` for what they estimate and why.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

__all__ = ["envelope", "fit_gain", "interp_mse", "log_frontier", "per_seed_gains",
           "spread_test"]

Point = tuple[float, float]  # (accuracy, mse)
Cells = Mapping[Any, Mapping[Any, Point]]


def envelope(points: Sequence[Point]) -> tuple[np.ndarray, np.ndarray]:
    """The monotone (Pareto) envelope of ``(accuracy, mse)`` points, as (accs, mses) sorted by
    accuracy: points beaten on both accuracy and MSE dropped, and a flat start at the least
    accurate point if that one was dominated.

    Example:
        >>> # (0.75, 0.010) is beaten on both by (0.77, 0.015); (0.79, 0.012) by (0.80, 0.013)
        >>> envelope([(0.75, 0.010), (0.77, 0.015), (0.79, 0.012), (0.80, 0.013)])
        (array([0.75, 0.77, 0.8 ]), array([0.015, 0.015, 0.013]))
    """
    pts = sorted(((float(a), float(m)) for a, m in points), key=lambda p: (-p[0], -p[1]))
    keep: list[Point] = []
    for a, m in pts:  # most accurate first: keep a point only if it beats all more accurate
        if not keep or m > keep[-1][1]:
            keep.append((a, m))
    keep.reverse()
    if pts and pts[-1][0] < keep[0][0]:
        keep.insert(0, (pts[-1][0], keep[0][1]))
    return np.array([a for a, _ in keep]), np.array([m for _, m in keep])


def interp_mse(accs: np.ndarray, mses: np.ndarray, acc: float) -> float | None:
    """The curve's MSE at accuracy ``acc`` (linear between its points), ``None`` outside.

    Example:
        >>> interp_mse(np.array([0.78, 0.80]), np.array([0.014, 0.010]), 0.79)
        0.012
    """
    if len(accs) == 0 or acc < accs[0] - 1e-12 or acc > accs[-1] + 1e-12:
        return None
    if len(accs) == 1:
        return float(mses[0])
    return round(float(np.interp(acc, accs, mses)), 15)


def log_frontier(points: Sequence[Point], acc: float) -> float | None:
    """log of the envelope's MSE at ``acc``; ``None`` outside it.

    Example:
        >>> round(float(np.exp(log_frontier([(0.78, 0.014), (0.80, 0.010)], 0.79))), 6)
        0.012
    """
    accs, mses = envelope(points)
    b = interp_mse(accs, mses, acc)
    return None if b is None or b <= 0 else float(np.log(b))


def per_seed_gains(cell: Mapping[Any, Point], base: Cells) -> tuple[dict[Any, float], list[str]]:
    """Per seed of ``cell``: log(mse / that seed's own baseline frontier at that seed's
    accuracy); and a line per seed without one.

    Example:
        >>> base = {0.1: {1: (0.80, 0.010)}, 0.2: {1: (0.70, 0.020), 2: (0.70, 0.02)}}
        >>> logs, dropped = per_seed_gains({1: (0.75, 0.018), 2: (0.75, 0.02)}, base)
        >>> round(float(np.expm1(logs[1])), 6), dropped
        (0.2, ["seed 2: accuracy 0.7500 outside seed 2's own baseline curve [0.7000, 0.7000]"])
    """
    logs: dict[Any, float] = {}
    dropped: list[str] = []
    for k, (a, m) in sorted(cell.items(), key=lambda kv: str(kv[0])):
        own = [c[k] for c in base.values() if k in c]
        lb = log_frontier(own, a) if own and m > 0 else None
        if lb is None:
            why = (f"no baseline run with seed {k}" if not own else
                   f"accuracy {a:.4f} outside seed {k}'s own baseline curve "
                   f"[{min(p[0] for p in own):.4f}, {max(p[0] for p in own):.4f}]")
            dropped.append(f"seed {k}: {why}")
        else:
            logs[k] = float(np.log(m)) - lb
    return logs, dropped


def fit_gain(cell: Mapping[Any, Point], base: Cells, *, seed_effects: bool
             ) -> tuple[float | None, float | None, int]:
    """(log gain, standard error, degrees of freedom) of ``cell`` against ``base``.

    Least squares on every run of the baseline and the cell: ``log mse = cell effect (+ seed
    effect)`` and likewise for accuracy, with seed effects (``seed_effects=True``: an effect
    a seed has on every run cancels) or without (cell means). The gain compares the cell's
    fitted log MSE with the envelope of the baseline cells' fitted points at the cell's fitted
    accuracy; its variance is the delta method's, with the residual variances pooled over all
    runs (``df`` = runs - rank); ``se`` is ``None`` when ``df < 1`` or the cell has fewer than
    2 runs that inform it.

    Example:
        >>> base = {0.1: {1: (0.80, 0.010), 2: (0.81, 0.012)}, 0.2: {1: (0.70, 0.02), 2: (0.71,
        ...         0.024)}}
        >>> lg, se, df = fit_gain({1: (0.75, 0.018), 2: (0.76, 0.0225)}, base, seed_effects=True)
        >>> round(float(np.expm1(lg)), 3), df
        (0.225, 2)
    """
    groups = [*base.values(), cell]
    rows = [(ci, s, a, np.log(m)) for ci, g in enumerate(groups) for s, (a, m) in g.items()]
    seeds = sorted({r[1] for r in rows}, key=str) if seed_effects else []
    n_c = len(groups)
    x = np.zeros((len(rows), n_c + len(seeds)))
    for i, (ci, s, _, _) in enumerate(rows):
        x[i, ci] = 1.0
        if seed_effects:
            x[i, n_c + seeds.index(s)] = 1.0
    y = np.array([[r[2], r[3]] for r in rows])  # columns: accuracy, log mse
    u, sv, vt = np.linalg.svd(x, full_matrices=False)
    rank = int((sv > sv.max() * max(x.shape) * np.finfo(float).eps).sum())
    pinv = (vt[:rank].T / sv[:rank]) @ u[:, :rank].T
    coef = pinv @ y
    df = len(rows) - rank
    est = coef[:n_c]  # fitted (accuracy, log mse) per cell, up to a shift common to all cells

    def theta(e: np.ndarray) -> float | None:
        lb = log_frontier([(float(a), float(np.exp(m))) for a, m in e[:-1]], float(e[-1, 0]))
        return None if lb is None else float(e[-1, 1]) - lb

    t0 = theta(est)
    # runs that inform the cell's fit: a seed with no other run only fits its own effect
    hat = x @ pinv
    own = [i for i, r in enumerate(rows) if r[0] == n_c - 1 and hat[i, i] < 1 - 1e-9]
    if t0 is None or df < 1 or len(own) < 2:
        return t0, None, df
    resid = y - x @ coef
    var = (resid ** 2).sum(axis=0) / df  # pooled residual variance: accuracy, log mse
    grad = np.zeros_like(est)
    for i in range(n_c):
        for j in range(2):
            h = 1e-6
            up, dn = est.copy(), est.copy()
            up[i, j] += h
            dn[i, j] -= h
            tu, td = theta(up), theta(dn)
            grad[i, j] = 0.0 if tu is None or td is None else (tu - td) / (2 * h)
    # theta ~ sum_ij grad_ij est_ij, est = pinv[:n_c] @ y: a linear combination of the runs
    w = grad.T @ pinv[:n_c]  # (2, runs)
    v = float(((w ** 2).sum(axis=1) * var).sum())
    return t0, float(np.sqrt(v)), df


def _design(groups: Sequence[Mapping[Any, Point]], seeds: list[Any]) -> np.ndarray:
    rows = [(ci, s) for ci, g in enumerate(groups) for s in g]
    x = np.zeros((len(rows), len(groups) + len(seeds)))
    for i, (ci, s) in enumerate(rows):
        x[i, ci] = 1.0
        x[i, len(groups) + seeds.index(s)] = 1.0
    return x


def spread_test(cell: Mapping[Any, Point], base: Cells) -> float | None:
    """p of the exact F test that the cell's runs follow the baseline's seed effects with the
    baseline's run-to-run spread (the equal-spread assumption of the pooled paired model),
    on log MSE and on accuracy (the smaller p, doubled); ``None`` without degrees of freedom
    on either side (fewer than 2 shared seeds, or a baseline with no residual).

    The cell's runs on seeds the baseline ran, minus the seed effects fitted on the baseline
    alone, are centred: under the assumption their covariance is ``sigma^2 M`` with ``M``
    known from the design and independent of the baseline's residual variance, so
    ``e' M^+ e / rank(M) / s^2_baseline`` is F-distributed.

    Example:
        >>> base = {0.1: {1: (0.80, 0.010), 2: (0.81, 0.0121)},
        ...         0.2: {1: (0.70, 0.020), 2: (0.71, 0.0238)},
        ...         0.3: {1: (0.60, 0.030), 2: (0.61, 0.0362)}}  # seed 2: +20% everywhere
        >>> spread_test({1: (0.75, 0.018), 2: (0.76, 0.0215)}, base) > 0.5  # +20% too
        True
        >>> spread_test({1: (0.75, 0.018), 2: (0.76, 0.0150)}, base) < 0.1  # -17%: not
        True
    """
    groups = [g for g in base.values() if g]
    seeds = sorted({s for g in groups for s in g}, key=str)
    shared = [s for s in cell if s in seeds]
    if len(shared) < 2 or not groups:
        return None
    x = _design(groups, seeds)
    pinv = np.linalg.pinv(x)
    rank = int(np.linalg.matrix_rank(x))
    df_b = x.shape[0] - rank
    if df_b < 1:
        return None
    # seed effects of the shared seeds as linear functions of the baseline's runs
    q = pinv[[len(groups) + seeds.index(s) for s in shared]]  # (n, runs)
    n = len(shared)
    c = np.eye(n) - 1.0 / n
    m = c @ (np.eye(n) + q @ q.T) @ c
    m_pinv = np.linalg.pinv(m)
    r = n - 1
    ps = []
    for col in (0, 1):
        f = (lambda v: v) if col == 0 else np.log
        y_b = np.array([f(g[s][col]) for g in groups for s in g])
        y_s = np.array([f(cell[s][col]) for s in shared])
        resid_b = y_b - x @ (pinv @ y_b)
        s2 = float(resid_b @ resid_b) / df_b
        e = c @ (y_s - q @ y_b)
        stat = float(e @ m_pinv @ e) / r
        ps.append(float(stats.f.sf(stat / s2, r, df_b)) if s2 > 0 else
                  (0.0 if stat > 1e-24 else 1.0))
    return min(1.0, 2 * min(ps))
