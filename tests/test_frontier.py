"""Frontier maths against hand-computed cases; sweep files expand as documented."""

from __future__ import annotations

import math

import numpy as np
import pytest

from splitcem.errors import ConfigError
from splitcem.study.frontier import (
    baseline_curve,
    compare,
    envelope,
    interp_mse,
    matched_gain,
    seeds_needed,
)
from splitcem.study.frontier_stats import fit_gain
from splitcem.study.grid import expand, load_sweep


def test_matched_accuracy_interpolation_by_hand():
    # baseline: sigma 0.1 -> seeds (80%, 0.010), (82%, 0.012): mean (81%, 0.011);
    #           sigma 0.2 -> (77%, 0.017): the curve joins (0.77, 0.017) and (0.81, 0.011)
    base = {0.1: [(0.80, 0.010), (0.82, 0.012)], 0.2: [(0.77, 0.017)]}
    accs, mses = baseline_curve(base)
    np.testing.assert_allclose(accs, [0.77, 0.81])
    np.testing.assert_allclose(mses, [0.017, 0.011])
    # at 79%: halfway, 0.014. A CEM point at (79%, 0.0175) gains 0.0175 / 0.014 - 1 = 25%
    m = matched_gain([(0.79, 0.0175)], base, n_boot=500)  # old keyword still accepted
    assert m.accuracy == pytest.approx(0.79) and m.mse == pytest.approx(0.0175)
    assert m.baseline_mse == pytest.approx(0.014)
    assert m.seeds == 1 and m.interval is None and m.verdict == "undecided"
    # the gain is on the log scale: 0.0175 against the curve of the cells' geometric means
    # (sigma 0.1: sqrt(0.010 * 0.012) at 81%)
    b = 0.017 + 0.5 * (math.sqrt(0.010 * 0.012) - 0.017)
    assert m.gain == pytest.approx(0.0175 / b - 1)


def test_a_dominated_baseline_point_does_not_help_a_setting():
    # sigma 0.3 measured less accurate AND less private than sigma 0.2: without the
    # envelope, a setting at 0.76 would be compared with 0.0125 and look 20% better
    base = {0.1: [(0.80, 0.010)], 0.2: [(0.77, 0.015)], 0.3: [(0.75, 0.010)]}
    accs, mses = baseline_curve(base)
    np.testing.assert_allclose(accs, [0.75, 0.77, 0.80])
    np.testing.assert_allclose(mses, [0.015, 0.015, 0.010])
    assert interp_mse(accs, mses, 0.76) == pytest.approx(0.015)
    assert compare(base, [(0.76, 0.015)]).gain == pytest.approx(0.0)


def test_outside_the_baseline_range_is_not_extrapolated():
    base = {0.1: [(0.80, 0.010)], 0.2: [(0.78, 0.014)]}
    assert interp_mse(*baseline_curve(base), 0.81) is None
    m = matched_gain([(0.70, 0.02)], base)
    assert m.gain is None and m.low is None and m.verdict == "no comparison"
    assert "outside" in m.reason


def _paired_study(gains, spread=0.0):
    """Baseline sigma 0.1 / 0.2 on seeds 1-3 with a seed effect; a setting at 75% accuracy
    with the given gain per seed (its MSE times 1 + gain over that seed's own curve)."""
    effect = {1: 1.0, 2: 1.2, 3: 0.9}
    base = {0.1: {s: (0.80, 0.010 * e * (1 + spread * (-1) ** s)) for s, e in effect.items()},
            0.2: {s: (0.70, 0.020 * e) for s, e in effect.items()}}
    own = {s: 0.5 * (base[0.1][s][1] + base[0.2][s][1]) for s in effect}
    return base, {s: (0.75, own[s] * (1 + g)) for s, g in zip(effect, gains, strict=False)}


