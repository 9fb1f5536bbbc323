"""The paper's table, decided per defense: CEM against its own defense's curve and against noise.

For every setting with CEM (lambda > 0) the table gives, beside the seed means of accuracy and
the worst-case MSE / SSIM / PSNR without and with CEM:

* the **same-strength gain**, the paper's measure: MSE with CEM / MSE without CEM at the same
  defense strength - 1 (seed means; no matching of accuracy);
* the **matched gain against its own curve**: :func:`splitcem.study.frontier.compare` of the
  CEM cell against the same defense without CEM over its strengths (interpolated at the CEM
  cell's accuracy), with its interval and verdict;
* the **matched gain against noise alone**: the same against the noise-only curve over sigma.

Beside it, :func:`curve_table`: every defense's curve without CEM point by point (accuracy,
worst-case MSE / SSIM / PSNR, seeds) and each point's matched gain against noise alone, the
answer to "which defense leaks least at the accuracy I can afford?".

A run's *defense* and *strength* (:func:`defense_of`): a zoo defense (any stack entry but
noise) over its ``strength_param``; a noise-only stack with a model bottleneck other than the
default (8 channels, stride 1) is ``bottleneck`` over ``model.bottleneck_channels``; noise
alone is ``noise`` over sigma; no defense is ``cut`` over ``model.cut``. A defense's *curve*
is its runs without CEM whose configs agree up to seed, CEM and the strength. The noise curve
a setting is compared with agrees with it up to seed, defenses, CEM and the model bottleneck.

A row whose CEM cell has one seed has no interval: it is marked *exploratory*.

:func:`_defense_panels` draws the same runs, one panel per defense (``defenses.png``).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from splitcem._io import write_json, write_text
from splitcem.config import ModelConfig, RunConfig
from splitcem.report import CurvePoint, markdown_table, plot_panels
from splitcem.runid import comparable
from splitcem.study.frontier import Comparison, compare
from splitcem.study.frontier_plan import sequential_level
from splitcem.study.grid import format_value
from splitcem.study.groups import FrontierRun, as_ran, family, find_runs

__all__ = ["NOISE_SERIES", "PANELS_FILE", "PAPER_GAINS", "average_gain", "cem_lambda",
           "curve_key", "curve_rows", "curve_table", "defense_of",
           "paper_rows", "paper_table", "write_paper"]

#: the per-defense small multiples :func:`write_paper` draws beside its table
PANELS_FILE = "defenses.png"
#: the paper's average same-strength gains over defenses (CVPR 2025 CEM paper, abstract)
PAPER_GAINS = (0.129, 0.482)
_METRICS = ("mse", "ssim", "psnr")


def _no_cem(cfg: RunConfig) -> RunConfig:
    return cfg.model_copy(update={"cem": None})


def defense_of(cfg: RunConfig) -> tuple[str, str, Any]:
    """(defense, dotted strength key, strength value) of a run's config, CEM ignored."""
    defs = list(cfg.defenses)
    if not defs:
        return "cut", "model.cut", cfg.model.cut
    if any(s["name"] != "noise" for s in defs):  # a zoo defense: its strength_param
        _, key, val = family(_no_cem(cfg))
        return next(s["name"] for s in defs if s["name"] != "noise"), key, val
    m = ModelConfig.model_fields
    if (cfg.model.bottleneck_channels, cfg.model.bottleneck_stride) != (
            m["bottleneck_channels"].default, m["bottleneck_stride"].default):
        return "bottleneck", "model.bottleneck_channels", cfg.model.bottleneck_channels
    return "noise", "defenses.0.sigma", defs[0].get("sigma")


def _label(cfg: RunConfig, name: str, skey: str, val: Any) -> str:
    fam = family(_no_cem(cfg))[0]
    if name == "bottleneck":
        fam = "bottleneck + " + " + ".join(
            f"{s['name']}(sigma={format_value(s.get('sigma'))})" for s in cfg.defenses)
    return f"{fam} ({skey.rsplit('.', 1)[-1]}={format_value(val)})"


def _key(cfg: dict[str, Any], drop: Sequence[str]) -> str:
    d = comparable(cfg)
    for k in ("seed", "cem"):
        d.pop(k, None)
    for path in drop:
        cur: Any = d
        *head, last = path.split(".")
        for p in head:
            cur = cur[int(p)] if isinstance(cur, list) else cur.get(p, {})
        if isinstance(cur, dict):
            cur.pop(last, None)
    data = d.get("data") or {}
    data.pop("root", None)
    data.pop("cache_dir", None)
    return json.dumps(d, sort_keys=True)


