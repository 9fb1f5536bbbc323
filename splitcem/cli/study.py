"""``splitcem sweep | frontier | reproduce | demo``: the study layer's front doors."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from splitcem.cli import Device, Overrides, Quiet, Threads, _threads, app

if TYPE_CHECKING:
    from splitcem.runtime import Setting
    from splitcem.study.trials import Engine

Address = Annotated[str | None, typer.Option(
    help="Ray cluster address (default: a local Ray sized to this machine)")]
MaxConcurrent = Annotated[int | None, typer.Option(
    help="Trials at once (default: CPUs // threads per trial)")]
TrialThreads = Annotated[int, typer.Option(help="torch threads (and Ray CPUs) per trial")]
Gpus = Annotated[float, typer.Option(help="GPUs per trial (a fraction shares one)")]
NoRay = Annotated[bool, typer.Option("--no-ray", help="Run the trials one after another here")]
AmpOpt = Annotated[str | None, typer.Option(
    "--amp", help="Pin every trial's numeric path, training and attacks: true (bf16 autocast), "
    "false (float32) or auto (each machine's fastest; the default). Runs adopt and pool only "
    "with runs on the same path, so continue a sweep made where bf16 is native with --amp "
    "true on a machine without it (a CPU there runs bf16 through float32 kernels)")]
Adopt = Annotated[list[Path] | None, typer.Option(
    help="Folder of existing runs: a trial whose config matches a finished run there copies "
         "it instead of training (the folder is only read); repeatable")]


def _engine(address: str | None, max_concurrent: int | None, threads_per_trial: int,
            gpus_per_trial: float, no_ray: bool, adopt: list[Path] | None, device: str | None,
            quiet: bool) -> Engine:
    """The sweep engine's options from the shared command-line options."""
    from splitcem.study.trials import Engine

    return Engine(address=address, max_concurrent=max_concurrent,
                  threads_per_trial=threads_per_trial, gpus_per_trial=gpus_per_trial,
                  use_ray=not no_ray, adopt=tuple(adopt or ()), device=device,
                  progress=not quiet)


def _amp(value: str | None) -> Setting | None:
    """``--amp``'s text as a setting (``None``: not given)."""
    if value is None:
        return None
    choices: dict[str, Setting] = {"true": True, "false": False, "auto": "auto"}
    if value.lower() not in choices:
        raise typer.BadParameter(f"--amp must be true, false or auto, got {value!r}")
    return choices[value.lower()]


def _grid_summary(res) -> None:  # type: ignore[no-untyped-def]
    for name, s in res.statuses.items():
        extra = f" ({s.get('error')})" if s.get("error") else ""
        typer.echo(f"{name:>28}: {s.get('status')}{extra}")
    typer.echo(f"{len(res.ran)} ran, {len(res.skipped)} already finished, "
               f"{len(res.adopted)} adopted, {len(res.failed)} failed -> {res.out}")


@app.command()
def sweep(
    configs: Annotated[list[Path], typer.Argument(
        help="A sweep file (base + grid / variants + seeds; docs/sweeps.md), or several run "
             "configs (one run each)")],
    out: Annotated[Path | None, typer.Option(
        help="Sweep folder (default: the sweep file's out, else runs/sweeps/NAME; for run "
             "configs runs/sweep)")] = None,
    baseline: Annotated[str | None, typer.Option(
        help="Run configs: run name to compare MSE against; sweep file: frontier group")]
    = None,
    address: Address = None,
    max_concurrent: MaxConcurrent = None,
    threads_per_trial: TrialThreads = 1,
    gpus_per_trial: Gpus = 0.0,
    no_ray: NoRay = False,
    adopt: Adopt = None,
    set_: Overrides = None,
    amp: AmpOpt = None,
    device: Device = None,
    quiet: Quiet = False,
    threads: Threads = None,
    dry_run: Annotated[bool, typer.Option(
        help="Sweep file: list each trial as finished / adopted / failed / pending, and the "
             "core-hours left; run nothing")]
    = False,
) -> None:
    """Run a sweep file on Ray (resumable, failures recorded), or several run configs."""
    _threads(threads)
    from splitcem.study.grid import is_sweep_file
    from splitcem.study.sweep import run_sweep, run_sweep_file

    pinned = _amp(amp)
    if pinned is not None and not (len(configs) == 1 and is_sweep_file(configs[0])):
        raise typer.BadParameter("--amp pins a sweep file's trials; for run configs use "
                                 "--set train.amp=... (and each attack's amp)")
    if dry_run:
        from splitcem.study.grid import add_overrides, load_sweep
        from splitcem.study.listing import list_sweep

        spec = add_overrides(load_sweep(configs[0]), set_ or [], amp=pinned)
        where = out or Path(spec.out or Path("runs") / "sweeps" / spec.name)
        typer.echo(list_sweep(spec, where, adopt=adopt or (), device=device)[1])
        typer.echo(f"-> would run into {where}")
        return

    engine = _engine(address, max_concurrent, threads_per_trial, gpus_per_trial, no_ray,
                     adopt, device, quiet)
    if len(configs) == 1 and is_sweep_file(configs[0]):
        res = run_sweep_file(configs[0], overrides=set_ or [], out=out, baseline=baseline,
                             engine=engine, amp=pinned)
        _grid_summary(res)
        if len(res.statuses) > len(res.failed):
            typer.echo(f"-> {res.out / 'frontier.md'}")
        return
    out = out or Path("runs/sweep")
    table = run_sweep(configs, out, overrides=set_ or [], baseline=baseline,
                      engine=engine.but(use_ray=False) if no_ray or address is None else engine)
    typer.echo(table)
    typer.echo(f"-> {out / 'comparison.md'}, {out / 'frontier.png'}")


