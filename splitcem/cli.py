"""Command line: ``splitcem train | attack | run | sweep | frontier | reproduce | demo | configs``,
``defenses | attacks``, and for deployment ``export | serve | infer | lens``.

Each command is a thin shell over :mod:`splitcem.experiment`; errors of ours are printed as
one clear line (exit code 2), anything else keeps its traceback.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

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


Address = Annotated[str | None, typer.Option(
    help="Ray cluster address (default: a local Ray sized to this machine)")]
MaxConcurrent = Annotated[int | None, typer.Option(
    help="Trials at once (default: CPUs // threads per trial)")]
TrialThreads = Annotated[int, typer.Option(help="torch threads (and Ray CPUs) per trial")]
Gpus = Annotated[float, typer.Option(help="GPUs per trial (a fraction shares one)")]
NoRay = Annotated[bool, typer.Option("--no-ray", help="Run the trials one after another here")]
Adopt = Annotated[list[Path] | None, typer.Option(
    help="Folder of existing runs: a trial whose config matches a finished run there copies "
         "it instead of training (the folder is only read); repeatable")]


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
    device: Device = None,
    quiet: Quiet = False,
    threads: Threads = None,
) -> None:
    """Run a sweep file on Ray (resumable, failures recorded), or several run configs."""
    _threads(threads)
    from splitcem.study.grid import is_sweep_file
    from splitcem.study.sweep import run_sweep, run_sweep_file

    engine: dict[str, Any] = {"address": address, "max_concurrent": max_concurrent,
                              "threads_per_trial": threads_per_trial, "adopt": adopt or (),
                              "gpus_per_trial": gpus_per_trial, "device": device}
    if len(configs) == 1 and is_sweep_file(configs[0]):
        res = run_sweep_file(configs[0], overrides=set_ or [], out=out, baseline=baseline,
                             use_ray=not no_ray, progress=not quiet, **engine)
        _grid_summary(res)
        if len(res.statuses) > len(res.failed):
            typer.echo(f"-> {res.out / 'frontier.md'}")
        return
    out = out or Path("runs/sweep")
    table = run_sweep(configs, out, overrides=set_ or [], baseline=baseline,
                      progress=not quiet, **engine)
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
    device: Device = None,
) -> None:
    """Accuracy vs worst-case attack MSE per defense family; MSE at matched accuracy."""
    from splitcem.study.frontier_report import write_frontier

    if leakage:  # an analysis step writing into the runs' records; the report only reads
        from splitcem.study.analysis import record_leakage

        for note in record_leakage(dirs, device=device):
            typer.echo(note)
    rec = write_frontier(dirs, out, baseline=baseline, show=show or ())
    for m in rec["matched"]:
        gain = "-" if m["gain"] is None else f"{100 * m['gain']:+.1f}%"
        ci = "" if m["low"] is None else f" [{100 * m['low']:+.1f}%, {100 * m['high']:+.1f}%]"
        typer.echo(f"{m['group']} @ {m['strength']}: accuracy {100 * m['accuracy']:.2f}%, "
                   f"MSE {m['mse']:.4f} vs {rec['baseline']} {gain}{ci}: {m['verdict']}")
    typer.echo(f"{rec['runs']} runs, {len(rec['notes'])} left out -> {out / 'frontier.md'}")


@app.command()
def reproduce(
    dataset: Annotated[str, typer.Argument(help="Dataset of a bundled sweep (cifar10)")],
    protocol: Annotated[str, typer.Option(help="cpu (2 cores, hours) or paper (GPUs)")] = "cpu",
    out: Annotated[Path | None, typer.Option(help="Sweep folder (default runs/sweeps/NAME)")]
    = None,
    address: Address = None,
    max_concurrent: MaxConcurrent = None,
    threads_per_trial: TrialThreads = 1,
    gpus_per_trial: Gpus = 0.0,
    no_ray: NoRay = False,
    adopt: Adopt = None,
    device: Device = None,
    quiet: Quiet = False,
) -> None:
    """The paper's comparison (defenses without / with CEM, noise curve, cut); resumable."""
    from splitcem.study.reproduce import reproduce as run

    res, table = run(dataset, protocol, out=out, address=address,
                     max_concurrent=max_concurrent, threads_per_trial=threads_per_trial,
                     gpus_per_trial=gpus_per_trial, use_ray=not no_ray, adopt=adopt or (),
                     device=device, progress=not quiet)
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
) -> None:
    """Train undefended, noise-defended and noise + CEM split models, attack each, compare."""
    _threads(threads)
    from splitcem.study.demo import run_demo

    table = run_demo(dataset=dataset, root=root, out=out, progress=not quiet, device=device)
    typer.echo(table)
    typer.echo(f"-> {out / 'comparison.md'}, {out / 'comparison.png'} and the images in "
               f"{out}/*/reconstructions.png")


