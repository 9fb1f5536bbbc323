"""Estimators behind :func:`splitcem.frontier.compare`: the monotone envelope, per-seed gains,
and the additive (cell + seed) model on log MSE and accuracy with pooled residual variance.

Pure numpy; see :mod:`splitcem.frontier` for what they estimate and why.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["envelope", "fit_gain", "interp_mse", "log_frontier", "per_seed_gains"]

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
