"""The frontier report's verdict tables: every setting against the baseline at matched
accuracy (cells keyed by seed, so shared seeds pair), as markdown and CSV rows.

Used by :mod:`splitcem.study.frontier_report`; the maths is
:func:`splitcem.study.frontier.compare`.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from splitcem._io import write_text
from splitcem.report import markdown_table
from splitcem.study.frontier import compare
from splitcem.study.grid import format_value as _fmt
from splitcem.study.groups import FrontierRun, seed_cells

__all__ = ["compare_groups", "matched_markdown", "num", "split_seed", "splits",
           "write_runs_csv", "write_settings_csv"]


def _without_attacks(r: FrontierRun) -> str:
    ctx = json.loads(r.context)
    ctx.pop("attack", None)
    return json.dumps(ctx, sort_keys=True)


def _attacks(r: FrontierRun) -> str:
    return json.dumps(json.loads(r.context).get("attack"), sort_keys=True)


def baselines_by_attacks(groups: dict[str, list[FrontierRun]], baseline: str
                         ) -> dict[str, str]:
    """The baseline group for each way of attacking: ``baseline`` for its own attacks, and
    for other attacks the group of ``baseline``'s family that differs from it only in its
    attacks (e.g. ``noise [other attacks]``). Worst-case MSEs of two attack suites are not
    one scale, so a setting is compared only with baseline runs attacked as it was."""
    ref = groups[baseline][0]
    out = {_attacks(ref): baseline}
    for g, rs in sorted(groups.items()):
        r = rs[0]
        if r.family == ref.family and _without_attacks(r) == _without_attacks(ref):
            out.setdefault(_attacks(r), g)
    return out


def compare_groups(groups: dict[str, list[FrontierRun]], baseline: str, *,
                   level: float = 0.95) -> tuple[list[dict[str, Any]], list[str]]:
    """Every other group's settings against ``baseline`` at matched accuracy, cells keyed
    by seed so that settings sharing seeds with the baseline are paired; and the baseline's
    runs left out of its cells, and why. A group attacked otherwise than ``baseline`` is
    compared with the baseline family's runs attacked the same way
    (:func:`baselines_by_attacks`), or not at all."""
    bases = baselines_by_attacks(groups, baseline)
    base_cells: dict[str, Any] = {}
    base_notes: dict[Any, list[str]] = {}
    for b in set(bases.values()):
        base_cells[b], notes_b = seed_cells(groups[b])
        if b == baseline:
            base_notes = notes_b
    out = []
    for g, rs in sorted(groups.items()):
        if g in bases.values():
            continue
        against = bases.get(_attacks(rs[0]))
        cells, notes = seed_cells(rs)
        for k, cell in sorted(cells.items(), key=lambda kv: (kv[0] is None, kv[0])):
            row: dict[str, Any] = {"group": g, "strength_key": rs[0].strength_key,
                                   "strength": k, "seeds_run": sorted(cell),
                                   "baseline_group": against}
            if against is None:
                out.append({**row, **_no_baseline(cell, groups[baseline][0].family)})
                continue
            c = compare(base_cells[against], cell, level=level)
            no_gain = [_no_gain(s, cell[s][0], base_cells[against]) for s in sorted(cell)
                       if s not in c.per_seed and not any(x.startswith(f"seed {s}:")
                                                          for x in c.dropped)]
            out.append({
                **row, **c.to_dict(),
                "design": f"{'paired' if c.paired else 'unpaired'}, "
                          f"{'per-seed t' if c.method == 'per_seed' else 'model'}",
                "dropped": list(c.dropped) + no_gain + notes.get(k, []),
            })
    return out, [n for ns in base_notes.values() for n in ns]


def _no_baseline(cell: dict[int, tuple[float, float]], family: str) -> dict[str, Any]:
    """A row for a setting no baseline run was attacked like."""
    pts = list(cell.values())
    return {"gain": None, "interval": None, "low": None, "high": None, "verdict":
            "no comparison", "n_seeds": 0, "seeds": 0, "paired": False, "seeds_needed": None,
            "accuracy": float(np.mean([a for a, _ in pts])),
            "mse": float(np.exp(np.mean([math.log(m) for _, m in pts]))),
            "baseline_mse": None, "per_seed": {}, "per_seed_interval": None, "spread_p": None,
            "design": "-", "dropped": [], "reason": f"attacked otherwise than every "
            f"{family!r} run: no baseline attacked the same way"}


def _no_gain(seed: int, acc: float, base: dict[Any, dict[int, Any]]) -> str:
    if not any(seed in c for c in base.values()):
        return f"seed {seed}: no per-seed gain (no baseline run with seed {seed}; used unpaired)"
    return f"seed {seed}: no per-seed gain (accuracy {acc:.4f} outside seed {seed}'s own " \
        "baseline curve; still in the model estimate)"


def split_seed(r: FrontierRun) -> int:
    """The seed of the aux / held-out split the run's attacks ran on."""
    return int((r.split or {}).get("seed", r.cfg.seed))


