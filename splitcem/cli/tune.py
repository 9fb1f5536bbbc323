"""``splitcem tune``: the least leaky setting within an accuracy budget, on Ray Tune."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from splitcem.cli import Device, Threads, _threads, app
from splitcem.cli.study import Address, MaxConcurrent, TrialThreads

Dirs = Annotated[list[Path] | None, typer.Option(help="A folder of runs; repeatable")]


@app.command()
def tune(
    base: Annotated[Path, typer.Argument(help="The base run config every trial shares")],
    max_drop: Annotated[float, typer.Option(
        help="Accuracy points (percent) the defense may cost against the reference")] = 1.0,
    reference: Annotated[list[Path] | None, typer.Option(
        help="Finished runs whose mean accuracy is the reference (default: the undefended "
             "base, trained with its seed); repeatable")] = None,
    space: Annotated[Path | None, typer.Option(
        help="Search space file (docs/tune.md; default: noise sigma, noise sigma + CEM "
             "lambda, each zoo defense's strength)")] = None,
    cut: Annotated[list[int] | None, typer.Option(
        help="Default space: also search model.cut over these; repeatable")] = None,
    trials: Annotated[int, typer.Option(min=0, help="Trials to pay for")] = 20,
    max_concurrent: MaxConcurrent = None,
    address: Address = None,
    warm_start: Annotated[list[Path] | None, typer.Option(
        help="Folder of finished runs: those in the space are observations, never paid "
             "again; repeatable")] = None,
    confirm_seeds: Annotated[int, typer.Option(
        min=0, help="Seeds in all to confirm the recommendation with (until decided)")] = 0,
    out: Annotated[Path, typer.Option(help="The tune's folder")] = Path("runs/tune"),
    resume: Annotated[bool, typer.Option(help="Continue a killed tune in --out")] = False,
    mode: Annotated[str, typer.Option(
        help="constrained (TPE, budget as a constraint) or multi (MSE and accuracy)")]
    = "constrained",
    seed: Annotated[int, typer.Option(help="The searcher's seed")] = 0,
    threads_per_trial: TrialThreads = 1,
    device: Device = None,
    threads: Threads = None,
) -> None:
    """Search noise, CEM and the zoo for the highest worst-case attack MSE within the budget."""
    _threads(threads)
    from splitcem.study.tune import run_tune

    res = run_tune(base, max_drop=max_drop, reference=reference or (), space=space,
                   trials=trials, max_concurrent=max_concurrent, address=address,
                   warm_start=warm_start or (), confirm_seeds=confirm_seeds, out=out,
                   resume=resume, mode=mode, threads_per_trial=threads_per_trial,
                   device=device, seed=seed, cut=cut)
    rec = res.report.get("recommended")
    typer.echo(f"{len(res.observations)} trials ({len(res.ran)} run now), budget "
               f"{100 * res.budget:.2f}% -> {res.out / 'tune.md'}")
    if rec:
        typer.echo(f"recommended: {rec['label']}: accuracy {100 * rec['accuracy']:.2f}%, "
                   f"worst-case MSE {rec['mse']:.4f} -> {res.report['chosen_run']}")
    else:
        typer.echo("no trial reached the budget")
