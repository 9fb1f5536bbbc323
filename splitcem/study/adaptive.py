"""Seeds until decided: the engine's adaptive rounds (issue 18 item 4).

A sweep file's ``seeds: {min: 2, max: 8, until: decided}`` (per variant or at the top
level) makes each of its settings start with ``min`` seeds (:mod:`splitcem.study.grid`).
:func:`run_until_decided` runs those, then in rounds: reads the finished runs' records (only
through :class:`splitcem.record.RunRecord`), asks :func:`splitcem.study.frontier_plan.next_seeds`
which seeds the settings still undecided against their baseline need (a CEM setting's own
curve: the same defense without CEM over its strength, so noise alone for noise + CEM and
top-k for top-k + CEM; any other setting: noise alone), closest to a decision first; the
baseline cells around each setting's accuracy get the same seed, so the new runs pair; runs
them (the baseline whose setting is closest to a decision first), and asks again, until every
such setting is decided or at ``max``.

Nothing is kept between invocations but the run directories: re-running a sweep finds the
seeds earlier rounds added (``OUT/{stem}_s{seed}`` finished for that setting's config at that
seed) and resumes from there. A planned trial that was already tried in this invocation
(e.g. it failed) ends the rounds, so a failing trial cannot loop.

:func:`plan_round` is the pure-ish planning step (it reads records, runs nothing).
"""

from __future__ import annotations

import logging
import math
import re
from collections import defaultdict
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from splitcem.config import RunConfig
from splitcem.record import RunRecord, comparable
from splitcem.report import attack_metric
from splitcem.study.frontier_plan import SeedPlan, SeedPolicy, next_seeds, sequential_level
from splitcem.study.grid import Trial

if TYPE_CHECKING:
    from splitcem.study.trials import GridResult

__all__ = ["adaptive", "finished_cells", "looks", "plan_round", "run_until_decided",
           "with_earlier_rounds"]

log = logging.getLogger(__name__)

Point = tuple[float, float]


def adaptive(trials: Sequence[Trial]) -> bool:
    """Whether any trial's setting asks for seeds until decided."""
    return any(t.policy is not None and t.policy.until == "decided" for t in trials)


def looks(trials: Sequence[Trial]) -> int:
    """The most times any setting of ``trials`` may be judged (its policy's
    :attr:`~splitcem.study.frontier_plan.SeedPolicy.looks`; 1 for fixed seeds): what the
    frontier of their runs is read with (``splitcem frontier --looks``)."""
    return max((t.policy.looks for t in trials if t.policy is not None), default=1)


def _stems(trials: Sequence[Trial]) -> dict[str, Trial]:
    out: dict[str, Trial] = {}
    for t in trials:
        out.setdefault(t.setting, t)
    return out


def _finished_in(adopt: Sequence[RunRecord], cfg: RunConfig, *,
                 device: str | None) -> RunRecord | None:
    """An ``--adopt`` run finished for exactly ``cfg`` (what the sweep would copy), if any."""
    return next((r for r in adopt if r.config is not None and r.config.seed == cfg.seed
                 and r.finished(cfg, device=device)), None)


def with_earlier_rounds(trials: Sequence[Trial], out: Path, *, device: str | None = None,
                        adopt: Sequence[RunRecord] = (),
                        queued: Collection[str] = ()) -> list[Trial]:
    """``trials`` and, after them, the trials earlier rounds added: ``OUT/{stem}_s{seed}``
    finished for a setting's config at that seed (an adaptive setting's, or a baseline
    cell's that paired with one), not among ``trials``; with ``adopt`` (the ``--adopt``
    folders' runs), also a run there finished for a setting's config at another seed, which
    the sweep copies instead of training (so a fresh ``--out`` that adopts an earlier sweep's
    runs starts where that sweep stood); and a trial a sweep started in ``out`` for a
    setting's config at another seed but did not finish (killed mid-round: it resumes, and
    ``--list`` shows it); and one named in ``queued`` (the round the last sweep into ``out``
    planned and had not started: :func:`splitcem.study.trials.queued`; a restarted sweep runs
    it, ``--list`` shows it), those last, in their queued order. What a sweep runs, lists
    and plans from."""
    have = {t.name for t in trials}
    found: list[Trial] = list(trials)
    if not adaptive(trials):
        return found
    names = sorted(({d.name for d in out.iterdir()} if out.is_dir() else set()) | set(queued))
    adopted_seeds = sorted({r.config.seed for r in adopt if r.config is not None})
    for stem, t in _stems(trials).items():
        pat = re.compile(re.escape(stem) + r"_s(\d+)")
        seeds = [int(m.group(1)) for n in names if (m := pat.fullmatch(n))]
        for seed in sorted(set(seeds) | set(adopted_seeds)):
            extra = t.with_seed(seed)
            if extra.name in have:
                continue
            rec = RunRecord.load(out / extra.name)
            started = bool(rec.trial) and rec.config is not None and \
                comparable(rec.config.to_dict()) == comparable(extra.cfg.to_dict())
            if started or extra.name in queued or rec.finished(extra.cfg, device=device) \
                    or _finished_in(adopt, extra.cfg, device=device) is not None:
                found.append(extra)
                have.add(extra.name)
    order = {n: i for i, n in enumerate(queued)}  # the rest keep their place, before these
    return [*found[:len(trials)],
            *sorted(found[len(trials):], key=lambda t: order.get(t.name, -1))]