def test_verdict_says_worse_when_it_is_worse_and_better_when_better():
    base, worse = _paired_study([-0.30, -0.32, -0.29], spread=0.02)
    w = compare(base, worse)
    assert w.paired and w.n_seeds == 3 and w.high is not None and w.high < 0
    assert w.verdict == "less private" and w.seeds_needed == 0
    base, better = _paired_study([0.30, 0.32, 0.29], spread=0.02)
    b = compare(base, better)
    assert b.low is not None and b.low > 0 and b.verdict == "more private"
    assert b.per_seed == pytest.approx({1: 0.30, 2: 0.32, 3: 0.29}, abs=0.03)


def test_a_shared_seed_effect_cancels_when_paired():
    # the same +20% on every seed, with a 20% seed effect on every run: paired, the interval
    # is tight around 20%; unpaired, the seed effect is spread and the interval wide
    base, cell = _paired_study([0.2, 0.2, 0.2], spread=0.01)
    p, u = compare(base, cell), compare(base, cell, paired=False)
    assert p.paired and not u.paired
    assert p.gain == pytest.approx(0.2, abs=0.01)
    assert (p.high - p.low) < 0.5 * (u.high - u.low)


def test_one_seed_gives_no_interval_and_says_so():
    base = {0.1: [(0.80, 0.010)], 0.2: [(0.70, 0.020)]}
    m = compare(base, [(0.75, 0.020)])
    assert m.gain is not None and abs(m.gain - (0.020 / 0.015 - 1)) < 1e-12
    assert m.interval is None and m.verdict == "undecided" and "one seed" in m.reason
    # a one-seed setting against a baseline with seeds: still no interval
    seeded = {0.1: {1: (0.80, 0.010), 2: (0.81, 0.011)}, 0.2: {1: (0.70, 0.020), 2: (0.71,
                                                                                     0.019)}}
    m = compare(seeded, {1: (0.75, 0.020)})
    assert m.gain is not None and m.interval is None and m.seeds_needed is None


def test_a_seed_without_baseline_runs_is_dropped_and_listed():
    base, cell = _paired_study([0.2, 0.25, 0.15], spread=0.02)
    cell[9] = (0.75, 0.05)  # a seed the baseline never ran: its seed effect is unknown
    c = compare(base, cell)
    assert c.paired and c.n_seeds == 3
    assert c.dropped == ("seed 9: no baseline run with seed 9 (adds nothing paired)",)
    assert c.gain == pytest.approx(compare(base, {s: cell[s] for s in (1, 2, 3)}).gain)
    per = compare(base, cell, method="per_seed")
    assert per.n_seeds == 3 and per.dropped == ("seed 9: no baseline run with seed 9",)
    assert per.df == 2 and set(per.per_seed) == {1, 2, 3}
    assert c.per_seed_interval == pytest.approx(per.interval)  # reported beside the model's


def test_interval_widens_with_seed_spread():
    base, tight = _paired_study([0.2, 0.21, 0.19], spread=0.01)
    _, wide = _paired_study([0.0, 0.4, 0.2], spread=0.01)
    t, w = compare(base, tight), compare(base, wide)
    assert t.verdict == "more private" and w.verdict == "undecided"
    assert (w.high - w.low) > 3 * (t.high - t.low)
    assert w.seeds_needed is not None and w.seeds_needed > 0


def test_seeds_needed_against_a_loop_over_t_quantiles():
    from scipy import stats

    for lg, se, n in [(0.2, 0.1, 2), (0.1, 0.08, 3), (-0.15, 0.05, 2), (0.3, 0.01, 4)]:
        m = n
        while stats.t.ppf(0.975, m - 1) * se * math.sqrt(n / m) >= abs(lg):
            m += 1
        assert seeds_needed(lg, se, n) == m - n
    assert seeds_needed(0.0, 0.1, 3) is None
    assert seeds_needed(1e-6, 0.1, 3) is None  # more than a thousand


