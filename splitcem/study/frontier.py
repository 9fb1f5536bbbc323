"""The maths of privacy-utility frontiers: attack MSE at matched accuracy, with honest intervals.

Pure functions on numbers (no files, no torch), so they can be checked by hand.

A *cell* is one setting of a defense (e.g. noise sigma 0.2) with one ``(accuracy, mse)``
pair per seed: a mapping ``{seed: (accuracy, mse)}`` (the seeds let settings be paired), or
a plain sequence of pairs (no seeds: never paired).

**The baseline's frontier** is the monotone (Pareto) envelope of its points: higher accuracy
and higher attack MSE are both good for the defender, so a point that another point beats on
both is dropped, the rest (MSE now falling as accuracy rises) are joined by straight lines,
and below the least accurate of them the curve stays flat down to the least accurate point
measured (a more accurate point that is also more private is reachable there). There is no
extrapolation: ``None`` outside the measured accuracies.

**The gain** of a setting is ``mse / frontier_mse(accuracy) - 1``, estimated on the log
scale: seed-to-seed effects on MSE are multiplicative, a log ratio is symmetric in the two
MSEs, and the t intervals below cover it as stated (``tests/test_frontier_coverage.py``
simulates the shipped design and checks it). The estimate fits, by least squares over every
run of the baseline and the setting, an additive model to log MSE and to accuracy
(:func:`splitcem.study.frontier_stats.fit_gain`):

* *paired* (at least 2 of the setting's seeds also ran the baseline): ``cell effect + seed
  effect``, so an effect a seed has on every run (its initialisation, its data order)
  cancels; a seed the baseline never ran only fits its own effect and adds nothing (it is
  listed in ``dropped``);
* *unpaired* (otherwise): cell means.

The gain compares the setting's fitted log MSE with the frontier of the baseline cells'
fitted points at the setting's fitted accuracy; its interval is a t interval from the delta
method, with the residual variances (log MSE, accuracy) pooled over all runs, ``df = runs -
rank`` (``method="model"``).

Pooling assumes the setting's runs follow the seed effects with the baseline's run-to-run
spread. Paired, :func:`~splitcem.study.frontier_stats.spread_test` (an exact F test) checks
that; where it rejects (p < 0.1) the default ``method="auto"`` uses the per-seed t
interval instead: per seed, the gain against that seed's own baseline curve, then a t
interval over seeds (n - 1 degrees of freedom; no assumption on the spread, but with two
seeds t(1) = 12.7 makes it wide). The per-seed gains and their interval are reported
either way (:attr:`Comparison.per_seed`, :attr:`Comparison.per_seed_interval`).
``python benchmarks/frontier_coverage.py`` measures coverage, false verdicts and power of
each method on simulated studies of the shipped design and variants.

A setting with one usable seed has no spread of its own: an estimate, no interval. The
verdict is "more private" / "less private" only when the interval excludes 0, else
"undecided", with :func:`seeds_needed` estimating how many more seeds would decide it at the
observed spread. Seed planning (``seeds: {min, max, until: decided}``) is in
:mod:`splitcem.study.frontier_plan`.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
from scipy import stats

from splitcem.study.frontier_stats import (
    envelope,
    fit_gain,
    interp_mse,
    per_seed_gains,
    spread_test,
)

__all__ = ["Comparison", "Matched", "baseline_curve", "compare", "envelope", "interp_mse",
           "matched_gain", "seeds_needed", "verdict", "within_reach"]

Point = tuple[float, float]  # (accuracy, mse)
#: one (accuracy, mse) per seed: ``{seed: (acc, mse)}``, or a plain sequence (no seeds)
Cell = Mapping[Any, Point] | Sequence[Point]

MORE, LESS, UNDECIDED, NO_COMPARISON = ("more private", "less private", "undecided",
                                        "no comparison")
_MAX_SEEDS = 1000  # seeds_needed looks no further than this
METHODS = ("auto", "model", "per_seed")
SPREAD_ALPHA = 0.1  # auto: below this spread_test p, the per-seed t interval is used


def _pairs(cell: Cell) -> dict[Any, Point]:
    if isinstance(cell, Mapping):
        return {k: (float(a), float(m)) for k, (a, m) in cell.items()}
    return {("#", i): (float(a), float(m)) for i, (a, m) in enumerate(cell)}


def baseline_curve(cells: Mapping[Any, Cell]) -> tuple[np.ndarray, np.ndarray]:
    """The baseline's frontier: :func:`envelope` of its cells' seed means.

    Example:
        >>> baseline_curve({0.1: [(0.8, 0.01)], 0.2: [(0.7, 0.02), (0.72, 0.03)]})
        (array([0.71, 0.8 ]), array([0.025, 0.01 ]))
    """
    pts = [tuple(np.mean(list(_pairs(c).values()), axis=0)) for c in cells.values() if len(c)]
    return envelope(pts)  # type: ignore[arg-type]


def verdict(gain: float | None, low: float | None, high: float | None) -> str:
    """``more private`` / ``less private`` only when the interval excludes 0; ``undecided``
    when it spans 0 or there is none; ``no comparison`` without a gain (out of range).

    Example:
        >>> verdict(0.2, 0.05, 0.4), verdict(0.2, -0.1, 0.5), verdict(0.2, None, None)
        ('more private', 'undecided', 'undecided')
    """
    if gain is None:
        return NO_COMPARISON
    if low is not None and high is not None:
        if low > 0:
            return MORE
        if high < 0:
            return LESS
    return UNDECIDED


def seeds_needed(log_gain: float, se: float, n: int, df: int | None = None, *,
                 level: float = 0.95) -> int | None:
    """More seeds that would make a t interval exclude 0 if the estimate and the spread
    stayed as observed (``se`` shrinking as ``1 / sqrt(n)``, degrees of freedom growing by
    one a seed from ``df``, default ``n - 1``); 0 if already decided, ``None`` if no
    estimate or more than a thousand.

    Example:
        >>> seeds_needed(0.2, 0.1, 2)  # se 0.1 on 2 seeds: 5 seeds give 2.78 * 0.1 * 0.63 < 0.2
        3
        >>> seeds_needed(0.0, 0.1, 2) is None
        True
    """
    if not np.isfinite(log_gain) or not np.isfinite(se) or log_gain == 0:
        return None
    df0 = n - 1 if df is None else df
    m = np.arange(max(n, 1), _MAX_SEEDS + 1)
    dfs = df0 + (m - n)
    t = _t_table(level)[np.clip(dfs, 1, None)]
    ok = (dfs >= 1) & (t * se * np.sqrt(n / m) < abs(log_gain))
    return int(m[np.argmax(ok)] - n) if ok.any() else None


#: :func:`within_reach` judges the spread from this many seeds on (from two it is too rough)
REACH_FROM = 3
#: ... and calls a decision out of reach when the seeds it needs at the spread seen are more
#: than this many times ``max`` (lenient, as the spread from few seeds is rough). On the
#: bundled frontier's simulated studies at the shipped level a true +20% gain was still
#: decided in 97.2% of them (98.3% without the rule) while a setting with no gain stopped
#: after 3.4 seeds on average instead of 7.9 (``python benchmarks/until_decided.py``)
REACH_SLACK = 2


def within_reach(c: Comparison, most: int) -> bool:
    """Whether more seeds may still decide ``c`` with at most ``most`` seeds in all: it is
    undecided, below ``most`` seeds, and either rests on fewer than :data:`REACH_FROM` seeds
    (too few to judge the spread by) or :func:`seeds_needed` at the spread seen says that
    it needs at most :data:`REACH_SLACK` times ``most`` seeds in all.

    Stopping once a decision is out of reach never makes a verdict (the setting stays
    undecided), so it keeps any false-verdict rate and costs only power.

    Example:
        >>> base = {0.1: {1: (0.80, 0.010), 2: (0.79, 0.0115), 3: (0.80, 0.0104)},
        ...         0.2: {1: (0.70, 0.020), 2: (0.71, 0.021), 3: (0.70, 0.0196)}}
        >>> c = compare(base, {1: (0.75, 0.018), 2: (0.75, 0.0165), 3: (0.75, 0.0152)})
        >>> c.verdict, c.n_seeds, c.seeds_needed
        ('undecided', 3, 6)
        >>> within_reach(c, 5), within_reach(c, 4)  # 3 + 6 seeds: within twice 5, not 4
        (True, False)
    """
    if c.verdict != UNDECIDED or c.n_seeds >= most:
        return False
    if c.interval is None or c.n_seeds < REACH_FROM:
        return True
    return c.seeds_needed is not None and c.n_seeds + c.seeds_needed <= REACH_SLACK * most


@lru_cache(maxsize=8)
def _t_table(level: float) -> np.ndarray:
    """Two-sided ``level`` quantiles of Student's t, indexed by degrees of freedom."""
    t = stats.t.ppf(1 - (1 - level) / 2, np.arange(2 * _MAX_SEEDS + 1))
    t.setflags(write=False)
    return t


