"""Serving throughput and latency: ``splitcem serve`` in its own process, clients in this one.

The server is a real ``splitcem serve`` process on 127.0.0.1; this (second) process runs 1
or 8 client threads, each with its own keep-alive connection, sending batches of 1 or 32
feature maps (the binary wire format, float32) for a fixed time per setting. Reported per
(batch, clients): requests/s, images/s and p50 / p99 latency; and the bytes a client sends
per image as features against the raw image.

Without ``--run`` it deploys the CPU protocol's split model (VGG11-BN cut 4, C8S1 bottleneck,
sigmoid client; width-0.5 server; 3x32x32 inputs, 10 classes) with untrained weights (the
speed does not depend on them) and a noise sigma 0.1 contract; with ``--run RUN_DIR`` it
serves that run.

    python benchmarks/serving.py [--run RUN_DIR] [--seconds 5] [--server-threads 1]

Last line: JSON, e.g. {"b1_c1_req_per_s": ..., "b32_c8_p99_ms": ..., ...}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from splitcem.data.info import NORMALIZATION, DatasetInfo
from splitcem.defenses import create_defense
from splitcem.models import create_split_model
from splitcem.serving import ClientHalf, ServerConnection, encode_features, export_model
from splitcem.serving.wire import header_size


class _Server:
    """``splitcem serve TARGET --port 0`` as a child process; reads its URL from stdout."""

    def __init__(self, target: Path, threads: int, timeout: float = 180.0) -> None:
        self.p = subprocess.Popen(
            [sys.executable, "-m", "splitcem.cli", "serve", str(target), "--port", "0",
             "--threads", str(threads)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True)
        found: list[str] = []
        ready = threading.Event()

        def drain() -> None:  # keeps reading so the child never blocks on a full pipe
            assert self.p.stdout is not None
            for line in self.p.stdout:
                m = re.search(r"http://127\.0\.0\.1:\d+", line)
                if m and not found:
                    found.append(m.group(0))
                    ready.set()
            ready.set()

        threading.Thread(target=drain, daemon=True).start()
        ready.wait(timeout)
        if not found:
            self.stop()
            raise RuntimeError("splitcem serve did not start")
        self.url = found[0]

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.p.kill()


def _deploy(out: Path) -> Path:
    """The CPU protocol's split model, untrained, exported with a noise contract."""
    torch.manual_seed(0)
    model = create_split_model("vgg11_bn", num_classes=10, in_channels=3, image_size=32,
                               cut=4, client_width=1.0, server_width=0.5).eval()
    mean, std = NORMALIZATION["cifar10"]
    info = DatasetInfo("cifar10", 10, 3, 32, mean, std, tuple(f"class{i}" for i in range(10)))
    spec = {"name": "noise", "sigma": 0.1}
    return export_model(model, out, info=info, name="cpu_protocol_untrained",
                        transforms=[(spec, create_defense("noise", sigma=0.1))])


def _load(url: str, body: bytes, clients: int, seconds: float) -> tuple[int, list[float], float]:
    """``clients`` threads post ``body`` until ``seconds`` pass; (requests, latencies, wall)."""
    lat: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []
    start = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def worker(i: int) -> None:
        conn = ServerConnection(url)
        try:
            conn.infer_bytes(body)  # connect + warm
            start.wait()
            while time.perf_counter() < stop_at[0]:
                t0 = time.perf_counter()
                conn.infer_bytes(body)
                lat[i].append(time.perf_counter() - t0)
        except Exception as e:  # reported below; a benchmark must not hang on one
            errors.append(repr(e))
            start.abort()
        finally:
            conn.close()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    stop_at[0] = t0 + seconds  # set before the barrier releases the workers
    with contextlib.suppress(threading.BrokenBarrierError):
        start.wait(timeout=120)
    for t in threads:
        t.join(timeout=seconds + 120)
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"client errors: {errors[:3]}")
    flat = [x for w in lat for x in w]
    return len(flat), flat, wall


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=None, help="serve this run (default: the CPU "
                    "protocol's model, untrained)")
    ap.add_argument("--seconds", type=float, default=5.0, help="per setting")
    ap.add_argument("--server-threads", type=int, default=1, help="torch threads of the server")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    args = ap.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        target = args.run if args.run is not None else _deploy(Path(tmp) / "deploy")
        server = _Server(target, args.server_threads)
        try:
            half = ClientHalf(target if args.run is None else target / "deploy")
            c, s = half.channels, half.size
            x01 = torch.rand(max(args.batches), c, s, s, generator=torch.Generator().manual_seed(0))
            t0 = time.perf_counter()
            z_all = half.encode(x01)  # what clients send (encoder + noise)
            encode_ms = 1e3 * (time.perf_counter() - t0) / x01.shape[0]
            dim = int(z_all[0].numel())
            out: dict[str, float | int | str] = {}
            print(f"server {server.url}: {half.spec['model_id']}, features "
                  f"{list(z_all.shape[1:])}, server threads {args.server_threads}", flush=True)
            for b in args.batches:
                body = encode_features(z_all[:b])
                for n in args.clients:
                    reqs, lat, wall = _load(server.url, body, n, args.seconds)
                    rps = reqs / wall
                    p50, p99 = 1e3 * _pct(lat, 0.5), 1e3 * _pct(lat, 0.99)
                    key = f"b{b}_c{n}"
                    out.update({f"{key}_req_per_s": round(rps, 1),
                                f"{key}_images_per_s": round(rps * b, 1),
                                f"{key}_p50_ms": round(p50, 2), f"{key}_p99_ms": round(p99, 2)})
                    print(f"batch {b:>3}  clients {n}: {rps:8.1f} req/s  {rps * b:9.1f} img/s  "
                          f"p50 {p50:7.2f} ms  p99 {p99:7.2f} ms  ({reqs} requests, mean "
                          f"{1e3 * statistics.fmean(lat):.2f} ms)", flush=True)
            raw = c * s * s
            per_img = {b: (header_size() + b * dim * 4) / b for b in args.batches}
            print(f"bytes per image: features {dim * 4} (float32) / {dim * 2} (float16) vs raw "
                  f"image {raw} (uint8) / {raw * 4} (float32); request body per image "
                  + ", ".join(f"batch {b}: {v:.1f}" for b, v in per_img.items()), flush=True)
            out.update({
                "feature_bytes_per_image_f32": dim * 4,
                "feature_bytes_per_image_f16": dim * 2,
                "raw_image_bytes_uint8": raw,
                "raw_image_bytes_f32": raw * 4,
                **{f"body_bytes_per_image_b{b}": round(v, 2) for b, v in per_img.items()},
                "client_encode_ms_per_image": round(encode_ms, 3),
                "server_threads": args.server_threads,
                "seconds_per_setting": args.seconds,
                "model_id": half.spec["model_id"],
            })
        finally:
            server.stop()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