def test_envelope_against_brute_force_dominance():
    rng = np.random.default_rng(3)
    for _ in range(200):
        pts = [(float(a), float(m)) for a, m in
               zip(rng.choice(np.linspace(0.7, 0.8, 21), 5), rng.uniform(0.01, 0.02, 5),
                   strict=True)]
        accs, mses = envelope(pts)
        keep = sorted({p for p in pts if not any(q != p and q[0] >= p[0] and q[1] >= p[1]
                                                 for q in pts)})
        lowest = min(a for a, _ in pts)
        expect = ([(lowest, keep[0][1])] if lowest < keep[0][0] else []) + keep
        np.testing.assert_allclose(np.column_stack([accs, mses]), np.array(expect))
        for a in np.linspace(lowest, max(a for a, _ in pts), 7):  # non-increasing, above all
            b = interp_mse(accs, mses, float(a))
            assert b is not None and all(b >= m - 1e-12 for x, m in pts if x >= a)


def _oracle(cells, seed_effects):
    """The additive model by hand on a complete table: loops over cells and seeds, the
    interpolation's gradient written out (the setting is the last cell, the baseline's
    points are already monotone and bracket it between cells i and j)."""
    seeds = sorted(cells[0])
    n_c, n_s = len(cells), len(seeds)
    est, res = [], [[], []]
    for col in (0, 1):
        val = [[(c[s][0] if col == 0 else math.log(c[s][1])) for s in seeds] for c in cells]
        row = [sum(v) / n_s for v in val]
        colm = [sum(val[c][k] for c in range(n_c)) / n_c for k in range(n_s)]
        grand = sum(row) / n_c
        for c in range(n_c):
            for k in range(n_s):
                fit = row[c] + (colm[k] - grand if seed_effects else 0.0)
                res[col].append(val[c][k] - fit)
        est.append(row)
    df = n_c * n_s - (n_c + n_s - 1 if seed_effects else n_c)
    var = [sum(r * r for r in res[col]) / df for col in (0, 1)]
    acc, lm = est
    a = acc[-1]
    order = sorted(range(n_c - 1), key=lambda c: acc[c])
    i = max((c for c in order if acc[c] <= a), key=lambda c: acc[c])
    j = min((c for c in order if acc[c] > a), key=lambda c: acc[c])
    mi, mj = math.exp(lm[i]), math.exp(lm[j])
    w = (a - acc[i]) / (acc[j] - acc[i])
    b = mi + w * (mj - mi)
    theta = lm[-1] - math.log(b)
    g_l = {n_c - 1: 1.0, i: -(1 - w) * mi / b, j: -w * mj / b}
    d = (mj - mi) / b
    g_a = {n_c - 1: -d / (acc[j] - acc[i]),
           i: -d * (a - acc[j]) / (acc[j] - acc[i]) ** 2,
           j: d * (a - acc[i]) / (acc[j] - acc[i]) ** 2}
    v = (var[1] * sum(g * g for g in g_l.values()) + var[0] * sum(g * g for g in g_a.values())
         ) / n_s
    return theta, math.sqrt(v), df


