"""The frontier report of finished run directories: compare at matched accuracy, render.

:func:`write_frontier` reads every run directory under the given folders (through
:class:`splitcem.record.RunRecord`, searched recursively; the folders are only read), skips
unfinished runs with a note, groups the runs by defense family
(:mod:`splitcem.study.groups`) and writes ``frontier.md``, ``.json``, ``.csv`` and ``.png``
into ``out``. The maths is in :mod:`splitcem.study.frontier`. A report only reads: the
held-out I(x; z) estimate is shown where a run recorded it (``splitcem attack RUN
--leakage-only``, or ``attack.leakage: true``; ``splitcem frontier --leakage`` runs that step
on the runs that lack it first).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from splitcem._io import write_json, write_text
from splitcem.errors import ConfigError
from splitcem.report import (
    GRID_FILE,
    RECON_FILE,
    CurvePoint,
    leakage_cell,
    markdown_table,
    mean_sd,
    plot_curves,
)
from splitcem.study.frontier_plan import sequential_level
from splitcem.study.frontier_verdicts import (
    compare_groups,
    matched_markdown,
    split_seed,
    write_runs_csv,
    write_settings_csv,
)
from splitcem.study.frontier_verdicts import (
    num as _num,
)
from splitcem.study.frontier_verdicts import (
    splits as _splits,
)
from splitcem.study.grid import format_value as _fmt
from splitcem.study.groups import FrontierRun, family, find_runs, group_runs

__all__ = ["FrontierRun", "family", "find_runs", "group_runs", "write_frontier"]

log = logging.getLogger(__name__)


def _leakage(r: FrontierRun) -> None:
    """The held-out estimate the run recorded, if any (a report computes nothing)."""
    lk = r.record.get("leakage") or {}
    if lk.get("heldout_bits") is not None:
        r.leakage_bits = float(lk["heldout_bits"])


def _plot(groups: dict[str, list[FrontierRun]], baseline: str | None, path: Path) -> Path:
    series: dict[str, list[CurvePoint]] = {}
    for g, runs in groups.items():
        cells: dict[Any, list[FrontierRun]] = defaultdict(list)
        for r in runs:
            cells[r.strength].append(r)
        series[g] = [CurvePoint.of(
            None if k is None else _fmt(k), [r.accuracy for r in cells[k]],
            [r.metric("mse") for r in cells[k]], [r.metric("ssim") for r in cells[k]])
            for k in sorted(cells, key=lambda k: (k is None, k))]
    return plot_curves(series, path, baseline=baseline)


def _choose_shown(groups: dict[str, list[FrontierRun]], baseline: str | None,
                  show: Sequence[str], limit: int = 6) -> list[FrontierRun]:
    """Runs whose reconstructions are shown side by side: all attacked on one held-out split
    (so on the same images), at most two per group (weakest and strongest setting), the
    baseline first; or the runs named in ``show``."""
    runs = [r for rs in groups.values() for r in rs]
    if show:
        by_name = {r.name: r for r in runs}
        missing = [s for s in show if s not in by_name]
        if missing:
            raise ConfigError(f"--show: no finished run named {missing}; known: "
                              f"{sorted(by_name)}")
        return [by_name[s] for s in show]
    keys = [_split_key(r) for r in runs]
    if not keys:
        return []
    first = {k: min(r.cfg.seed for r in runs if _split_key(r) == k) for k in keys}
    key = max(set(keys), key=lambda k: (keys.count(k), -first[k]))
    order = sorted(groups, key=lambda g: (g != baseline, g))
    out: list[FrontierRun] = []
    for g in order:
        rs = sorted((r for r in groups[g] if _split_key(r) == key),
                    key=lambda r: (r.strength is None, r.strength))
        out += rs[:1] + rs[-1:] if len(rs) > 1 else rs
    return out[:limit]


def _split_key(r: FrontierRun) -> str:
    """The held-out split's identity (its seed, and the kept test subset's where
    ``limit_test`` is set): runs with one key were attacked on the same images."""
    sp = {k: v for k, v in (r.split or {"seed": r.cfg.seed}).items() if k != "legacy"}
    return json.dumps(sp, sort_keys=True)


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
    show: Sequence[str] = (),
    n_boot: int = 2000,
    looks: int = 1,
) -> dict[str, Any]:
    """Read finished runs under ``dirs`` (never written to), write the frontier report into
    ``out``; returns the JSON record (also ``out/frontier.json``).

    Args:
        baseline: The group compared against (default ``noise`` if present).
        show: Run names whose reconstructions to show side by side (default: chosen).
        looks: How many times a setting may have been judged while seeds were added until
            decided (a sweep's ``seeds: {min, max}``: ``max - min + 1``; 1: a fixed design).
            The intervals are then at :func:`~splitcem.study.frontier_plan.sequential_level`.
    """
    level = sequential_level(looks)
    out = Path(out)
    runs, notes = find_runs(dirs)
    if not runs:
        raise ConfigError(f"no finished runs (config.yaml + metrics.json with attacks) under "
                          f"{', '.join(map(str, dirs))}" + (f"; {len(notes)} left out: "
                                                            + "; ".join(notes[:5]) if notes
                                                            else ""))
    out.mkdir(parents=True, exist_ok=True)
    for r in runs:
        _leakage(r)
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
            acc = mean_sd([r.accuracy for r in cr])
            cells_out.append({
                "group": g, "strength_key": cr[0].strength_key, "strength": k,
                "seeds": sorted(r.cfg.seed for r in cr), "runs": [r.name for r in cr],
                "split_seeds": {str(r.cfg.seed): split_seed(r) for r in cr},
                "accuracy": acc[0], "accuracy_sd": acc[1],
                **{m: mean_sd([r.metric(m) for r in cr])[0] for m in ("mse", "ssim", "psnr")},
                **{f"{m}_sd": mean_sd([r.metric(m) for r in cr])[1] for m in ("mse", "ssim")},
                "leakage_heldout_bits": mean_sd([r.leakage_bits for r in cr
                                                  if r.leakage_bits is not None])[0],
            })
    comparisons, base_dropped = compare_groups(groups, baseline, level=level) \
        if baseline is not None else ([], [])
    record = {
        "dirs": [str(d) for d in dirs], "baseline": baseline, "runs": len(runs),
        "groups": {g: sorted({r.strength_key for r in rs}) for g, rs in groups.items()},
        "cells": cells_out, "matched": comparisons, "notes": notes,
        "splits_per_seed": _splits_per_seed(runs), "baseline_dropped": base_dropped,
        "level": level, "looks": looks,
        "method": "worst case per run = best score any attack reached (lowest MSE, highest "
                  "SSIM); matched accuracy: splitcem.study.frontier.compare (the baseline's "
                  "monotone envelope of seed means; paired per seed where seeds are shared, "
                  f"additive model or per-seed t interval, {100 * level:.4g}%)",
    }
    write_json(out / "frontier.json", _finite(record))
    write_settings_csv(record, out / "frontier.csv")
    write_runs_csv(runs, out / "frontier_runs.csv")
    _plot(groups, baseline, out / "frontier.png")
    shown = _choose_shown(groups, baseline, show)
    grid = _recon_grid(shown, out) if shown else None
    write_text(out / "frontier.md", _markdown(record, groups, shown, grid, out))
    return record


def _splits_per_seed(runs: list[FrontierRun]) -> str:
    """``one``: every run attacked on one held-out split; ``own``: several splits, but one
    per seed (pairs by seed share their images); ``mixed``: otherwise."""
    keys = {_split_key(r) for r in runs}
    if len(keys) <= 1:
        return "one"
    per: dict[int, set[str]] = defaultdict(set)
    for r in runs:
        per[r.cfg.seed].add(_split_key(r))
    return "own" if all(len(v) == 1 for v in per.values()) else "mixed"


def _as_attacked(r: FrontierRun) -> dict[str, Any]:
    """The run's config with ``data.split_seed`` = the partition its attacks really ran on
    (a run attacked before the fixed split existed: its own seed)."""
    d = r.cfg.to_dict()
    if r.split is not None:
        d["data"]["split_seed"] = r.split.get("seed")
    return d


def _finite(o: Any) -> Any:
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, list):
        return [_finite(v) for v in o]
    return o


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
    ]
    points = []
    for c in record["cells"]:
        lk = c["leakage_heldout_bits"]
        points.append([
            c["group"], f"{c['strength_key'].rsplit('.', 1)[-1]}={_fmt(c['strength'])}",
            str(len(c["seeds"])), f"{100 * c['accuracy']:.2f} ± {100 * c['accuracy_sd']:.2f}",
            f"{_num(c['mse'])} ± {_num(c['mse_sd'])}", _num(c["ssim"], 3),
            _num(c["psnr"], 2), "-" if lk is None or math.isnan(lk) else f"{lk:.0f}",
            _splits(c["split_seeds"])])
    lines.append(markdown_table(["group", "strength", "seeds", "accuracy (%)", "MSE", "SSIM",
                                 "PSNR (dB)", "I(x;z) bound est., held-out (bits)",
                                 "attacked on split (data.split_seed)"], points))
    lines += ["", "The I(x;z) column is a plug-in estimate of an upper bound (splitcem.leakage:"
              " k-means partition fitted on training features, statistics measured on test "
              "features in eval mode), not a guarantee; `-` where no run of the cell has one "
              "(run `splitcem frontier ... --leakage` to compute it).", ""]
    if base is None:
        lines += ["No baseline group (pass --baseline GROUP): no matched-accuracy comparison.",
                  ""]
    else:
        lines += matched_markdown(record)
    lines += ["## Reconstructions", ""]
    if shown:
        seeds = sorted({split_seed(r) for r in shown})
        same = len({_split_key(r) for r in shown}) == 1
        lines.append(
            "Runs attacked on the held-out split of seed " + str(seeds[0]) + " (data."
             "split_seed; for runs attacked before it existed, the run's seed), so on the same "
             "images (the grid columns are the same held-out indices)." if same else
             "Chosen runs were attacked on different held-out splits, hence different "
             "images.")
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
                "```yaml", yaml.safe_dump(_as_attacked(r), sort_keys=False).rstrip(), "```", "",
                "</details>", ""]
    if record["notes"]:
        lines += ["## Left out", ""] + [f"- {n}" for n in record["notes"]] + [""]
    return "\n".join(lines)
