"""The one sweep engine: run trials on Ray (or in a plain loop), resumably, recording each
one's fate; every front door (a sweep file, a list of configs, ``reproduce``) proposes
:class:`~splitcem.study.grid.Trial` s to :func:`run_trials`.

Each trial is an ordinary run directory (:func:`splitcem.experiment.train_run` then
:func:`~splitcem.experiment.attack_run`) under the sweep's folder, read and written only
through :class:`splitcem.record.RunRecord`, plus ``trial.json``: its status (``running``,
``finished``, ``failed`` with the error and traceback), values, seed, threads and times.
Re-running a sweep skips finished trials (the record finished *for this config*: hashes of
what ran compared, see :mod:`splitcem.record`), resumes a killed one from its last epoch
checkpoint (a kill loses at most the trials in flight, and of those only the epoch or attack
under way), re-runs one whose config changed, and retries failed ones. A failing trial never
stops the others.

No shared filesystem is needed: a trial returns its results (``config.yaml``,
``metrics.json``, ``summary.md``, the reconstructions and the attack decoder, as bytes) to
the driver, which writes them into the sweep's folder. Checkpoints stay on the node that
trained (node-local): a trial resumed on another node trains again from the start. Each
node finds the datasets by the usual search (``SPLITCEM_DATA``, ``~/.splitcem/data``, ...)
or the config's explicit ``data.root``.

Ray is optional (``pip install 'splitcem[sweep]'``): local by default, sized to this
machine (``num_cpus = os.cpu_count()``; ``max_concurrent = cpus // threads_per_trial``), or
an existing cluster with ``address``. Every trial sets its own thread count
(``torch.set_num_threads`` and ``SPLITCEM_THREADS``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from splitcem._io import read_json_object, write_json
from splitcem.config import RunConfig
from splitcem.errors import ConfigError
from splitcem.record import RunRecord, comparable
from splitcem.study.execute import RESULT_FILES, land, run_trial
from splitcem.study.grid import SweepSpec, Trial, expand, load_sweep

if TYPE_CHECKING:
    from splitcem.runtime import NumericPath

__all__ = [
    "RESULT_FILES",
    "Engine",
    "GridResult",
    "Job",
    "comparable",
    "find_adoptable",
    "numeric_path_here",
    "other_paths",
    "path_here",
    "pin_advice",
    "plan_trials",
    "queued",
    "run_grid",
    "run_trial",
    "run_trials",
    "schedule",
]

log = logging.getLogger(__name__)

INDEX_FILE = "trials.json"


def find_adoptable(trial: Trial, dirs: Sequence[Path], *, device: str | None = None,
                   records: Sequence[RunRecord] | None = None) -> Path | None:
    """A run under ``dirs`` (searched recursively) that can stand in for the trial: finished
    for exactly its config up to name and device (what ran compared: numerics, and attacks
    on the same aux / eval partition); else one trained for it whose checkpoint is there
    (then only the attacks run again). ``records``: those runs, already loaded (then
    ``dirs`` is not read)."""
    trained = None
    for rec in records if records is not None else RunRecord.find(list(dirs)):
        if rec.finished(trial.cfg, device=device):
            return rec.path
        if trained is None and rec.has_checkpoint and rec.trained_for(trial.cfg,
                                                                      device=device):
            trained = rec.path
    return trained


def numeric_path_here(cfg: RunConfig, device: str | None = None) -> NumericPath:
    """The numeric path ``cfg`` trains on here (``device``: default its own), resolved
    without the warning training gives for ``amp: true`` without native bf16."""
    from splitcem.runtime import resolve_device, resolve_numeric_path

    dev = resolve_device(device if device is not None else cfg.device)
    return resolve_numeric_path(cfg.train.amp, cfg.train.channels_last, dev, quiet=True)


def path_here(cfg: RunConfig, device: str | None = None) -> str:
    """The numeric path ``cfg`` trains on here, and why (``float32 + channels-last (auto on
    cpu (AVX512): no native bf16: float32, channels-last)``)."""
    p = numeric_path_here(cfg, device)
    return f"{p.describe()} ({p.reason})"


def other_paths(trials: Sequence[Trial], records: Sequence[RunRecord], *,
                device: str | None = None) -> dict[str, tuple[RunRecord, str]]:
    """Trials (by name) that a run among ``records`` was trained for in all but the
    numeric path, with that run and its path: what a sweep continued on a machine that
    resolves ``amp: auto`` otherwise neither adopts nor pools (:func:`pin_advice`)."""
    found: dict[str, tuple[RunRecord, str]] = {}
    for t in trials:
        for rec in records:
            if rec.config is not None and rec.config.seed == t.seed and \
                    (other := rec.other_path_for(t.cfg, device=device)) is not None:
                found[t.name] = (rec, other)
                break
    return found


def pin_advice(trials: Sequence[Trial], found: dict[str, tuple[RunRecord, str]], *,
               device: str | None = None) -> str:
    """One line on ``found`` (:func:`other_paths`): how many, which path they ran and this
    machine would run, and the ``--amp`` that keeps theirs."""
    by_name = {t.name: t for t in trials}
    name, (rec, theirs) = next(iter(found.items()))
    amp = "true" if rec.numerics.get("amp") else "false"
    return (f"{len(found)} trial(s) match runs made on another numeric path ({theirs}, e.g. "
            f"{rec.path}); here they would train {path_here(by_name[name].cfg, device)}, so "
            f"those runs are neither adopted nor pooled with new seeds: --amp {amp} keeps "
            "their path")


def _adopt(trial: Trial, src: Path, dst: Path, *, device: str | None) -> dict[str, Any]:
    """Copy a finished (or trained) run into the trial's folder (the source is only read)."""
    rec = RunRecord.load(src).copy_to(dst, trial.cfg)
    done = rec.finished(trial.cfg, device=device)
    status = {"name": trial.name, "status": "finished" if done else "pending",
              "adopted_from": str(src), "adopted_as": "finished" if done else "trained",
              "values": trial.values, "seed": trial.seed, "accuracy": rec.accuracy}
    rec.write_trial(status)
    return status


