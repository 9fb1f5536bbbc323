"""Several run configs -> one comparison: the list-of-configs front door onto the one engine.

``splitcem sweep a.yaml b.yaml ...`` makes one trial per config (:func:`~splitcem.study.grid.
config_trials`) and runs them through :func:`splitcem.study.trials.run_trials`, like a sweep
file: finished runs are reused (for exactly their config), killed ones resumed, failures
recorded while the others go on; in a loop here, or on Ray with ``address``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from splitcem._io import write_json, write_text
from splitcem.errors import SplitcemError
from splitcem.record import RunRecord
from splitcem.report import comparison_table, plot_frontier
from splitcem.runtime import Setting
from splitcem.study.grid import add_overrides, config_trials, expand, load_sweep
from splitcem.study.trials import Engine, GridResult, run_grid, run_trials

__all__ = ["run_sweep", "run_sweep_file", "write_comparison"]

log = logging.getLogger(__name__)


def write_comparison(records: Sequence[dict[str, Any]], out: Path, *,
                     baseline: str | None = None) -> str:
    """``out/comparison.md`` (the table), ``comparison.json`` (the records without their
    per-epoch history) and ``frontier.png``; returns the table."""
    table = comparison_table(records, baseline=baseline)
    write_text(out / "comparison.md", table + "\n")
    write_json(out / "comparison.json", [
        {k: v for k, v in r.items() if k != "train"} | {"train": {
            k: v for k, v in (r.get("train") or {}).items() if k != "history"}}
        for r in records
    ])
    plot_frontier(records, out / "frontier.png")
    return table


def run_sweep(
    configs: Sequence[str | Path],
    out: str | Path,
    *,
    overrides: Sequence[str] = (),
    baseline: str | None = None,
    engine: Engine | None = None,
) -> str:
    """Train + attack each config under ``out/NAME``; write and return the comparison table.

    Writes ``out/comparison.md`` (markdown table), ``out/comparison.json`` (all records) and
    ``out/frontier.png`` (accuracy against attack MSE). ``engine``
    (:class:`~splitcem.study.trials.Engine`): default one after another in this process, on
    Ray only with ``use_ray`` (or an ``address``); its ``progress`` shows each run's bars. A
    failed run is listed under the table (its ``trial.json`` has the traceback), and if every
    run failed that is an error.
    """
    out = Path(out)
    eng = engine or Engine(use_ray=False)
    trials = config_trials(list(configs), list(overrides))
    res: GridResult = run_trials(
        trials, out, name=out.name, source=", ".join(map(str, configs)),
        engine=eng.but(use_ray=eng.use_ray or eng.address is not None, progress=False),
        trial_progress=eng.progress)
    records = []
    for t in trials:
        run = RunRecord.load(out / t.name)
        if run.finished(t.cfg, device=eng.device):
            records.append(run.metrics)
    failed = [f"{n} ({res.statuses[n].get('error')})" for n in res.failed]
    if not records:
        raise SplitcemError("no run of the sweep finished: " + "; ".join(failed))
    table = write_comparison(records, out, baseline=baseline)
    return table + ("\n\nFailed (see their trial.json): " + "; ".join(failed) if failed else "")


def run_sweep_file(path: str | Path, *, overrides: Sequence[str] = (),
                   out: str | Path | None = None, baseline: str | None = None,
                   engine: Engine | None = None, amp: Setting | None = None) -> GridResult:
    """The sweep-file front door: :func:`~splitcem.study.trials.run_grid` (``engine``: its
    options; ``amp``: every trial's numeric path, :func:`~splitcem.study.grid.pin_amp`),
    then the frontier report into the sweep's folder when a trial finished."""
    from splitcem.study.adaptive import looks
    from splitcem.study.frontier_report import write_frontier

    spec = add_overrides(load_sweep(path), list(overrides), amp=amp)
    res = run_grid(spec, out=out, engine=engine)
    if len(res.statuses) > len(res.failed):
        write_frontier([res.out], res.out, baseline=baseline, looks=looks(expand(spec)))
    return res
