"""The run record: the one reader (and writer) of a run directory.

A run directory holds ``config.yaml`` (the resolved config), ``metrics.json`` (what the run
measured, and its status), ``checkpoints/last.pt``, images and a summary; a sweep adds
``trial.json`` (the trial's attempts). :class:`RunRecord` is the only code that parses
``config.yaml`` + ``metrics.json`` pairs; sweeps, trials, the frontier, reproduce, export
and the CLI go through :meth:`RunRecord.load` and :meth:`RunRecord.finished`.

Integrity: a run is finished only for the config it finished with. ``metrics.json`` stores

* ``status``: ``training`` (written when training starts: a restarted run never shows the
  old results), ``trained``, ``attacked`` or ``failed``;
* ``config_hash``: a hash of what training ran: the config without the keys that change no
  result (name, device, TensorBoard, the aux / eval partition) and with the
  *resolved* numeric path (``amp`` / ``channels_last`` as they ran, so ``amp: true`` on a
  CPU with native bf16 is the same run as ``amp: auto`` there);
* ``attacks.attack_hash``: the attack section (attack ``amp`` resolved likewise), the
  partition the attacker saw (``attacks.split``) and the trained model's hash;
* ``made_by``: one entry per training start, resume and attack recording: the splitcem
  version and commit, torch, Python, CPU and GPU (:func:`splitcem.provenance.made_by`;
  provenance only, never compared).

Records written before these fields existed (``legacy``) are read as they were: trained when
their epochs are complete, attacked when they hold attacks, their numerics those their config
set explicitly on the device they recorded, their attacks on the partition of the run's own
seed (how splits were drawn then).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from splitcem._io import read_json_object, write_json, write_text
from splitcem.config import RunConfig, load_config
from splitcem.errors import ConfigError
from splitcem.provenance import made_by
from splitcem.runid import attack_hash, attack_split, comparable, resolved_amp, train_hash
from splitcem.runtime import describe_path, ran_bf16

__all__ = [
    "CHECKPOINT",
    "CONFIG_FILE",
    "METRICS_FILE",
    "PARTIAL_CHECKPOINT",
    "TRIAL_FILE",
    "RunRecord",
    "Status",
    "attack_hash",
    "attack_split",
    "comparable",
    "train_hash",
]

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
TRIAL_FILE = "trial.json"
#: held by the process running a sweep's trial for as long as it runs (the OS drops it when
#: that process dies): a resumed sweep never writes beside a worker of a killed one
LOCK_FILE = ".trial.lock"
CHECKPOINT = "checkpoints/last.pt"
#: the checkpoint written within an epoch (splitcem.train.PARTIAL), gone at the epoch's end
PARTIAL_CHECKPOINT = "checkpoints/partial.pt"
#: files a run's attacks leave behind (removed when training starts again)
ATTACK_FILES = ("reconstructions.png", "reconstructions.npz", "attack_decoder.safetensors",
                "attack_decoder.json", "summary.md")

Status = Literal["missing", "training", "trained", "attacked", "failed"]


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


@dataclass
class RunRecord:
    """One run directory, read once: its config, metrics and status.

    Attributes:
        path: The run directory.
        config: Its resolved config (``None`` if missing or unreadable: see ``config_error``).
        metrics: ``metrics.json`` (``{}`` when absent).
        trial: ``trial.json`` of a sweep's trial (``{}`` when absent).
    """

    path: Path
    config: RunConfig | None
    metrics: dict[str, Any] = field(default_factory=dict)
    trial: dict[str, Any] = field(default_factory=dict)
    config_error: str | None = None

    # ------------------------------------------------------------------ reading
    @classmethod
    def load(cls, path: str | Path) -> RunRecord:
        """Read a run directory; never raises for a missing or half-written one."""
        path = Path(path)
        cfg, err = None, None
        if (path / CONFIG_FILE).is_file():
            try:
                cfg = load_config(path / CONFIG_FILE)
            except ConfigError as e:
                err = str(e).splitlines()[0]
        else:
            err = f"no {CONFIG_FILE}"
        return cls(path, cfg, read_json_object(path / METRICS_FILE) or {},
                   read_json_object(path / TRIAL_FILE) or {}, err)

    @classmethod
    def find(cls, dirs: Sequence[str | Path]) -> Iterator[RunRecord]:
        """Every run directory (a folder with ``config.yaml``) under ``dirs``, recursively,
        in path order; hidden folders are skipped."""
        for d in dirs:
            d = Path(d)
            if not d.is_dir():
                raise ConfigError(f"{d} is not a folder of run directories")
            for cfg_file in sorted(d.rglob(CONFIG_FILE)):
                run = cfg_file.parent
                if not any(part.startswith(".") for part in run.relative_to(d).parts):
                    yield cls.load(run)

    @property
    def legacy(self) -> bool:
        """Written before records had a status and a config hash."""
        return bool(self.metrics) and "config_hash" not in self.metrics

    @property
    def numerics(self) -> dict[str, Any]:
        """The numeric path training ran (recorded; a legacy run's: what its config set)."""
        num = dict(self.metrics.get("numerics") or {})
        if ("amp" not in num or "channels_last" not in num) and self.config is not None:
            dev = str(self.metrics.get("device") or num.get("device") or "cpu")
            dev = dev.split(":", 1)[0]
            amp, cl = resolved_amp(self.config.train.amp, dev, self.config.train.channels_last)
            num.update(device=dev, amp=amp, channels_last=cl)
        return num

    @property
    def config_hash(self) -> str | None:
        """The recorded training hash (a legacy run's: computed from its config)."""
        if "config_hash" in self.metrics:
            return str(self.metrics["config_hash"])
        if self.config is None or not self.metrics:
            return None
        return train_hash(self.config, numerics=self.numerics)

    @property
    def attacks(self) -> dict[str, Any]:
        return dict(self.metrics.get("attacks") or {})

    @property
    def attack_amps(self) -> dict[str, bool]:
        """Whether each recorded attack (by label) ran bf16 autocast, from the numeric path
        it recorded (``extra.numerics``, :meth:`splitcem.runtime.NumericPath.describe`
        followed by the reason); attacks that recorded none are left out."""
        out: dict[str, bool] = {}
        for label, rec in (self.attacks.get("attacks") or {}).items():
            num = ((rec or {}).get("extra") or {}).get("numerics")
            if isinstance(num, str):
                out[label] = ran_bf16(num)
        return out

    @property
    def split(self) -> dict[str, Any] | None:
        """The partition the recorded attacks ran on (legacy: the run's own seed)."""
        att = self.attacks
        if not att:
            return None
        if "split" in att:
            return dict(att["split"])
        if self.config is None:
            return None
        return {**attack_split(self.config), "seed": self.config.seed, "legacy": True}

    @property
    def trained_epochs(self) -> int | None:
        return (self.metrics.get("train") or {}).get("epochs")

    @property
    def status(self) -> Status:
        """``missing`` (nothing recorded), ``training``, ``trained``, ``attacked``, ``failed``."""
        m = self.metrics
        if not m or self.config is None:
            return "missing"
        st = m.get("status")
        if st in ("training", "failed"):
            return st  # type: ignore[no-any-return]
        if self.stale or self.trained_epochs != self.config.train.epochs:
            return "training"
        att = self.attacks
        if att.get("attacks") and att.get("train_hash", self.config_hash) == self.config_hash:
            return "attacked"
        return "trained"

    @property
    def stale(self) -> bool:
        """The results were recorded for another config than ``config.yaml`` now holds."""
        return not self.legacy and self.config is not None and bool(self.metrics) and \
            self.metrics.get("config_hash") != train_hash(self.config, numerics=self.numerics)

    @property
    def times(self) -> dict[str, Any]:
        return dict(self.metrics.get("times") or {})

    @property
    def accuracy(self) -> float:
        return float((self.metrics.get("train") or {}).get("test_accuracy", float("nan")))

    @property
    def has_checkpoint(self) -> bool:
        """An epoch's end is checkpointed (the weights to attack once training is done)."""
        return (self.path / CHECKPOINT).is_file()

    @property
    def can_resume(self) -> bool:
        """Training left a checkpoint to continue from: an epoch's end or one within it."""
        return self.has_checkpoint or (self.path / PARTIAL_CHECKPOINT).is_file()

    def unfinished(self) -> str | None:
        """Why this run is not a finished (trained and attacked) result; ``None`` if it is."""
        if self.config is None:
            return f"config not readable here ({self.config_error})"
        if not self.metrics:
            return f"unfinished (no {METRICS_FILE} yet)"
        st = self.status
        if st == "failed":
            return f"failed ({self.metrics.get('error', 'see trial.json')})"
        if st == "training":
            if self.stale and self.metrics.get("status") != "training":
                return f"stale (results recorded for another config than its {CONFIG_FILE})"
            if self.metrics.get("status") == "training":
                return "unfinished (training)"
            return f"unfinished (trained {self.trained_epochs} of {self.config.train.epochs} " \
                   "epochs)"
        if st != "attacked":
            return "unfinished (not attacked yet)"
        return None

    def trained_for(self, cfg: RunConfig, *, device: str | None = None) -> bool:
        """Trained (attacked or not) with exactly what training ``cfg`` would run here."""
        return self.status in ("trained", "attacked") and \
            self.config_hash == train_hash(cfg, device=device)

    def other_path_for(self, cfg: RunConfig, *, device: str | None = None) -> str | None:
        """The numeric path this run trained on when it is trained for ``cfg`` in all but
        that (``cfg`` would resolve another path on this machine, e.g. ``amp: auto`` where
        bf16 is not native), e.g. ``bf16 autocast + channels-last``; else ``None``."""
        if self.config is None or self.status not in ("trained", "attacked") \
                or self.trained_for(cfg, device=device):
            return None
        if self.config_hash != train_hash(cfg, numerics=self.numerics):
            return None
        num = self.numerics
        return describe_path(bool(num.get("amp")), bool(num.get("channels_last")))

    def finished(self, for_config: RunConfig | None = None, *,
                 device: str | None = None) -> bool:
        """Trained, and attacked if the config has attacks; with ``for_config``: all of it
        for exactly that config (hashes compared, numerics as they ran, attacks on the same
        aux / eval partition). ``device``: where ``for_config`` would run (default: its
        own ``device``, resolved on this machine)."""
        cfg = for_config or self.config
        if cfg is None or self.config is None:
            return False
        if for_config is not None and not self.trained_for(for_config, device=device):
            return False
        if not cfg.attack.attacks:
            return self.status in ("trained", "attacked")
        if self.status != "attacked":
            return False
        if for_config is None:
            return True
        recorded = self.attacks.get("attack_hash") or attack_hash(
            self.config, numerics=self.numerics, split=self.split)
        return recorded == attack_hash(for_config, device=device)

    # ------------------------------------------------------------------ writing
    @classmethod
    def begin_training(cls, path: str | Path, cfg: RunConfig, *, resume: bool,
                       device: str) -> RunRecord:
        """Write ``config.yaml`` and mark the run ``training`` (before any epoch): a fresh
        start drops the old results and attack outputs, a resume keeps the record."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        old = cls.load(path)
        metrics = dict(old.metrics) if resume else {}
        if not resume:
            for f in ATTACK_FILES:
                (path / f).unlink(missing_ok=True)
        metrics.update(name=cfg.name, status="training",
                       config_hash=train_hash(cfg, device=device),
                       times={**(metrics.get("times") or {}), "train_started": _now()},
                       made_by=[*(metrics.get("made_by") or []),
                                made_by("resume" if old.metrics and resume else "train",
                                        device)])
        metrics.pop("attacks", None)
        write_json(path / METRICS_FILE, metrics)  # first: a kill in between leaves no result
        write_text(path / CONFIG_FILE, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return cls(path, cfg, metrics, old.trial)

    def save(self, metrics: dict[str, Any] | None = None) -> RunRecord:
        """Write ``metrics`` (default: this record's) as ``metrics.json``."""
        if metrics is not None:
            self.metrics = metrics
        write_json(self.path / METRICS_FILE, self.metrics)
        return self

    def record_epoch(self, epoch: int, seconds: float, *,
                     cpu_seconds: float | None = None) -> RunRecord:
        """Record that training finished (and checkpointed) ``epoch`` of the config's
        epochs, the last of them in ``seconds`` (on a CPU, ``cpu_seconds`` of the process's
        CPU time): ``progress`` in ``metrics.json``, what ``--list`` shows of a trial in
        flight and how it estimates what is left."""
        assert self.config is not None
        cpu = {} if cpu_seconds is None else {"epoch_cpu_seconds": round(float(cpu_seconds), 3)}
        return self.save({**self.metrics, "progress": {
            "epoch": int(epoch), "of": self.config.train.epochs,
            "epoch_seconds": round(float(seconds), 3), **cpu, "at": _now()}})

    def record_within_epoch(self, batch: int, batches: int, seconds: float, *,
                            cpu_seconds: float | None = None) -> RunRecord:
        """Record a checkpoint within the epoch after the last recorded one: ``batch`` of
        its ``batches`` done, in ``seconds`` of training (and ``cpu_seconds`` of CPU time,
        where known) (``progress``'s ``batch``, ``batches``, ``seconds`` and
        ``cpu_seconds``; the next :meth:`record_epoch` drops them)."""
        assert self.config is not None
        prog = self.metrics.get("progress")
        prog = dict(prog) if isinstance(prog, dict) else {
            "epoch": 0, "of": self.config.train.epochs}
        prog.pop("cpu_seconds", None)
        prog.update(batch=int(batch), batches=int(batches), seconds=round(float(seconds), 3),
                    at=_now())
        if cpu_seconds is not None:
            prog["cpu_seconds"] = round(float(cpu_seconds), 3)
        return self.save({**self.metrics, "progress": prog})

    @property
    def progress(self) -> dict[str, Any] | None:
        """Training's last recorded epoch (:meth:`record_epoch`) while it trains, else None."""
        prog = self.metrics.get("progress")
        return dict(prog) if isinstance(prog, dict) and self.status == "training" else None

    def finish_training(self, metrics: dict[str, Any]) -> RunRecord:
        """Record finished training (its numerics recorded in ``metrics``)."""
        assert self.config is not None
        metrics = {k: v for k, v in metrics.items() if k != "progress"}
        metrics = {**metrics, "status": "trained",
                   "config_hash": train_hash(self.config, numerics=metrics.get("numerics")),
                   "times": {**(metrics.get("times") or {}), "train_ended": _now()}}
        metrics.pop("error", None)
        return self.save(metrics)

    def record_attacks(self, attacks: dict[str, Any], cfg: RunConfig, *, device: str,
                       as_configured: bool = True) -> RunRecord:
        """Record attacks of the trained model run under ``cfg``'s attack section on
        ``device``: with the partition they saw and their hashes. ``as_configured=False``
        (other attacks or threats than the config's, e.g. ``splitcem attack --all``): the
        record is attacked, but never the config's own attack result."""
        assert self.config is not None
        split = attack_split(cfg)
        m = dict(self.metrics)
        h = attack_hash(cfg, device=device, numerics=self.numerics, split=split)
        m["attacks"] = {**attacks, "split": split, "train_hash": self.config_hash,
                        "attack_hash": h if as_configured else f"other-than-config:{h}"}
        m["status"] = "attacked"
        m["times"] = {**(m.get("times") or {}), "attack_ended": _now()}
        m["made_by"] = [*(m.get("made_by") or []), made_by("attacks", device)]
        return self.save(m)

    def mark_failed(self, error: str) -> RunRecord:
        """Record that the run failed (what it measured before stays, not as a result)."""
        if self.path.is_dir():
            self.save({**self.metrics, "status": "failed", "error": error,
                       "times": {**(self.metrics.get("times") or {}), "failed": _now()}})
        return self

    def write_trial(self, status: dict[str, Any]) -> None:
        """Write the sweep trial's ``trial.json``."""
        self.trial = dict(status)
        write_json(self.path / TRIAL_FILE, self.trial)

    def copy_to(self, dst: str | Path, cfg: RunConfig) -> RunRecord:
        """Copy this finished run to ``dst`` as the run ``cfg`` (adoption: ``cfg`` is the
        same run up to name and device); the source is only read."""
        dst = Path(dst)
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(self.path, dst,
                        ignore=shutil.ignore_patterns(TRIAL_FILE, LOCK_FILE, ".*.tmp"))
        write_text(dst / CONFIG_FILE, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        m = {**self.metrics, "name": cfg.name, "adopted_from": str(self.path)}
        if self.legacy:  # pin what ran: the copy's config may say amp: auto
            m["numerics"] = self.numerics
            m["config_hash"] = self.config_hash
            m.setdefault("status", self.status)
            if m.get("attacks"):
                m["attacks"] = {**m["attacks"], "split": self.split,
                                "train_hash": self.config_hash,
                                "attack_hash": attack_hash(self.config, numerics=self.numerics,
                                                           split=self.split)
                                if self.config is not None else None}
        write_json(dst / METRICS_FILE, m)
        return RunRecord.load(dst)

    def files(self, names: Sequence[str]) -> dict[str, bytes]:
        """The named files of the run directory that exist (bytes), e.g. to send a trial's
        results from a worker node to the sweep's driver."""
        return {n: (self.path / n).read_bytes() for n in names if (self.path / n).is_file()}
