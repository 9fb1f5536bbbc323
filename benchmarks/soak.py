"""A bounded soak of ``splitcem serve`` on loopback: valid, fuzzed, wrong-token, mid-body
disconnect and slow-socket clients at once, from several processes.

The server runs in its own process with a token and short deadlines (head 2 s, body 3 s,
idle 2 s). ``--procs`` load processes (``benchmarks/_soakgen.py load``) send ``--requests``
requests between them, half of them valid: each valid answer is checked against the
in-process server half loaded here from the same deployment (clean features, noise off;
labels equal and every probability within 1e-5); the rest are fuzzed bodies, wrong or
missing tokens and disconnects in the middle of a body. Meanwhile one more process holds
``--slow`` slow-header and ``--slow`` slow-body sockets that drip a byte every 0.25 s. The
server's RSS is read after a warm-up and at the end; once the slow sockets are gone the
server must still answer health and a valid request correctly. Everything is capped by
``--seconds``.

    python benchmarks/soak.py [--run RUN_DIR] [--requests 12000] [--procs 6] [--slow 40]

Without ``--run`` it serves the CPU protocol's split model (untrained weights, as
benchmarks/serving.py does). Exit status 1 if any check fails. Last line: JSON of the
counts (``requests_total``, ``status_5xx``, ``valid_wrong``, ``rss_growth_mb``, ...).
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _serve_proc import ServeProcess  # benchmarks/_serve_proc.py, beside this script

from splitcem.data.info import NORMALIZATION, DatasetInfo
from splitcem.models import create_split_model
from splitcem.serving import ServerConnection, encode_features, ensure_export, export_model
from splitcem.serving.halves import ClientHalf, ServerHalf

GEN = Path(__file__).with_name("_soakgen.py")
TOKEN = "soak-token-5d1e8a"


def _deploy(out: Path) -> Path:
    torch.manual_seed(0)
    model = create_split_model("vgg11_bn", num_classes=10, in_channels=3, image_size=32,
                               cut=4, client_width=1.0, server_width=0.5).eval()
    mean, std = NORMALIZATION["cifar10"]
    info = DatasetInfo("cifar10", 10, 3, 32, mean, std, tuple(f"class{i}" for i in range(10)))
    return export_model(model, out, info=info, name="cpu_protocol_untrained")


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _cases(deploy: Path, n: int = 16) -> list[dict]:
    """Valid bodies (batches of 1-4 clean features) and the in-process answers to them."""
    client, server = ClientHalf(deploy), ServerHalf(deploy)
    gen = torch.Generator().manual_seed(11)
    out = []
    for i in range(n):
        x01 = torch.rand(1 + i % 4, client.channels, client.size, client.size, generator=gen)
        z = client.encode(x01, defense=False)
        probs, labels = server.predict(z.numpy())
        out.append({"body": base64.b64encode(encode_features(z)).decode(),
                    "labels": labels.tolist(), "probs": probs.tolist()})
    return out


def _run(cmd: list[str], timeout: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(GEN), *cmd], stdout=subprocess.PIPE,
                            text=True)


def _result(p: subprocess.Popen, timeout: float) -> dict:
    out, _ = p.communicate(timeout=timeout)
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=None, help="serve this run (default: the CPU "
                    "protocol's model, untrained)")
    ap.add_argument("--requests", type=int, default=12_000, help="load requests in all")
    ap.add_argument("--procs", type=int, default=6, help="load processes")
    ap.add_argument("--slow", type=int, default=40, help="slow-header and slow-body sockets "
                    "(each)")
    ap.add_argument("--seconds", type=float, default=400.0, help="time cap of the load")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        deploy = ensure_export(args.run) if args.run else _deploy(Path(tmp) / "deploy")
        token_file = Path(tmp) / "token"
        token_file.write_text(TOKEN + "\n")
        cases = _cases(deploy)
        cases_file = Path(tmp) / "cases.json"
        cases_file.write_text(json.dumps(cases))
        server = ServeProcess(deploy, [
            "--threads", "1", "--token-file", str(token_file), "--header-timeout", "2",
            "--body-timeout", "3", "--keep-alive", "2", "--max-connections", "256"])
        try:
            conn = ServerConnection(server.url, token=TOKEN)
            for c in cases * 4:  # warm-up: allocator and caches settle before the baseline
                conn.infer_bytes(base64.b64decode(c["body"]))
            rss0 = _rss_mb(server.p.pid)
            per = -(-args.requests // args.procs)
            slow = _run(["slow", server.url, TOKEN, str(args.slow), "20", "99"], 120)
            load = [_run(["load", str(cases_file), server.url, TOKEN, str(per),
                          str(args.seconds), str(i)], args.seconds + 60)
                    for i in range(args.procs)]
            results = [_result(p, args.seconds + 120) for p in load]
            slow_res = _result(slow, 180)
            time.sleep(2.5)  # any socket the slow process left is past the head deadline now
            rss1 = _rss_mb(server.p.pid)
            healthy = ServerConnection(server.url).health() == {"status": "ok"}
            ans = ServerConnection(server.url, token=TOKEN).infer_bytes(
                base64.b64decode(cases[0]["body"]))
            healthy = healthy and ans["labels"] == cases[0]["labels"]
            _, mtext = ServerConnection(server.url, token=TOKEN).request("GET", "/metrics")
            alive = server.p.poll() is None
        finally:
            server.stop()
    log = "".join(server.lines)
    tot: dict = {"statuses": {}}
    for r in results:
        for k, v in r.items():
            if k == "statuses":
                for s, n in v.items():
                    tot["statuses"][s] = tot["statuses"].get(s, 0) + n
            elif k == "max_prob_diff":
                tot[k] = max(tot.get(k, 0.0), v)
            else:
                tot[k] = tot.get(k, 0) + v
    counted = re.search(r"^splitcem_client_disconnects_total (\S+)$", mtext.decode(), re.M)
    out = {
        "requests_total": tot["requests"] + slow_res["slow_sockets"],
        "load_requests": tot["requests"],
        "valid": tot["valid"], "valid_wrong": tot["valid_wrong"],
        "max_prob_diff": tot["max_prob_diff"],
        "fuzzed": tot["fuzzed"], "wrong_token": tot["wrong_token"],
        "wrong_token_not_401": tot["wrong_token_not_401"],
        "mid_body_disconnects": tot["mid_body_disconnects"],
        "server_counted_disconnects": float(counted.group(1)) if counted else None,
        **slow_res,
        "status_5xx": tot["status_5xx"], "statuses": tot["statuses"],
        "client_errors": tot["client_errors"], "client_reconnects": tot["reconnects"],
        "tracebacks_in_server_log": log.count("Traceback"),
        "rss_start_mb": round(rss0, 1), "rss_end_mb": round(rss1, 1),
        "rss_growth_mb": round(rss1 - rss0, 1),
        "healthy_after": bool(healthy and alive),
        "processes": args.procs + 1, "seconds": round(time.monotonic() - t_start, 1),
    }
    out["ok"] = (out["status_5xx"] == 0 and out["valid_wrong"] == 0
                 and out["wrong_token_not_401"] == 0 and out["rss_growth_mb"] <= 50
                 and out["healthy_after"] and out["slow_held_past_deadline"] == 0
                 and out["tracebacks_in_server_log"] == 0 and out["client_errors"] == 0
                 and out["server_counted_disconnects"] == out["mid_body_disconnects"])
    print(f"{out['requests_total']} requests ({out['valid']} valid, {out['fuzzed']} fuzzed, "
          f"{out['wrong_token']} wrong token, {out['mid_body_disconnects']} mid-body "
          f"disconnects, {out['slow_sockets']} slow sockets) in {out['seconds']} s: "
          f"{out['status_5xx']} 5xx, {out['valid_wrong']} wrong answers, RSS "
          f"{out['rss_start_mb']} -> {out['rss_end_mb']} MB, healthy after: "
          f"{out['healthy_after']}", flush=True)
    print(json.dumps(out))
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