@app.command()
def frontier(
    dirs: Annotated[list[Path], typer.Argument(
        help="Folders of finished run directories (searched recursively; only read)")],
    out: Annotated[Path, typer.Option(help="Where frontier.md/.json/.csv/.png go")]
    = Path("runs/frontier"),
    baseline: Annotated[str | None, typer.Option(
        help="Group to compare against at matched accuracy (default: noise)")] = None,
    leakage: Annotated[bool, typer.Option(
        help="First record the held-out I(x;z) estimate of runs without one (in the runs)")]
    = False,
    show: Annotated[list[str] | None, typer.Option(
        help="Run name whose reconstructions to show (repeatable; default: chosen)")] = None,
    looks: Annotated[int, typer.Option(
        min=1, help="Settings were seeded until decided, judged up to this many times each "
        "(a sweep's seeds: {min, max}: max - min + 1): intervals at the level that keeps 5% "
        "over all looks")] = 1,
    paper: Annotated[bool, typer.Option(
        help="Also write paper_table.md / .json (per defense: CEM against its own curve and "
        "against noise alone; each defense's curve against noise alone) and defenses.png "
        "(one panel per defense); what `reproduce` writes")] = False,
    device: Device = None,
) -> None:
    """Accuracy vs worst-case attack MSE per defense family; MSE at matched accuracy."""
    from splitcem.study.frontier_report import write_frontier

    if leakage:  # an analysis step writing into the runs' records; the report only reads
        from splitcem.study.analysis import record_leakage

        for note in record_leakage(dirs, device=device):
            typer.echo(note)
    rec = write_frontier(dirs, out, baseline=baseline, show=show or (), looks=looks)
    for m in rec["matched"]:
        gain = "-" if m["gain"] is None else f"{100 * m['gain']:+.1f}%"
        ci = "" if m["low"] is None else f" [{100 * m['low']:+.1f}%, {100 * m['high']:+.1f}%]"
        typer.echo(f"{m['group']} @ {m['strength']}: accuracy {100 * m['accuracy']:.2f}%, "
                   f"MSE {m['mse']:.4f} vs {m.get('baseline_group') or rec['baseline']} "
                   f"{gain}{ci} on {m['n_seeds']} "
                   f"seed(s), {m['design']}: {m['verdict']}"
                   + (f" (about {m['seeds_needed']} more seeds to decide)"
                      if m["verdict"] == "undecided" and m["seeds_needed"] else ""))
    typer.echo(f"{rec['runs']} runs, {len(rec['notes'])} left out -> {out / 'frontier.md'}")
    if paper:
        from splitcem.study.paper import write_paper

        prec = write_paper(dirs, out, looks=looks)
        typer.echo(f"{len(prec['rows'])} CEM setting(s) -> {out / 'paper_table.md'}")


@app.command()
def reproduce(
    dataset: Annotated[str, typer.Argument(help="Dataset of a bundled sweep (cifar10)")],
    protocol: Annotated[str, typer.Option(help="cpu (2 cores, hours) or paper (GPUs)")] = "cpu",
    list_: Annotated[bool, typer.Option(
        "--list", help="Print every trial's state (finished / adopted / pending / failed) "
                       "and the core-hours left; run nothing")] = False,
    out: Annotated[Path | None, typer.Option(help="Sweep folder (default runs/sweeps/NAME)")]
    = None,
    address: Address = None,
    max_concurrent: MaxConcurrent = None,
    threads_per_trial: TrialThreads = 1,
    gpus_per_trial: Gpus = 0.0,
    no_ray: NoRay = False,
    adopt: Adopt = None,
    set_: Overrides = None,
    amp: AmpOpt = None,
    device: Device = None,
    quiet: Quiet = False,
    threads: Threads = None,
) -> None:
    """The paper's comparison (defenses without / with CEM, noise curve, cut); resumable."""
    _threads(threads)
    from splitcem.study.reproduce import list_reproduce
    from splitcem.study.reproduce import reproduce as run

    if list_:
        _, text = list_reproduce(dataset, protocol, out=out, overrides=set_ or [],
                                 adopt=adopt or (), device=device, amp=_amp(amp))
        typer.echo(text)
        return
    res, table = run(dataset, protocol, out=out, overrides=set_ or [], amp=_amp(amp),
                     engine=_engine(address, max_concurrent, threads_per_trial,
                                    gpus_per_trial, no_ray, adopt, device, quiet))
    _grid_summary(res)
    typer.echo(table)
    typer.echo(f"-> {res.out / 'paper_table.md'}, {res.out / 'frontier.md'}")


@app.command()
def demo(
    dataset: Annotated[str, typer.Option(help="Dataset name (see splitcem.data)")]
    = "fashion_mnist",
    root: Annotated[str | None, typer.Option(help="Dataset location (default: search)")] = None,
    out: Annotated[Path, typer.Option(help="Where the demo's runs go")] = Path("runs/demo"),
    device: Device = None,
    quiet: Quiet = False,
    threads: Threads = None,
    no_ray: NoRay = False,
    undefended: Annotated[bool, typer.Option(
        help="Also train one undefended run as a reference point (about 100 CPU-s more)")]
    = False,
) -> None:
    """A small frontier (noise alone at several sigmas, noise + CEM, paired seeds), attacked;
    CEM against more noise at matched accuracy, with its interval and verdict."""
    _threads(threads)
    from splitcem.study.demo import run_demo

    text = run_demo(dataset=dataset, root=root, out=out, progress=not quiet, device=device,
                    undefended=undefended, use_ray=False if no_ray else None)
    typer.echo(text)
    typer.echo(f"-> {out / 'comparison.md'}, {out / 'frontier.png'} and the images in "
               f"{out}/*/reconstructions.png")
