"""Seeds until decided: which runs a study needs next (pure; issue 18 item 4).

A sweep's ``seeds: {min: 2, max: 8, until: decided}`` becomes a :class:`SeedPolicy`;
:func:`next_seeds` reads the runs so far (``{key: {seed: (accuracy, mse)}}`` for the baseline
and for the compared settings) and returns a :class:`SeedPlan`: the seeds each cell should
run next. The caller runs them, then asks again, until the plan is empty.

Rules, in order:

1. Every cell (baseline or setting) below ``min`` seeds gets seeds up to ``min``; nothing
   else is planned in that round (verdicts on fewer seeds are not used to steer).
2. With ``until: decided``, each undecided setting below ``max`` seeds is a candidate,
   closest to a decision first (fewest :func:`~splitcem.study.frontier.seeds_needed`, unknown
   last; among equals, and where one seed gives no spread to count with, the largest gain
   either way first: at a common spread, seeds needed fall with the gain squared); each
   chosen setting gets one more seed, and the baseline cells around its accuracy
   (:attr:`~splitcem.study.frontier.Comparison.neighbours`) get the same seed where they lack
   it and are below ``max``, so the new run is paired; a seed the setting ran and its
   neighbours did not is paired first (neighbours only, no new run of the setting).
3. Settings outside the baseline's accuracy range, decided, at ``max``, or whose decision
   is out of reach of ``max`` (:func:`~splitcem.study.frontier.within_reach`: from 3 seeds
   on, :func:`~splitcem.study.frontier.seeds_needed` at the spread seen says more than twice
   ``max`` seeds in all) are left alone (the plan's ``notes`` say which). Leaving an
   out-of-reach setting undecided never makes a verdict: it saves runs, costs only power.

Seeds are reused before new ones are drawn: the seeds most cells already ran first (so runs
pair), then fresh seeds after the largest seen.

**Looking more than once.** A 95% interval read after every added seed, stopping at the first
verdict, gives a verdict at a true gain of 0 far more often than 5% (optional stopping: 11.9%
on the bundled sweep's frontier, ``python benchmarks/until_decided.py``). So a setting seeded
until decided is decided, by the planner and in the report, at
:func:`sequential_level`: the level that keeps the chance of any false verdict over all its
possible looks (``min`` to ``max`` seeds: :attr:`SeedPolicy.looks`) at most 5% (Bonferroni:
valid whatever the looks' dependence). ``splitcem frontier --looks N`` reads a study that way.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

from splitcem.errors import ConfigError
from splitcem.study.frontier import Point, compare, within_reach

__all__ = ["SeedPlan", "SeedPolicy", "next_seeds", "sequential_level"]

Cells = Mapping[Any, Mapping[int, Point]]
#: A setting's place in the queue for a seed, smaller first (:attr:`SeedPlan.ranks`).
Rank = tuple[float, float, int, str]


def sequential_level(looks: int, level: float = 0.95) -> float:
    """The interval level at each of up to ``looks`` looks that keeps the chance of a false
    verdict over all of them at most ``1 - level`` (Bonferroni).

    Example:
        >>> sequential_level(1), round(sequential_level(7), 5)
        (0.95, 0.99286)
    """
    if isinstance(looks, bool) or not isinstance(looks, int) or looks < 1:
        raise ConfigError(f"looks must be an integer >= 1, not {looks!r}")
    if not 0 < level < 1:
        raise ConfigError(f"level must be in (0, 1), not {level!r}")
    return 1 - (1 - level) / looks


@dataclass(frozen=True)
class SeedPolicy:
    """How many seeds a study runs per cell.

    Attributes:
        min: Seeds every cell runs first.
        max: Seeds no cell goes beyond.
        until: ``"decided"``: between ``min`` and ``max``, add seeds to undecided settings;
            ``None``: ``min`` seeds and stop.

    Example:
        >>> SeedPolicy.parse({"min": 2, "max": 8, "until": "decided"})
        SeedPolicy(min=2, max=8, until='decided')
        >>> SeedPolicy.parse(3)
        SeedPolicy(min=3, max=3, until=None)
        >>> SeedPolicy(min=4, max=2)
        Traceback (most recent call last):
        ...
        splitcem.errors.ConfigError: seeds: min (4) must be at most max (2)
    """

    min: int = 2
    max: int = 8
    until: str | None = "decided"

    def __post_init__(self) -> None:
        for name in ("min", "max"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"seeds: {name} must be an integer >= 1, not {v!r}")
        if self.min > self.max:
            raise ConfigError(f"seeds: min ({self.min}) must be at most max ({self.max})")
        if self.until not in ("decided", None):
            raise ConfigError(f"seeds: until must be 'decided' or absent, not {self.until!r}")

    @property
    def looks(self) -> int:
        """How many times a setting may be judged: at ``min`` seeds and after each one added
        up to ``max`` (1 for fixed seeds)."""
        return self.max - self.min + 1 if self.until == "decided" else 1

    @classmethod
    def parse(cls, spec: int | Mapping[str, Any]) -> SeedPolicy:
        """A policy from a sweep file's ``seeds:`` value (an integer: that many, fixed)."""
        if isinstance(spec, int) and not isinstance(spec, bool):
            return cls(spec, spec, None)
        if not isinstance(spec, Mapping):
            raise ConfigError(f"seeds: expected an integer or {{min, max, until}}, not {spec!r}")
        unknown = sorted(set(spec) - {"min", "max", "until"})
        if unknown:
            raise ConfigError(f"seeds: unknown key(s) {unknown}; known: min, max, until")
        return cls(**dict(spec))