@pytest.mark.parametrize("seed_effects", [True, False])
def test_fit_gain_against_the_model_by_hand(seed_effects):
    rng = np.random.default_rng(11)
    for _ in range(50):
        n_s = int(rng.integers(2, 5))
        true = [(0.80, 0.010), (0.78, 0.012), (0.76, 0.015), (0.74, 0.019), (0.775, 0.016)]
        u = rng.normal(0, 0.05, n_s)
        cells = [{s: (a + rng.normal(0, 0.002), m * math.exp(u[s] + rng.normal(0, 0.04)))
                  for s in range(n_s)} for a, m in true]
        base = dict(enumerate(cells[:-1]))
        accs = [np.mean([p[0] for p in c.values()]) for c in cells]
        geo = [np.mean([math.log(p[1]) for p in c.values()]) for c in cells[:-1]]
        if np.any(np.diff([geo[c] for c in np.argsort(accs[:-1])]) >= 0):
            continue  # the oracle assumes a monotone baseline (no envelope needed)
        lg, se, df = fit_gain(cells[-1], base, seed_effects=seed_effects)
        o = _oracle(cells, seed_effects)
        assert (lg, se, df) == pytest.approx(o, rel=1e-5)


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
    from splitcem.study.frontier_plan import SeedPolicy
    from splitcem.study.reproduce import sweep_file

    trials = expand(load_sweep(sweep_file("cifar10", name.split("_")[1])))
    names = [t.name for t in trials]
    assert len(names) == len(set(names))
    attacks = {a["name"] for t in trials for a in t.cfg.attack.attacks}
    assert attacks == {"decoder", "decoder_adaptive"}
    if name == "cifar10_cpu":  # issue 18 item 6: >= 2 seeds, lambda 3 / 10 until decided
        for stem, seeds in (("noise0.1", 2), ("noise0.1_cem3", 3), ("noise0.15", 2),
                            ("noise0.2", 2), ("noise0.3", 2), ("noise0.1_cem1", 2),
                            ("noise0.1_cem10", 2)):
            assert sum(n.rsplit("_s", 1)[0] == stem for n in names) == seeds, stem
        policy = {t.stem: t.policy for t in trials}
        assert policy["noise0.1_cem3"] == SeedPolicy(3, 8, "decided")
        assert policy["noise0.1_cem10"] == SeedPolicy(2, 8, "decided")
        assert policy["noise0.1"] is None and policy["noise0.1_cem1"] is None
        assert {"noise0.1_s125", "noise0.1_cem3_s127"} <= set(names)
        assert {"cut4_s125", "cut6_s125", "topk0.4_cem3_s125"} <= set(names)


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


def test_spread_test_against_the_two_seed_formula_by_hand():
    from scipy import stats

    from splitcem.study.frontier_stats import spread_test

    rng = np.random.default_rng(5)
    for _ in range(30):
        n_b = int(rng.integers(3, 6))  # baseline cells, two seeds each; equal accuracies
        lm = rng.normal(0, 0.05, (n_b + 1, 2)) + np.array([0.0, 0.06])
        base = {c: {1: (0.7 + c / 100, math.exp(lm[c, 0])), 2: (0.7 + c / 100,
                                                                math.exp(lm[c, 1]))}
                for c in range(n_b)}
        cell = {1: (0.72, math.exp(lm[-1, 0])), 2: (0.72, math.exp(lm[-1, 1]))}
        d = [lm[c, 1] - lm[c, 0] for c in range(n_b)]  # seed 2 - seed 1, per baseline cell
        d_bar = sum(d) / n_b
        s2 = sum((x - d_bar) ** 2 for x in d) / (n_b - 1) / 2  # per-run residual variance
        stat = (lm[-1, 1] - lm[-1, 0] - d_bar) ** 2 / 2 / (1 + 1 / n_b)
        p = stats.f.sf(stat / s2, 1, n_b - 1)
        assert spread_test(cell, base) == pytest.approx(min(1.0, 2 * p), rel=1e-6)


def test_spread_test_holds_its_level_and_flags_a_wider_spread():
    from splitcem.study.frontier_stats import spread_test

    rng = np.random.default_rng(9)

    def reject(setting_sd: float, n: int = 600) -> float:
        hits = 0
        for _ in range(n):
            u, v = rng.normal(0, 0.05, 3), rng.normal(0, 0.002, 3)
            base = {c: {s: (a + v[s] + rng.normal(0, 0.003), m * math.exp(u[s] + rng.normal(
                0, 0.04))) for s in range(3)} for c, (a, m) in
                enumerate([(0.80, 0.010), (0.78, 0.012), (0.76, 0.015)])}
            cell = {s: (0.79 + v[s] + rng.normal(0, 0.003 * setting_sd / 0.04),
                        0.013 * math.exp(u[s] + rng.normal(0, setting_sd))) for s in range(3)}
            p = spread_test(cell, base)
            hits += p is not None and p < 0.1
        return hits / n

    assert reject(0.04) <= 0.12  # the same spread: rejected at most about 10% of the time
    assert reject(0.16) > 0.4  # four times the spread: usually caught