def cem_lambda(cfg: RunConfig) -> float:
    """The run's CEM lambda (0 without CEM)."""
    return float(cfg.cem.lam) if cfg.cem is not None else 0.0


def curve_key(cfg: RunConfig) -> str:
    """The key of the defense curve a run belongs to: its config up to seed, CEM and its
    defense's strength (:func:`defense_of`). A setting with CEM and the runs of the same
    defense without CEM over its strength share it (its *own curve*)."""
    return _key(cfg.to_dict(), [defense_of(cfg)[1]])


def _run_curve(r: FrontierRun) -> str:
    """:func:`curve_key` of a finished run, with its numeric path as it ran
    (:func:`~splitcem.study.groups.as_ran`: ``amp: true`` and ``auto`` that ran bf16 are one
    curve)."""
    return _key(as_ran(r), [defense_of(r.cfg)[1]])


def _mean(xs: Sequence[float]) -> float:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def _sd(xs: Sequence[float]) -> float | None:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if len(xs) < 2:
        return None
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _stats(rs: Sequence[FrontierRun]) -> dict[str, Any]:
    """A cell's seed means of accuracy and each metric, and the sds of accuracy and MSE."""
    return {"accuracy": _mean([r.accuracy for r in rs]),
            **{m: _mean([r.metric(m) for r in rs]) for m in _METRICS},
            "mse_sd": _sd([r.metric("mse") for r in rs]),
            "accuracy_sd": _sd([r.accuracy for r in rs])}


def _cell(rs: Sequence[FrontierRun]) -> dict[int, tuple[float, float]]:
    return {r.cfg.seed: (r.accuracy, r.metric("mse")) for r in rs}


def _cmp(curve: dict[Any, list[FrontierRun]], rs: list[FrontierRun], level: float
         ) -> Comparison | None:
    cells = {k: _cell(v) for k, v in curve.items() if v}
    return compare(cells, _cell(rs), level=level) if cells else None


def _context(r: FrontierRun) -> str:
    """The key of the noise curve a run is compared with: its config (numeric path as it
    ran) up to seed, CEM, defenses and the model bottleneck."""
    return _key(as_ran(r), ["defenses", "model.bottleneck_channels", "model.bottleneck_stride"])


@dataclass
class _Grouped:
    """Finished runs by curve: ``own[curve][strength]`` (without CEM), ``noise[context]
    [sigma]`` (noise alone), ``cem[(curve, strength, lambda)]`` and ``labels[curve]``
    (defense, strength key)."""

    own: dict[str, dict[Any, list[FrontierRun]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(list)))
    noise: dict[str, dict[Any, list[FrontierRun]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(list)))
    cem: dict[tuple[str, Any, float], list[FrontierRun]] = field(
        default_factory=lambda: defaultdict(list))
    labels: dict[str, tuple[str, str]] = field(default_factory=dict)


def _group(runs: Sequence[FrontierRun]) -> _Grouped:
    g = _Grouped()
    for r in runs:
        name, skey, val = defense_of(r.cfg)
        curve = _run_curve(r)
        g.labels.setdefault(curve, (name, skey))
        lam = cem_lambda(r.cfg)
        if lam > 0:
            g.cem[(curve, val, lam)].append(r)
            continue
        g.own[curve][val].append(r)
        if name == "noise":
            g.noise[_context(r)][val].append(r)
    return g


def paper_rows(runs: Sequence[FrontierRun], *, level: float = 0.95) -> list[dict[str, Any]]:
    """One row per (defense, strength, lambda > 0): see the module docstring; the matched
    comparisons' intervals at ``level`` (a study seeded until decided: its
    :func:`~splitcem.study.frontier_plan.sequential_level`)."""
    return [row for _, row in _keyed_rows(_group(runs), level)]


