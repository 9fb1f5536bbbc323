"""Run a sweep's trials on Ray (or in a plain loop), resumably, recording each one's fate.

Each trial is an ordinary run directory (:func:`splitcem.experiment.train_run` then
:func:`~splitcem.experiment.attack_run`) under the sweep's folder, plus ``trial.json``: its
status (``running``, ``finished``, ``failed`` with the error and traceback), values, seed,
threads and times. Re-running a sweep skips finished trials (config unchanged, training and
attacks recorded), resumes a killed one from its last epoch checkpoint (a kill loses at most
the trials in flight, and of those only the epoch or attack under way), and retries failed
ones. A failing trial never stops the others.

Ray is optional (``pip install 'splitcem[sweep]'``): local by default, sized to this
machine (``num_cpus = os.cpu_count()``; ``max_concurrent = cpus // threads_per_trial``), or
an existing cluster with ``address``. Every trial sets its own thread count
(``torch.set_num_threads`` and ``SPLITCEM_THREADS``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from splitcem._io import write_json, write_text
from splitcem.config import RunConfig, load_config
from splitcem.errors import ConfigError
from splitcem.study.grid import SweepSpec, Trial, expand, load_sweep

__all__ = [
    "STATUS_FILE",
    "GridResult",
    "comparable",
    "find_adoptable",
    "run_grid",
    "run_trial",
    "trial_finished",
]

log = logging.getLogger(__name__)

STATUS_FILE = "trial.json"
INDEX_FILE = "trials.json"
#: config keys that do not change what a run measures (ignored when matching runs)
_IGNORED = {"name", "device"}


def comparable(cfg: dict[str, Any]) -> dict[str, Any]:
    """A resolved config without the keys that do not change results (name, device,
    TensorBoard logging), for matching a trial to an existing run."""
    out = {k: v for k, v in cfg.items() if k not in _IGNORED}
    train = dict(out.get("train") or {})
    train.pop("tensorboard", None)
    out["train"] = train
    return out


def _read_json(p: Path) -> dict[str, Any] | None:
    try:
        d = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


def trial_finished(run_dir: Path, cfg: RunConfig) -> dict[str, Any] | None:
    """The run's record if ``run_dir`` holds this config, trained and (if the config has
    attacks) attacked; else ``None``."""
    rec = _read_json(run_dir / "metrics.json")
    if rec is None or not (run_dir / "config.yaml").is_file():
        return None
    try:
        same = load_config(run_dir / "config.yaml").to_dict() == cfg.to_dict()
    except Exception:  # an unreadable leftover: run the trial again
        return None
    done = (rec.get("train") or {}).get("epochs") == cfg.train.epochs
    attacked = bool(rec.get("attacks")) or not cfg.attack.attacks
    return rec if same and done and attacked else None


def _status(run_dir: Path, status: dict[str, Any]) -> None:
    write_json(run_dir / STATUS_FILE, status)


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
) -> dict[str, Any]:
    """Train and attack one trial in ``run_dir`` (resuming it if it was killed); return
    its status. Errors are caught and recorded, never raised: the sweep goes on.

    Runs in a Ray worker or in the driver; everything it takes and returns is plain data.
    """
    from splitcem.experiment import attack_run, train_run

    path = Path(run_dir)
    path.mkdir(parents=True, exist_ok=True)
    old = _read_json(path / STATUS_FILE) or {}
    status: dict[str, Any] = {
        **(meta or {}), "status": "running", "run_dir": str(path), "host": socket.gethostname(),
        "pid": os.getpid(), "threads": threads, "attempts": int(old.get("attempts", 0)) + 1,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    t0 = time.perf_counter()
    _status(path, status)
    try:
        with _threads(threads):
            cfg = load_config(cfg_dict)
            ckpt = path / "checkpoints" / "last.pt"
            resume = ckpt.is_file() and (path / "config.yaml").is_file() and (
                load_config(path / "config.yaml").to_dict() == cfg.to_dict())
            status["resumed"] = resume
            train_run(cfg, path, resume=resume, overwrite=not resume, progress=progress,
                      device=device)
            rec = attack_run(path, progress=progress, device=device) if cfg.attack.attacks \
                else _read_json(path / "metrics.json") or {}
        status.update(status="finished", accuracy=(rec.get("train") or {}).get("test_accuracy"))
    except Exception as e:  # recorded for the sweep's table; the others go on
        status.update(status="failed", error=f"{type(e).__name__}: {e}",
                      traceback=traceback.format_exc())
        log.warning("trial %s failed: %s", path.name, status["error"])
    status["ended"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    status["seconds"] = round(time.perf_counter() - t0, 2)
    _status(path, status)
    return status


def find_adoptable(trial: Trial, dirs: Sequence[Path]) -> Path | None:
    """A finished run under ``dirs`` (searched recursively) whose config is the trial's up
    to name and device: it can stand in for the trial instead of training it again."""
    want = comparable(trial.cfg.to_dict())
    for d in dirs:
        for cfg_file in sorted(Path(d).rglob("config.yaml")):
            run = cfg_file.parent
            try:
                cfg = load_config(cfg_file)
            except Exception:
                continue
            if comparable(cfg.to_dict()) != want:
                continue
            rec = _read_json(run / "metrics.json") or {}
            if (rec.get("train") or {}).get("epochs") == cfg.train.epochs and (
                    rec.get("attacks") or not cfg.attack.attacks):
                return run
    return None


def _adopt(trial: Trial, src: Path, dst: Path) -> dict[str, Any]:
    """Copy a finished run into the trial's folder (the source is only read)."""
    import yaml

    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(STATUS_FILE, ".*.tmp"))
    write_text(dst / "config.yaml", yaml.safe_dump(trial.cfg.to_dict(), sort_keys=False))
    rec = _read_json(dst / "metrics.json") or {}
    rec["name"] = trial.name
    write_json(dst / "metrics.json", rec)
    status = {"name": trial.name, "status": "finished", "adopted_from": str(src),
              "values": trial.values, "seed": trial.seed,
              "accuracy": (rec.get("train") or {}).get("test_accuracy")}
    _status(dst, status)
    return status


