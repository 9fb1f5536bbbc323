"""Figures are drawn without pyplot: the caller's matplotlib backend and figures are left
alone (a notebook user keeps theirs)."""

from __future__ import annotations

import math
import sys

import matplotlib
import pytest
import torch
from PIL import Image

from splitcem.report import plot_frontier, save_image_grid


def _record(name: str, acc: float, mse: float) -> dict:
    return {"name": name, "train": {"test_accuracy": acc},
            "attacks": {"attacks": {"decoder": {"metrics": {"mse": mse, "ssim": 0.5,
                                                            "psnr": 20.0}}}}}


def test_figures_leave_the_backend_and_pyplot_alone(tmp_path):
    before = matplotlib.get_backend()
    had_pyplot = "matplotlib.pyplot" in sys.modules
    rows = {"original": torch.rand(5, 3, 8, 8), "decoder": torch.rand(5, 3, 8, 8)}
    grid = save_image_grid(rows, tmp_path / "grid.png", show=4)
    plot = plot_frontier([_record("a", 0.8, 0.01), _record("b", 0.7, 0.02)],
                         tmp_path / "frontier.png")
    for p in (grid, plot):
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
    assert matplotlib.get_backend() == before
    if not had_pyplot:
        assert "matplotlib.pyplot" not in sys.modules
    else:  # nothing was left open in pyplot's figure registry
        import matplotlib.pyplot as plt

        assert not plt.get_fignums()


# --- the frontier report: seeds paired, verdicts, envelope, dropped seeds -----------------


def _fake_run(root, name: str, seed: int, acc: float, mse: float, *, sigma: float = 0.1,
              lam: float = 0.0, split: int = 125) -> None:
    """A finished run directory as the run record reads it (no training: the numbers are
    given)."""
    import json

    import yaml

    run = root / name
    run.mkdir(parents=True)
    cfg = {"name": name, "seed": seed, "train": {"epochs": 1},
           "defenses": [{"name": "noise", "sigma": sigma}],
           "attack": {"attacks": [{"name": "decoder", "epochs": 1}]}}
    if lam:
        cfg["cem"] = {"lambda": lam}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run / "metrics.json").write_text(json.dumps({
        "name": name, "train": {"epochs": 1, "test_accuracy": acc},
        "attacks": {"split": {"seed": split}, "attacks": {"decoder": {"metrics": {
            "mse": mse, "ssim": 0.5, "psnr": 20.0}}},
            "worst": {"mse": {"value": mse, "attack": "decoder"}}}}))


def _study(root):
    """Noise at 3 sigmas x 3 seeds with a strong per-seed effect on MSE; CEM lambda 3 +20%
    above the noise curve at seeds 1-3 plus a seed the baseline never ran; lambda 10 once."""
    import numpy as np

    rng = np.random.default_rng(0)
    effect = {1: 0.0, 2: 0.25, 3: -0.2}
    for sigma, acc, mse in ((0.1, 0.80, 0.010), (0.2, 0.70, 0.020), (0.3, 0.60, 0.030)):
        for s, e in effect.items():
            _fake_run(root, f"noise{sigma}_s{s}", s, acc + 0.002 * rng.normal(),
                      mse * np.exp(e + 0.01 * rng.normal()), sigma=sigma, split=125 + (s == 3))
    for s, e in effect.items():
        _fake_run(root, f"cem3_s{s}", s, 0.75 + 0.002 * rng.normal(),
                  0.015 * 1.2 * np.exp(e + 0.01 * rng.normal()), lam=3.0)
    _fake_run(root, "cem3_s9", 9, 0.75, 0.018, lam=3.0)
    _fake_run(root, "cem10_s1", 1, 0.65, 0.03, lam=10.0)


