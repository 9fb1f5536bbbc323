"""Serving throughput and latency: ``splitcem serve`` in its own process, clients in others.

Two measurements, both on 127.0.0.1:

* **Before / after** (the serving issue's figure): batch-1 requests from 8 concurrent client
  *processes* (``benchmarks/_loadgen.py``, stdlib only, one keep-alive connection each),
  against the server as it was (``--no-batching``: one forward pass per request, in turn)
  and with dynamic batching (the default), optionally with ``--workers 2``; run back to back
  in one invocation, so that the ratio holds even on a shared machine. Reported per variant:
  requests/s and p50 / p99 latency, and the ratio of each to the first.
* **The grid** (``--grid``): 1 or 8 client threads of this process, batches of 1 or 32,
  against the default (batched) server; and the bytes a client sends per image as features
  against the raw image.

Without ``--run`` it deploys the CPU protocol's split model (VGG11-BN cut 4, C8S1 bottleneck,
sigmoid client; width-0.5 server; 3x32x32 inputs, 10 classes) with untrained weights (the
speed does not depend on them) and a noise sigma 0.1 contract; with ``--run RUN_DIR`` it
serves that run.

    python benchmarks/serving.py [--run RUN_DIR] [--seconds 10] [--server-threads 1] [--grid]

Last line: JSON, e.g. {"unbatched_p8_req_per_s": ..., "batched_p8_p99_ms": ..., ...}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from _serve_proc import ServeProcess  # benchmarks/_serve_proc.py, beside this script

from splitcem.data.info import NORMALIZATION, DatasetInfo
from splitcem.defenses import create_defense
from splitcem.models import create_split_model
from splitcem.serving import ClientHalf, ServerConnection, encode_features, export_model
from splitcem.serving.wire import header_size

LOADGEN = Path(__file__).with_name("_loadgen.py")
#: server variants of the before / after comparison: name -> extra `splitcem serve` options
VARIANTS = {
    "unbatched": ["--no-batching"],
    "batched": [],
    "batched_w2": ["--workers", "2"],
}


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


def _load_procs(url: str, body: bytes, procs: int, seconds: float) -> tuple[int, list[float]]:
    """``procs`` client processes post ``body`` for ``seconds``; (requests, latencies in s)."""
    with tempfile.NamedTemporaryFile(suffix=".scf", delete=False) as f:
        f.write(body)
    try:
        ps = [subprocess.Popen([sys.executable, str(LOADGEN), url, f.name, str(seconds)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
              for _ in range(procs)]
        for p in ps:  # each has connected and sent its warm-up request
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        start_at = f"{time.time() + 0.5}\n"
        for p in ps:  # all get the start time before any is waited for
            assert p.stdin is not None
            p.stdin.write(start_at)
            p.stdin.flush()
        for p in ps:
            assert p.stdin is not None
            p.stdin.close()
            p.stdin = None  # communicate() then only reads
        outs = [p.communicate(timeout=seconds + 120)[0] for p in ps]
    finally:
        os.unlink(f.name)
    res = [json.loads(o.strip().splitlines()[-1]) for o in outs]
    errors = sum(r["errors"] for r in res)
    if errors:
        raise RuntimeError(f"{errors} failed requests")
    lat = [x / 1e3 for r in res for x in r["latencies_ms"]]
    return len(lat), lat


def _tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of ``pid`` and its descendants so far (Linux /proc)."""
    tck = os.sysconf("SC_CLK_TCK")
    total, todo, seen = 0.0, [pid], set()
    while todo and len(seen) < 256:  # bounded: a server has a handful of processes
        p = todo.pop()
        seen.add(p)
        try:
            stat = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(stat[11]) + int(stat[12])) / tck
            for task in Path(f"/proc/{p}/task").iterdir():
                kids = (task / "children").read_text().split()
                todo += [int(k) for k in kids if int(k) not in seen]
        except (OSError, ValueError):
            continue
    return total


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def _compare(target: Path, body: bytes, args: argparse.Namespace,
             out: dict[str, float | int | str]) -> None:
    """The before / after figures: batch 1 from ``args.procs`` client processes, each
    variant ``args.rounds`` times, interleaved (A B C A B C ...) so that a passing load on
    a shared machine hits all of them; the figures pool the rounds."""
    pooled: dict[str, dict[str, list[float]]] = {
        n: {"lat": [], "reqs": [], "cpu": []} for n in args.variants}
    for r in range(args.rounds):
        for name in args.variants:
            server = ServeProcess(target, ["--threads", str(args.server_threads), *VARIANTS[name]])
            try:
                cpu0 = _tree_cpu_s(server.p.pid)
                reqs, lat = _load_procs(server.url, body, args.procs, args.seconds)
                cpu = _tree_cpu_s(server.p.pid) - cpu0
            finally:
                server.stop()
            pooled[name]["lat"] += lat
            pooled[name]["reqs"].append(reqs)
            pooled[name]["cpu"].append(cpu)
            print(f"round {r + 1}: {name:>11}: {reqs / args.seconds:8.1f} req/s  p99 "
                  f"{1e3 * _pct(lat, 0.99):7.2f} ms", flush=True)
    first: dict[str, float] = {}
    for name in args.variants:
        lat, reqs = pooled[name]["lat"], sum(pooled[name]["reqs"])
        rps = reqs / (args.seconds * args.rounds)
        p50, p99 = 1e3 * _pct(lat, 0.5), 1e3 * _pct(lat, 0.99)
        cpu_ms = 1e3 * sum(pooled[name]["cpu"]) / max(reqs, 1)
        key = f"{name}_p{args.procs}"
        out.update({f"{key}_req_per_s": round(rps, 1), f"{key}_p50_ms": round(p50, 2),
                    f"{key}_p99_ms": round(p99, 2),
                    f"{key}_server_cpu_ms_per_req": round(cpu_ms, 2),
                    f"{key}_req_per_s_rounds": "/".join(
                        f"{n / args.seconds:.0f}" for n in pooled[name]["reqs"])})
        if not first:
            first = {"rps": rps, "p99": p99}
        else:
            out[f"{key}_req_per_s_ratio"] = round(rps / first["rps"], 2)
            out[f"{key}_p99_ratio"] = round(p99 / first["p99"], 2)
        print(f"{name:>11} ({' '.join(VARIANTS[name]) or 'default'}): batch 1, {args.procs} "
              f"client processes: {rps:8.1f} req/s  p50 {p50:7.2f} ms  p99 {p99:7.2f} ms  "
              f"server CPU {cpu_ms:.2f} ms/request ({reqs} requests, {args.rounds} rounds)",
              flush=True)