@dataclass(frozen=True)
class Engine:
    """How and where a study's trials run: one object that every front door (a sweep file,
    a list of configs, ``reproduce``, the tuner) hands to :func:`run_trials` unchanged.

    Args:
        address: A Ray cluster's address; ``None`` starts a local Ray sized to this machine.
        max_concurrent: Trials at once (default: CPUs // threads_per_trial).
        threads_per_trial: torch threads (and Ray CPUs) per trial.
        gpus_per_trial: Ray GPUs per trial (a fraction shares one GPU).
        use_ray: ``False`` runs the trials one after another in this process.
        adopt: Folders of existing runs: a trial whose config matches a finished run there
            (up to name and device; what ran compared, see :mod:`splitcem.record`) copies
            it instead of training again (the source is only read).
        device: Device for every trial (default: each config's).
        progress: A progress bar over the trials.

    Example:
        >>> Engine(use_ray=False, progress=False).but(device="cpu").device
        'cpu'
    """

    address: str | None = None
    max_concurrent: int | None = None
    threads_per_trial: int = 1
    gpus_per_trial: float = 0.0
    use_ray: bool = True
    adopt: tuple[Path, ...] = ()
    device: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.threads_per_trial < 1:
            raise ConfigError(f"--threads-per-trial must be >= 1, got {self.threads_per_trial}")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise ConfigError(f"--max-concurrent must be >= 1, got {self.max_concurrent}")
        if self.gpus_per_trial < 0:
            raise ConfigError(f"--gpus-per-trial must be >= 0, got {self.gpus_per_trial}")
        object.__setattr__(self, "adopt", tuple(Path(a) for a in self.adopt))

    def but(self, **changes: Any) -> Engine:
        """A copy with ``changes`` (e.g. ``engine.but(progress=False)``)."""
        return replace(self, **changes)


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


#: a job of the engine: the trial, its run directory and its ``trial.json`` metadata
Job = tuple[Trial, Path, dict[str, Any]]


def schedule(jobs: Sequence[Job], limit: int, submit: Callable[[Job], Any],
             wait_one: Callable[[list[Any]], Any],
             refill: Callable[[], Sequence[Job]] | None = None) -> None:
    """Keep ``limit`` jobs in flight: ``submit`` starts one and returns its handle,
    ``wait_one`` blocks until one of the handles given ends and returns it (and handles its
    result). When a slot is free and nothing is queued, ``refill`` (if given) is asked once
    for more jobs (seeds until decided plans its next round then), so a round's last trials
    do not leave the other slots idle."""
    pending = list(jobs)
    running: list[Any] = []
    while True:
        asked = False
        while len(running) < limit:
            if not pending and refill is not None and not asked:
                pending.extend(refill())
                asked = True
            if not pending:
                break
            running.append(submit(pending.pop(0)))
        if not running:
            return
        running.remove(wait_one(running))


