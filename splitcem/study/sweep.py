"""Run several configs and compare them: the one command behind the paper-style tables.

A run whose directory already holds finished training and attacks for the same config is
reused, and a run that was killed is resumed, so re-running a sweep only does what is left.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from splitcem._io import write_json, write_text
from splitcem.config import load_config
from splitcem.experiment import CONFIG_FILE, METRICS_FILE, attack_run, train_run
from splitcem.report import comparison_table, plot_frontier

__all__ = ["run_sweep"]

log = logging.getLogger(__name__)


def _finished(run_dir: Path, cfg_dict: dict[str, Any]) -> dict[str, Any] | None:
    m, c = run_dir / METRICS_FILE, run_dir / CONFIG_FILE
    if not (m.is_file() and c.is_file()):
        return None
    try:
        rec = json.loads(m.read_text())
        same = load_config(c).to_dict() == cfg_dict
    except Exception:  # unreadable leftovers: run again
        return None
    return rec if same and rec.get("attacks") and rec.get("train") else None


def run_sweep(
    configs: Sequence[str | Path],
    out: str | Path,
    *,
    overrides: Sequence[str] = (),
    baseline: str | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
) -> str:
    """Train + attack each config under ``out/NAME``; write and return the comparison table.

    Writes ``out/comparison.md`` (markdown table), ``out/comparison.json`` (all records) and
    ``out/frontier.png`` (accuracy against attack MSE).
    """
    out = Path(out)
    records = []
    names: set[str] = set()
    for path in configs:
        cfg = load_config(path, list(overrides))
        if cfg.name in names:
            raise ValueError(f"two configs in the sweep are named {cfg.name!r}; names must differ")
        names.add(cfg.name)
        run_dir = out / cfg.name
        rec = _finished(run_dir, cfg.to_dict())
        if rec is None:
            ckpt = run_dir / "checkpoints" / "last.pt"
            resume = ckpt.is_file() and (run_dir / CONFIG_FILE).is_file() and (
                load_config(run_dir / CONFIG_FILE).to_dict() == cfg.to_dict())
            log.info("sweep: %s (%s)", cfg.name, "resuming" if resume else "new")
            train_run(cfg, run_dir, resume=resume, overwrite=not resume, progress=progress,
                      device=device)
            rec = attack_run(run_dir, progress=progress, device=device)
        else:
            log.info("sweep: %s already finished, reused", cfg.name)
        records.append(rec)
    table = comparison_table(records, baseline=baseline)
    write_text(out / "comparison.md", table + "\n")
    write_json(out / "comparison.json", [
        {k: v for k, v in r.items() if k != "train"} | {"train": {
            k: v for k, v in (r.get("train") or {}).items() if k != "history"}}
        for r in records
    ])
    plot_frontier(records, out / "frontier.png")
    return table
