"""``splitcem export | serve | infer | lens``: the deployed split."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from splitcem.cli import app


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