def _execute_ray(
    jobs: list[Job],
    *,
    address: str | None,
    max_concurrent: int | None,
    threads: int,
    gpus: float,
    device: str | None,
    on_done: Callable[[Trial, dict[str, Any]], None],
    refill: Callable[[], Sequence[Job]] | None = None,
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
        running: dict[Any, tuple[Trial, Path]] = {}

        def submit(job: Job) -> Any:
            trial, path, meta = job
            ref = remote.remote(trial.cfg.to_dict(), str(path), threads=threads, meta=meta,
                                device=device, ship=True)
            running[ref] = (trial, path)
            return ref

        def wait_one(refs: list[Any]) -> Any:
            (ref,), _ = ray.wait(refs, num_returns=1)
            trial, path = running.pop(ref)
            try:
                status = ray.get(ref)
            except Exception as e:  # the worker died (killed, out of memory)
                status = {"name": trial.name, "status": "failed", "run_dir": str(path),
                          "error": f"{type(e).__name__}: {e}"}
            on_done(trial, land(path, status))
            return ref

        schedule(jobs, limit, submit, wait_one, refill)
    finally:
        if started:
            ray.shutdown()


def _started(rec: RunRecord) -> bool:
    """Work of this trial is on disk to continue from: a checkpoint, or trained."""
    return rec.can_resume or rec.status == "trained"


def plan_trials(trials: Sequence[Trial], out: Path, *, adopt: Sequence[str | Path] = (),
                device: str | None = None) -> tuple[GridResult, list[Job]]:
    """What a sweep has left to do: skip the trials finished in ``out`` (for exactly their
    config), adopt finished runs from ``adopt`` (copied into ``out``), and return the rest
    as jobs (a run adopted as trained only is a job: its attacks run again). The trials with
    work on disk (an epoch checkpoint, or trained and not attacked) come first, in their
    order, then the others: a re-run finishes what it started before it starts anything new."""
    out_dir = Path(out)
    own = [RunRecord.load(out_dir / t.name) for t in trials]
    if mine := other_paths(trials, own, device=device):
        raise ConfigError(f"{pin_advice(trials, mine, device=device)}; re-running would "
                          f"replace them: pass that --amp, or move {out_dir} away to start "
                          "over")
    out_dir.mkdir(parents=True, exist_ok=True)
    result = GridResult(out_dir)
    jobs: list[Job] = []
    records = list(RunRecord.find([Path(a) for a in adopt])) if adopt else []  # read once
    started: set[str] = set()
    for t, rec in zip(trials, own, strict=True):
        path = out_dir / t.name
        meta = {"name": t.name, "variant": t.variant, "values": t.values, "seed": t.seed}
        if rec.finished(t.cfg, device=device):
            result.statuses[t.name] = rec.trial or {**meta, "status": "finished"}
            result.skipped.append(t.name)
            continue
        src = find_adoptable(t, [], device=device, records=records) if adopt else None
        if src is not None:
            result.statuses[t.name] = _adopt(t, src, path, device=device)
            log.info("trial %s: adopted the %s run %s", t.name,
                     result.statuses[t.name]["adopted_as"], src)
            if result.statuses[t.name]["status"] == "finished":
                result.adopted.append(t.name)
                continue
        if _started(RunRecord.load(path) if src is not None else rec):  # adopted: copied in
            started.add(t.name)
        jobs.append((t, path, meta))
    if started:
        jobs.sort(key=lambda j: j[0].name not in started)  # stable: each part in its order
        log.info("%d started trial(s) continue first: %s", len(started),
                 ", ".join(t.name for t, _, _ in jobs[:len(started)]))
    if records and jobs:
        left = [t for t, _, _ in jobs]
        if found := other_paths(left, records, device=device):
            log.warning("%s", pin_advice(left, found, device=device))
    return result, jobs


def run_trials(
    trials: Sequence[Trial],
    out: str | Path,
    *,
    name: str = "sweep",
    source: str = "(trials)",
    engine: Engine | None = None,
    trial_progress: bool = False,
    refill: Callable[[], Sequence[Trial]] | None = None,
) -> GridResult:
    """Run every trial that is not finished yet in ``out/TRIAL``; returns their statuses.

    The one engine behind :func:`run_grid` (sweep files), :func:`splitcem.study.sweep.run_sweep`
    (lists of configs) and :func:`splitcem.study.reproduce.reproduce`. ``engine``: how and
    where they run (default: an :class:`Engine` with its defaults). ``trial_progress``:
    progress bars inside each trial (loop only). ``refill``: asked for more trials whenever
    a slot is free and none is queued (:func:`schedule`; seeds until decided plans its next
    round then); they are skipped, adopted or run like the others.
    """
    eng = engine or Engine()
    out_dir = Path(out)
    result, jobs = plan_trials(trials, out_dir, adopt=eng.adopt, device=eng.device)
    index = (name, source, list(trials))
    _write_index(out_dir, *index, result)
    log.info("sweep %s: %d trials, %d finished before, %d adopted, %d to run -> %s", name,
             len(trials), len(result.skipped), len(result.adopted), len(jobs), out_dir)

    from tqdm.auto import tqdm

    bar = tqdm(total=len(jobs), desc=f"sweep {name}", disable=not eng.progress or not jobs,
               dynamic_ncols=True)

    def on_done(trial: Trial, status: dict[str, Any]) -> None:
        result.statuses[trial.name] = status
        result.ran.append(trial.name)
        _write_index(out_dir, *index, result)
        bar.update(1)
        log.info("trial %s: %s%s", trial.name, status.get("status"),
                 f" ({status.get('error')})" if status.get("error") else "")

    def more() -> list[Job]:
        assert refill is not None
        new = [t for t in refill() if t.name not in result.statuses]
        if not new:
            return []
        res, todo = plan_trials(new, out_dir, adopt=eng.adopt, device=eng.device)
        result.statuses.update(res.statuses)
        result.skipped += res.skipped
        result.adopted += res.adopted
        index[2].extend(new)
        _write_index(out_dir, *index, result)
        bar.total += len(todo)
        bar.refresh()
        return todo

    def here(job: Job) -> Job:  # the loop: one trial at a time, in this process
        t, path, meta = job
        on_done(t, run_trial(t.cfg.to_dict(), str(path), threads=eng.threads_per_trial,
                             meta=meta, device=eng.device, progress=trial_progress))
        return job

    try:
        if jobs and eng.use_ray:
            _execute_ray(jobs, address=eng.address, max_concurrent=eng.max_concurrent,
                         threads=eng.threads_per_trial, gpus=eng.gpus_per_trial,
                         device=eng.device, on_done=on_done,
                         refill=more if refill is not None else None)
        elif jobs:
            schedule(jobs, 1, here, lambda running: running[0],
                     more if refill is not None else None)
    finally:
        bar.close()
    return result


def run_grid(
    sweep: str | Path | dict[str, Any] | SweepSpec,
    *,
    out: str | Path | None = None,
    engine: Engine | None = None,
) -> GridResult:
    """Run every trial of a sweep file that is not finished yet; returns their statuses.
    Settings with ``seeds: {min, max, until: decided}`` then get more seeds in rounds
    (:mod:`splitcem.study.adaptive`; at most the file's ``per_round`` settings each) until
    decided against the baseline or at ``max``.

    Args:
        sweep: A sweep file (see :mod:`splitcem.study.grid`), its dict, or a parsed spec.
        out: The sweep's folder (default: the file's ``out``, else ``runs/sweeps/NAME``).
        engine: How and where the trials run (:class:`Engine`; default a local Ray).
    """
    from splitcem.study.adaptive import adaptive, run_until_decided

    eng = engine or Engine()
    spec = sweep if isinstance(sweep, SweepSpec) else load_sweep(sweep)
    trials = expand(spec)
    out_dir = Path(out if out is not None else spec.out or Path("runs") / "sweeps" / spec.name)

    def run(ts: list[Trial], refill: Callable[[], Sequence[Trial]] | None = None
            ) -> GridResult:
        return run_trials(ts, out_dir, name=spec.name, source=spec.source, engine=eng,
                          refill=refill)

    if adaptive(trials):  # seeds: {min, max, until: decided}: rounds of more seeds
        adopted = [r for d in eng.adopt if d.is_dir() for r in RunRecord.find([d])]
        # the round a stopped sweep planned and had not started runs first, in its order,
        # read before this sweep writes its own index over it
        return run_until_decided(trials, out_dir, run, device=eng.device,
                                 per_round=spec.per_round, adopt=adopted,
                                 queued=queued(out_dir, sweep=spec.name))
    return run(trials)


def _write_index(out: Path, name: str, source: str, trials: list[Trial],
                 result: GridResult) -> None:
    rows = []
    for t in trials:
        s = result.statuses.get(t.name) or {"status": "pending"}
        rows.append({"name": t.name, "variant": t.variant, "values": t.values, "seed": t.seed,
                     "status": s.get("status"), "error": s.get("error"),
                     "seconds": s.get("seconds"), "adopted_from": s.get("adopted_from")})
    write_json(out / INDEX_FILE, {"sweep": name, "source": source, "trials": rows})


def queued(out: str | Path, *, sweep: str | None = None) -> list[str]:
    """The trials the last sweep into ``out`` planned and had not finished when it last wrote
    its index (``trials.json``: a round's trials are written there when they are planned,
    before any of them starts), in its order; ``[]`` without a readable index, or (``sweep``
    given) when that index is another sweep's. A restarted sweep runs them before it plans
    anything new (:func:`run_grid`), as it would have had it not stopped; ``--list`` shows
    them (:mod:`splitcem.study.listing`)."""
    index = read_json_object(Path(out) / INDEX_FILE) or {}
    if sweep is not None and index.get("sweep") != sweep:
        return []
    rows = index.get("trials")
    if not isinstance(rows, list):
        return []
    return [r["name"] for r in rows if isinstance(r, dict) and r.get("status") == "pending"
            and isinstance(r.get("name"), str)]
