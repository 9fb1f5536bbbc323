"""Frontiers from finished run directories: group, plot, compare at matched accuracy, report.

:func:`write_frontier` reads every run directory under the given folders (``config.yaml`` +
``metrics.json``, searched recursively; the folders are only read), skips unfinished runs
with a note, groups the runs by defense family and writes ``frontier.md``, ``.json``,
``.csv`` and ``.png`` into ``out``. The maths is in :mod:`splitcem.study.frontier`.

Families (a *group* is a family in one context, see below):

* ``noise``: Gaussian noise alone, over sigma;
* ``noise(sigma=S) + cem``: noise plus CEM (lambda > 0), over lambda; any defense with CEM
  likewise, over lambda, with the defenses' strengths fixed in the label;
* ``D + noise(sigma=S)``: a zoo defense D over its strength (``Defense.strength_param``);
* ``cut``: no defense at all, over ``model.cut`` (a deeper split point is a free defense).

Everything else in the config (data, model, training, attacks, CEM's other settings for a
CEM family) is the group's *context*; runs in different contexts are never pooled, and
their labels say what differs. Runs with the same config up to name and device (e.g. a copy
made by ``splitcem sweep --adopt``) are counted once.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from splitcem._io import atomic_write, write_json, write_text
from splitcem.config import RunConfig, load_config
from splitcem.errors import ConfigError
from splitcem.study.frontier import matched_gain
from splitcem.report import GRID_FILE, RECON_FILE, _attack_metric, leakage_cell

__all__ = ["FrontierRun", "find_runs", "group_runs", "write_frontier"]

log = logging.getLogger(__name__)

#: config keys that neither change a run's results nor its group
_NOT_CONTEXT = {("name",), ("seed",), ("device",), ("data", "root"), ("data", "cache_dir"),
                ("train", "tensorboard"), ("defenses",), ("cem",)}


@dataclass
class FrontierRun:
    """One finished run, as the frontier sees it."""

    path: Path
    cfg: RunConfig
    record: dict[str, Any]
    family: str = ""
    strength_key: str = ""
    strength: float | None = None
    context: str = ""
    group: str = ""
    leakage_bits: float | None = None

    @property
    def name(self) -> str:
        return self.cfg.name

    @property
    def accuracy(self) -> float:
        return float((self.record.get("train") or {}).get("test_accuracy", float("nan")))

    def metric(self, m: str) -> float:
        return _attack_metric(self.record, m)


def _read(p: Path) -> dict[str, Any] | None:
    try:
        d = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


def find_runs(dirs: Sequence[str | Path]) -> tuple[list[FrontierRun], list[str]]:
    """Finished runs under ``dirs`` (recursively), and a note per run left out and why."""
    runs: list[FrontierRun] = []
    notes: list[str] = []
    seen: dict[str, Path] = {}
    for d in dirs:
        d = Path(d)
        if not d.is_dir():
            raise ConfigError(f"{d} is not a folder of run directories")
        for cfg_file in sorted(d.rglob("config.yaml")):
            run = cfg_file.parent
            if any(part.startswith(".") for part in run.relative_to(d).parts):
                continue
            try:
                cfg = load_config(cfg_file)
            except ConfigError as e:
                notes.append(f"{run}: config not readable here ({str(e).splitlines()[0]})")
                continue
            rec = _read(run / "metrics.json")
            if rec is None:
                notes.append(f"{run}: unfinished (no metrics.json yet)")
                continue
            epochs = (rec.get("train") or {}).get("epochs")
            if epochs != cfg.train.epochs:
                notes.append(f"{run}: unfinished (trained {epochs} of {cfg.train.epochs} epochs)")
                continue
            if not (rec.get("attacks") or {}).get("attacks"):
                notes.append(f"{run}: unfinished (not attacked yet)")
                continue
            key = json.dumps(_comparable(cfg), sort_keys=True)
            if key in seen:
                notes.append(f"{run}: same config as {seen[key]}, counted once")
                continue
            seen[key] = run
            runs.append(FrontierRun(run, cfg, rec))
    return runs, notes


def _comparable(cfg: RunConfig) -> dict[str, Any]:
    from splitcem.study.trials import comparable

    return comparable(cfg.to_dict())


def _strength_param(name: str) -> str | None:
    from splitcem.defenses import DEFENSES

    if name not in DEFENSES:
        return None
    return getattr(DEFENSES.get(name), "strength_param", None)


def _param_value(spec: dict[str, Any], param: str | None) -> Any:
    """A defense's parameter from its config, else the registered factory's default."""
    import inspect

    from splitcem.defenses import DEFENSES

    if param is None:
        return None
    if param in spec:
        return spec[param]
    try:
        p = inspect.signature(DEFENSES.get(spec["name"])).parameters.get(param)
    except (ValueError, TypeError, KeyError):
        return None
    return None if p is None or p.default is inspect.Parameter.empty else p.default


def _fmt(v: Any) -> str:
    from splitcem.study.grid import format_value

    return format_value(v)


def _family(cfg: RunConfig) -> tuple[str, str, float | None]:
    """(family label, strength key, strength value) of a run's config."""
    defs = list(cfg.defenses)
    lam = cfg.cem.lam if cfg.cem is not None else 0.0

    def fixed(spec: dict[str, Any]) -> str:
        sp = _strength_param(spec["name"])
        v = _param_value(spec, sp)
        return f"{spec['name']}({sp}={_fmt(v)})" if sp and v is not None else spec["name"]

    if lam > 0:
        label = " + ".join([fixed(s) for s in defs] + ["cem"])
        return label, "cem.lambda", float(lam)
    if not defs:
        return "cut", "model.cut", float(cfg.model.cut)
    primary = next((i for i, s in enumerate(defs) if s["name"] != "noise"), 0)
    sp = _strength_param(defs[primary]["name"])
    val = _param_value(defs[primary], sp)
    label = " + ".join(s["name"] if i == primary else fixed(s) for i, s in enumerate(defs))
    key = f"defenses.{primary}.{sp}" if sp else f"defenses.{primary}"
    return label, key, float(val) if isinstance(val, int | float) else None


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: json.dumps(d, sort_keys=True)}


