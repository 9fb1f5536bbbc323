"""Frontier maths against hand-computed cases; sweep files expand as documented."""

from __future__ import annotations

import math

import numpy as np
import pytest

from splitcem.errors import ConfigError
from splitcem.study.frontier import baseline_curve, interp_mse, matched_gain
from splitcem.study.grid import expand, load_sweep


def test_matched_accuracy_interpolation_by_hand():
    # baseline: sigma 0.1 -> seeds (80%, 0.010), (82%, 0.012): mean (81%, 0.011);
    #           sigma 0.2 -> (77%, 0.017): the curve joins (0.77, 0.017) and (0.81, 0.011)
    base = {0.1: [(0.80, 0.010), (0.82, 0.012)], 0.2: [(0.77, 0.017)]}
    accs, mses = baseline_curve(base)
    np.testing.assert_allclose(accs, [0.77, 0.81])
    np.testing.assert_allclose(mses, [0.017, 0.011])
    # at 79%: halfway, 0.014. A CEM point at mean (79%, 0.0175) gains 0.0175 / 0.014 - 1 = 25%
    cem = [(0.785, 0.017), (0.795, 0.018)]
    m = matched_gain(cem, base, n_boot=500)
    assert m.accuracy == pytest.approx(0.79) and m.mse == pytest.approx(0.0175)
    assert m.baseline_mse == pytest.approx(0.014)
    assert m.gain == pytest.approx(0.25)
    assert m.low is not None and m.high is not None and m.low <= m.gain <= m.high
    assert m.seeds == 2


def test_outside_the_baseline_range_is_not_extrapolated():
    base = {0.1: [(0.80, 0.010)], 0.2: [(0.78, 0.014)]}
    assert interp_mse(*baseline_curve(base), 0.81) is None
    m = matched_gain([(0.70, 0.02)], base)
    assert m.gain is None and m.low is None and "outside" in m.verdict


def test_verdict_says_worse_when_it_is_worse():
    base = {0.1: [(0.80, 0.010), (0.80, 0.010)], 0.2: [(0.70, 0.020), (0.70, 0.020)]}
    worse = matched_gain([(0.75, 0.010), (0.75, 0.011)], base, n_boot=300)  # base: 0.015
    assert worse.gain == pytest.approx(0.0105 / 0.015 - 1)
    assert worse.high is not None and worse.high < 0 and "less private" in worse.verdict
    better = matched_gain([(0.75, 0.020), (0.75, 0.021)], base, n_boot=300)
    assert better.low is not None and better.low > 0 and "more private" in better.verdict


def test_one_seed_everywhere_gives_no_interval_and_says_so():
    base = {0.1: [(0.80, 0.010)], 0.2: [(0.70, 0.020)]}
    m = matched_gain([(0.75, 0.020)], base, n_boot=300)
    assert m.gain is not None and abs(m.gain - (0.020 / 0.015 - 1)) < 1e-12
    assert m.low is None and m.high is None and "no interval" in m.verdict
    # a one-seed setting against a baseline with seeds: the baseline's spread alone is not
    # the setting's uncertainty, so still no interval
    seeded = {0.1: [(0.80, 0.010), (0.81, 0.011)], 0.2: [(0.70, 0.020), (0.71, 0.019)]}
    m = matched_gain([(0.75, 0.020)], seeded, n_boot=300)
    assert m.gain is not None and m.low is None and "not a verdict" in m.verdict


def test_bootstrap_interval_widens_with_seed_spread():
    base = {0.1: [(0.80, 0.010), (0.80, 0.010)], 0.2: [(0.70, 0.020), (0.70, 0.020)]}
    tight = matched_gain([(0.75, 0.018), (0.75, 0.018)], base, n_boot=300)
    wide = matched_gain([(0.75, 0.012), (0.75, 0.024)], base, n_boot=300)
    assert tight.high - tight.low == pytest.approx(0.0, abs=1e-12)
    assert wide.high - wide.low > 0.3
    assert math.isclose(tight.gain, wide.gain)