def _grid(target: Path, z_all: torch.Tensor, args: argparse.Namespace,
          out: dict[str, float | int | str]) -> None:
    """Threads of this process against the default (batched) server: batch x clients."""
    server = ServeProcess(target, ["--threads", str(args.server_threads)])
    try:
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
                print(f"batch {b:>3}  threads {n}: {rps:8.1f} req/s  {rps * b:9.1f} img/s  "
                      f"p50 {p50:7.2f} ms  p99 {p99:7.2f} ms  ({reqs} requests, mean "
                      f"{1e3 * statistics.fmean(lat):.2f} ms)", flush=True)
    finally:
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=None, help="serve this run (default: the CPU "
                    "protocol's model, untrained)")
    ap.add_argument("--seconds", type=float, default=10.0, help="per setting")
    ap.add_argument("--procs", type=int, default=8, help="client processes (before / after)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per variant")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--grid", action="store_true", help="also the thread grid (batch x "
                    "clients) against the batched server")
    ap.add_argument("--server-threads", type=int, default=1, help="torch threads of the server")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    args = ap.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        target = args.run if args.run is not None else _deploy(Path(tmp) / "deploy")
        half = ClientHalf(target if args.run is None else target / "deploy")
        c, s = half.channels, half.size
        x01 = torch.rand(max(args.batches), c, s, s, generator=torch.Generator().manual_seed(0))
        t0 = time.perf_counter()
        z_all = half.encode(x01)  # what clients send (encoder + noise)
        encode_ms = 1e3 * (time.perf_counter() - t0) / x01.shape[0]
        dim = int(z_all[0].numel())
        out: dict[str, float | int | str] = {}
        print(f"{half.spec['model_id']}: features {list(z_all.shape[1:])}, server threads "
              f"{args.server_threads}", flush=True)
        _compare(target, encode_features(z_all[:1]), args, out)
        if args.grid:
            _grid(target, z_all, args, out)
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
            "client_processes": args.procs,
            "seconds_per_setting": args.seconds,
            "rounds": args.rounds,
            "cpu_count": os.cpu_count() or 0,
            "model_id": half.spec["model_id"],
        })
    print(json.dumps(out))


if __name__ == "__main__":
    main()
