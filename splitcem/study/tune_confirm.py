"""``--confirm-seeds N``: re-run the recommendation and the noise-only settings around its
accuracy with more seeds, one seed at a time, until the gain's verdict is decided
(:func:`splitcem.study.frontier.compare`) or N seeds ran. Every run goes through the sweep
engine (:func:`splitcem.study.trials.run_trials`) into the tune's ``trials`` folder, so a
kill loses at most the runs in flight and a second call pays for nothing already done."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from splitcem.record import RunRecord
from splitcem.study.frontier_plan import sequential_level
from splitcem.study.grid import Trial
from splitcem.study.space import NOISE, SearchSpace
from splitcem.study.trials import Engine, run_trials
from splitcem.study.tune_report import gain_over_noise, recommend, settings

if TYPE_CHECKING:
    from splitcem.study.tune import TuneResult

__all__ = ["confirm"]

log = logging.getLogger(__name__)


def confirm(result: TuneResult, space: SearchSpace, base: dict[str, Any], seeds: int, *,
            engine: Engine | None = None) -> None:
    """Add seeds to the recommendation and its noise neighbours until decided (in place);
    ``engine`` runs them (:class:`~splitcem.study.trials.Engine`; its ``adopt`` folders are
    the tune's warm-start runs)."""
    from splitcem.study.tune import Observation, _observation

    tdir = result.out / "trials"
    # judged at 2, 3, ..., seeds seeds: each look at the level that keeps 5% over all
    result.looks = max(seeds - 1, 1)
    level = sequential_level(result.looks)
    for _ in range(seeds):
        sets = settings(result.observations, space)
        ranked = recommend(sets, result.budget)
        if not ranked:
            return
        best = ranked[0]
        cmp = gain_over_noise(best, sets, level=level)
        if cmp is None or cmp.decided or len(best.seeds) >= seeds:
            return
        targets = [best] + [s for s in sets if s.family == NOISE and s.label in cmp.neighbours]
        seed = max(o.seed for s in targets for o in s.runs) + 1
        trials = []
        for s in targets:
            name = f"{s.label}_s{seed}"
            cfg = space.config(base, s.family, s.values, name=name, seed=seed)
            trials.append(Trial(name, cfg, seed, dict(s.values), s.family))
        log.info("confirm: seed %d for %s (verdict so far: %s)", seed,
                 ", ".join(t.name for t in trials), cmp.verdict)
        run_trials(trials, tdir, name="confirm", engine=engine)
        for t in trials:
            o: Observation = _observation(RunRecord.load(tdir / t.name), t.variant, t.values,
                                          "confirm")
            result.observations.append(o)
            result.ran.append(t.name)