@app.command()
def defenses() -> None:
    """List the registered defenses, one line each."""
    from splitcem.defenses import DEFENSES

    for name in DEFENSES.names():
        typer.echo(f"{name:>12}  {DEFENSES.doc(name)}")
    for name, why in DEFENSES.failed_plugins().items():
        typer.echo(f"{name:>12}  (not loaded) {why}")


@app.command()
def configs() -> None:
    """List the bundled run configs: `splitcem run NAME` runs one."""
    from splitcem.config import bundled_configs, config_summary

    for name, path in bundled_configs().items():
        typer.echo(f"{name:<28}  {config_summary(path)}")


@app.command()
def attacks() -> None:
    """List the registered attacks, one line each."""
    from splitcem.attacks import ATTACKS

    for name in ATTACKS.names():
        typer.echo(f"{name:>12}  {ATTACKS.doc(name)}")
    for name, why in ATTACKS.failed_plugins().items():
        typer.echo(f"{name:>12}  (not loaded) {why}")


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="A trained run directory")],
    out: Annotated[Path | None, typer.Option(help="Deployment directory (default "
                                                  "RUN_DIR/deploy)")] = None,
    onnx: Annotated[bool, typer.Option("--onnx", help="Also write client.onnx")] = False,
) -> None:
    """Write a run's server half, client half and spec.json as separate files (with --onnx
    also the edge client, client.onnx; RUN_DIR may then be a deployment, e.g. a BYO one)."""
    from splitcem.serving.edge import export_cli

    d = export_cli(run_dir, out, onnx=onnx)
    typer.echo(f"-> {d} (server.safetensors + spec.json go to the server; "
               "client.safetensors stays with the client)")