def test_frontier_report_pairs_seeds_and_shows_each_verdict(tmp_path):
    import csv

    from splitcem.study.frontier import baseline_curve, compare, interp_mse
    from splitcem.study.frontier_report import write_frontier
    from splitcem.study.groups import find_runs, group_runs, seed_cells

    _study(tmp_path / "runs")
    rec = write_frontier([tmp_path / "runs"], tmp_path / "front")
    m = {c["strength"]: c for c in rec["matched"]}
    assert set(m) == {3.0, 10.0}
    # paired on the seeds it shares with the baseline, the same numbers as compare()
    groups = group_runs(find_runs([tmp_path / "runs"])[0])
    base, _ = seed_cells(groups["noise"])
    cem, _ = seed_cells(groups["noise(sigma=0.1) + cem"])
    c = compare(base, cem[3.0])
    assert m[3.0]["paired"] and m[3.0]["n_seeds"] == 3 and m[3.0]["seeds_run"] == [1, 2, 3, 9]
    assert m[3.0]["gain"] == pytest.approx(c.gain) and m[3.0]["low"] == pytest.approx(c.low)
    assert m[3.0]["verdict"] == "more private" and 0.1 < m[3.0]["gain"] < 0.3
    # unpaired, the seed effect drowns it: the pairing is what decides
    unpaired = compare({k: list(v.values()) for k, v in base.items()}, list(cem[3.0].values()))
    assert unpaired.verdict == "undecided"
    # the envelope at the setting's accuracy, and the seed without a baseline run, dropped
    assert m[3.0]["baseline_mse"] == pytest.approx(
        interp_mse(*baseline_curve(base), m[3.0]["accuracy"]))
    assert any(d.startswith("seed 9: no baseline run") for d in m[3.0]["dropped"])
    assert m[10.0]["verdict"] == "undecided" and m[10.0]["interval"] is None

    md = (tmp_path / "front" / "frontier.md").read_text()
    matched = md.split("## Attack MSE at matched accuracy")[1].split("### Per seed")[0]
    row = next(line for line in matched.splitlines() if "| lambda=3 |" in line)
    assert "3 of 4 (1, 2, 3, 9)" in row and "paired, model" in row and "**more private**" in row
    assert f"{100 * m[3.0]['gain']:+.1f}%" in row and f"{m[3.0]['baseline_mse']:.4f}" in row
    row10 = next(line for line in matched.splitlines() if "| lambda=10 |" in line)
    assert "one seed" in row10
    assert "noise MSE at that accuracy (envelope)" in md
    assert "- noise(sigma=0.1) + cem lambda=3: seed 9: no baseline run with seed 9" in md
    assert "125 (s1, s2); 126 (s3)" in md  # which held-out split each run was attacked on

    rows = list(csv.DictReader((tmp_path / "front" / "frontier.csv").open()))
    by = {(r["group"], r["strength"]): r for r in rows}
    assert len(rows) == 5 and by[("noise", "0.1")]["verdict"] == "baseline"
    r3 = by[("noise(sigma=0.1) + cem", "3.0")]
    assert r3["verdict"] == "more private" and r3["seeds"] == "1 2 3 9"
    assert r3["design"] == "paired, model" and "seed 9" in r3["dropped"]
    runs = list(csv.DictReader((tmp_path / "front" / "frontier_runs.csv").open()))
    assert len(runs) == 14 and {r["split_seed"] for r in runs} == {"125", "126"}


def test_an_undecided_setting_says_how_many_seeds_would_decide_it(tmp_path):
    from splitcem.study.frontier_report import write_frontier

    root = tmp_path / "runs"
    for sigma, acc, mse in ((0.1, 0.80, 0.010), (0.2, 0.70, 0.020)):
        for s, e in ((1, 1.0), (2, 1.03)):
            _fake_run(root, f"noise{sigma}_s{s}", s, acc, mse * e, sigma=sigma)
    for s, g in ((1, 1.05), (2, 1.25)):  # +5% and +25%: a gain, not yet decided
        _fake_run(root, f"cem3_s{s}", s, 0.75, 0.015 * g, lam=3.0)
    m = write_frontier([root], tmp_path / "front")["matched"][0]
    assert m["verdict"] == "undecided" and m["interval"] is not None
    assert m["interval"][0] < 0 < m["interval"][1] and m["seeds_needed"] >= 1
    md = (tmp_path / "front" / "frontier.md").read_text()
    assert f"about {m['seeds_needed']} more seed" in md and "**undecided**" in md


