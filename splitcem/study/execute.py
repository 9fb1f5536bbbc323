"""One trial, on whichever node runs it: train, attack, record its fate, send results back.

Used by the engine (:mod:`splitcem.study.trials`) in the driver's loop or in a Ray worker;
everything a trial takes and returns is plain data, so it needs no shared filesystem.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from splitcem._io import atomic_write
from splitcem.config import load_config
from splitcem.record import CONFIG_FILE, LOCK_FILE, METRICS_FILE, RunRecord

__all__ = ["RESULT_FILES", "land", "run_trial"]

log = logging.getLogger("splitcem.study.trials")

#: what a trial sends back to the driver (checkpoints stay on the node)
RESULT_FILES = (CONFIG_FILE, METRICS_FILE, "summary.md", "reconstructions.png",
                "reconstructions.npz", "attack_decoder.safetensors", "attack_decoder.json")



@contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """Set torch's intra-op threads and ``SPLITCEM_THREADS`` for one trial; restore after."""
    if not n:
        yield
        return
    import torch

    old_n, old_env = torch.get_num_threads(), os.environ.get("SPLITCEM_THREADS")
    os.environ["SPLITCEM_THREADS"] = str(n)
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old_n)
        if old_env is None:
            os.environ.pop("SPLITCEM_THREADS", None)
        else:
            os.environ["SPLITCEM_THREADS"] = old_env


def run_trial(
    cfg_dict: dict[str, Any],
    run_dir: str,
    *,
    threads: int | None = None,
    meta: dict[str, Any] | None = None,
    device: str | None = None,
    progress: bool = False,
    ship: bool = False,
    stop_rule: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train and attack one trial in ``run_dir`` (resuming it if it was killed); return
    its status. Errors are caught and recorded, never raised: the sweep goes on.

    Runs in a Ray worker or in the driver; everything it takes and returns is plain data.
    With ``ship`` the status carries the run's result files (``files``: name -> bytes),
    for a driver that does not share this node's filesystem. ``stop_rule`` (a
    :class:`~splitcem.study.stopping.StopRule` as a dict) stops a trial that cannot reach
    its accuracy budget after an epoch: status ``stopped``, the run left resumable.
    """
    from splitcem.study.stopping import StopRule

    hook = StopRule.from_dict(stop_rule).on_epoch if stop_rule else None

    path = Path(run_dir)
    path.mkdir(parents=True, exist_ok=True)
    with _exclusive(path):
        return _run_locked(path, cfg_dict, threads=threads, meta=meta, device=device,
                           progress=progress, ship=ship, hook=hook)


@contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Hold the trial's lock; if another process holds it (a worker of a killed sweep still
    finishing this trial), say so and wait for it, then go on from where it got."""
    lock = FileLock(path / LOCK_FILE)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        holder = RunRecord.load(path).trial
        log.warning("trial %s: still being run by pid %s on %s (a worker of a killed sweep?); "
                    "waiting for it to end", path.name, holder.get("pid"), holder.get("host"))
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _run_locked(path: Path, cfg_dict: dict[str, Any], *, threads: int | None,
                meta: dict[str, Any] | None, device: str | None, progress: bool, ship: bool,
                hook: Callable[[dict[str, Any]], None] | None) -> dict[str, Any]:
    from splitcem.experiment import attack_run, train_run
    from splitcem.study.stopping import TrialStopped

    run = RunRecord.load(path)
    status: dict[str, Any] = {
        **(meta or {}), "status": "running", "run_dir": str(path), "host": socket.gethostname(),
        "pid": os.getpid(), "threads": threads,
        "attempts": int(run.trial.get("attempts", 0)) + 1,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    t0 = time.perf_counter()
    run.write_trial(status)
    try:
        with _threads(threads):
            cfg = load_config(cfg_dict)
            resume = run.can_resume and run.config is not None and (
                run.config.to_dict() == cfg.to_dict())
            status["resumed"] = resume
            rec = train_run(cfg, path, resume=resume, overwrite=not resume, progress=progress,
                            device=device, on_epoch_end=hook)
            if cfg.attack.attacks:
                rec = attack_run(path, progress=progress, device=device)
        status.update(status="finished", accuracy=(rec.get("train") or {}).get("test_accuracy"))
    except TrialStopped as e:  # hopeless: not a failure, not a result
        status.update(status="stopped", stopped_at_epoch=e.epoch, accuracy=e.accuracy,
                      reason=e.reason)
    except Exception as e:  # recorded for the sweep's table; the others go on
        status.update(status="failed", error=f"{type(e).__name__}: {e}",
                      traceback=traceback.format_exc())
        RunRecord.load(path).mark_failed(status["error"])
        log.warning("trial %s failed: %s", path.name, status["error"])
    status["ended"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    status["seconds"] = round(time.perf_counter() - t0, 2)
    run.write_trial(status)
    if ship:
        status["files"] = RunRecord.load(path).files(RESULT_FILES)
    return status


def _writer(data: bytes) -> Callable[[Path], object]:
    return lambda p: p.write_bytes(data)


def land(path: Path, status: dict[str, Any]) -> dict[str, Any]:
    """Write the files a trial sent back into its folder on the driver (where the driver
    shares the node's filesystem they are already there, and are left alone)."""
    files = status.pop("files", None) or {}
    path.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        dst = path / name
        if not (dst.is_file() and dst.read_bytes() == data):
            atomic_write(dst, _writer(data))
    RunRecord(path, None).write_trial(status)
    return status