def _keyed_rows(g: _Grouped, level: float) -> list[tuple[tuple[str, Any, float], dict[str, Any]]]:
    """:func:`paper_rows` of grouped runs, each with its CEM cell's (curve, strength, lambda)."""
    own, noise, labels = g.own, g.noise, g.labels
    rows: list[tuple[tuple[str, Any, float], dict[str, Any]]] = []
    for (curve, val, lam), with_cem in g.cem.items():
        name, skey = labels[curve]
        base = own.get(curve, {}).get(val, [])
        ctx = _context(with_cem[0])
        row: dict[str, Any] = {
            "defense": _label(with_cem[0].cfg, name, skey, val), "defense_name": name,
            "strength_key": skey, "strength": val, "lambda": lam,
            "seeds_without": len(base), "seeds_with": len(with_cem),
            "seed_list_without": sorted(r.cfg.seed for r in base),
            "seed_list_with": sorted(r.cfg.seed for r in with_cem),
        }
        for tag, rs in (("without", base), ("with", with_cem)):
            row |= {f"{k}_{tag}": v for k, v in _stats(rs).items()}
        row["mse_gain"] = row["mse_with"] / row["mse_without"] - 1.0 if base else None
        vs_own = _cmp(own.get(curve, {}), with_cem, level)
        vs_noise = _cmp(noise.get(ctx, {}), with_cem, level) if name != "noise" else vs_own
        row["vs_own"] = vs_own.to_dict() if vs_own is not None else None
        row["vs_noise"] = vs_noise.to_dict() if vs_noise is not None else None
        row["own_strengths"] = sorted(own.get(curve, {}), key=str)
        row["exploratory"] = len(with_cem) < 2
        rows.append(((curve, val, lam), row))
    rows.sort(key=lambda kw: (kw[1]["defense_name"] != "noise", kw[1]["defense_name"],
                              str(kw[1]["strength"]), kw[1]["lambda"]))
    return rows


def average_gain(rows: Sequence[dict[str, Any]]) -> tuple[float | None, list[str]]:
    """The same-strength gain averaged over defenses (each defense's rows averaged first)
    and the defenses it averages."""
    per: dict[str, list[float]] = defaultdict(list)
    for w in rows:
        if w["mse_gain"] is not None and not math.isnan(w["mse_gain"]):
            per[w["defense_name"]].append(w["mse_gain"])
    if not per:
        return None, []
    return sum(sum(g) / len(g) for g in per.values()) / len(per), list(per)


