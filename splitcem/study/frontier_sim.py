"""Simulated studies for checking the frontier's intervals (pure numpy; no training).

The default design is the committed CIFAR-10 CPU study (results/cifar10_cpu): noise sigma
0.1 / 0.15 / 0.2 on seeds 125 and 126, sigma 0.3 on 125; noise 0.1 + CEM lambda 1 and 10
on 125, lambda 3 on 125-127, with the committed seed means as the truth. Each study draws
every run's accuracy and worst-case MSE around them: a per-seed effect shared by every run
of that seed (log MSE sd 5%, accuracy sd 0.2 points), a per-run spread (accuracy sd 0.3
points; log MSE sd drawn per setting from 2-8%), and CEM's MSE set to ``(1 + gain)`` times
the piecewise-linear frontier through the noise settings' true points.
``tests/test_frontier_coverage.py`` and ``benchmarks/frontier_coverage.py`` use it;
:func:`until_decided` simulates the sweep's seeds-until-decided rounds on it
(``benchmarks/until_decided.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from splitcem.study.frontier import LESS, MORE, Comparison, compare

__all__ = ["BASE_TRUE", "CEM_ACC", "SHIPPED_SEEDS", "SWEEP_ADAPTIVE", "SWEEP_START", "Design",
           "coverage", "simulate", "unpaired", "until_decided"]

#: true (accuracy, MSE) of the noise settings: the committed seed means
BASE_TRUE = {0.1: (0.7928, 0.00947), 0.15: (0.78395, 0.01092), 0.2: (0.7717, 0.01262),
             0.3: (0.7504, 0.01600)}
#: true accuracy of the CEM settings (noise 0.1 + lambda)
CEM_ACC = {1.0: 0.7912, 3.0: 0.7855, 10.0: 0.7587}
Design = Mapping[str, Mapping[float, list[int]]]  # {"base" | "cem": {key: seeds}}
SHIPPED_SEEDS: Design = {"base": {0.1: [125, 126], 0.15: [125, 126], 0.2: [125, 126],
                                  0.3: [125]},
                         "cem": {1.0: [125], 3.0: [125, 126, 127], 10.0: [125]}}
Study = tuple[dict[float, dict[int, tuple[float, float]]],
              dict[float, dict[int, tuple[float, float]]]]


def frontier_true(acc: float) -> float:
    """The true noise frontier's MSE at ``acc`` (linear between the true points)."""
    a, m = zip(*sorted(BASE_TRUE.values()), strict=True)
    return float(np.interp(acc, a, m))


def unpaired(design: Design = SHIPPED_SEEDS) -> Design:
    """The same seed counts, every run on a seed of its own (nothing to pair)."""
    nxt = iter(range(1000, 100000))
    return {part: {k: [next(nxt) for _ in s] for k, s in cells.items()}
            for part, cells in design.items()}


def simulate(rng: np.random.Generator, gain: float, design: Design = SHIPPED_SEEDS, *,
             seed_sd: float = 0.05, seed_acc_sd: float = 0.002, run_acc_sd: float = 0.003,
             run_sd: tuple[float, float] = (0.02, 0.08), cem_extra_sd: float = 0.0) -> Study:
    """One study: (baseline cells, CEM cells), each ``{key: {seed: (acc, mse)}}``.

    Example:
        >>> base, cem = simulate(np.random.default_rng(0), 0.2)
        >>> sorted(base), sorted(cem), sorted(cem[3.0])
        ([0.1, 0.15, 0.2, 0.3], [1.0, 3.0, 10.0], [125, 126, 127])
    """
    seeds = sorted({s for part in design.values() for c in part.values() for s in c})
    u = dict(zip(seeds, rng.normal(0, seed_sd, len(seeds)), strict=True))
    v = dict(zip(seeds, rng.normal(0, seed_acc_sd, len(seeds)), strict=True))
    truth = {("base", k): p for k, p in BASE_TRUE.items()}
    truth |= {("cem", k): (a, (1 + gain) * frontier_true(a)) for k, a in CEM_ACC.items()}
    out: dict[str, dict[float, dict[int, tuple[float, float]]]] = {"base": {}, "cem": {}}
    for part, cells in design.items():
        for k, ss in cells.items():
            a0, m0 = truth[(part, k)]
            sd = rng.uniform(*run_sd)  # this setting's own run-to-run spread
            if part == "cem":
                sd = float(np.hypot(sd, cem_extra_sd))
            out[part][k] = {s: (a0 + v[s] + rng.normal(0, run_acc_sd),
                                m0 * float(np.exp(u[s] + rng.normal(0, sd)))) for s in ss}
    return out["base"], out["cem"]


