"""Command line: ``splitcem train | attack | run | sweep | frontier | reproduce | demo | tune``,
``defenses | attacks``, and for deployment ``export | serve | infer | lens``.

Each command is a thin shell over :mod:`splitcem.experiment`; errors of ours are printed as
one clear line (exit code 2), anything else keeps its traceback.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from splitcem.errors import SplitcemError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Model-inversion robustness for split inference: defenses, CEM and attacks.",
)

Overrides = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config value, e.g. --set train.epochs=2"),
]
Device = Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N, mps or auto")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars")]
Threads = Annotated[int | None, typer.Option(
    min=1, help="CPU threads (default: $SPLITCEM_THREADS, else the cores free of other work)")]


def _threads(n: int | None) -> None:
    from splitcem.runtime import set_threads

    set_threads(n)


def _run_dir(out: Path | None, name: str) -> Path:
    return out if out is not None else Path("runs") / name


# the commands register themselves on ``app`` (imported after the shared options above)
from splitcem.cli import catalog, deploy, runs, study, tune  # noqa: E402

__all__ = ["app", "catalog", "deploy", "main", "runs", "study", "tune"]


def main() -> None:
    """Entry point of the ``splitcem`` command."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except SplitcemError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)