def _pct(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else f"{100 * x:+.1f}%"


def _matched(c: dict[str, Any] | None) -> str:
    if c is None:
        return "no curve"
    if c["gain"] is None:
        return f"{c['verdict']} ({c['reason']})" if c.get("reason") else str(c["verdict"])
    ci = "" if c["low"] is None else f" [{_pct(c['low'])}, {_pct(c['high'])}]"
    return f"{_pct(c['gain'])}{ci} {c['verdict']} (n={c['n_seeds']})"


def _with_sd(v: float, sd: float | None, fmt: str) -> str:
    return format(v, fmt) + ("" if sd is None else f" ± {format(sd, fmt)}")


def _accuracy(v: float, sd: float | None) -> str:
    """Accuracy (a fraction) as a percentage, ± its sd over seeds where there is one."""
    return _with_sd(100 * v, None if sd is None else 100 * sd, ".2f")


def paper_table(runs: Sequence[FrontierRun], *, level: float = 0.95
                ) -> tuple[str, list[dict[str, Any]]]:
    """The per-defense table (markdown) and its rows (:func:`paper_rows`, at ``level``)."""
    rows = paper_rows(runs, level=level)
    return _table(rows), rows


def _table(rows: Sequence[dict[str, Any]]) -> str:
    header = ["defense", "CEM lambda", "seeds (w/o, w/)", "accuracy % w/o", "w/", "MSE w/o",
              "w/", "SSIM w/o", "w/", "PSNR w/o", "w/", "same-strength gain",
              "matched vs own curve", "matched vs noise", "note"]
    cells = []
    for w in rows:
        note = "exploratory (1 seed)" if w["exploratory"] else ""
        cells.append([
            w["defense"], format_value(w["lambda"]), f"{w['seeds_without']}, {w['seeds_with']}",
            _accuracy(w["accuracy_without"], w["accuracy_sd_without"]),
            _accuracy(w["accuracy_with"], w["accuracy_sd_with"]),
            _with_sd(w["mse_without"], w["mse_sd_without"], ".4f"),
            _with_sd(w["mse_with"], w["mse_sd_with"], ".4f"),
            f"{w['ssim_without']:.3f}", f"{w['ssim_with']:.3f}",
            f"{w['psnr_without']:.2f}", f"{w['psnr_with']:.2f}",
            _pct(w["mse_gain"]), _matched(w["vs_own"]), _matched(w["vs_noise"]), note])
    avg, names = average_gain(rows)
    lines = [markdown_table(header, cells), "",
             f"Average same-strength gain over {len(names)} defense(s) "
             f"({', '.join(names) or 'none'}; each defense's rows averaged first): "
             f"{_pct(avg)}; the paper reports {_pct(PAPER_GAINS[0])} to "
             f"{_pct(PAPER_GAINS[1])}."]
    return "\n".join(lines)


#: the series each panel of ``defenses.png`` draws solid and black
NOISE_SERIES = "noise alone"
_WITHOUT = "without CEM"


def _order(vals: Sequence[Any]) -> list[Any]:
    """Strengths in order: numbers ascending, anything else after them by its text."""
    return sorted(vals, key=lambda v: (not isinstance(v, int | float), v
                                       if isinstance(v, int | float) else 0, str(v)))


def _point(val: Any, rs: Sequence[FrontierRun]) -> CurvePoint:
    return CurvePoint.of(format_value(val), [r.accuracy for r in rs],
                         [r.metric("mse") for r in rs], [r.metric("ssim") for r in rs])


def _defense_panels(g: _Grouped, keyed: Sequence[tuple[tuple[str, Any, float], dict[str, Any]]]
                   ) -> dict[str, dict[str, list[CurvePoint]]]:
    """``defenses.png``'s panels (:func:`~splitcem.report.plot_panels`): one per defense
    curve (the cut layer, no defense, left out), noise first: the noise-only curve it is
    compared with (:data:`NOISE_SERIES`), the defense without CEM over its strength, and one
    series per CEM lambda over the strengths it ran at, labelled with its matched gain
    against its own curve where it ran at one strength (the table's ``matched vs own
    curve``)."""
    verdict = dict(keyed)
    cem: dict[str, dict[float, dict[Any, list[FrontierRun]]]] = defaultdict(
        lambda: defaultdict(dict))
    for (curve, val, lam), rs in g.cem.items():
        cem[curve][lam][val] = rs
    curves = [c for c in {**g.own, **cem} if g.labels[c][0] != "cut"]
    curves.sort(key=lambda c: (g.labels[c][0] != "noise", g.labels[c][0]))
    panels: dict[str, dict[str, list[CurvePoint]]] = {}
    for curve in curves:
        name, skey = g.labels[curve]
        first = next(rs[0] for cells in (g.own.get(curve, {}), *cem[curve].values())
                     for rs in cells.values() if rs)
        series: dict[str, list[CurvePoint]] = {}
        base = g.noise.get(_context(first), {})
        if base:
            series[NOISE_SERIES] = [_point(v, base[v]) for v in _order(list(base))]
        own = g.own.get(curve, {})
        if own and name != "noise":
            series[_WITHOUT] = [_point(v, own[v]) for v in _order(list(own))]
        for lam in sorted(cem[curve]):
            cells = cem[curve][lam]
            label = f"CEM lambda={format_value(lam)}"
            if len(cells) == 1:
                row = verdict[(curve, next(iter(cells)), lam)]
                label += f": {_matched(row['vs_own'])}"
            series[label] = [_point(v, cells[v]) for v in _order(list(cells))]
        title, k = f"{name} (over {skey.rsplit('.', 1)[-1]})", 2
        while title in panels:  # two curves of one defense (say, other contexts)
            title, k = f"{name} (over {skey.rsplit('.', 1)[-1]}) #{k}", k + 1
        panels[title] = series
    return panels


def curve_rows(runs: Sequence[FrontierRun], *, level: float = 0.95) -> list[dict[str, Any]]:
    """One row per point of every defense's curve without CEM (noise alone, which is the
    baseline, and the cut layer, which is no defense, left out): seed means and spreads and
    the point's matched gain against the noise-only curve of its context (at ``level``);
    by defense and curve, then accuracy from high to low."""
    return _curve_rows(_group(runs), level)


def _curve_rows(g: _Grouped, level: float) -> list[dict[str, Any]]:
    """:func:`curve_rows` of grouped runs."""
    rows: list[tuple[str, str, float, dict[str, Any]]] = []
    for curve, cells in g.own.items():
        name, skey = g.labels[curve]
        if name in ("noise", "cut"):
            continue
        for val, rs in cells.items():
            vs_noise = _cmp(g.noise.get(_context(rs[0]), {}), rs, level)
            stats = _stats(rs)
            rows.append((name, curve, -stats["accuracy"], {
                "defense": _label(rs[0].cfg, name, skey, val), "defense_name": name,
                "strength_key": skey, "strength": val, "seeds": len(rs),
                "seed_list": sorted(r.cfg.seed for r in rs), **stats,
                "vs_noise": vs_noise.to_dict() if vs_noise is not None else None,
                "exploratory": len(rs) < 2}))
    return [w for *_, w in sorted(rows, key=lambda t: t[:3])]


def curve_table(runs: Sequence[FrontierRun], *, level: float = 0.95
                ) -> tuple[str, list[dict[str, Any]]]:
    """Every defense's curve without CEM against noise alone (markdown) and its rows
    (:func:`curve_rows`, at ``level``)."""
    rows = curve_rows(runs, level=level)
    return _curve_markdown(rows), rows


def _curve_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """:func:`curve_table`'s markdown of :func:`curve_rows`."""
    header = ["defense", "seeds", "accuracy %", "worst-case MSE", "SSIM", "PSNR",
              "matched vs noise", "note"]
    cells = [[w["defense"], str(w["seeds"]),
              _accuracy(w["accuracy"], w["accuracy_sd"]),
              _with_sd(w["mse"], w["mse_sd"], ".4f"), f"{w['ssim']:.3f}", f"{w['psnr']:.2f}",
              _matched(w["vs_noise"]), "exploratory (1 seed)" if w["exploratory"] else ""]
             for w in rows]
    return markdown_table(header, cells)


def write_paper(dirs: Sequence[str | Path], out: str | Path, *, looks: int = 1,
                title: str = "Defenses without and with CEM", failed: Sequence[str] = ()
                ) -> dict[str, Any]:
    """Write ``paper_table.md`` / ``.json`` (the CEM table, :func:`paper_table`),
    ``defense_curves.json`` (the curves against noise alone, :func:`curve_table`, also in
    ``paper_table.md``) and ``defenses.png`` (:func:`_defense_panels`, shown in
    ``paper_table.md``) for the finished runs under ``dirs`` into ``out``; intervals at the
    level that keeps 95% over ``looks`` looks (a study seeded until decided: its
    :func:`~splitcem.study.adaptive.looks`). ``failed``: trial names to list as failed.
    Returns ``{"runs": number of finished runs, "table": the CEM table (markdown), "rows":
    its rows, "curves": the curves table (markdown), "curve_rows": its rows}``."""
    runs, notes = find_runs(dirs)
    level = sequential_level(looks)
    g = _group(runs)
    keyed = _keyed_rows(g, level)
    rows = [row for _, row in keyed]
    table = _table(rows)
    crows = _curve_rows(g, level)
    curves = _curve_markdown(crows)
    panels = _defense_panels(g, keyed)
    where = ", ".join(str(d) for d in dirs)
    text = [f"# {title}", "",
            f"{len(runs)} finished runs in {where}; seed means (± one standard deviation "
            "over seeds); MSE / SSIM / PSNR are each run's worst case over the decoder and "
            "the defense-aware decoder. Same-strength gain (the paper's measure) = MSE with "
            "CEM / MSE without at the same defense strength - 1. Matched = MSE against the "
            "curve (the defense's own without CEM over its strength; noise alone over sigma) "
            f"interpolated at the CEM setting's accuracy - 1, with its "
            f"{100 * level:.4g}% interval (95% spread over up to {looks} "
            "looks: seeds until decided), verdict "
            "and seeds (splitcem.study.frontier.compare). Higher = CEM made inversion "
            "harder. A row with one CEM seed has no interval: exploratory.", "",
            table, ""]
    if panels:
        text += [f"![each defense without and with CEM against noise alone]({PANELS_FILE})", "",
                 "Each panel: one defense's curve without CEM (dashed), its CEM settings, and "
                 "noise alone (solid black) in its context; test accuracy against worst-case "
                 "MSE, mean ± sd over seeds, points labelled by strength (noise: sigma); a "
                 "CEM setting at one strength labelled with its matched gain against its own "
                 "curve.", ""]
    text += ["## Each defense's curve without CEM, against noise alone", "",
             "Every strength of every defense but noise alone (the baseline) and the cut "
             "layer (no defense), without CEM, by accuracy; matched vs noise as above, at "
             "the point's accuracy. Higher = the defense leaks less than noise alone at "
             "that accuracy.", "", curves, ""]
    if failed:
        text += ["Failed trials (see their trial.json): " + ", ".join(failed), ""]
    if notes:
        text += ["Not finished yet: " + "; ".join(notes), ""]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if panels:  # before the table that shows it
        plot_panels(panels, out / PANELS_FILE, baseline=NOISE_SERIES,
                    title=f"{title}: each defense against noise alone (higher MSE = more "
                          "private)")
    else:
        (out / PANELS_FILE).unlink(missing_ok=True)  # a stale one would show other runs
    write_text(out / "paper_table.md", "\n".join(text))
    write_json(out / "paper_table.json", rows)
    write_json(out / "defense_curves.json", crows)
    return {"runs": len(runs), "table": table, "rows": rows, "curves": curves,
            "curve_rows": crows}