_CSV = ["group", "strength_key", "strength", "seeds", "accuracy", "mse", "baseline_mse",
        "gain", "low", "high", "design", "verdict", "seeds_needed", "n_seeds", "dropped"]


def write_settings_csv(record: dict[str, Any], path: Path) -> None:
    """One row per setting: its points, and against the baseline its comparison."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(_CSV)
    matched = {(m["group"], m["strength"]): m for m in record["matched"]}
    for c in record["cells"]:
        m = matched.get((c["group"], c["strength"]), {})
        row = {**{k: m.get(k) for k in _CSV}, **{k: c[k] for k in ("group", "strength_key",
                                                                    "strength", "accuracy",
                                                                    "mse")}}
        row["seeds"] = " ".join(map(str, c["seeds"]))
        row["dropped"] = " | ".join(m.get("dropped") or [])
        if c["group"] == record["baseline"]:
            row["verdict"] = "baseline"
        w.writerow(["" if row[k] is None else row[k] for k in _CSV])
    write_text(path, buf.getvalue())


def write_runs_csv(runs: list[FrontierRun], path: Path) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["run", "path", "group", "strength_key", "strength", "seed", "split_seed",
                "accuracy", "mse", "ssim", "psnr", "leakage_heldout_bits"])
    for r in sorted(runs, key=lambda r: (r.group, r.strength is None, r.strength, r.cfg.seed)):
        w.writerow([r.name, str(r.path), r.group, r.strength_key, r.strength, r.cfg.seed,
                    split_seed(r), r.accuracy, r.metric("mse"), r.metric("ssim"),
                    r.metric("psnr"), "" if r.leakage_bits is None else r.leakage_bits])
    write_text(path, buf.getvalue())


def _pct(v: float | None, digits: int = 1) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else \
        f"{100 * v:+.{digits}f}%"


def num(v: float | None, digits: int = 4) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def splits(by_seed: dict[str, int]) -> str:
    """Which held-out split each seed's run was attacked on, e.g. ``125 (s125, s126)``."""
    runs: dict[int, list[str]] = defaultdict(list)
    for seed, sp in by_seed.items():
        runs[sp].append(f"s{seed}")
    return "; ".join(f"{sp} ({', '.join(v)})" for sp, v in sorted(runs.items()))


def _verdict_md(m: dict[str, Any]) -> str:
    v = m["verdict"]
    if v == "undecided":
        need = m["seeds_needed"]
        more = (f"about {need} more seed{'s' if need != 1 else ''} would decide it"
                if need is not None else "more seeds needed; how many is unknown"
                if m["interval"] is None else "no number of seeds decides it at this gain")
        return f"**undecided** ({m['reason']}; {more})"
    if v == "no comparison":
        return f"no comparison ({m['reason']})"
    return f"**{v}**"