def _context(cfg: RunConfig, family: str) -> dict[str, Any]:
    d = cfg.to_dict()
    for path in _NOT_CONTEXT:
        cur = d
        for k in path[:-1]:
            cur = cur.get(k) or {}
        cur.pop(path[-1], None)
    if family == "cut":
        d["model"].pop("cut", None)
    if family.endswith("cem") and cfg.cem is not None:
        d["cem"] = {k: v for k, v in cfg.cem.model_dump(by_alias=True).items() if k != "lambda"}
    return d


def group_runs(runs: list[FrontierRun]) -> dict[str, list[FrontierRun]]:
    """Set each run's family, strength, context and group label; return runs by group.

    Runs in the most common context get the family as their label; the others add what
    differs from it, e.g. ``noise [model.bottleneck_channels=4]``.
    """
    contexts: dict[str, dict[str, Any]] = {}
    counts: dict[str, int] = defaultdict(int)
    for r in runs:
        r.family, r.strength_key, r.strength = _family(r.cfg)
        ctx = _context(r.cfg, r.family)
        r.context = json.dumps(ctx, sort_keys=True)
        contexts[r.context] = _flatten(ctx)
        counts[r.context] += 1
    main = contexts[max(counts, key=lambda c: (counts[c], c))] if counts else {}
    groups: dict[str, list[FrontierRun]] = defaultdict(list)
    for r in runs:
        flat = contexts[r.context]
        # a key differs if both have it and disagree (a CEM family's context has CEM's
        # settings, the others have none: that absence is not a difference)
        diff = sorted(k for k in flat if k in main and flat[k] != main[k])
        parts = [f"{k}={_short(flat[k])}" for k in diff if not k.startswith("attack.")]
        if any(k.startswith("attack.") for k in diff):
            parts.append("other attacks")
        r.group = r.family + (f" [{', '.join(parts)}]" if parts else "")
        groups[r.group].append(r)
    return dict(groups)