def test_sweep_file_names_seeds_and_placeholders(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("defenses: [{name: noise, sigma: 0.1}]\nseed: 7\n")
    (tmp_path / "s.yaml").write_text(
        "base: base.yaml\nseeds: 2\n"
        "variants:\n"
        "  - {name: 'noise{sigma}', grid: {defenses.0.sigma: [0.1, 0.2]}}\n"
        "  - {name: cem, set: {cem: {lambda: 1.0}}, grid: {cem.lambda: [3]}, seeds: [125]}\n")
    trials = expand(load_sweep(tmp_path / "s.yaml"))
    assert [t.name for t in trials] == ["noise0.1_s7", "noise0.1_s8", "noise0.2_s7",
                                        "noise0.2_s8", "cem_lambda3_s125"]
    t = trials[2]
    assert t.cfg.defenses[0]["sigma"] == 0.2 and t.cfg.seed == 7 and t.cfg.name == t.name
    assert trials[-1].cfg.cem is not None and trials[-1].cfg.cem.lam == 3.0


@pytest.mark.parametrize("spec, match", [
    ({"grid": {"defenses.0.sigma": 0.1}}, "non-empty list"),
    ({"seeds": 0}, ">= 1"),
    ({"variants": [{"name": "x{nope}", "grid": {"train.lr": [0.1]}}]}, "not grid keys"),
    ({"variants": [{"name": "x", "set": {"defenses": [{"name": "noise", "sigma": -1}]}}]},
     "sigma"),
    ({"gird": {}}, "unknown key"),
])
def test_bad_sweep_files_fail_before_running(spec, match):
    with pytest.raises(ConfigError, match=match):
        expand(load_sweep(spec))


@pytest.mark.parametrize("name", ["cifar10_cpu", "cifar10_paper"])
def test_bundled_sweeps_expand(name):
    from splitcem.study.reproduce import sweep_file

    trials = expand(load_sweep(sweep_file("cifar10", name.split("_")[1])))
    names = [t.name for t in trials]
    assert len(names) == len(set(names))
    attacks = {a["name"] for t in trials for a in t.cfg.attack.attacks}
    assert attacks == {"decoder", "decoder_adaptive"}
    if name == "cifar10_cpu":  # issue 9's grid, with the seeds it asks for
        for stem, seeds in (("noise0.1", 3), ("noise0.1_cem3", 3), ("noise0.15", 2),
                            ("noise0.2", 2), ("noise0.3", 1), ("noise0.1_cem1", 1),
                            ("noise0.1_cem10", 1)):
            assert sum(n.rsplit("_s", 1)[0] == stem for n in names) == seeds, stem
        assert {"cut4_s125", "cut6_s125", "topk0.3_cem3_s125"} <= set(names)


def test_paper_table_pairs_runs_without_and_with_cem(tmp_path):
    from splitcem.config import load_config
    from splitcem.study.frontier_report import FrontierRun
    from splitcem.study.reproduce import paper_table

    def run(name, seed, lam, acc, mse):
        cfg = load_config({"name": name, "seed": seed,
                           "defenses": [{"name": "topk", "ratio": 0.3},
                                        {"name": "noise", "sigma": 0.1}],
                           "cem": {"lambda": lam}})
        worst = {m: {"attack": "decoder", "value": v}
                 for m, v in (("mse", mse), ("ssim", 0.5), ("psnr", 20.0))}
        return FrontierRun(tmp_path / name, cfg, {"train": {"test_accuracy": acc},
                                                  "attacks": {"worst": worst}})

    runs = [run("a0", 0, 0.0, 0.80, 0.010), run("a1", 1, 0.0, 0.78, 0.012),
            run("c0", 0, 3.0, 0.79, 0.0132)]
    table, rows = paper_table(runs)
    (row,) = rows
    assert row["defense"].startswith("topk + noise(sigma=0.1)") and row["lambda"] == 3.0
    assert (row["seeds_without"], row["seeds_with"]) == (2, 1)
    assert row["accuracy_without"] == pytest.approx(0.79)
    assert row["mse_gain"] == pytest.approx(0.0132 / 0.011 - 1)  # +20%
    assert "+20.0%" in table