def matched_markdown(record: dict[str, Any]) -> list[str]:
    base = record["baseline"]
    level = record.get("level", 0.95)
    looks = record.get("looks", 1)
    pct = f"{100 * level:.4g}%"
    lines = [
        f"## Attack MSE at matched accuracy, against `{base}`", "",
        f"For each setting: its worst-case MSE against the `{base}` frontier at the same "
        f"accuracy: the monotone (Pareto) envelope of `{base}`'s seed means, joined by straight "
        "lines, no extrapolation. Gain = MSE / envelope MSE - 1 (geometric mean over seeds), "
        f"with a {pct} t interval (`splitcem.study.frontier.compare`). *paired*: the setting "
        f"shares at least 2 seeds with `{base}`, so each seed's effect on every run cancels "
        "(seed effects in the model); *model*: least squares over all runs, residual spread "
        "pooled; *per-seed t*: each seed's gain against its own baseline curve, a t interval "
        "over seeds (used where the setting's runs spread more than the baseline's: spread "
        "test p < 0.1). A verdict is printed only when the interval excludes 0; otherwise "
        "*undecided*, with the seeds that would decide it if the estimate and spread stayed "
        "as observed. *seeds*: those the estimate rests on (of those run); accuracy and "
        "worst-case MSE: means over all seeds run.", "",
    ]
    if looks > 1:
        lines += [f"Read as a study whose settings were seeded until decided (`--looks {looks}`:"
                  f" judged up to {looks} times each): every interval is {pct}, so that over all "
                  "the looks a false verdict stays at most 5% (Bonferroni; "
                  "`splitcem.study.frontier_plan.sequential_level`; a 95% interval looked at "
                  "after every seed gives one more than twice as often, 11.9% in simulation: "
                  "`python benchmarks/until_decided.py`).", ""]
    others = sorted({m["baseline_group"] for m in record["matched"]
                     if m.get("baseline_group") not in (None, base)})
    if others:
        lines += [f"Worst-case MSEs of two attack suites are not one scale: a group attacked "
                  f"otherwise than `{base}` is compared with the `{base}` runs attacked as it "
                  f"was ({', '.join(f'`{o}`' for o in others)}: its frontier, its seeds), and "
                  "a group no such run matches is not compared.", ""]
    if record.get("splits_per_seed") == "own":
        lines += ["The runs were not all attacked on one held-out split (see *attacked on "
                  "split* above), but every run of one seed was attacked on the same split: a "
                  "paired comparison compares runs of one seed, on the same images.", ""]
    rows = []
    for m in record["matched"]:
        iv = "-" if m["low"] is None else f"[{_pct(m['low'])}, {_pct(m['high'])}]"
        run = m["seeds_run"]
        seeds = f"{m['n_seeds']}" + (f" of {len(run)}" if len(run) != m["n_seeds"] else "")
        rows.append([m["group"], f"{m['strength_key'].rsplit('.', 1)[-1]}={_fmt(m['strength'])}",
                     f"{seeds} ({', '.join(map(str, run))})", f"{100 * m['accuracy']:.2f}",
                     num(m["mse"]), num(m["baseline_mse"]), _pct(m["gain"]), iv,
                     m["design"], _verdict_md(m)])
    if not rows:
        rows.append(["(no other group with finished runs yet)"] + [""] * 9)
    lines.append(markdown_table(
        ["group", "strength", "seeds", "accuracy (%)", "worst-case MSE",
         f"{base} MSE at that accuracy (envelope)", "MSE gain", f"{pct} interval", "method",
         "verdict"], rows))
    lines += ["", "### Per seed", "",
              "Each seed's gain against that seed's own baseline curve, and the t interval "
              "over them (the check that does not assume the baseline's spread); spread p: "
              "the test that the setting's runs follow the baseline's seed effects with its "
              "spread.", ""]
    per = [[m["group"], f"{m['strength_key'].rsplit('.', 1)[-1]}={_fmt(m['strength'])}",
            ", ".join(f"{k}: {_pct(v)}" for k, v in m["per_seed"].items()) or "-",
            "-" if m["per_seed_interval"] is None else
            f"[{_pct(m['per_seed_interval'][0])}, {_pct(m['per_seed_interval'][1])}]",
            num(m["spread_p"], 3)] for m in record["matched"]]
    if per:
        lines.append(markdown_table(["group", "strength", "per-seed gains", "t interval",
                                     "spread p"], per))
    dropped = [f"- {m['group']} {m['strength_key'].rsplit('.', 1)[-1]}={_fmt(m['strength'])}: "
               f"{d}" for m in record["matched"] for d in m["dropped"]]
    dropped += [f"- {base} (baseline): {d}" for d in record.get("baseline_dropped") or []]
    lines += ["", "### Dropped seeds", "",
              *(dropped or ["None: every seed of every setting is in its estimate and its "
                            "per-seed gains (there are no bootstrap resamples to drop)."]), ""]
    return lines