def _short(v: Any) -> str:
    s = json.loads(v) if isinstance(v, str) else v
    return _fmt(s) if not isinstance(s, list | dict) else json.dumps(s)[:40]


def _cells(runs: list[FrontierRun], metric: str = "mse") -> dict[Any, list[tuple[float, float]]]:
    cells: dict[Any, list[tuple[float, float]]] = defaultdict(list)
    for r in runs:
        cells[r.strength].append((r.accuracy, r.metric(metric)))
    return dict(cells)


def _mean_sd(xs: Sequence[float]) -> tuple[float, float]:
    a = np.asarray([x for x in xs if x is not None and not math.isnan(x)], dtype=float)
    if not len(a):
        return float("nan"), float("nan")
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def _leakage(r: FrontierRun, compute: bool, cache: dict[str, Any], device: str | None) -> None:
    lk = r.record.get("leakage") or {}
    if lk.get("heldout_bits") is not None:
        r.leakage_bits = float(lk["heldout_bits"])
        return
    if not compute or r.record.get("leakage_note"):
        return
    ckpt = r.path / "checkpoints" / "last.pt"
    key = f"{r.path.resolve()}:{ckpt.stat().st_mtime_ns if ckpt.exists() else 0}"
    if key not in cache:
        from splitcem.experiment import leakage_run

        log.info("frontier: held-out leakage estimate of %s", r.path)
        cache[key] = leakage_run(r.path, write=False, device=device)  # the run is only read
    r.record = {**r.record, "leakage": cache[key]}
    if cache[key].get("heldout_bits") is not None:
        r.leakage_bits = float(cache[key]["heldout_bits"])


def _plot(groups: dict[str, list[FrontierRun]], baseline: str | None, path: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 5))
    axes = fig.subplots(1, 2)
    for gi, (g, runs) in enumerate(sorted(groups.items())):
        color = f"C{gi % 10}"
        for ax, metric in zip(axes, ("mse", "ssim"), strict=True):
            cells = defaultdict(list)
            for r in runs:
                cells[r.strength].append((r.accuracy * 100, r.metric(metric)))
            keys = sorted(cells, key=lambda k: (k is None, k))
            xs, ys, xe, ye = [], [], [], []
            for k in keys:
                acc_m, acc_s = _mean_sd([a for a, _ in cells[k]])
                m_m, m_s = _mean_sd([m for _, m in cells[k]])
                xs.append(m_m)
                ys.append(acc_m)
                xe.append(m_s)
                ye.append(acc_s)
            style = "-" if g == baseline else "--"
            ax.errorbar(xs, ys, xerr=xe, yerr=ye, fmt="o" + style, color=color, capsize=3,
                        lw=2 if g == baseline else 1.2, label=g + (" (baseline)" if g == baseline
                                                               else ""))
            for x, y, k in zip(xs, ys, keys, strict=True):
                if k is not None:
                    ax.annotate(_fmt(k), (x, y), fontsize=7, xytext=(4, 3),
                                textcoords="offset points", color=color)
    axes[0].set_xlabel("worst-case attack MSE (higher = more private)")
    axes[1].set_xlabel("worst-case attack SSIM (lower = more private)")
    for ax in axes:
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")
    fig.suptitle("privacy-utility frontier (mean ± sd over seeds; labels: strength)")
    fig.tight_layout()
    return atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110))


def _choose_shown(groups: dict[str, list[FrontierRun]], baseline: str | None,
                  show: Sequence[str], limit: int = 6) -> list[FrontierRun]:
    """Runs whose reconstructions are shown side by side: all of one seed (the same seed
    means the same held-out split, so the same images), at most two per group (weakest and
    strongest setting), the baseline first; or the runs named in ``show``."""
    runs = [r for rs in groups.values() for r in rs]
    if show:
        by_name = {r.name: r for r in runs}
        missing = [s for s in show if s not in by_name]
        if missing:
            raise ConfigError(f"--show: no finished run named {missing}; known: "
                              f"{sorted(by_name)}")
        return [by_name[s] for s in show]
    seeds = [r.cfg.seed for r in runs]
    if not seeds:
        return []
    seed = max(set(seeds), key=lambda s: (seeds.count(s), -s))
    order = sorted(groups, key=lambda g: (g != baseline, g))
    out: list[FrontierRun] = []
    for g in order:
        rs = sorted((r for r in groups[g] if r.cfg.seed == seed),
                    key=lambda r: (r.strength is None, r.strength))
        out += rs[:1] + rs[-1:] if len(rs) > 1 else rs
    return out[:limit]


