"""The evidence layer: sweeps of runs, their execution, the frontier maths and the reports.

Below the CLI, above :mod:`splitcem.experiment` / :mod:`splitcem.train` /
:mod:`splitcem.attacks` (which never import it). Every module here reads run directories
only through :class:`splitcem.record.RunRecord`.

* :mod:`~splitcem.study.grid`: sweep files (base + variants + grid + seeds) and lists of
  run configs, expanded into :class:`~splitcem.study.grid.Trial` s;
* :mod:`~splitcem.study.trials`: the one engine that runs trials (a loop or Ray), with
  resume, adoption and failure handling; results come back to the driver; how and where
  they run is one :class:`~splitcem.study.trials.Engine` every front door passes down;
* :mod:`~splitcem.study.frontier`: matched-accuracy maths (pure functions);
* :mod:`~splitcem.study.frontier_report`, :mod:`~splitcem.study.groups`: the frontier
  report (grouping by defense family, tables, the plot);
* :mod:`~splitcem.study.paper`: the per-defense paper table (same-strength and matched
  gains); :mod:`~splitcem.study.listing`: what a sweep has left (``reproduce --list``);
* :mod:`~splitcem.study.sweep`, :mod:`~splitcem.study.reproduce`,
  :mod:`~splitcem.study.demo`: front doors (a list of configs, the bundled sweeps, the
  embedded demo) onto that engine and those reports.
"""

from splitcem.study.frontier import Matched, baseline_curve, interp_mse, matched_gain, verdict
from splitcem.study.frontier_report import FrontierRun, find_runs, group_runs, write_frontier
from splitcem.study.grid import SweepSpec, Trial, expand, load_sweep
from splitcem.study.reproduce import list_reproduce, paper_table, reproduce, sweep_file
from splitcem.study.sweep import run_sweep
from splitcem.study.trials import Engine, GridResult, run_grid

__all__ = [
    "Engine",
    "FrontierRun",
    "GridResult",
    "Matched",
    "SweepSpec",
    "Trial",
    "baseline_curve",
    "expand",
    "find_runs",
    "group_runs",
    "interp_mse",
    "list_reproduce",
    "load_sweep",
    "matched_gain",
    "paper_table",
    "reproduce",
    "run_grid",
    "run_sweep",
    "sweep_file",
    "verdict",
    "write_frontier",
]