def _false(c: Comparison, gain: float) -> bool:
    """A false verdict: any verdict at ``gain == 0``, the wrong sign otherwise."""
    return (c.verdict == (LESS if gain > 0 else MORE)) if gain else c.decided


def coverage(gain: float, n: int = 2000, design: Design = SHIPPED_SEEDS, *,
             rng_seed: int = 20261201,
             method: Callable[[Any, Any], Comparison] | None = None,
             **sim: Any) -> dict[str, float]:
    """Coverage and false-verdict rates of ``method`` (default :func:`compare`) over ``n``
    simulated studies, counted over the settings that got an interval.

    A false verdict is any verdict at ``gain == 0`` and the wrong sign otherwise.
    """
    rng = np.random.default_rng(rng_seed)
    fn = method or compare
    covered = false = with_interval = verdicts = 0
    for _ in range(n):
        base, cem = simulate(rng, gain, design, **sim)
        for cell in cem.values():
            c = fn(base, cell)
            if c.interval is None:
                continue
            with_interval += 1
            covered += c.interval[0] <= gain <= c.interval[1]
            verdicts += c.decided
            false += _false(c, gain)
    k = max(with_interval, 1)
    return {"coverage": covered / k, "false_verdicts": false / k, "verdicts": verdicts / k,
            "with_interval": with_interval}


#: the bundled sweep's frontier after its first round: seeds per cell (noise sigma; CEM lambda)
SWEEP_START = {"base": {0.1: 2, 0.15: 2, 0.2: 2, 0.3: 2}, "cem": {1.0: 2, 3.0: 3, 10.0: 2}}
#: the settings it seeds until decided (max 8)
SWEEP_ADAPTIVE = (3.0, 10.0)


def until_decided(gain: float, n: int = 1000, *, level: float | None = None, looks: int = 7,
                  max_seeds: int = 8, rng_seed: int = 20261205, reach: bool = True
                  ) -> dict[str, float]:
    """Error rates of *seeds until decided* over ``n`` simulated studies of the bundled
    sweep's frontier (:data:`SWEEP_START`, :data:`SWEEP_ADAPTIVE`).

    Each study draws every cell's runs for seeds 125 to 125 + ``max_seeds`` - 1 up front and
    reveals those the planner (:func:`~splitcem.study.frontier_plan.next_seeds`, as
    :mod:`splitcem.study.adaptive` calls it) asks for, round by round, judging each setting
    at ``level`` (default: :func:`~splitcem.study.frontier_plan.sequential_level` of
    ``looks``), until every adaptive setting is decided or at ``max_seeds``; its final
    comparison at the same level is scored (``reach=False``: settings whose decision is out
    of reach of ``max_seeds`` are seeded on anyway, the planner's ``reach``). Rates are over
    the adaptive settings:
    ``false`` (any verdict at ``gain == 0``, the wrong sign otherwise), ``verdicts``,
    ``coverage`` (of the final interval, where there is one) and mean ``seeds``.
    """
    from splitcem.study.frontier_plan import SeedPolicy, next_seeds, sequential_level

    lvl = sequential_level(looks) if level is None else level
    seeds = list(range(125, 125 + max_seeds))
    rng = np.random.default_rng(rng_seed)
    false = verdicts = covered = intervals = total = n_seeds = 0
    for _ in range(n):
        full = simulate(rng, gain, {part: {k: seeds for k in cells}
                                    for part, cells in SWEEP_START.items()})
        shown = [{k: {s: full[i][k][s] for s in seeds[:m]} for k, m in cells.items()}
                 for i, cells in enumerate(SWEEP_START.values())]
        base, cem = shown
        while True:
            plan = next_seeds(base, {k: cem[k] for k in SWEEP_ADAPTIVE},
                              SeedPolicy(1, max_seeds, "decided"), level=lvl, reach=reach)
            if plan.done:
                break
            for i, part in ((0, plan.baseline), (1, plan.settings)):
                for k, ss in part.items():
                    shown[i][k].update({s: full[i][k][s] for s in ss})  # type: ignore[index]
        for k in SWEEP_ADAPTIVE:
            c = compare(base, cem[k], level=lvl)
            total += 1
            n_seeds += len(cem[k])
            verdicts += c.decided
            false += _false(c, gain)
            if c.interval is not None:
                intervals += 1
                covered += c.interval[0] <= gain <= c.interval[1]
    return {"false": false / total, "verdicts": verdicts / total,
            "coverage": covered / max(intervals, 1), "seeds": n_seeds / total, "level": lvl}