def _recon_grid(shown: list[FrontierRun], out: Path) -> Path | None:
    """One grid: the originals, then each shown run's worst-case (lowest MSE) attack, from
    the runs' saved ``reconstructions.npz``; ``None`` if a run has none or the images differ."""
    import torch

    from splitcem.report import load_image_arrays, save_image_grid

    rows: dict[str, Any] = {}
    originals = None
    for r in shown:
        f = r.path / RECON_FILE
        if not f.is_file():
            return None
        arr = load_image_arrays(f)
        worst = ((r.record.get("attacks") or {}).get("worst") or {}).get("mse", {}).get("attack")
        orig = next((v for k, v in arr.items() if k.startswith("original")), None)
        rec = arr.get(worst) if worst else None
        if orig is None or rec is None:
            return None
        if originals is None:
            originals = orig
        elif orig.shape != originals.shape or not np.array_equal(orig, originals):
            return None  # different images: side by side would mislead
        rows[f"{r.name} ({worst})"] = rec
    if originals is None:
        return None
    tensors = {"original": originals, **rows}
    return save_image_grid(
        {k: torch.from_numpy(v).permute(0, 3, 1, 2).float() / 255 for k, v in tensors.items()},
        out / "frontier_reconstructions.png", show=8)


def write_frontier(
    dirs: Sequence[str | Path],
    out: str | Path,
    *,
    baseline: str | None = None,
    leakage: bool = False,
    show: Sequence[str] = (),
    n_boot: int = 2000,
    device: str | None = None,
) -> dict[str, Any]:
    """Read finished runs under ``dirs`` (never written to), write the frontier report into
    ``out``; returns the JSON record (also ``out/frontier.json``).

    Args:
        baseline: The group compared against (default ``noise`` if present).
        leakage: Compute the held-out I(x; z) estimate of runs that lack it (loads each
            run's checkpoint; results are cached in ``out/leakage_cache.json``, not written
            into the runs).
        show: Run names whose reconstructions to show side by side (default: chosen).
    """
    out = Path(out)
    runs, notes = find_runs(dirs)
    if not runs:
        raise ConfigError(f"no finished runs (config.yaml + metrics.json with attacks) under "
                          f"{', '.join(map(str, dirs))}" + (f"; {len(notes)} left out: "
                                                            + "; ".join(notes[:5]) if notes
                                                            else ""))
    out.mkdir(parents=True, exist_ok=True)
    cache_file = out / "leakage_cache.json"
    cache = (_read(cache_file) or {}) if leakage else {}
    for r in runs:
        try:
            _leakage(r, leakage, cache, device)
        except Exception as e:  # one unreadable checkpoint must not sink the report
            notes.append(f"{r.path}: no leakage estimate ({type(e).__name__}: {e})")
    if leakage:
        write_json(cache_file, cache)
    groups = group_runs(runs)
    if baseline is None:
        baseline = "noise" if "noise" in groups else None
    elif baseline not in groups:
        raise ConfigError(f"--baseline {baseline!r} is not a group here; groups: "
                          f"{sorted(groups)}")

    cells_out = []
    for g, rs in sorted(groups.items()):
        by = defaultdict(list)
        for r in rs:
            by[r.strength].append(r)
        for k in sorted(by, key=lambda k: (k is None, k)):
            cr = by[k]
            acc = _mean_sd([r.accuracy for r in cr])
            cells_out.append({
                "group": g, "strength_key": cr[0].strength_key, "strength": k,
                "seeds": sorted(r.cfg.seed for r in cr), "runs": [r.name for r in cr],
                "accuracy": acc[0], "accuracy_sd": acc[1],
                **{m: _mean_sd([r.metric(m) for r in cr])[0] for m in ("mse", "ssim", "psnr")},
                **{f"{m}_sd": _mean_sd([r.metric(m) for r in cr])[1] for m in ("mse", "ssim")},
                "leakage_heldout_bits": _mean_sd([r.leakage_bits for r in cr
                                                  if r.leakage_bits is not None])[0],
            })
    comparisons = []
    if baseline is not None:
        base_cells = _cells(groups[baseline])
        for g, rs in sorted(groups.items()):
            if g == baseline:
                continue
            for k, cell in sorted(_cells(rs).items(), key=lambda kv: (kv[0] is None, kv[0])):
                m = matched_gain(cell, base_cells, n_boot=n_boot)
                comparisons.append({"group": g, "strength": k, **m.to_dict()})

    record = {
        "dirs": [str(d) for d in dirs], "baseline": baseline, "runs": len(runs),
        "groups": {g: sorted({r.strength_key for r in rs}) for g, rs in groups.items()},
        "cells": cells_out, "matched": comparisons, "notes": notes,
        "method": "worst case per run = best score any attack reached (lowest MSE, highest "
                  "SSIM); matched accuracy: splitcem.study.frontier (linear interpolation along "
                  "the baseline's seed-mean curve, percentile bootstrap over seeds)",
    }
    write_json(out / "frontier.json", _finite(record))
    _write_csv(runs, out / "frontier.csv")
    _plot(groups, baseline, out / "frontier.png")
    shown = _choose_shown(groups, baseline, show)
    grid = _recon_grid(shown, out) if shown else None
    write_text(out / "frontier.md", _markdown(record, groups, shown, grid, out))
    return record


