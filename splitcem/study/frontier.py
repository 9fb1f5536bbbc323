"""The maths of privacy-utility frontiers: attack MSE at matched accuracy, with a bootstrap.

Pure functions on numbers (no files, no torch), so they can be checked by hand.

A *cell* is one setting of a defense (e.g. noise sigma 0.2) with one ``(accuracy, mse)``
pair per seed. The baseline's curve is its cells' seed means, sorted by accuracy and joined
by straight lines; a setting's gain over the baseline is

    gain = mse_cell / mse_baseline(acc_cell) - 1,

its mean MSE against the MSE the baseline reaches at the same mean accuracy (linear
interpolation; ``None`` outside the accuracy range the baseline covers: no extrapolation).
The interval is a percentile bootstrap over seeds: every cell (the compared one and each of
the baseline's) resamples its own seeds with replacement, and the gain is recomputed. A
compared setting with one seed gets no interval and no verdict; baseline cells with one seed
contribute no spread, so with few seeds the interval is optimistic; the number of seeds is
reported beside it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["Matched", "baseline_curve", "interp_mse", "matched_gain", "verdict"]

Cell = Sequence[tuple[float, float]]  # one (accuracy, mse) per seed


def baseline_curve(cells: Mapping[object, Cell]) -> tuple[np.ndarray, np.ndarray]:
    """(accuracies, mses) of the cells' seed means, sorted by accuracy (equal accuracies
    averaged, so the curve is a function of accuracy).

    Example:
        >>> baseline_curve({0.1: [(0.8, 0.01)], 0.2: [(0.7, 0.02), (0.72, 0.03)]})
        (array([0.71, 0.8 ]), array([0.025, 0.01 ]))
    """
    pts = [(float(np.mean([a for a, _ in c])), float(np.mean([m for _, m in c])))
           for c in cells.values() if len(c)]
    pts.sort()
    accs: list[float] = []
    mses: list[list[float]] = []
    for a, m in pts:
        if accs and np.isclose(a, accs[-1], rtol=0, atol=1e-12):
            mses[-1].append(m)
        else:
            accs.append(a)
            mses.append([m])
    return np.array(accs), np.array([float(np.mean(m)) for m in mses])


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


def verdict(gain: float | None, low: float | None, high: float | None) -> str:
    """Words for a gain and its interval: better / worse / no clear difference / out of range."""
    if gain is None:
        return "outside the baseline's accuracy range: no comparison"
    if low is not None and high is not None:
        if low > 0:
            return "higher MSE than the baseline at this accuracy (more private)"
        if high < 0:
            return "lower MSE than the baseline at this accuracy (less private)"
        return "no clear difference from the baseline (interval spans 0)"
    return ("higher MSE than the baseline" if gain > 0 else "not higher than the baseline") \
        + " (one seed of this setting: no interval, not a verdict)"


@dataclass
class Matched:
    """A cell against the baseline at matched accuracy (see the module docstring)."""

    accuracy: float
    mse: float
    baseline_mse: float | None
    gain: float | None
    low: float | None
    high: float | None
    seeds: int
    boot_valid: int
    verdict: str

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _gain(cell_acc: float, cell_mse: float, accs: np.ndarray, mses: np.ndarray
          ) -> tuple[float | None, float | None]:
    base = interp_mse(accs, mses, cell_acc)
    if base is None or base <= 0:
        return base, None
    return base, cell_mse / base - 1.0


def matched_gain(
    cell: Cell, baseline: Mapping[object, Cell], *, n_boot: int = 2000, level: float = 0.95,
    seed: int = 0,
) -> Matched:
    """The cell's MSE gain over the baseline at the cell's mean accuracy, with a bootstrap
    interval over seeds (``level`` coverage; resamples that fall outside the baseline's
    range are dropped and counted in ``boot_valid``).

    Example:
        >>> m = matched_gain([(0.79, 0.015)], {0.1: [(0.80, 0.010)], 0.2: [(0.78, 0.014)]})
        >>> round(m.baseline_mse, 6), round(m.gain, 6)
        (0.012, 0.25)
    """
    acc = float(np.mean([a for a, _ in cell]))
    mse = float(np.mean([m for _, m in cell]))
    accs, mses = baseline_curve(baseline)
    base, gain = _gain(acc, mse, accs, mses)
    low = high = None
    valid = 0
    # a setting measured on one seed has no spread of its own: an interval from the
    # baseline's seeds alone would leave out the larger part of the uncertainty (and with
    # one-seed neighbours it is zero-wide, which reads as certainty), so it gets none
    if gain is not None and n_boot > 0 and len(cell) > 1:
        rng = np.random.default_rng(seed)
        c = np.asarray(cell, dtype=float)
        bcells = [np.asarray(b, dtype=float) for b in baseline.values() if len(b)]
        gains = []
        for _ in range(n_boot):
            cs = c[rng.integers(0, len(c), len(c))]
            bs = {i: b[rng.integers(0, len(b), len(b))] for i, b in enumerate(bcells)}
            ba, bm = baseline_curve({i: [tuple(r) for r in b] for i, b in bs.items()})
            _, g = _gain(float(cs[:, 0].mean()), float(cs[:, 1].mean()), ba, bm)
            if g is not None:
                gains.append(g)
        valid = len(gains)
        if gains:
            q = (1.0 - level) / 2.0
            low, high = (float(v) for v in np.quantile(gains, [q, 1.0 - q]))
    return Matched(acc, mse, base, gain, low, high, len(cell), valid, verdict(gain, low, high))
