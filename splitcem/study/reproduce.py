"""The paper's comparison in one command: a bundled sweep, its paper-shaped table, frontiers.

``splitcem reproduce cifar10 --protocol cpu`` runs ``configs/sweeps/cifar10_cpu.yaml``
(each defense at its strengths without and with CEM, the noise-only curve, the cut
baseline; every run attacked with the worst case of ``decoder`` and ``decoder_adaptive``)
through :func:`splitcem.study.trials.run_grid`, so re-running continues where it stopped; then it
writes ``paper_table.md`` / ``.json`` (per defense: CEM against the same defense without CEM
at the same strength, the paper's measure, and at matched accuracy against its own curve and
against noise alone; below it each defense's curve against noise alone; ``defenses.png``,
one panel per defense: :mod:`splitcem.study.paper`) and the frontier report
(:mod:`splitcem.study.frontier_report`) into the sweep's folder. :func:`list_reproduce`
(``--list``) says what it would do and the core-hours left, running nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from splitcem.errors import ConfigError
from splitcem.runtime import Setting
from splitcem.study.adaptive import looks
from splitcem.study.frontier_report import write_frontier
from splitcem.study.grid import SweepSpec, add_overrides, expand, load_sweep
from splitcem.study.listing import TrialState, list_sweep
from splitcem.study.paper import paper_table, write_paper
from splitcem.study.trials import Engine, GridResult, run_grid

__all__ = ["list_reproduce", "paper_table", "reproduce", "sweep_file"]

SWEEPS = Path(__file__).resolve().parents[1] / "configs" / "sweeps"  # bundled in the package


def sweep_file(dataset: str, protocol: str) -> Path:
    """The bundled sweep file ``configs/sweeps/{dataset}_{protocol}.yaml``."""
    path = SWEEPS / f"{dataset}_{protocol}.yaml"
    if not path.is_file():
        have = sorted(p.stem for p in SWEEPS.glob("*.yaml")) if SWEEPS.is_dir() else []
        raise ConfigError(f"no bundled sweep for {dataset} / {protocol} ({path}); available: "
                          f"{', '.join(have) or 'none (run from a source checkout)'}")
    return path


def _spec(dataset: str, protocol: str, overrides: Sequence[str],
          amp: Setting | None) -> SweepSpec:
    return add_overrides(load_sweep(sweep_file(dataset, protocol)), list(overrides), amp=amp)


def _out(spec: SweepSpec, out: str | Path | None) -> Path:
    return Path(out if out is not None else spec.out or Path("runs") / "sweeps" / spec.name)


def list_reproduce(
    dataset: str = "cifar10",
    protocol: str = "cpu",
    *,
    out: str | Path | None = None,
    overrides: Sequence[str] = (),
    adopt: Sequence[str | Path] = (),
    device: str | None = None,
    amp: Setting | None = None,
) -> tuple[list[TrialState], str]:
    """What ``reproduce`` would do (:mod:`splitcem.study.listing`): each trial's state and
    the core-hours left; nothing is run or written. Returns (states, text)."""
    spec = _spec(dataset, protocol, overrides, amp)
    return list_sweep(spec, _out(spec, out), adopt=adopt, device=device)


def reproduce(
    dataset: str = "cifar10",
    protocol: str = "cpu",
    *,
    out: str | Path | None = None,
    engine: Engine | None = None,
    overrides: Sequence[str] = (),
    amp: Setting | None = None,
) -> tuple[GridResult, str]:
    """Run (or continue) the bundled sweep and write its tables; returns (result, table).
    ``engine``: how and where the trials run (:class:`~splitcem.study.trials.Engine`);
    ``overrides`` (``key.sub=value``) apply to every trial, last (``--set``); ``amp``
    (``--amp``) pins every trial's numeric path (:func:`~splitcem.study.grid.pin_amp`)."""
    spec = _spec(dataset, protocol, overrides, amp)
    res = run_grid(spec, out=_out(spec, out), engine=engine)
    n_looks = looks(expand(spec))  # seeds until decided: every interval at its level
    rec = write_paper([res.out], res.out, looks=n_looks, failed=res.failed,
                      title=f"{dataset}, {protocol} protocol: defenses without and with CEM")
    if rec["runs"]:
        write_frontier([res.out], res.out, looks=n_looks)
    return res, rec["table"]
