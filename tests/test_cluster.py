"""A sweep on a real 2-node Ray cluster that shares nothing but the network.

A head with no CPUs (``ray start --head --num-cpus 0``) and a worker node (``ray start
--address``), both on loopback; the worker runs in its own mount namespace with a tmpfs over
the sweep folder, so what it writes there never reaches the driver's disk. Every trial's
record, metrics, summary and images must still land in the driver's sweep folder (the
trial ships them back); checkpoints stay on the worker (node-local, as documented).

Bounded: every wait has a deadline, the driver runs in a subprocess with a timeout, and
both ``ray start`` process groups (only those this test started) are ended at the end. A
private HOME keeps any ``~/.ray/auth_token`` of another cluster out of it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from _ports import free_port_block

pytest.importorskip("ray", reason="pip install 'splitcem[sweep]' (make setup does)")

pytestmark = pytest.mark.slow  # two Ray nodes and two tiny trials: about a minute

REPO = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).with_name("ray")
HEAD, WORKER = "127.0.0.2", "127.0.0.3"


def _can_unshare() -> bool:
    if not shutil.which("unshare") or not RAY.is_file():
        return False
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True, check=False)
    return probe.returncode == 0


WORKER_PORTS = 41  # --min-worker-port .. --max-worker-port: a node's worker processes
NODE_PORTS = 7 + WORKER_PORTS  # what one node listens on (see _node_args)


def _node_args(ip: str, ports: list[int], temp: Path) -> list[str]:
    """``ray start`` flags that pin every port a node listens on to ``ports`` (7 + the
    worker range)."""
    assert len(ports) == NODE_PORTS
    nm, om, client, agent_l, agent_g, metrics, renv, wmin = ports[:8]
    return ["--node-ip-address", ip, "--temp-dir", str(temp),
            "--node-manager-port", str(nm), "--object-manager-port", str(om),
            "--ray-client-server-port", str(client), "--dashboard-agent-listen-port",
            str(agent_l), "--dashboard-agent-grpc-port", str(agent_g),
            "--metrics-export-port", str(metrics), "--runtime-env-agent-port", str(renv),
            "--min-worker-port", str(wmin), "--max-worker-port", str(wmin + WORKER_PORTS - 1),
            "--disable-usage-stats", "--block"]


def _tail(log: Path, temp: Path, n: int = 1500) -> str:
    """The end of a node's ``ray start`` output and of its raylet's logs, for a failure."""
    parts = []
    logs = temp / "session_latest" / "logs"
    for f in [log, *sorted(logs.glob("raylet.*")), *sorted(logs.glob("dashboard_agent.*"))]:
        if f.is_file():
            text = f.read_text(errors="replace")[-n:]
            parts.append(f"--- {f.name}:\n{text}")
    return "\n".join(parts) or f"(no output under {temp})"


def _wait_for_node(proc: subprocess.Popen[bytes], ip: str, port: int, what: str,
                   log: Path, temp: Path, seconds: float = 120) -> None:
    """Wait until ``ip:port`` answers (the node's raylet is up), or fail with its logs."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex((ip, port)) == 0:
                return
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode} before it was up:\n"
                        + _tail(log, temp))
        time.sleep(0.5)
    pytest.fail(f"{what} not up on {ip}:{port} after {seconds:.0f} s:\n" + _tail(log, temp))


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """End one ``ray start --block`` and everything in its process group."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        try:  # children may outlive the leader briefly
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return


DRIVER = """
import json, sys
from splitcem.study.trials import Engine, run_grid
res = run_grid(json.loads(sys.argv[1]), out=sys.argv[2],
               engine=Engine(address=sys.argv[3], progress=False))