def test_plot_curves_gives_every_series_its_own_colour_and_keeps_the_legend_off_the_axes(
        tmp_path, monkeypatch):
    """Twelve series (more than tab10 has colours): twelve colours, the baseline black, and
    the legend is the figure's, below the axes, not inside one of them."""
    from matplotlib.axes import Axes
    from matplotlib.colors import to_hex
    from matplotlib.figure import Figure

    from splitcem.report import CurvePoint, plot_curves

    drawn: list[tuple[str, str]] = []
    legends: list[Figure] = []
    real_errorbar, real_legend = Axes.errorbar, Figure.legend

    def errorbar(self, *a, **kw):
        drawn.append((kw["label"], to_hex(kw["color"])))
        return real_errorbar(self, *a, **kw)

    def legend(self, *a, **kw):
        legends.append(self)
        assert kw["loc"] == "lower center"
        return real_legend(self, *a, **kw)

    monkeypatch.setattr(Axes, "errorbar", errorbar)
    monkeypatch.setattr(Figure, "legend", legend)
    series = {f"s{i:02d}": [CurvePoint(str(k), 0.8 - 0.01 * i - 0.02 * k, 0.0,
                                       0.01 + 0.001 * i + 0.002 * k, 0.0, 0.6, 0.0)
                            for k in range(2)] for i in range(12)}
    path = plot_curves(series, tmp_path / "f.png", baseline="s03")
    assert path.is_file() and Image.open(path).size[1] > 5 * 110  # taller: room for the legend
    colours = dict(drawn)
    assert len(drawn) == 2 * 12 and len(set(colours.values())) == 12
    assert colours["s03 (baseline)"] == "#000000"
    assert len(legends) == 1


def test_plot_panels_draws_the_baseline_black_and_gives_the_nth_series_one_colour(
        tmp_path, monkeypatch):
    """Five panels on a 3-column grid: every series drawn in its own panel with its legend,
    the baseline black wherever it is, the n-th other series one colour in every panel, the
    unused sixth axes hidden; no panels is an error."""
    from matplotlib.axes import Axes
    from matplotlib.colors import to_hex

    from splitcem.report import CurvePoint, plot_panels

    drawn: list[tuple[int, str, str]] = []
    hidden: list[int] = []
    real, real_visible = Axes.errorbar, Axes.set_visible

    def errorbar(self, *a, **kw):
        drawn.append((id(self), kw["label"], to_hex(kw["color"])))
        return real(self, *a, **kw)

    def set_visible(self, b):
        if not b:
            hidden.append(id(self))
        return real_visible(self, b)

    monkeypatch.setattr(Axes, "errorbar", errorbar)
    monkeypatch.setattr(Axes, "set_visible", set_visible)

    def pts(shift: float) -> list[CurvePoint]:
        return [CurvePoint.of(str(k), [0.8 - 0.02 * k], [0.01 + shift + 0.002 * k], [0.6])
                for k in range(3)]

    panels = {f"p{i}": {"base": pts(0.0), **{f"s{j}": pts(0.001 * (i + j + 1))
                                              for j in range(i % 3 + 1)}} for i in range(5)}
    path = plot_panels(panels, tmp_path / "p.png", baseline="base", title="t")
    assert path.is_file() and Image.open(path).size[0] > 3 * 4 * 100
    axes = list(dict.fromkeys(a for a, _, _ in drawn))
    assert len(axes) == 5 and len(drawn) == sum(len(s) for s in panels.values())
    colour = {(axes.index(a), lab): c for a, lab, c in drawn}
    assert all(colour[(i, "base")] == "#000000" for i in range(5))
    for j in range(3):
        seen = {c for (i, lab), c in colour.items() if lab == f"s{j}"}
        assert len(seen) == 1 and "#000000" not in seen
    assert len({colour[(4, f"s{j}")] for j in range(2)}) == 2
    assert len(hidden) == 1 and hidden[0] not in axes
    with pytest.raises(ValueError, match="no panels"):
        plot_panels({}, tmp_path / "q.png", baseline="base", title="t")


def test_curve_point_of_seeds_is_their_mean_and_sample_sd():
    from splitcem.report import CurvePoint, mean_sd

    p = CurvePoint.of("x", [0.7, 0.8], [0.01, 0.03, float("nan")], [0.5])
    assert (p.accuracy, p.mse, p.ssim) == pytest.approx((0.75, 0.02, 0.5))
    assert p.accuracy_sd == pytest.approx(0.0707107, rel=1e-5)
    assert p.mse_sd == pytest.approx(0.0141421, rel=1e-5) and p.ssim_sd == 0.0
    assert all(math.isnan(v) for v in mean_sd([None, float("nan")]))