def _t(level: float, df: int) -> float:
    return float(_t_table(level)[df]) if df <= 2 * _MAX_SEEDS else \
        float(stats.t.ppf(1 - (1 - level) / 2, df))


@dataclass(frozen=True)
class Comparison:
    """A setting against the baseline's frontier at matched accuracy (module docstring).

    Attributes:
        gain: ``mse / frontier_mse - 1`` (geometric mean over seeds); ``None`` out of range.
        interval: ``(low, high)`` of the gain at ``level``; ``None`` with fewer than 2 seeds.
        verdict: ``more private`` / ``less private`` / ``undecided`` / ``no comparison``.
        n_seeds: The seeds the estimate rests on (paired: seeds with their own curve).
        paired: Whether per-seed gains against each seed's own curve were used.
        dropped: One line per seed left out of the estimate, and why.
        seeds_needed: More seeds estimated to decide an undecided verdict (see
            :func:`seeds_needed`); 0 when decided; ``None`` when unknown.
        per_seed: Each seed's gain against that seed's own baseline curve (seeds without a
            covering curve left out), whichever method; empty for cells without seeds.
        per_seed_interval: The t interval (n - 1 df) over ``per_seed``: the check that does
            not assume the setting's seed-to-seed spread is the baseline's (``None`` with
            fewer than 2 per-seed gains).
        accuracy: The setting's mean accuracy; mse: its mean MSE.
        baseline_mse: The frontier of the baseline's seed means at that accuracy.
        neighbours: Baseline cells whose points bracket that accuracy (they need seeds too
            when this setting does).
        log_gain, se, df: The estimate on the log scale, its standard error and degrees of
            freedom (``None`` where there is no interval).
        method: The interval's method: ``model`` or ``per_seed`` (see :func:`compare`).
        spread_p: Paired: :func:`~splitcem.study.frontier_stats.spread_test`'s p that the
            setting's runs follow the baseline's seed effects with the baseline's spread.
        reason: Words for the verdict.
    """

    gain: float | None
    interval: tuple[float, float] | None
    verdict: str
    n_seeds: int
    paired: bool
    dropped: tuple[str, ...]
    seeds_needed: int | None
    per_seed: dict[Any, float] = field(default_factory=dict)
    per_seed_interval: tuple[float, float] | None = None
    accuracy: float = float("nan")
    mse: float = float("nan")
    baseline_mse: float | None = None
    neighbours: tuple[Hashable, ...] = ()
    log_gain: float | None = None
    se: float | None = None
    df: int | None = None
    level: float = 0.95
    method: str = "model"
    spread_p: float | None = None
    reason: str = ""

    @property
    def low(self) -> float | None:
        return None if self.interval is None else self.interval[0]

    @property
    def high(self) -> float | None:
        return None if self.interval is None else self.interval[1]

    @property
    def seeds(self) -> int:
        return self.n_seeds

    @property
    def decided(self) -> bool:
        return self.verdict in (MORE, LESS)

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["per_seed"] = {str(k): v for k, v in self.per_seed.items()}
        d["neighbours"] = list(self.neighbours)
        d["per_seed_interval"] = None if self.per_seed_interval is None else \
            list(self.per_seed_interval)
        d.update(low=self.low, high=self.high, seeds=self.n_seeds)
        return d