print("RESULT " + json.dumps({n: s.get("status") for n, s in res.statuses.items()}))
"""


@pytest.mark.skipif(not _can_unshare(), reason="needs `unshare -m` (root, or user "
                    "namespaces) and the ray command")
def test_sweep_on_two_nodes_without_a_shared_filesystem(tiny_config):
    # short paths: Ray's unix sockets live under the temp dir (108-byte limit)
    tmp = Path(tempfile.mkdtemp(prefix="sc", dir="/tmp"))
    sweep_dir = tmp / "sweep"
    sweep_dir.mkdir()
    base = tiny_config(train={"epochs": 1, "warmup_epochs": 0}, cem={"lambda": 0.0},
                       model={"client_width": 0.125, "server_width": 0.125},
                       attack={"attacks": [{"name": "decoder", "epochs": 1, "width": 8,
                                            "depth": 1}]},
                       defenses=[{"name": "noise", "sigma": 0.1}])
    (tmp / "base.yaml").write_text(yaml.safe_dump(base.to_dict()))
    spec = {"name": "two", "base": str(tmp / "base.yaml"), "seeds": [0],
            "variants": [{"name": "noise{sigma}", "grid": {"defenses.0.sigma": [0.1, 0.3]}}]}
    # every port either node listens on, from one block below the ephemeral range: a worker
    # whose raylet cannot bind a port exits, the likely cause of a CI run whose worker node
    # never joined; one block also keeps the two nodes' worker-port ranges apart
    gcs, *ports = free_port_block(1 + 2 * NODE_PORTS)
    head_ports, worker_ports = ports[:NODE_PORTS], ports[NODE_PORTS:]
    # Loopback only. Ray swaps "127.0.0.1" for the machine's network address on a
    # multi-node cluster (and a worker node needs multi-node mode), but keeps other loopback
    # addresses: the head is 127.0.0.2, the worker node 127.0.0.3. (The GCS and raylets
    # then listen on all interfaces; everything here connects over loopback only.)
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1", "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": "1",
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
           "HOME": str(tmp / "home")}  # no ~/.ray/auth_token of another cluster
    (tmp / "home").mkdir()
    head_log, worker_log = tmp / "head.log", tmp / "worker.log"
    with head_log.open("wb") as f:
        head = subprocess.Popen(
            [str(RAY), "start", "--head", "--port", str(gcs), "--num-cpus", "0",
             "--include-dashboard", "false", *_node_args(HEAD, head_ports, tmp / "rh")],
            env=env, start_new_session=True, stdout=f, stderr=subprocess.STDOUT)
    worker = None
    try:
        _wait_for_node(head, HEAD, gcs, "the head's GCS", head_log, tmp / "rh")
        _wait_for_node(head, HEAD, head_ports[0], "the head's raylet", head_log, tmp / "rh")
        inner = (f"mount -t tmpfs tmpfs {sweep_dir} && exec {RAY} start --address "
                 f"{HEAD}:{gcs} --num-cpus 1 " + " ".join(_node_args(WORKER, worker_ports,
                                                                     tmp / "rw")))
        with worker_log.open("wb") as f:
            worker = subprocess.Popen(["unshare", "-m", "sh", "-c", inner], env=env,
                                      start_new_session=True, stdout=f, stderr=subprocess.STDOUT)
        _wait_for_node(worker, WORKER, worker_ports[0], "the worker node's raylet", worker_log,
                       tmp / "rw")
        try:
            out = subprocess.run(
                [sys.executable, "-c", DRIVER, json.dumps(spec), str(sweep_dir),
                 f"{HEAD}:{gcs}"], env=env, cwd=REPO, capture_output=True, text=True,
                timeout=400, check=False)
        except subprocess.TimeoutExpired:
            state = "exited" if worker.poll() is not None else "running"
            pytest.fail(f"the sweep did not finish in 400 s (worker node {state}):\n"
                        + _tail(worker_log, tmp / "rw"))
        assert out.returncode == 0, out.stderr[-3000:] + "\n" + _tail(worker_log, tmp / "rw")
        line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
        assert json.loads(line[7:]) == {"noise0.1_s0": "finished", "noise0.3_s0": "finished"}
        for name in ("noise0.1_s0", "noise0.3_s0"):
            run = sweep_dir / name
            # the worker wrote into its own tmpfs: only what it sent back is here
            assert not (run / "checkpoints").exists(), "the driver saw the worker's disk"
            for f in ("config.yaml", "metrics.json", "summary.md", "reconstructions.png",
                      "trial.json"):
                assert (run / f).is_file(), f"{name}/{f} did not reach the driver"
            from splitcem.record import RunRecord

            rec = RunRecord.load(run)
            assert rec.status == "attacked" and rec.attacks["worst"]["mse"]["value"] > 0
        from splitcem.study.frontier_report import write_frontier

        front = write_frontier([sweep_dir], tmp / "front", n_boot=100)
        assert front["runs"] == 2
    finally:
        for p in (worker, head):
            if p is not None:
                _stop(p)
        shutil.rmtree(tmp, ignore_errors=True)