def finished_cells(trials: Sequence[Trial], out: Path, *, device: str | None = None,
                   adopt: Sequence[RunRecord] = ()) -> dict[str, dict[int, Point]]:
    """``{stem: {seed: (accuracy, worst-case MSE)}}`` of the trials finished in ``out``, or
    (``adopt``: the ``--adopt`` folders' runs) finished there, which the sweep would copy."""
    cells: dict[str, dict[int, Point]] = defaultdict(dict)
    for t in trials:
        here = RunRecord.load(out / t.name)
        rec = here if here.finished(t.cfg, device=device) else \
            _finished_in(adopt, t.cfg, device=device)
        if rec is not None:
            cells[t.setting][t.seed] = (
                rec.accuracy, attack_metric(rec.metrics, "mse"))
    return dict(cells)


def _roles(stems: dict[str, Trial], baseline: str | None) -> tuple[list[str], list[str]]:
    """(baseline stems, compared stems), grouped as the frontier report groups runs."""
    from splitcem.study.groups import FrontierRun, group_runs

    runs = [FrontierRun(Path(stem), t.cfg, {}) for stem, t in stems.items()]
    groups = group_runs(runs)
    if baseline is None:  # noise alone; where several contexts have it, the largest
        noise = [g for g, rs in groups.items() if rs[0].family == "noise"]
        baseline = max(noise, key=lambda g: (len(groups[g]), g == "noise")) if noise else None
    if baseline is None or baseline not in groups:
        return [], []
    base = baseline
    return ([str(r.path) for r in groups[base]],
            [str(r.path) for g, rs in groups.items() if g != base for r in rs])


def _own_curves(stems: dict[str, Trial]) -> dict[str, list[str]]:
    """Each CEM setting's own curve: the stems of the same defense without CEM over its
    strength (:func:`splitcem.study.paper.curve_key`); settings without one are absent."""
    from splitcem.study.paper import cem_lambda, curve_key

    keys = {s: curve_key(t.cfg) for s, t in stems.items()}
    with_cem = {s for s, t in stems.items() if cem_lambda(t.cfg) > 0}
    plain: dict[str, list[str]] = defaultdict(list)
    for s in sorted(set(stems) - with_cem):
        plain[keys[s]].append(s)
    return {s: plain[keys[s]] for s in with_cem if plain.get(keys[s])}


def plan_round(trials: Sequence[Trial], out: Path, *, device: str | None = None,
               baseline: str | None = None, level: float = 0.95, per_round: int | None = None,
               adopt: Sequence[RunRecord] = (), busy: Collection[str] = ()
               ) -> tuple[list[Trial], list[str]]:
    """The trials the next round adds (seeds for undecided settings and their baseline
    neighbours), and the planner's notes; reads the finished runs in ``out`` (those of
    earlier rounds too). A setting with CEM is judged against its own curve (the same defense
    without CEM over its strength: for noise + CEM, noise alone), any other against
    ``baseline`` (default: noise alone). It counts as decided when its interval at
    :func:`~splitcem.study.frontier_plan.sequential_level` (``level`` spread over
    :func:`looks`: the most looks any setting's policy allows, the level the sweep's report
    reads every setting at) excludes 0. ``per_round``: at most this many undecided settings get a
    seed this round, across all baselines, closest to a decision first (the sweep file's
    ``per_round``); ``None``: every one. ``adopt``: the ``--adopt`` folders' runs, which count
    as finished where the sweep would copy them (:func:`with_earlier_rounds`). ``busy``:
    settings (stems) with a trial still running; a setting whose own runs or baseline runs
    are among them waits (its next seed is planned once they have finished)."""
    trials = with_earlier_rounds(trials, out, device=device, adopt=adopt)
    # one level for every setting: the one the sweep's report reads its study at (the most
    # looks any setting may have), so the planner stops seeding a setting exactly when the
    # report reads it decided (a level per setting's own looks could stop one that the
    # report, at the stricter level, still shows undecided)
    n_looks = looks(trials)
    stems = _stems(trials)
    base, compared = _roles(stems, baseline)
    own = _own_curves(stems) if baseline is None else {}
    cells = finished_cells(trials, out, device=device, adopt=adopt)

    # min is past: what matters now is the baseline (a CEM setting's own curve, else noise
    # alone) and max
    by_policy: dict[tuple[tuple[str, ...], int], list[str]] = defaultdict(list)
    waiting: list[str] = []  # said, so that a listing does not drop these settings silently
    for s in compared:
        pol = stems[s].policy
        if pol is None or pol.until != "decided" or not cells.get(s):
            continue
        curve = own.get(s) or base
        if running := sorted({s, *curve} & set(busy)):
            waiting.append(f"{s!r}: waits for the trials left of {', '.join(running)} "
                           "(running or queued), then its next seed is planned")
        else:
            by_policy[(tuple(curve), pol.max)].append(s)

    def plan(key: tuple[tuple[str, ...], int], cap: int | None = None) -> SeedPlan:
        curve, most = key
        return next_seeds({b: cells[b] for b in curve if cells.get(b)},
                          {s: cells[s] for s in by_policy[key]}, SeedPolicy(1, most, "decided"),
                          per_round=cap, level=sequential_level(n_looks, level))

    plans = {key: plan(key) for key in sorted(by_policy)}
    if per_round is not None:  # the round's cap across baselines: the smallest ranks stay
        kept = sorted(r for p in plans.values() for r in p.ranks.values())[:per_round]
        plans = {key: plan(key, sum(r in kept for r in p.ranks.values()))
                 for key, p in plans.items()}
    notes = [n for p in plans.values() for n in p.notes] + waiting
    # cheapest decisions first: the plan whose best setting is closest to a decision runs
    # first (a round of the zoo is many core-hours; what ends mid-round has decided most)
    order = sorted(plans.values(), key=lambda p: min(p.ranks.values(),
                                                     default=(math.inf, 0.0, 0, "")))
    new: dict[str, Trial] = {}
    for p in order:
        for stem, seeds in [*p.baseline.items(), *p.settings.items()]:
            for seed in seeds:
                t = stems[str(stem)].with_seed(seed)
                new.setdefault(t.name, t)
    return list(new.values()), notes