#: the old name of a comparison's result
Matched = Comparison


def _neighbours(base: Mapping[Hashable, dict[Any, Point]], acc: float) -> tuple[Hashable, ...]:
    means = {k: np.mean(list(c.values()), axis=0) for k, c in base.items() if c}
    lo = [k for k, (a, _) in means.items() if a <= acc]
    hi = [k for k, (a, _) in means.items() if a >= acc]
    out = ([max(lo, key=lambda k: means[k][0])] if lo else []) + \
        ([min(hi, key=lambda k: means[k][0])] if hi else [])
    return tuple(dict.fromkeys(out))


def compare(baseline: Mapping[Any, Cell], cell: Cell, *, level: float = 0.95,
            paired: bool | None = None, method: str = "auto") -> Comparison:
    """A setting against the baseline's frontier at matched accuracy (module docstring).

    Args:
        baseline: The baseline's cells, e.g. ``{sigma: {seed: (accuracy, mse)}}``.
        cell: The setting's ``{seed: (accuracy, mse)}`` (or a sequence: unpaired).
        level: The interval's coverage.
        paired: ``None``: paired when at least 2 of the setting's seeds also ran the
            baseline; ``True`` / ``False`` forces it.
        method: ``model``: the additive model, residual variance pooled over all runs;
            ``per_seed`` (paired only): a t interval on the per-seed gains, n - 1 degrees
            of freedom; ``auto``: ``model``, but paired ``per_seed`` where
            :func:`~splitcem.study.frontier_stats.spread_test` rejects the pooled model's
            equal-spread assumption (p < 0.1).

    Example:
        >>> base = {0.1: {1: (0.80, 0.010), 2: (0.80, 0.0124), 3: (0.80, 0.0109)},
        ...         0.2: {1: (0.70, 0.020), 2: (0.70, 0.0236), 3: (0.70, 0.0222)}}
        >>> c = compare(base, {1: (0.75, 0.018), 2: (0.75, 0.0225), 3: (0.75, 0.0198)})
        >>> round(c.gain, 3), [round(v, 3) for v in c.interval], c.verdict, c.df, c.method
        (0.215, [0.166, 0.267], 'more private', 4, 'model')
        >>> {k: round(g, 3) for k, g in c.per_seed.items()}, c.paired
        ({1: 0.2, 2: 0.25, 3: 0.196}, True)
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
    base = {k: _pairs(c) for k, c in baseline.items()}
    own = _pairs(cell)
    acc, mse = (float(v) for v in np.mean(list(own.values()), axis=0)) if own else (np.nan,) * 2
    b = interp_mse(*baseline_curve(base), acc) if own else None
    common: dict[str, Any] = dict(accuracy=acc, mse=mse, baseline_mse=b, level=level,
                                  neighbours=_neighbours(base, acc) if own else ())
    seeded = isinstance(cell, Mapping)
    logs, no_curve = per_seed_gains(own, base) if seeded else ({}, [])
    per = {k: float(np.expm1(v)) for k, v in logs.items()}
    common["per_seed_interval"] = _t_interval(list(logs.values()), level)
    shared = [k for k in own if seeded and any(k in c for c in base.values())]
    use_paired = len(shared) >= 2 if paired is None else paired
    if not own:
        return Comparison(None, None, NO_COMPARISON, 0, False, (), None, reason="no runs",
                          method="model", **common)
    spread_p = spread_test(own, base) if use_paired and seeded else None
    if method == "auto":
        method = "per_seed" if spread_p is not None and spread_p < SPREAD_ALPHA else "model"
    method = method if use_paired else "model"
    common.update(method=method, spread_p=spread_p)
    dropped: list[str] = []
    lg: float | None
    if method == "per_seed":
        dropped = no_curve
        x = np.array(list(logs.values()))
        n = len(x)
        lg = float(x.mean()) if n else None
        se = float(x.std(ddof=1) / np.sqrt(n)) if n > 1 else None
        df = n - 1
    else:
        if use_paired:
            dropped = [f"seed {k}: no baseline run with seed {k} (adds nothing paired)"
                       for k in own if k not in shared]
        n = len(shared) if use_paired else len(own)
        lg, se, df = fit_gain(own, base, seed_effects=use_paired)
    if lg is None:
        return Comparison(None, None, NO_COMPARISON, n, use_paired, tuple(dropped), None, per,
                          reason="outside the baseline's accuracy range", **common)
    if se is None or df < 1:
        return Comparison(float(np.expm1(lg)), None, UNDECIDED, n, use_paired, tuple(dropped),
                          None, per, log_gain=lg, reason="one seed: no spread, no interval",
                          **common)
    half = _t(level, df) * se
    lo, hi = float(np.expm1(lg - half)), float(np.expm1(lg + half))
    v = verdict(float(np.expm1(lg)), lo, hi)
    need = 0 if v != UNDECIDED else seeds_needed(lg, se, n, df, level=level)
    why = f"{100 * level:.4g}% interval {'spans' if v == UNDECIDED else 'excludes'} 0"
    return Comparison(float(np.expm1(lg)), (lo, hi), v, n, use_paired, tuple(dropped), need,
                      per, log_gain=lg, se=se, df=df, reason=why, **common)


def _t_interval(logs: list[float], level: float) -> tuple[float, float] | None:
    if len(logs) < 2:
        return None
    x = np.asarray(logs)
    half = _t(level, len(x) - 1) * float(x.std(ddof=1)) / np.sqrt(len(x))
    return float(np.expm1(x.mean() - half)), float(np.expm1(x.mean() + half))


def matched_gain(cell: Cell, baseline: Mapping[Any, Cell], *, level: float = 0.95,
                 n_boot: int | None = None, seed: int | None = None) -> Comparison:
    """``compare(baseline, cell)``: the old entry point (``n_boot`` and ``seed`` are accepted
    and ignored: there is no bootstrap any more).

    Example:
        >>> m = matched_gain([(0.79, 0.015)], {0.1: [(0.80, 0.010)], 0.2: [(0.78, 0.014)]})
        >>> round(m.baseline_mse, 6), round(m.gain, 6), m.verdict
        (0.012, 0.25, 'undecided')
    """
    del n_boot, seed
    return compare(baseline, cell, level=level)