@dataclass
class GridResult:
    """What a sweep did: its folder, every trial's status, and what this call ran."""

    out: Path
    statuses: dict[str, dict[str, Any]] = field(default_factory=dict)
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    adopted: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[str]:
        return [n for n, s in self.statuses.items() if s.get("status") == "failed"]


#: set before ray is imported: a local (single-machine) Ray then binds its services to
#: loopback instead of the machine's network address (Ray reads it at import time)
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def _ray(address: str | None, num_cpus: int | None, num_gpus: float | None) -> tuple[Any, bool]:
    if not address:
        for k, v in LOOPBACK_ENV.items():
            os.environ.setdefault(k, v)
    try:
        import ray
    except ImportError:
        raise ConfigError("sweeps on Ray need the 'ray' package: pip install 'splitcem[sweep]' "
                          "(or make setup); --no-ray runs the trials one after another") from None
    if ray.is_initialized():
        return ray, False
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
    if address:
        kwargs["address"] = address
    else:
        kwargs["num_cpus"] = num_cpus or os.cpu_count() or 1
        if num_gpus is not None:
            kwargs["num_gpus"] = num_gpus
    ray.init(**kwargs)
    return ray, True


def _execute_ray(
    jobs: list[tuple[Trial, Path, dict[str, Any]]],
    *,
    address: str | None,
    max_concurrent: int | None,
    threads: int,
    gpus: float,
    device: str | None,
    on_done: Any,
) -> None:
    ray, started = _ray(address, None, None)
    try:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        limit = max_concurrent or max(1, cpus // threads)
        if gpus > 0:
            limit = min(limit, max(1, int(ray.cluster_resources().get("GPU", 0) / gpus)))
        remote = ray.remote(num_cpus=threads, num_gpus=gpus, max_retries=0)(run_trial)
        log.info("sweep on Ray: %d trials, %d at a time, %d thread(s) each", len(jobs), limit,
                 threads)
        pending = list(jobs)
        running: dict[Any, tuple[Trial, Path]] = {}
        while pending or running:
            while pending and len(running) < limit:
                trial, path, meta = pending.pop(0)
                ref = remote.remote(trial.cfg.to_dict(), str(path), threads=threads, meta=meta,
                                    device=device)
                running[ref] = (trial, path)
            done, _ = ray.wait(list(running), num_returns=1)
            for ref in done:
                trial, path = running.pop(ref)
                try:
                    status = ray.get(ref)
                except Exception as e:  # the worker died (killed, out of memory)
                    status = {"name": trial.name, "status": "failed", "run_dir": str(path),
                              "error": f"{type(e).__name__}: {e}"}
                    _status(path, status)
                on_done(trial, status)
    finally:
        if started:
            ray.shutdown()


def run_grid(
    sweep: str | Path | dict[str, Any] | SweepSpec,
    *,
    out: str | Path | None = None,
    address: str | None = None,
    max_concurrent: int | None = None,
    threads_per_trial: int = 1,
    gpus_per_trial: float = 0.0,
    use_ray: bool = True,
    adopt: Sequence[str | Path] = (),
    device: str | None = None,
    progress: bool = True,
) -> GridResult:
    """Run every trial of a sweep file that is not finished yet; returns their statuses.

    Args:
        sweep: A sweep file (see :mod:`splitcem.study.grid`), its dict, or a parsed spec.
        out: The sweep's folder (default: the file's ``out``, else ``runs/sweeps/NAME``).
        address: A Ray cluster's address; ``None`` starts a local Ray sized to this machine.
        max_concurrent: Trials at once (default: CPUs // threads_per_trial).
        threads_per_trial: torch threads (and Ray CPUs) per trial.
        gpus_per_trial: Ray GPUs per trial (a fraction shares one GPU).
        use_ray: ``False`` runs the trials one after another in this process.
        adopt: Folders of existing runs: a trial whose config matches a finished run there
            (up to name and device) copies it instead of training again (the source is
            only read).
        device: Device for every trial (default: each config's).
    """
    spec = sweep if isinstance(sweep, SweepSpec) else load_sweep(sweep)
    trials = expand(spec)
    if threads_per_trial < 1:
        raise ConfigError(f"--threads-per-trial must be >= 1, got {threads_per_trial}")
    if max_concurrent is not None and max_concurrent < 1:
        raise ConfigError(f"--max-concurrent must be >= 1, got {max_concurrent}")
    out_dir = Path(out if out is not None else spec.out or Path("runs") / "sweeps" / spec.name)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = GridResult(out_dir)
    jobs: list[tuple[Trial, Path, dict[str, Any]]] = []
    for t in trials:
        path = out_dir / t.name
        meta = {"name": t.name, "variant": t.variant, "values": t.values, "seed": t.seed}
        if trial_finished(path, t.cfg) is not None:
            result.statuses[t.name] = _read_json(path / STATUS_FILE) or {**meta,
                                                                         "status": "finished"}
            result.skipped.append(t.name)
            continue
        src = find_adoptable(t, [Path(a) for a in adopt]) if adopt else None
        if src is not None:
            result.statuses[t.name] = _adopt(t, src, path)
            result.adopted.append(t.name)
            log.info("trial %s: adopted the finished run %s", t.name, src)
            continue
        jobs.append((t, path, meta))
    _write_index(out_dir, spec, trials, result)
    log.info("sweep %s: %d trials, %d finished before, %d adopted, %d to run -> %s", spec.name,
             len(trials), len(result.skipped), len(result.adopted), len(jobs), out_dir)

    from tqdm.auto import tqdm

    bar = tqdm(total=len(jobs), desc=f"sweep {spec.name}", disable=not progress or not jobs,
               dynamic_ncols=True)

    def on_done(trial: Trial, status: dict[str, Any]) -> None:
        result.statuses[trial.name] = status
        result.ran.append(trial.name)
        _write_index(out_dir, spec, trials, result)
        bar.update(1)
        log.info("trial %s: %s%s", trial.name, status.get("status"),
                 f" ({status.get('error')})" if status.get("error") else "")

    try:
        if use_ray and jobs:
            _execute_ray(jobs, address=address, max_concurrent=max_concurrent,
                         threads=threads_per_trial, gpus=gpus_per_trial, device=device,
                         on_done=on_done)
        else:
            for t, path, meta in jobs:
                on_done(t, run_trial(t.cfg.to_dict(), str(path), threads=threads_per_trial,
                                     meta=meta, device=device, progress=False))
    finally:
        bar.close()
    return result


def _write_index(out: Path, spec: SweepSpec, trials: list[Trial], result: GridResult) -> None:
    rows = []
    for t in trials:
        s = result.statuses.get(t.name) or {"status": "pending"}
        rows.append({"name": t.name, "variant": t.variant, "values": t.values, "seed": t.seed,
                     "status": s.get("status"), "error": s.get("error"),
                     "seconds": s.get("seconds"), "adopted_from": s.get("adopted_from")})
    write_json(out / INDEX_FILE, {"sweep": spec.name, "source": spec.source, "trials": rows})
