"""Seeds until decided: the planner against a fake-cheap trial function (no training)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from splitcem.errors import ConfigError
from splitcem.study.frontier import compare, within_reach
from splitcem.study.frontier_plan import SeedPolicy, next_seeds

NOISE = {0.1: (0.793, 0.0095), 0.15: (0.784, 0.0109), 0.2: (0.772, 0.0126), 0.3: (0.750, 0.016)}
CEM = {1.0: (0.791, 0.0), 3.0: (0.7855, 0.25), 10.0: (0.7587, 0.0)}  # (accuracy, true gain)


def frontier(acc: float) -> float:
    a, m = zip(*sorted(NOISE.values()), strict=True)
    return float(np.interp(acc, a, m))


def trial(kind: str, key: float, seed: int) -> tuple[float, float]:
    """A fake trial: deterministic per (setting, seed), a shared seed effect, 4% spread."""
    rs = np.random.default_rng([seed])
    u, v = rs.normal(0, 0.05), rs.normal(0, 0.002)
    r = np.random.default_rng([seed, int(1000 * key), kind == "cem"])
    acc, mse = NOISE[key] if kind == "noise" else (CEM[key][0],
                                                    (1 + CEM[key][1]) * frontier(CEM[key][0]))
    return acc + v + r.normal(0, 0.003), mse * math.exp(u + r.normal(0, 0.04))


def run_study(policy: SeedPolicy, per_round: int | None = None, rounds: int = 50):
    base: dict[float, dict[int, tuple[float, float]]] = {k: {} for k in NOISE}
    cem: dict[float, dict[int, tuple[float, float]]] = {k: {} for k in CEM}
    for i in range(rounds):
        plan = next_seeds(base, cem, policy, per_round=per_round, first_seed=125)
        if plan.done:
            return base, cem, i, plan
        for k, seeds in plan.baseline.items():
            for s in seeds:
                assert s not in base[k]
                base[k][s] = trial("noise", k, s)
        for k, seeds in plan.settings.items():
            for s in seeds:
                assert s not in cem[k]
                cem[k][s] = trial("cem", k, s)
    raise AssertionError(f"no end after {rounds} rounds")


def test_seeds_until_decided_stops_decided_or_at_max():
    policy = SeedPolicy(min=2, max=8, until="decided")
    base, cem, rounds, plan = run_study(policy)
    assert rounds > 1 and plan.done
    for k, cell in cem.items():
        c = compare(base, cell)
        assert 2 <= len(cell) <= 8
        assert c.decided or len(cell) == 8 or c.gain is None or not within_reach(c, 8), (k, c)
        assert c.paired  # new seeds went to the baseline too
        if len(cell) > 2:  # grown: the baseline around it grew with it
            assert all(set(cell) <= set(base[n]) | {s for s in cell if len(base[n]) == 8}
                       for n in c.neighbours)
    assert all(2 <= len(c) <= 8 for c in base.values())
    # lambda 3's true +25% is found (this fake study decides it), never the wrong way
    c3 = compare(base, cem[3.0])
    assert c3.verdict == "more private", c3
    assert [s for s in sorted(cem[3.0])] == list(range(125, 125 + len(cem[3.0])))


def test_fixed_seeds_run_min_and_stop():
    base, cem, rounds, plan = run_study(SeedPolicy.parse(2))
    assert rounds == 1 and all(len(c) == 2 for c in [*base.values(), *cem.values()])
    assert set(base[0.3]) == set(cem[3.0]) == {125, 126}
    assert plan.notes == ("fixed seeds: nothing more to run",)


def test_per_round_grows_the_closest_to_a_decision_first():
    base = {k: {s: trial("noise", k, s) for s in (125, 126)} for k in NOISE}
    cem = {k: {s: trial("cem", k, s) for s in (125, 126)} for k in CEM}
    cands = {k: compare(base, c) for k, c in cem.items()}
    undecided = {k: c for k, c in cands.items() if not c.decided and c.gain is not None}
    plan = next_seeds(base, cem, SeedPolicy(2, 8), per_round=1)
    assert len(plan.settings) == min(1, len(undecided))
    if undecided:
        (k,) = plan.settings
        need = {j: (math.inf if c.seeds_needed is None else c.seeds_needed)
                for j, c in undecided.items()}
        assert need[k] == min(need.values())
        assert set(plan.baseline) <= set(cands[k].neighbours)


@pytest.mark.parametrize("spec, match", [
    ({"min": 0}, "min must be an integer >= 1"),
    ({"min": 3, "max": 2}, "at most max"),
    ({"until": "forever"}, "until must be"),
    ({"mn": 2}, "unknown key"),
    ("two", "expected an integer"),
])
def test_bad_policies_fail_in_one_line(spec, match):
    with pytest.raises(ConfigError, match=match) as e:
        SeedPolicy.parse(spec)
    assert "\n" not in str(e.value)


def test_cells_without_seeds_are_refused():
    with pytest.raises(ConfigError, match="seed:"):
        next_seeds({0.1: [(0.8, 0.01)]}, {}, SeedPolicy())  # type: ignore[dict-item]


def test_a_seed_the_setting_ran_alone_is_paired_first():
    # the committed design: lambda 3 ran seed 127, the noise points around it did not
    base = {k: {s: trial("noise", k, s) for s in (125, 126)} for k in NOISE}
    cem = {3.0: {s: (0.7855 + 0.002 * (s - 126), (1.32, 1.14, 1.2)[s - 125] *
                     frontier(0.7855)) for s in (125, 126, 127)}}
    c = compare(base, cem[3.0])
    assert not c.decided and "seed 127: no baseline run with seed 127" in c.dropped
    plan = next_seeds(base, cem, SeedPolicy(2, 8))
    assert plan.settings == {}  # no new lambda 3 run: its seed 127 gets paired
    assert plan.baseline == {n: (127,) for n in c.neighbours}
    assert "pairs a seed it ran" in plan.notes[0]


def test_a_setting_out_of_reach_is_left_undecided_and_seeded_on_without_the_rule():
    """Lambda 1's true gain is 0: from 3 seeds on its spread says that no 8 seeds would decide
    it, so the planner stops seeding it (and its noise neighbours); with ``reach=False`` it
    runs to max. The rule never makes a verdict: lambda 1 stays undecided either way."""
    policy = SeedPolicy(min=3, max=8, until="decided")
    base = {k: {s: trial("noise", k, s) for s in (125, 126, 127)} for k in NOISE}
    cem = {1.0: {s: trial("cem", 1.0, s) for s in (125, 126, 127)}}
    c = compare(base, cem[1.0])
    assert c.verdict == "undecided" and c.n_seeds == 3 and not within_reach(c, 8), c
    plan = next_seeds(base, cem, policy)
    assert plan.done and plan.settings == {} and plan.baseline == {}
    assert "out of reach" in plan.notes[0], plan.notes
    more = next_seeds(base, cem, policy, reach=False)
    assert more.settings == {1.0: (128,)}


def test_with_no_spread_yet_the_largest_gain_either_way_goes_first():
    """One seed each: seeds needed is unknown for all, so the setting furthest from its
    baseline (either way) is the cheapest decision and is planned first; ``ranks`` say so."""
    base = {0.1: {1: (0.80, 0.010)}, 0.2: {1: (0.70, 0.020)}}
    settings = {"small": {1: (0.75, 0.0155)}, "less": {1: (0.75, 0.010)},
                "big": {1: (0.75, 0.022)}}
    plan = next_seeds(base, settings, SeedPolicy(1, 5))
    assert list(plan.settings) == ["less", "big", "small"]  # |log 0.667| > |log 1.467| > ...
    assert [plan.ranks[k] for k in plan.settings] == sorted(plan.ranks.values())
    assert all(r[0] == float("inf") for r in plan.ranks.values())