@app.command()
def serve(
    run_dir: Annotated[Path, typer.Argument(help="A run directory or a deployment directory")],
    host: Annotated[str, typer.Option(help="Address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0 = any free port)")] = 8000,
    token_file: Annotated[Path | None, typer.Option(help="File holding the bearer token "
                                                         "clients must send")] = None,
    insecure: Annotated[bool, typer.Option(help="Allow a non-loopback --host without "
                                                "--token-file")] = False,
    ssl_certfile: Annotated[Path | None, typer.Option(help="TLS certificate (PEM)")] = None,
    ssl_keyfile: Annotated[Path | None, typer.Option(help="TLS private key (PEM)")] = None,
    workers: Annotated[int, typer.Option(min=1, help="Server processes on the port")] = 1,
    max_batch: Annotated[int, typer.Option(min=1, help="Most samples per request")] = 256,
    max_body_bytes: Annotated[int | None, typer.Option(
        min=1, help="Largest binary body (default: fits --max-batch)")] = None,
    max_json_body_bytes: Annotated[int | None, typer.Option(
        min=1, help="Largest JSON body (default: fits the JSON batch limit)")] = None,
    batch_window_ms: Annotated[float, typer.Option(
        min=0, max=50, help="Dynamic batching: most ms a pass waits for arriving requests")
    ] = 2.0,
    batching: Annotated[bool, typer.Option(help="Batch requests that arrive together")] = True,
    header_timeout: Annotated[float, typer.Option(min=0.1, help="Seconds for a request "
                                                              "head")] = 10.0,
    body_timeout: Annotated[float, typer.Option(min=0.1, help="Seconds for a body")] = 30.0,
    keep_alive: Annotated[float, typer.Option(min=0.1, help="Idle seconds on a "
                                                          "connection")] = 5.0,
    max_connections: Annotated[int, typer.Option(min=1, help="Open connections per "
                                                           "process")] = 512,
    threads: Annotated[int | None, typer.Option(min=1, help="torch threads")] = None,
    device: Annotated[str, typer.Option(help="Where the server half runs")] = "cpu",
) -> None:
    """Serve the server half of a run over HTTP (exports the run first if needed)."""
    from splitcem.serving.server import serve as run_server
    from splitcem.serving.transport import Deadlines

    run_server(run_dir, host=host, port=port, token_file=token_file, insecure=insecure,
               ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile, workers=workers,
               limits={"max_batch": max_batch}, max_body_bytes=max_body_bytes,
               max_json_body_bytes=max_json_body_bytes, threads=threads, device=device,
               batch_window_ms=batch_window_ms if batching else None,
               deadlines=Deadlines(header_s=header_timeout, body_s=body_timeout,
                                   keep_alive_s=keep_alive, max_connections=max_connections))


CaFile = Annotated[Path | None, typer.Option(help="PEM certificates to trust for an https "
                                                  "server (its own, if self-signed)")]


@app.command()
def infer(
    run_dir: Annotated[Path, typer.Argument(help="The run (or deployment) the server serves")],
    images: Annotated[list[Path], typer.Argument(help="Image files to classify")],
    url: Annotated[str, typer.Option(help="The server, e.g. http://127.0.0.1:8000")],
    token_file: Annotated[Path | None, typer.Option(help="File holding the bearer token")]
    = None,
    ca_file: CaFile = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per image")] = False,
    onnx: Annotated[bool, typer.Option("--onnx", help="Encode with client.onnx")] = False,
) -> None:
    """Classify images: encode and protect them here, send only features to the server."""
    from splitcem.serving.client import Client

    with Client(run_dir, url, token_file=token_file, cafile=ca_file, onnx=onnx) as client:
        preds = client.classify(images)
    for path, p in zip(images, preds, strict=True):
        if as_json:
            typer.echo(json.dumps({"image": str(path), "label": p.label, "class": p.name,
                                   "prob": round(p.prob, 6)}))
        else:
            typer.echo(f"{path}: {p.name} ({100 * p.prob:.1f}%)")


@app.command()
def lens(
    run_dir: Annotated[Path, typer.Argument(help="A trained (and attacked) run directory")],
    url: Annotated[str, typer.Option(help="The server, e.g. http://127.0.0.1:8000")],
    port: Annotated[int, typer.Option(help="Local port of the page (0 = any free port)")]
    = 8765,
    token_file: Annotated[Path | None, typer.Option(help="File holding the bearer token")]
    = None,
    ca_file: CaFile = None,
    wait: Annotated[float, typer.Option(min=0, help="Seconds to wait for the server to come "
                                                    "up (it may still be exporting)")] = 300.0,
) -> None:
    """A local page: drop an image, see the prediction, the features sent, and what the
    run's strongest attacker rebuilds from them."""
    from splitcem.lens import run_lens

    run_lens(run_dir, url, port=port, token_file=token_file, cafile=ca_file, wait_s=wait)


@app.command()
def show(run_dir: Annotated[Path, typer.Argument(help="A run directory")]) -> None:
    """Print a run's metrics.json (without the per-epoch history)."""
    from splitcem.record import RunRecord

    rec = RunRecord.load(run_dir).metrics
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
