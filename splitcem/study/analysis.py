"""Analysis steps: computations on finished runs that write into their run records.

A report only shows what runs recorded (:mod:`splitcem.study.frontier_report`); what must be
computed from a trained model first is a step here, run by the CLI before the report.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from splitcem.record import RunRecord

__all__ = ["record_leakage"]

log = logging.getLogger(__name__)


def record_leakage(dirs: Sequence[str | Path], *, device: str | None = None) -> list[str]:
    """Compute the held-out I(x; z) estimate (:func:`splitcem.experiment.leakage_run`) of
    every attacked run under ``dirs`` that has none and still has its checkpoint, writing it
    into that run's record; returns a note per run that could not get one."""
    from splitcem.experiment import leakage_run

    notes = []
    for rec in RunRecord.find(dirs):
        if rec.status != "attacked" or rec.metrics.get("leakage_note") or \
                (rec.metrics.get("leakage") or {}).get("heldout_bits") is not None:
            continue
        if not rec.has_checkpoint:
            notes.append(f"{rec.path}: no leakage estimate (no checkpoint here)")
            continue
        log.info("held-out leakage estimate of %s", rec.path)
        try:
            leakage_run(rec.path, write=True, device=device)
        except Exception as e:  # one unreadable checkpoint must not stop the others
            notes.append(f"{rec.path}: no leakage estimate ({type(e).__name__}: {e})")
    return notes
