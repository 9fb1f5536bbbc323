"""``--confirm-seeds N``: re-run the recommendation and the noise-only settings around its
accuracy with more seeds, one seed at a time, until the gain's verdict is decided
(:func:`splitcem.study.frontier.compare`), N seeds ran, or a decision is out of reach of N
seeds at the spread seen (:func:`splitcem.study.frontier.within_reach`). A recommendation
outside noise alone's accuracy range (no comparison: the curve is never extrapolated) first
gets the noise setting that brackets it (:func:`bracket`), on its own seeds. Every run goes
through the sweep engine (:func:`splitcem.study.trials.run_trials`) into the tune's
``trials`` folder, so a kill loses at most the runs in flight and a second call pays for
nothing already done."""

from __future__ import annotations

import itertools
import logging
from typing import TYPE_CHECKING, Any

from splitcem.record import RunRecord
from splitcem.study.frontier import NO_COMPARISON, within_reach
from splitcem.study.frontier_plan import sequential_level
from splitcem.study.grid import Trial
from splitcem.study.space import NOISE, SearchSpace
from splitcem.study.trials import Engine, run_trials
from splitcem.study.tune_report import Setting, gain_over_noise, recommend, settings

if TYPE_CHECKING:
    from splitcem.study.tune import TuneResult

__all__ = ["bracket", "confirm"]

log = logging.getLogger(__name__)

#: noise settings run at most to bring a recommendation inside noise alone's accuracy range
_BRACKETS = 3


def bracket(best: Setting, sets: list[Setting], space: SearchSpace) -> dict[str, Any] | None:
    """The noise-alone values to run so that noise's accuracy range covers ``best``'s.

    First noise at ``best``'s own strength (a CEM setting adds to a noise sigma: without CEM
    it is the more accurate point); then, from the noise setting nearest in accuracy, half its
    strength (above the range) or twice it (below), within the space's range: noise alone's
    accuracy falls as its strength grows. ``None`` when the noise family has no single
    range to move along, or the step is at the range's end or was run already.
    """
    fam = space.family(NOISE)
    ranged = [p for p in fam.params if not p.choices]
    noise = [s for s in sets if s.family == NOISE]
    if len(ranged) != 1 or not noise:
        return None
    p = ranged[0]
    run = {s.values.get(p.key) for s in noise}
    own = best.values.get(p.key, space.family(best.family).consts.get(p.key))
    if isinstance(own, int | float) and p.contains(own) and p.round(own) not in run:
        v = p.round(own)
    else:
        above = best.accuracy > max(s.accuracy for s in noise)
        near = (max if above else min)(noise, key=lambda s: s.accuracy)
        v = p.round(float(near.values[p.key]) * (0.5 if above else 2.0))
        if v in run:
            return None
    return {**{q.key: q.middle() for q in fam.params if q is not p}, p.key: v}


def confirm(result: TuneResult, space: SearchSpace, base: dict[str, Any], seeds: int, *,
            engine: Engine | None = None) -> None:
    """Add seeds to the recommendation and its noise neighbours until decided (in place);
    ``engine`` runs them (:class:`~splitcem.study.trials.Engine`; its ``adopt`` folders are
    the tune's warm-start runs)."""
    # judged at 2, 3, ..., seeds seeds: each look at the level that keeps 5% over all
    result.looks = max(seeds - 1, 1)
    level = sequential_level(result.looks)
    brackets = 0
    for _ in range(seeds + _BRACKETS):
        sets = settings(result.observations, space)
        ranked = recommend(sets, result.budget)
        if not ranked:
            return
        best = ranked[0]
        cmp = gain_over_noise(best, sets, level=level)
        if cmp is not None and cmp.verdict == NO_COMPARISON:
            vals = bracket(best, sets, space) if brackets < _BRACKETS else None
            if vals is None:
                log.info("confirm: %s lies outside noise alone's accuracy range and no noise "
                         "setting can bracket it: no comparison", best.label)
                return
            label = space.label(NOISE, vals)
            log.info("confirm: %s lies outside noise alone's accuracy range: %s on its seeds",
                     best.label, label)
            _run(result, space, base, [(NOISE, vals, label, s) for s in best.seeds], engine)
            brackets += 1
            continue
        if cmp is None or cmp.decided or len(best.seeds) >= seeds:
            return
        if not within_reach(cmp, seeds):
            more = "not within a thousand" if cmp.seeds_needed is None else \
                f"about {cmp.seeds_needed} more"
            log.info("confirm: %s stays undecided: out of reach of %d seeds (%s seeds at "
                     "this spread)", best.label, seeds, more)
            return
        # the recommendation's next seed (the lowest it lacks), on it and on the noise
        # settings around its accuracy that lack it: warm-start runs' seeds are reused
        targets = [best] + [s for s in sets if s.family == NOISE and s.label in cmp.neighbours]
        seed = next(k for k in itertools.count(min(best.seeds)) if k not in best.seeds)
        targets = [s for s in targets if seed not in s.seeds]
        log.info("confirm: seed %d for %s (verdict so far: %s)", seed,
                 ", ".join(s.label for s in targets), cmp.verdict)
        _run(result, space, base, [(s.family, s.values, s.label, seed) for s in targets],
             engine)


def _run(result: TuneResult, space: SearchSpace, base: dict[str, Any],
         points: list[tuple[str, dict[str, Any], str, int]], engine: Engine | None) -> None:
    """Run ``(family, values, label, seed)`` points into the tune's trials folder and add
    them to its observations."""
    from splitcem.study.tune import Observation, _observation

    tdir = result.out / "trials"
    trials = []
    for fam, vals, label, seed in points:
        name = f"{label}_s{seed}"
        cfg = space.config(base, fam, vals, name=name, seed=seed)
        trials.append(Trial(name, cfg, seed, dict(vals), fam))
    run_trials(trials, tdir, name="confirm", engine=engine)
    for t in trials:
        o: Observation = _observation(RunRecord.load(tdir / t.name), t.variant, t.values,
                                      "confirm")
        result.observations.append(o)
        result.ran.append(t.name)