@dataclass(frozen=True)
class SeedPlan:
    """The runs to start next: seeds per baseline cell and per setting, and why.

    Attributes:
        baseline: New seeds per baseline cell (only cells with any).
        settings: New seeds per compared setting (only settings with any).
        notes: One line per setting (or cell) on why it does or does not get seeds.
        ranks: Per setting that gets a seed under rule 2, the order it was chosen in,
            smaller first: (seeds needed to decide, ``inf`` when unknown; minus its absolute
            log gain; its seeds so far; its name). ``settings`` is in that order; a caller
            running several plans runs the one with the smallest rank first, and a caller
            capping a round across plans (:func:`splitcem.study.adaptive.plan_round`) keeps
            the smallest ranks.
    """

    baseline: dict[Hashable, tuple[int, ...]] = field(default_factory=dict)
    settings: dict[Hashable, tuple[int, ...]] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    ranks: dict[Hashable, Rank] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        """Nothing left to run."""
        return not self.baseline and not self.settings

    @property
    def runs(self) -> int:
        return sum(map(len, self.baseline.values())) + sum(map(len, self.settings.values()))


def _check(cells: Cells, what: str) -> None:
    for k, c in cells.items():
        if not isinstance(c, Mapping):
            raise ConfigError(f"{what} {k!r}: give its runs as {{seed: (accuracy, mse)}}, so "
                              "new seeds can pair with the others")


