"""The tune's pieces without Ray or training: search space files (a bad key or range is one
clear error), the default space per defense family, and the early-stopping rule on the
recorded CIFAR-10 CPU histories in results/ (never stops a run that finished within the
budget, does stop hopeless ones)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from splitcem.errors import ConfigError
from splitcem.record import RunRecord
from splitcem.study.space import default_space, load_space
from splitcem.study.stopping import StopRule, TrialStopped, learn_rule

RESULTS = Path(__file__).resolve().parents[1] / "results" / "cifar10_cpu"
BASE = {"name": "t", "data": {"name": "fashion_mnist"},
        "defenses": [{"name": "nopeek", "weight": 0.3}]}
NOISE = [{"name": "noise", "sigma": 0.1}]


@pytest.mark.parametrize(("space", "says"), [
    ({"families": {"n": {"set": {"defenses": NOISE,
                                 "defenses.0.sgima": {"low": 0.1, "high": 1.0}}}}},
     "no parameter(s) 'sgima'"),
    ({"families": {"n": {"set": {"train.epochz": {"low": 1, "high": 3}}}}},
     "train.epochz: unknown key"),
    ({"families": {"n": {"set": {"defenses": NOISE,
                                 "defenses.0.sigma": {"low": 1.0, "high": 0.1}}}}},
     "the range [1.0, 0.1] is empty"),
    ({"families": {"n": {"set": {"defenses": NOISE,
                                 "defenses.0.sigma": {"low": 0.0, "high": 1.0, "log": True}}}}},
     "not positive (log scale)"),
    ({"families": {"n": {"set": {"defenses": NOISE,
                                 "defenses.0.sigma": {"low": 0.1, "hgih": 1.0}}}}},
     "a range is {low, high, log, int}"),
    ({"familes": {}}, "top-level keys are ['families', 'shared']"),
    ({"families": {"n": {"grid": {}}}}, "a family is {set:"),
])
def test_a_bad_space_file_is_one_clear_error(tmp_path, space, says):
    p = tmp_path / "space.yaml"
    p.write_text(yaml.safe_dump(space))
    try:
        load_space(p, BASE)
    except ConfigError as e:
        msg = str(e)
        assert says in msg and "\n" not in msg and str(p) in msg, msg
    else:
        pytest.fail(f"no error for {space}")


def test_space_file_round_trip(tmp_path):
    p = tmp_path / "space.yaml"
    p.write_text(yaml.safe_dump({
        "families": {"cem": {"set": {"defenses": NOISE,
                                     "defenses.0.sigma": {"low": 0.01, "high": 1.0,
                                                          "log": True},
                                     "cem.lambda": {"low": 0.3, "high": 100, "log": True}}}},
        "shared": {"model.cut": {"choices": [3, 4]}}}))
    sp = load_space(p, BASE)
    cfg = sp.config(BASE, "cem", {"defenses.0.sigma": 0.2, "cem.lambda": 3.0,
                                  "model.cut": 3})
    assert cfg.defenses == [{"name": "noise", "sigma": 0.2}] and cfg.cem is not None
    assert cfg.cem.lam == 3.0 and cfg.model.cut == 3
    assert sp.point_of(cfg) == ("cem", {"defenses.0.sigma": 0.2, "cem.lambda": 3.0,
                                        "model.cut": 3})
    out_of_range = sp.config(BASE, "cem", {"defenses.0.sigma": 2.0, "cem.lambda": 3.0,
                                           "model.cut": 3})
    assert sp.point_of(out_of_range) is None


def test_default_space_per_family():
    sp = default_space(BASE)
    assert [f.name for f in sp.families] == ["noise", "cem", "nopeek"]
    noise, cem, nopeek = sp.families
    assert noise.consts["cem.lambda"] == 0.0  # CEM off: a point
    assert [(p.key, p.low, p.high, p.log) for p in cem.params] == [
        ("defenses.0.sigma", 0.01, 1.0, True), ("cem.lambda", 0.3, 100.0, True)]
    (w,) = nopeek.params
    assert w.key == "defenses.0.weight" and w.log and w.low == pytest.approx(0.03)
    assert [p.key for p in default_space(BASE, cut=[3, 4]).families[0].params][-1] == \
        "model.cut"


def _recorded() -> list[dict]:
    runs = [r.metrics for r in RunRecord.find([RESULTS]) if r.finished()]
    if len(runs) < 5:
        pytest.skip(f"the recorded runs of {RESULTS} are not in this checkout")
    return runs


def test_stop_rule_on_recorded_histories_never_stops_a_run_within_budget():
    runs = _recorded()
    accs = sorted(m["train"]["test_accuracy"] for m in runs)
    for budget in (accs[0], accs[len(accs) // 2], accs[-1]):  # a few budgets in the range
        rule = learn_rule(runs, budget=budget, epochs=10)
        assert rule.runs == len(runs) and sorted(rule.margins) == list(range(1, 10))
        assert rule.check(runs) == []
        for m in runs:  # those within budget run to the end; those below are allowed to stop
            if m["train"]["test_accuracy"] >= budget:
                assert rule.first_stop(m["train"]["history"]) is None
    # leave-one-out: a run the rule did not learn from, within budget, is not stopped either
    budget = accs[len(accs) // 2]
    for i, m in enumerate(runs):
        rule = learn_rule(runs[:i] + runs[i + 1:], budget=budget, epochs=10)
        if m["train"]["test_accuracy"] >= budget:
            assert rule.first_stop(m["train"]["history"]) is None, m["name"]


def test_stop_rule_stops_hopeless_trials_and_only_learned_epochs():
    runs = _recorded()
    rule = learn_rule(runs, budget=0.78, epochs=10)
    hopeless = [{"epoch": e, "train_accuracy": 0.1} for e in range(1, 11)]
    assert rule.first_stop(hopeless) == 1
    with pytest.raises(TrialStopped, match=r"< budget 0\.7800"):
        rule.on_epoch(hopeless[0])
    rule.on_epoch({"epoch": 10, "train_accuracy": 0.1})  # the last epoch: never stopped
    # a rule from no runs (or runs of another length) stops nothing
    assert learn_rule(runs, budget=0.78, epochs=2).margins == {}
    assert not learn_rule([], budget=0.78, epochs=10).should_stop(1, 0.0)
    assert StopRule.from_dict(rule.to_dict()) == rule


def test_the_cifar10_tune_base_makes_the_bundled_sweeps_frontier_runs():
    """configs/tune/cifar10_cpu.yaml's default space reproduces every noise / noise + CEM
    trial of the bundled CIFAR-10 CPU sweep exactly (training and attacks hashed alike), so
    the sweep's finished runs enter a tune as warm-start observations (issue 20 item 5)."""
    from splitcem.config import CONFIG_DIR
    from splitcem.record import attack_hash, train_hash
    from splitcem.study.grid import expand, load_sweep
    from splitcem.study.reproduce import sweep_file

    base = yaml.safe_load((CONFIG_DIR / "tune" / "cifar10_cpu.yaml").read_text())
    space = default_space(base)
    frontier = [t for t in expand(load_sweep(sweep_file("cifar10", "cpu")))
                if t.name.startswith("noise")]
    assert {t.name for t in frontier} >= {"noise0.1_s125", "noise0.1_cem3_s127"}
    for t in frontier:
        at = space.point_of(t.cfg)
        assert at is not None, t.name
        cfg = space.config(base, *at, name=t.name, seed=t.seed)
        assert train_hash(cfg, device="cpu") == train_hash(t.cfg, device="cpu"), t.name
        assert attack_hash(cfg, device="cpu") == attack_hash(t.cfg, device="cpu"), t.name
