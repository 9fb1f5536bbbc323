"""Command line: ``splitcem train | attack | run | sweep | demo | defenses | attacks``.

Each command is a thin shell over :mod:`splitcem.experiment`; errors of ours are printed as
one clear line (exit code 2), anything else keeps its traceback.
"""

from __future__ import annotations

import json
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


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="Run config (YAML)")],
    out: Annotated[Path | None, typer.Option(help="Run directory (default runs/NAME)")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out")] = False,
    overwrite: Annotated[bool, typer.Option(help="Start again in an existing --out")] = False,
    set_: Overrides = None,
    device: Device = None,
    quiet: Quiet = False,
    threads: Threads = None,
) -> None:
    """Train a split model with its defenses; writes checkpoints and metrics.json."""
    from splitcem.config import load_config
    from splitcem.experiment import train_run

    cfg = load_config(config, set_ or [])
    _threads(threads)
    run_dir = _run_dir(out, cfg.name)
    rec = train_run(cfg, run_dir, resume=resume, overwrite=overwrite, progress=not quiet,
                    device=device)
    typer.echo(f"{cfg.name}: test accuracy {100 * rec['train']['test_accuracy']:.2f}% "
               f"-> {run_dir}")


@app.command()
def attack(
    run_dir: Annotated[Path, typer.Argument(help="A trained run directory")],
    all_: Annotated[bool, typer.Option("--all", help="Every applicable attack + worst case")]
    = False,
    threat: Annotated[list[str] | None, typer.Option(
        help="Threat model setting (inference or training); repeat it to attack under each "
             "and report the worst case across them (default: the run's)")] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", "-s", help="Override an attack setting, e.g. --set attack.attacks.0.epochs=10"
    )] = None,
    device: Device = None,
    quiet: Quiet = False,
    threads: Threads = None,
) -> None:
    """Attack a trained run's features; adds the results to its metrics and summary."""
    _threads(threads)
    from splitcem.experiment import attack_run
    from splitcem.report import attack_rows

    rec = attack_run(run_dir, all_attacks=all_, threat=threat or None, overrides=set_ or (),
                     progress=not quiet, device=device)
    for name, mse, ssim, psnr, _ in attack_rows(rec):
        typer.echo(f"{name:>14}: MSE {mse:.4f}  SSIM {ssim:.4f}  PSNR {psnr:.2f} dB")
    typer.echo(f"-> {Path(run_dir) / 'summary.md'}")


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="Run config (YAML)")],
    out: Annotated[Path | None, typer.Option(help="Run directory (default runs/NAME)")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out")] = False,
    overwrite: Annotated[bool, typer.Option(help="Start again in an existing --out")] = False,
    set_: Overrides = None,
    device: Device = None,
    quiet: Quiet = False,
    threads: Threads = None,
) -> None:
    """Train, attack and report one run."""
    from splitcem.config import load_config
    from splitcem.experiment import run_experiment
    from splitcem.report import comparison_table

    cfg = load_config(config, set_ or [])
    _threads(threads)
    run_dir = _run_dir(out, cfg.name)
    rec = run_experiment(cfg, run_dir, resume=resume, overwrite=overwrite,
                         progress=not quiet, device=device)
    typer.echo(comparison_table([rec]))
    typer.echo(f"-> {run_dir / 'summary.md'}")


@app.command()
def sweep(
    configs: Annotated[list[Path], typer.Argument(help="Run configs (YAML), one run each")],
    out: Annotated[Path, typer.Option(help="Directory for the runs and the comparison")] = Path(
        "runs/sweep"),
    baseline: Annotated[str | None, typer.Option(help="Run name to compare MSE against")]
    = None,
    set_: Overrides = None,
    device: Device = None,
    quiet: Quiet = False,
    threads: Threads = None,
) -> None:
    """Run several configs (resuming / reusing finished ones) and compare them in one table."""
    _threads(threads)
    from splitcem.sweep import run_sweep

    table = run_sweep(configs, out, overrides=set_ or [], baseline=baseline,
                      progress=not quiet, device=device)
    typer.echo(table)
    typer.echo(f"-> {out / 'comparison.md'}, {out / 'frontier.png'}")


@app.command()
def demo(
    dataset: Annotated[str, typer.Option(help="Dataset name (see splitcem.data)")]
    = "fashion_mnist",
    root: Annotated[str | None, typer.Option(help="Dataset location (default: search)")] = None,
    out: Annotated[Path, typer.Option(help="Where the demo's runs go")] = Path("runs/demo"),
    device: Device = None,
    quiet: Quiet = False,
    threads: Threads = None,
) -> None:
    """Train undefended, noise-defended and noise + CEM split models, attack each, compare."""
    _threads(threads)
    from splitcem.demo import run_demo

    table = run_demo(dataset=dataset, root=root, out=out, progress=not quiet, device=device)
    typer.echo(table)
    typer.echo(f"-> {out / 'comparison.md'}, {out / 'comparison.png'} and the images in "
               f"{out}/*/reconstructions.png")


@app.command()
def defenses() -> None:
    """List the registered defenses, one line each."""
    import splitcem.cem  # noqa: F401  (registers "cem")
    from splitcem.defenses import DEFENSES

    for name in DEFENSES.names():
        typer.echo(f"{name:>12}  {DEFENSES.doc(name)}")


@app.command()
def attacks() -> None:
    """List the registered attacks, one line each."""
    from splitcem.attacks import ATTACKS

    for name in ATTACKS.names():
        typer.echo(f"{name:>12}  {ATTACKS.doc(name)}")


@app.command()
def show(run_dir: Annotated[Path, typer.Argument(help="A run directory")]) -> None:
    """Print a run's metrics.json (without the per-epoch history)."""
    rec = json.loads((run_dir / "metrics.json").read_text())
    rec.get("train", {}).pop("history", None)
    typer.echo(json.dumps(rec, indent=2))


def main() -> None:
    """Entry point of the ``splitcem`` command."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except SplitcemError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