def run_until_decided(trials: Sequence[Trial], out: Path,
                      run: Callable[[list[Trial], Callable[[], list[Trial]] | None],
                                    GridResult], *,
                      device: str | None = None, baseline: str | None = None,
                      per_round: int | None = None,
                      adopt: Sequence[RunRecord] = (),
                      queued: Collection[str] = ()) -> GridResult:
    """Run ``trials`` (``run(trials, refill)``: the engine, e.g.
    :func:`splitcem.study.trials.run_trials` bound to its options; returns a
    :class:`~splitcem.study.trials.GridResult`), then add seeds in rounds until every
    adaptive setting is decided or at its ``max``; ``per_round`` caps the settings each
    round grows (:func:`plan_round`); ``adopt``: the runs of the engine's ``--adopt``
    folders (a seed an earlier sweep added there joins this one, and ``run`` copies it);
    ``queued``: the round a stopped sweep into ``out`` planned and had not started
    (:func:`splitcem.study.trials.queued`), which runs before any new round is planned.

    A round is planned as soon as a slot of the engine is free and nothing is queued (the
    engine calls ``refill``), not only once every trial has ended: the settings whose runs
    are still running wait for a later round (``busy``), the others are planned from the
    runs finished so far, so a round's last trial does not leave the other cores idle."""
    todo = with_earlier_rounds(trials, out, device=device, adopt=adopt, queued=queued)
    tried = {t.name for t in todo}
    rounds = 0

    def next_round(busy: Collection[str] = ()) -> list[Trial]:
        nonlocal rounds
        new, notes = plan_round(todo, out, device=device, baseline=baseline,
                                per_round=per_round, adopt=adopt, busy=busy)
        for n in notes:
            log.info("seeds until decided: %s", n)
        fresh = [t for t in new if t.name not in tried]
        if not fresh:
            if new and not busy:
                log.warning("seeds until decided: the plan repeats trials already tried here "
                            "(%s); stopping", ", ".join(sorted(t.name for t in new)))
            return []
        rounds += 1
        log.info("seeds until decided, round %d%s: %s", rounds,
                 f" (while the trials left of {', '.join(sorted(busy))} run)" if busy else "",
                 ", ".join(t.name for t in fresh))
        todo.extend(fresh)
        tried.update(t.name for t in fresh)
        return fresh

    def refill() -> list[Trial]:  # a slot is free, nothing queued: trials still run
        busy = {t.setting for t in todo
                if not RunRecord.load(out / t.name).finished(t.cfg, device=device)}
        return next_round(busy)

    res = run(todo, refill)
    ran, adopted = list(res.ran), list(res.adopted)
    bound = sum(t.policy.max for t in _stems(todo).values() if t.policy is not None) + \
        len(_stems(todo))  # each round adds at least one run; no cell passes max
    while rounds < bound:
        fresh = next_round()
        if not fresh:
            break
        res = run(todo, refill)
        ran += res.ran
        adopted += res.adopted
    res.ran, res.adopted = ran, adopted
    res.skipped = [n for n in res.skipped if n not in ran and n not in adopted]
    return res