def next_seeds(baseline: Cells, settings: Cells, policy: SeedPolicy, *,
               per_round: int | None = None, level: float = 0.95, first_seed: int = 0,
               reach: bool = True) -> SeedPlan:
    """The seeds to run next under ``policy`` (module docstring).

    Args:
        baseline: The baseline's runs so far, ``{key: {seed: (accuracy, mse)}}``.
        settings: The compared settings' runs so far, same shape (keys may repeat the
            baseline's: the two are separate).
        policy: min / max / until.
        per_round: At most this many undecided settings grow this round (closest to a
            decision first); ``None``: all of them.
        level: The intervals' coverage (as in :func:`~splitcem.study.frontier.compare`).
        first_seed: The first seed when there are no runs at all.
        reach: Leave settings whose decision is out of reach of ``max`` (rule 3);
            ``False`` seeds every undecided setting up to ``max`` (measured against each
            other by ``benchmarks/until_decided.py``).

    Example:
        >>> base = {0.1: {1: (0.80, 0.010), 2: (0.79, 0.0115)},
        ...         0.2: {1: (0.70, 0.020), 2: (0.71, 0.021)}, 0.3: {1: (0.6, 0.03)}}
        >>> plan = next_seeds(base, {"cem": {1: (0.75, 0.018)}}, SeedPolicy(2, 8))
        >>> plan.baseline, plan.settings  # below min: seed 2 pairs with the others
        ({0.3: (2,)}, {'cem': (2,)})
        >>> base[0.3][2] = (0.6, 0.036)
        >>> plan = next_seeds(base, {"cem": {1: (0.75, 0.018), 2: (0.75, 0.0165)}},
        ...                   SeedPolicy(2, 8))
        >>> plan.settings, plan.baseline  # undecided: a new seed here and on its neighbours
        ({'cem': (3,)}, {0.2: (3,), 0.1: (3,)})
        >>> plan.notes[0]
        "'cem': undecided (+10.4% [-14.9%, +43.3%], 2 seeds): seed 3, about 6 more to decide"
    """
    _check(baseline, "baseline cell")
    _check(settings, "setting")
    counts = Counter(s for cells in (baseline, settings) for c in cells.values() for s in c)
    fresh = max(counts, default=first_seed - 1) + 1
    order = sorted(counts, key=lambda s: (-counts[s], s))
    plan_b: dict[Hashable, list[int]] = {}
    plan_s: dict[Hashable, list[int]] = {}

    def pick(have: set[int], prefer: list[set[int]]) -> int:
        """A seed not in ``have``: one the most ``prefer`` cells have, else a fresh one."""
        nonlocal fresh
        known = [s for s in order if s not in have]
        if known:
            return max(known, key=lambda s: (sum(s in p for p in prefer), -order.index(s)))
        while fresh in have:
            fresh += 1
        fresh += 1
        order.append(fresh - 1)
        return fresh - 1

    def top_up(cells: Cells, out: dict[Hashable, list[int]]) -> None:
        for k, c in cells.items():
            have = set(c)
            while len(have) < policy.min:
                s = pick(have, [set(o) for o in cells.values()])
                have.add(s)
                out.setdefault(k, []).append(s)

    top_up(baseline, plan_b)
    top_up(settings, plan_s)
    notes: list[str] = []
    if plan_b or plan_s:
        notes.append(f"below min ({policy.min} seeds): every cell first gets min seeds")
        return _plan(plan_b, plan_s, notes)
    if policy.until is None:
        return _plan({}, {}, ["fixed seeds: nothing more to run"])
    cands: list[tuple[float, float, int, str, Hashable, Any]] = []
    for k, cell in settings.items():
        c = compare(baseline, cell, level=level)
        desc = _describe(c)
        if c.decided:
            notes.append(f"{k!r}: {c.verdict} ({desc}): decided")
        elif c.gain is None:
            notes.append(f"{k!r}: outside the baseline's accuracy range: more seeds here "
                         "do not place it; extend the baseline instead")
        elif len(cell) >= policy.max:
            notes.append(f"{k!r}: undecided ({desc}) at max ({policy.max} seeds)")
        elif reach and not within_reach(c, policy.max):
            more = "not within a thousand" if c.seeds_needed is None else \
                f"about {c.seeds_needed} more"
            notes.append(f"{k!r}: undecided ({desc}): out of reach ({more} seeds at this "
                         f"spread; max {policy.max})")
        else:
            need = math.inf if c.seeds_needed is None else c.seeds_needed
            cands.append((need, -abs(math.log1p(c.gain)), len(cell), str(k), k, c))
    cands.sort(key=lambda t: t[:4])
    ranks: dict[Hashable, Rank] = {}
    for need, big, n, name, k, c in cands[:per_round]:
        ranks[k] = (need, big, n, name)
        nbs = [n for n in c.neighbours if n in baseline]

        def room(n: Hashable) -> bool:
            return len(baseline[n]) + len(plan_b.get(n, [])) < policy.max

        # a seed this setting ran and its neighbours did not: pair it (no new setting run)
        lone = [s for s in sorted(settings[k]) if any(
            s not in baseline[n] and s not in plan_b.get(n, []) and room(n) for n in nbs)]
        if lone:
            s = lone[0]
        else:
            s = pick(set(settings[k]) | set(plan_s.get(k, [])), [set(baseline[n]) for n in nbs])
            plan_s.setdefault(k, []).append(s)
        for n in nbs:
            planned = plan_b.setdefault(n, [])
            if s not in baseline[n] and s not in planned and room(n):
                planned.append(s)
        more = "unknown" if need == math.inf else f"about {int(need)}"
        where = " (on the baseline around it: pairs a seed it ran)" if lone else ""
        notes.append(f"{k!r}: undecided ({_describe(c)}): seed {s}{where}, {more} more to "
                     "decide")
    for k, c in [t[4:] for t in cands[per_round:]] if per_round is not None else []:
        notes.append(f"{k!r}: undecided ({_describe(c)}): waits for a later round (closer "
                     "decisions first)")
    return _plan({k: v for k, v in plan_b.items() if v}, plan_s, notes, ranks)


def _describe(c: Any) -> str:
    def pct(v: float) -> str:
        return f"{100 * v:+.1f}%"

    iv = "no interval" if c.interval is None else f"[{pct(c.low)}, {pct(c.high)}]"
    return f"{pct(c.gain)} {iv}, {c.n_seeds} seed{'s' if c.n_seeds != 1 else ''}" \
        if c.gain is not None else "no gain"


def _plan(b: dict[Hashable, list[int]], s: dict[Hashable, list[int]], notes: list[str],
          ranks: dict[Hashable, Rank] | None = None) -> SeedPlan:
    return SeedPlan({k: tuple(v) for k, v in b.items()}, {k: tuple(v) for k, v in s.items()},
                    tuple(notes), dict(ranks or {}))