def _finite(o: Any) -> Any:
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, list):
        return [_finite(v) for v in o]
    return o


def _write_csv(runs: list[FrontierRun], path: Path) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["run", "path", "group", "strength_key", "strength", "seed", "accuracy", "mse",
                "ssim", "psnr", "leakage_heldout_bits"])
    for r in sorted(runs, key=lambda r: (r.group, r.strength is None, r.strength, r.cfg.seed)):
        w.writerow([r.name, str(r.path), r.group, r.strength_key, r.strength, r.cfg.seed,
                    r.accuracy, r.metric("mse"), r.metric("ssim"), r.metric("psnr"),
                    "" if r.leakage_bits is None else r.leakage_bits])
    write_text(path, buf.getvalue())


def _pct(v: float | None, digits: int = 1) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else \
        f"{100 * v:+.{digits}f}%"


def _num(v: float | None, digits: int = 4) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _rel(target: Path, start: Path) -> str:
    try:
        return os.path.relpath(target.resolve(), start.resolve())
    except ValueError:  # another drive (Windows)
        return str(target.resolve())


def _markdown(record: dict[str, Any], groups: dict[str, list[FrontierRun]],
              shown: list[FrontierRun], grid: Path | None, out: Path) -> str:
    base = record["baseline"]
    lines = [
        "# Privacy-utility frontier", "",
        f"{record['runs']} finished runs from {', '.join(record['dirs'])}; "
        f"{len(record['notes'])} left out (listed at the end). Accuracy is the test accuracy "
        "under the deployed defense; each run's attack figure is its worst case (the best "
        "score any of its attacks reached: lowest MSE, highest SSIM / PSNR).", "",
        "![frontier](frontier.png)", "",
        "## Points (mean ± sd over seeds)", "",
        "| group | strength | seeds | accuracy (%) | MSE | SSIM | PSNR (dB) | "
        "I(x;z) bound est., held-out (bits) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in record["cells"]:
        lk = c["leakage_heldout_bits"]
        lines.append(
            f"| {c['group']} | {c['strength_key'].rsplit('.', 1)[-1]}={_fmt(c['strength'])} | "
            f"{len(c['seeds'])} | {100 * c['accuracy']:.2f} ± {100 * c['accuracy_sd']:.2f} | "
            f"{_num(c['mse'])} ± {_num(c['mse_sd'])} | {_num(c['ssim'], 3)} | "
            f"{_num(c['psnr'], 2)} | {'-' if lk is None or math.isnan(lk) else f'{lk:.0f}'} |")
    lines += ["", "The I(x;z) column is a plug-in estimate of an upper bound (splitcem.leakage:"
              " k-means partition fitted on training features, statistics measured on test "
              "features in eval mode), not a guarantee; `-` where no run of the cell has one "
              "(run `splitcem frontier ... --leakage` to compute it).", ""]
    if base is None:
        lines += ["No baseline group (pass --baseline GROUP): no matched-accuracy comparison.",
                  ""]
    else:
        lines += [
            f"## Attack MSE at matched accuracy, against `{base}`", "",
            "For each setting: its mean MSE against the MSE the baseline reaches at the same "
            "mean accuracy (linear interpolation between the baseline's seed-mean points, no "
            "extrapolation); gain = MSE / baseline MSE - 1, with a 95% percentile bootstrap "
            "interval over seeds (each setting resamples its own seeds; a setting with one "
            "seed gets no interval and no verdict, and a baseline point with one seed adds no "
            "spread, so few seeds give an optimistic interval).", "",
            "| group | strength | seeds | accuracy (%) | MSE | baseline MSE at that accuracy |"
            " MSE gain | 95% interval | verdict |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        if not record["matched"]:
            lines.append("| (no other group with finished runs yet) | | | | | | | | |")
        for m in record["matched"]:
            key = next((c["strength_key"] for c in record["cells"] if c["group"] == m["group"]),
                       "")
            interval = ("-" if m["low"] is None else f"[{_pct(m['low'])}, {_pct(m['high'])}]")
            lines.append(
                f"| {m['group']} | {key.rsplit('.', 1)[-1]}={_fmt(m['strength'])} | "
                f"{m['seeds']} | {100 * m['accuracy']:.2f} | {_num(m['mse'])} | "
                f"{_num(m['baseline_mse'])} | {_pct(m['gain'])} | {interval} | {m['verdict']} |")
        lines.append("")
    lines += ["## Reconstructions", ""]
    if shown:
        seeds = sorted({r.cfg.seed for r in shown})
        same = len(seeds) == 1
        lines.append(
            ("Runs of seed " + str(seeds[0]) + ": the held-out split is drawn from the run's "
             "seed, so these runs were attacked on the same images (the grid columns are the "
             "same held-out indices)." if same else
             "Chosen runs have different seeds, hence different held-out images.") + "")
        lines.append("")
        if grid is not None:
            lines += [f"![reconstructions]({grid.name})", "",
                      "Top row: originals; each row below: that run's worst-case (lowest MSE) "
                      "attack.", ""]
        else:
            lines += ["Each run's own grid (top row: originals; a row per attack):", "",
                      "| run | reconstructions |", "|---|---|"]
            for r in shown:
                img = _rel(r.path / GRID_FILE, out)
                lines.append(f"| {r.name} ({r.group}) | ![{r.name}]({img}) |")
            lines.append("")
    lines += ["## Runs and their exact configs", ""]
    for g, rs in sorted(groups.items()):
        for r in sorted(rs, key=lambda r: (r.strength is None, r.strength, r.cfg.seed)):
            lines += [
                "<details>",
                f"<summary>{r.name}: {g}, {r.strength_key}={_fmt(r.strength)}, seed "
                f"{r.cfg.seed}, accuracy {100 * r.accuracy:.2f}%, MSE {r.metric('mse'):.4f}, "
                f"I(x;z) {leakage_cell(r.record)} ({r.path})</summary>", "",
                "```yaml", yaml.safe_dump(r.cfg.to_dict(), sort_keys=False).rstrip(), "```", "",
                "</details>", ""]
    if record["notes"]:
        lines += ["## Left out", ""] + [f"- {n}" for n in record["notes"]] + [""]
    return "\n".join(lines)