def test_auto_falls_back_to_per_seed_when_the_setting_spreads_more():
    base, cell = _paired_study([0.45, 0.0, 0.3], spread=0.005)  # baseline: tight seed effects
    c = compare(base, cell)
    assert c.spread_p is not None and c.spread_p < 0.1 and c.method == "per_seed"
    assert c.interval == pytest.approx(c.per_seed_interval)
    m = compare(base, cell, method="model")
    assert m.method == "model" and (m.high - m.low) < (c.high - c.low)


@pytest.mark.parametrize("reader_bf16", [True, False])
def test_groups_compare_the_numeric_path_that_ran_not_the_setting(monkeypatch, reader_bf16):
    """``amp: true`` and ``amp: auto`` runs that both trained in bf16 are one group (the
    committed legacy runs beside the sweep's), a float32 run is not; the held-out leakage
    estimate (``attack.leakage``) changes no attack figure and splits nothing. An ``auto``
    attack counts as it ran (its recorded path, else as ``auto`` resolved where the run
    trained), whatever machine reads the runs: read where bf16 is not native, a bf16 run
    attacked with ``auto`` stays in the group of one attacked with ``amp: true``."""
    from pathlib import Path

    import torch

    from splitcem.config import load_config
    from splitcem.study.groups import FrontierRun, group_runs

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: reader_bf16,
                        raising=False)

    def run(name, sigma, amp, numerics, leakage=False, attack_amps=None):
        cfg = load_config({"name": name, "seed": 0,
                           "train": {"amp": amp, "channels_last": amp},
                           "defenses": [{"name": "noise", "sigma": sigma}],
                           "attack": {"leakage": leakage, "attacks": [
                               {"name": "decoder", "epochs": 1, "amp": amp}]}})
        return FrontierRun(Path(name), cfg, {}, numerics=numerics,
                           attack_amps=attack_amps or {})

    bf16 = {"device": "cpu", "amp": True, "channels_last": True, "native_bf16": True}
    emulated = {**bf16, "native_bf16": False}  # --amp true where bf16 is not native
    fp32 = {"device": "cpu", "amp": False, "channels_last": False}
    runs = [run("legacy", 0.1, True, bf16), run("swept", 0.2, "auto", bf16, leakage=True),
            run("other", 0.3, True, emulated), run("fp32", 0.15, False, fp32),
            run("recorded", 0.25, "auto", emulated, attack_amps={"decoder": True}),
            run("fp32_attack", 0.4, "auto", emulated, attack_amps={"decoder": False})]
    groups = group_runs(runs)
    assert sorted(r.name for r in groups["noise"]) == ["legacy", "other", "recorded", "swept"]
    odd = sorted(set(groups) - {"noise"})
    assert sorted(r.name for g in odd for r in groups[g]) == ["fp32", "fp32_attack"]
    assert [r.name for r in groups["noise [other attacks]"]] == ["fp32_attack"]
    assert len(odd) == 2 and any("train.amp=false" in g for g in odd)


def test_a_group_label_names_what_varies_with_its_differences_not_only_the_differences():
    """A context that differs from the main one only in ``model.bottleneck_stride`` sits
    beside one that differs in the stride and the channel count: its label names its
    channel count too (the default, 8), so the two read as two bottleneck widths. A
    context differing in an unrelated key names that key alone."""
    from pathlib import Path

    from splitcem.config import load_config
    from splitcem.study.groups import FrontierRun, group_runs

    def run(name, model=None, epochs=1):
        cfg = load_config({"name": name, "seed": 0, "model": model or {},
                           "train": {"epochs": epochs},
                           "defenses": [{"name": "noise", "sigma": 0.1}]})
        return FrontierRun(Path(name), cfg, {})

    runs = [run("a"), run("b"), run("wide", {"bottleneck_channels": 16, "bottleneck_stride": 2}),
            run("narrow", {"bottleneck_stride": 2}), run("long", epochs=3)]
    labels = {r.name: g for g, rs in group_runs(runs).items() for r in rs}
    assert labels["a"] == labels["b"] == "noise"
    assert labels["wide"] == "noise [model.bottleneck_channels=16, model.bottleneck_stride=2]"
    assert labels["narrow"] == "noise [model.bottleneck_channels=8, model.bottleneck_stride=2]"
    assert labels["long"] == "noise [train.epochs=3]"


