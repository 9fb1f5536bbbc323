"""The paper's comparison in one command: a bundled sweep, its paper-shaped table, frontiers.

``splitcem reproduce cifar10 --protocol cpu`` runs ``configs/sweeps/cifar10_cpu.yaml``
(each defense at its strengths without and with CEM, the noise-only curve, the cut
baseline; every run attacked with the worst case of ``decoder`` and ``decoder_adaptive``)
through :func:`splitcem.study.trials.run_grid`, so re-running continues where it stopped; then it
writes ``paper_table.md`` / ``.json`` (accuracy, MSE, SSIM, PSNR without / with CEM and the
relative gain in MSE, seed means) and the frontier report (:mod:`splitcem.study.frontier_report`)
into the sweep's folder.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from splitcem._io import write_json, write_text
from splitcem.errors import ConfigError
from splitcem.report import markdown_table
from splitcem.study.frontier_report import write_frontier
from splitcem.study.grid import format_value as _fmt
from splitcem.study.groups import FrontierRun, family, find_runs
from splitcem.study.trials import GridResult, run_grid

__all__ = ["paper_table", "reproduce", "sweep_file"]

SWEEPS = Path(__file__).resolve().parents[1] / "configs" / "sweeps"  # bundled in the package


def sweep_file(dataset: str, protocol: str) -> Path:
    """The bundled sweep file ``configs/sweeps/{dataset}_{protocol}.yaml``."""
    path = SWEEPS / f"{dataset}_{protocol}.yaml"
    if not path.is_file():
        have = sorted(p.stem for p in SWEEPS.glob("*.yaml")) if SWEEPS.is_dir() else []
        raise ConfigError(f"no bundled sweep for {dataset} / {protocol} ({path}); available: "
                          f"{', '.join(have) or 'none (run from a source checkout)'}")
    return path


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def paper_table(runs: Sequence[FrontierRun]) -> tuple[str, list[dict[str, Any]]]:
    """Pair every run with CEM (lambda > 0) with the runs of the same config without it;
    one row per (defense setting, lambda), seed means. Returns (markdown, rows)."""
    by_key: dict[str, dict[float, list[FrontierRun]]] = defaultdict(lambda: defaultdict(list))
    labels: dict[str, str] = {}
    for r in runs:
        d = r.cfg.to_dict()
        lam = float(r.cfg.cem.lam) if r.cfg.cem is not None else 0.0
        for k in ("name", "seed", "device", "cem"):
            d.pop(k, None)
        d["data"].pop("root", None)
        d["data"].pop("cache_dir", None)
        d["train"].pop("tensorboard", None)
        key = json.dumps(d, sort_keys=True)
        by_key[key][lam].append(r)
        if lam == 0:
            fam, skey, val = family(r.cfg)
            labels[key] = f"{fam} ({skey.rsplit('.', 1)[-1]}={_fmt(val)})"
    rows = []
    for key, by_lam in by_key.items():
        base = by_lam.get(0.0)
        if not base:
            continue
        for lam, with_cem in sorted(by_lam.items()):
            if lam == 0:
                continue
            row: dict[str, Any] = {"defense": labels[key], "lambda": lam,
                                   "seeds_without": len(base), "seeds_with": len(with_cem)}
            for tag, rs in (("without", base), ("with", with_cem)):
                row[f"accuracy_{tag}"] = _mean([r.accuracy for r in rs])
                for m in ("mse", "ssim", "psnr"):
                    row[f"{m}_{tag}"] = _mean([r.metric(m) for r in rs])
            row["mse_gain"] = row["mse_with"] / row["mse_without"] - 1.0
            rows.append(row)
    rows.sort(key=lambda r: (r["defense"], r["lambda"]))
    header = ["defense", "CEM lambda", "seeds (w/o, w/)", "accuracy % w/o", "w/", "MSE w/o",
              "w/", "SSIM w/o", "w/", "PSNR w/o", "w/", "MSE gain with CEM"]
    cells = [[w["defense"], _fmt(w["lambda"]), f"{w['seeds_without']}, {w['seeds_with']}",
              f"{100 * w['accuracy_without']:.2f}", f"{100 * w['accuracy_with']:.2f}",
              f"{w['mse_without']:.4f}", f"{w['mse_with']:.4f}", f"{w['ssim_without']:.3f}",
              f"{w['ssim_with']:.3f}", f"{w['psnr_without']:.2f}", f"{w['psnr_with']:.2f}",
              f"{100 * w['mse_gain']:+.1f}%"] for w in rows]
    lines = [markdown_table(header, cells)]
    return "\n".join(lines), rows


def reproduce(
    dataset: str = "cifar10",
    protocol: str = "cpu",
    *,
    out: str | Path | None = None,
    address: str | None = None,
    max_concurrent: int | None = None,
    threads_per_trial: int = 1,
    gpus_per_trial: float = 0.0,
    use_ray: bool = True,
    adopt: Sequence[str | Path] = (),
    device: str | None = None,
    progress: bool = True,
) -> tuple[GridResult, str]:
    """Run (or continue) the bundled sweep and write its tables; returns (result, table)."""
    res = run_grid(sweep_file(dataset, protocol), out=out, address=address,
                   max_concurrent=max_concurrent, threads_per_trial=threads_per_trial,
                   gpus_per_trial=gpus_per_trial, use_ray=use_ray, adopt=adopt, device=device,
                   progress=progress)
    runs, notes = find_runs([res.out])
    table, rows = paper_table(runs)
    failed = res.failed
    text = [f"# {dataset}, {protocol} protocol: defenses without and with CEM", "",
            f"{len(runs)} finished runs in {res.out}; seed means; MSE / SSIM / PSNR are each "
            "run's worst case over the decoder and the defense-aware decoder. MSE gain = "
            "MSE with CEM / MSE without - 1 (higher = CEM made inversion harder).", "",
            table, ""]
    if failed:
        text += ["Failed trials (see their trial.json): " + ", ".join(failed), ""]
    if notes:
        text += ["Not finished yet: " + "; ".join(notes), ""]
    write_text(res.out / "paper_table.md", "\n".join(text))
    write_json(res.out / "paper_table.json", rows)
    if runs:
        write_frontier([res.out], res.out)
    return res, table
