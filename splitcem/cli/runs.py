"""``splitcem train | attack | run | show``: one run directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from splitcem.cli import Device, Overrides, Quiet, Threads, _run_dir, _threads, app


@app.command()
def train(
    config: Annotated[Path, typer.Argument(
        help="Run config: a YAML file or a bundled config's name (splitcem configs)")],
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
    leakage_only: Annotated[bool, typer.Option(
        "--leakage-only", help="Only compute the held-out I(x;z) bound estimate (no attacks)")]
    = False,
    device: Device = None,
    quiet: Quiet = False,
    threads: Threads = None,
) -> None:
    """Attack a trained run's features; adds the results to its metrics and summary."""
    _threads(threads)
    from splitcem.experiment import attack_run, leakage_run
    from splitcem.report import attack_rows

    if leakage_only:
        est = leakage_run(run_dir, device=device)
        bits = est.get("heldout_bits")
        typer.echo(f"I(x;z) bound, plug-in estimate on held-out features: "
                   f"{'n/a (' + str(est.get('note')) + ')' if bits is None else f'{bits:.1f} bits'}"
                   f" (on the fitting images: {est.get('fit_bits')}) -> {run_dir / 'metrics.json'}")
        return

    rec = attack_run(run_dir, all_attacks=all_, threat=threat or None, overrides=set_ or (),
                     progress=not quiet, device=device)
    for name, mse, ssim, psnr, _ in attack_rows(rec):
        typer.echo(f"{name:>14}: MSE {mse:.4f}  SSIM {ssim:.4f}  PSNR {psnr:.2f} dB")
    typer.echo(f"-> {Path(run_dir) / 'summary.md'}")


@app.command()
def run(
    config: Annotated[Path, typer.Argument(
        help="Run config: a YAML file or a bundled config's name (splitcem configs)")],
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
def show(run_dir: Annotated[Path, typer.Argument(help="A run directory")]) -> None:
    """Print a run's metrics.json (without the per-epoch history)."""
    from splitcem.record import RunRecord

    rec = RunRecord.load(run_dir).metrics
    rec.get("train", {}).pop("history", None)
    typer.echo(json.dumps(rec, indent=2))