def test_a_setting_is_compared_only_with_baseline_runs_attacked_as_it_was():
    """Worst-case MSEs of two attack suites are not one scale: CEM runs attacked by suite B
    are compared with the noise runs attacked by B (their own group), never with suite A's
    noise curve, and a setting no noise run was attacked like gets no comparison."""
    from pathlib import Path

    from splitcem.config import load_config
    from splitcem.study.frontier_verdicts import compare_groups
    from splitcem.study.groups import FrontierRun, group_runs

    bf16 = {"device": "cpu", "amp": True, "channels_last": True}

    def run(name, seed, sigma, lam, epochs, acc, mse):
        cfg = load_config({"name": name, "seed": seed, "train": {"amp": True},
                           "defenses": [{"name": "noise", "sigma": sigma}],
                           "cem": {"lambda": lam},
                           "attack": {"attacks": [{"name": "decoder", "epochs": epochs}]}})
        rec = {"train": {"test_accuracy": acc},
               "attacks": {"worst": {"mse": {"attack": "decoder", "value": mse}}}}
        return FrontierRun(Path(name), cfg, rec, numerics=bf16)

    runs = []
    for seed, e in ((1, 1.0), (2, 1.02)):  # suite A (3 epochs): the most common context
        runs += [run(f"a{s}_{seed}", seed, s, 0, 3, acc, mse * e) for s, acc, mse in
                 ((0.1, 0.80, 0.010), (0.2, 0.76, 0.014), (0.3, 0.72, 0.020))]
    for seed, e in ((1, 1.0), (2, 0.98)):  # suite B (9 epochs): a stronger attack
        runs += [run(f"b{s}_{seed}", seed, s, 0, 9, acc, mse * e) for s, acc, mse in
                 ((0.1, 0.80, 0.008), (0.3, 0.72, 0.016))]
        runs.append(run(f"bcem_{seed}", seed, 0.1, 3, 9, 0.76, 0.013 * e))
    runs.append(run("ccem_1", 1, 0.1, 3, 5, 0.76, 0.013))  # suite C: no noise run
    groups = group_runs(runs)
    # two suites other than the main one: each named, so they are not one group
    noise_b = next(g for g, rs in groups.items() if rs[0].name.startswith("b0"))
    assert noise_b.startswith("noise [other attacks ")
    assert {r.name for r in groups[noise_b]} == {"b0.1_1", "b0.3_1", "b0.1_2", "b0.3_2"}
    assert next(g for g, rs in groups.items() if rs[0].name == "ccem_1") != \
        next(g for g, rs in groups.items() if rs[0].name == "bcem_1")
    matched, _ = compare_groups(groups, "noise")
    assert noise_b not in {m["group"] for m in matched}  # suite B's noise: a baseline
    cem_b, = (m for m in matched if m["baseline_group"] == noise_b)
    # against B's own curve (0.008 -> 0.016 at 0.80 -> 0.72: 0.012 at 0.76), not A's 0.014
    assert cem_b["baseline_mse"] == pytest.approx(0.012, rel=0.02)
    assert cem_b["gain"] > 0.05
    cem_c = [m for m in matched if m["baseline_group"] is None]
    assert len(cem_c) == 1 and cem_c[0]["verdict"] == "no comparison"
    assert "attacked otherwise" in cem_c[0]["reason"]
