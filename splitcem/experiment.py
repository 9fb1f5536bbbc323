"""A config in, a results record out: data -> split model -> defenses -> train -> attacks -> report.

Every run lives in one directory::

    RUN_DIR/config.yaml            the fully resolved config
    RUN_DIR/checkpoints/last.pt    written atomically each epoch (resume with --resume)
    RUN_DIR/checkpoints/partial.pt written within an epoch every 10 minutes (gone at its end)
    RUN_DIR/metrics.json           training history, test accuracy, attack metrics, CEM bounds
    RUN_DIR/reconstructions.png    originals (top row) against each attack's reconstructions
    RUN_DIR/attack_decoder.*       the strongest decoder attack's decoder (safetensors + JSON)
    RUN_DIR/summary.md             a short human-readable summary
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from splitcem import report
from splitcem._clock import Clock
from splitcem._io import load_checkpoint
from splitcem.config import RunConfig, load_config
from splitcem.data import Augment, DataSplits, make_splits
from splitcem.defenses import DefenseStack, create_defense
from splitcem.errors import CheckpointError, ConfigError
from splitcem.models import SplitModel, create_split_model
from splitcem.record import CONFIG_FILE, RunRecord
from splitcem.runtime import honour_env_threads
from splitcem.train import LAST, Trainer, resolve_device, setup_context

__all__ = [
    "Prepared",
    "attack_run",
    "augmentation",
    "build_defenses",
    "build_model",
    "check_attacks",
    "leakage_run",
    "prepare",
    "run_experiment",
    "train_run",
]

log = logging.getLogger(__name__)

#: the strongest decoder attack's decoder (+ .json beside it), for splitcem lens
ATTACK_DECODER = "attack_decoder.safetensors"


def build_model(cfg: RunConfig, splits: DataSplits) -> SplitModel:
    """The split model the config describes, sized for the dataset's images and classes."""
    info = splits.train.info
    return create_split_model(
        cfg.model.arch, num_classes=info.num_classes, in_channels=info.channels,
        image_size=info.image_size, **cfg.model.model_dump(exclude={"arch"}),
    )


def build_defenses(cfg: RunConfig) -> DefenseStack:
    """The config's defenses in order, with CEM (if configured) appended last."""
    items = []
    for spec in cfg.defenses:
        params = {k: v for k, v in spec.items() if k != "name"}
        items.append(create_defense(spec["name"], **params))
    if cfg.cem is not None:
        items.append(create_defense("cem", **cfg.cem.kwargs()))
    return DefenseStack(items)


def augmentation(cfg: RunConfig) -> bool | Augment:
    """The training augmentation the config asks for (``True``: the paper's default)."""
    a = cfg.data.augment
    return a if isinstance(a, bool) else Augment(**a.model_dump())


@dataclass
class Prepared:
    """Everything a run needs, built from its config."""

    cfg: RunConfig
    splits: DataSplits
    model: SplitModel
    stack: DefenseStack
    device: torch.device


def prepare(cfg: RunConfig, *, device: str | torch.device | None = None) -> Prepared:
    """Load the data and build the (seeded) model and defenses for ``cfg``.

    Honours ``$SPLITCEM_THREADS`` (a sweep sets it per trial) unless
    :func:`splitcem.runtime.set_threads` was given a number."""
    honour_env_threads()
    dev = resolve_device(device if device is not None else cfg.device)
    d = cfg.data
    splits = make_splits(
        d.name, root=d.root, seed=cfg.seed, aux_fraction=d.aux_fraction,
        limit_train=d.limit_train, limit_test=d.limit_test, cache_dir=d.cache_dir,
        split_seed=d.split_seed,
    )
    torch.manual_seed(cfg.seed)  # model initialisation depends only on the seed
    model = build_model(cfg, splits)
    stack = build_defenses(cfg)
    return Prepared(cfg, splits, model, stack, dev)


def check_attacks(cfg: RunConfig) -> None:
    """Fail before training, not after it, on a bad threat model or attack spec."""
    if not cfg.attack.attacks:
        return
    from splitcem.attacks import parse_threats
    from splitcem.attacks.suite import parse_specs

    parse_threats(cfg.attack.threat)
    parse_specs(cfg.attack.attacks)


def _tensorboard() -> Any:
    """torch's SummaryWriter, or a ConfigError saying how to get it."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(
            "train.tensorboard: true needs the tensorboard package: pip install "
            "'splitcem[tensorboard]' (or set train.tensorboard: false)") from None
    return SummaryWriter


def _check_run_dir(run_dir: Path, cfg: RunConfig, resume: bool, overwrite: bool) -> None:
    old = RunRecord.load(run_dir)
    if old.can_resume and not (resume or overwrite):
        raise ConfigError(
            f"{run_dir} already holds a run (checkpoints in {run_dir / 'checkpoints'}); pass "
            "--resume to continue it, --overwrite to start again there, or --out to use "
            "another directory"
        )
    if resume and (run_dir / CONFIG_FILE).is_file():
        if old.config is None:
            raise ConfigError(f"--resume: {run_dir / CONFIG_FILE}: {old.config_error}")
        if old.config.to_dict() != cfg.to_dict():
            raise ConfigError(
                f"--resume: the config differs from {run_dir / CONFIG_FILE}; resume with that "
                "config (splitcem train RUN_DIR/config.yaml --resume) or use a new --out"
            )


def train_run(
    cfg: RunConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    device: str | torch.device | None = None,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train the run ``cfg`` describes into ``run_dir``; returns the results record.

    ``on_epoch_end``: called with each epoch's record after it is checkpointed (an exception
    it raises stops training there; the run stays unfinished and resumable)."""
    run_dir = Path(run_dir)
    check_attacks(cfg)
    writer_cls = _tensorboard() if cfg.train.tensorboard else None  # fail before training
    _check_run_dir(run_dir, cfg, resume, overwrite)
    # config.yaml and status "training" before anything else: a restarted run's old
    # results are gone, so a kill from now on leaves an unfinished run, never a stale one
    dev = resolve_device(device if device is not None else cfg.device)
    run = RunRecord.begin_training(run_dir, cfg, resume=resume, device=dev.type)
    p = prepare(cfg, device=dev)
    log.info("training %s on %s: %s", cfg.name, p.device, p.stack.describe())
    writer = writer_cls(log_dir=str(run_dir / "tensorboard")) if writer_cls else None

    def log_epoch(rec: dict[str, Any]) -> None:  # TensorBoard: every number of the epoch
        nonlocal run
        run = run.record_epoch(len(trainer.history), float(rec.get("wall_seconds") or 0.0),
                               cpu_seconds=rec.get("cpu_seconds"))
        if writer is not None:
            for k, v in rec.items():
                if k != "epoch" and isinstance(v, int | float) and not isinstance(v, bool):
                    writer.add_scalar(k, v, int(rec["epoch"]))
            writer.flush()
        if on_epoch_end is not None:
            on_epoch_end(rec)

    def log_partial(done: dict[str, Any]) -> None:  # how far the epoch in flight is
        nonlocal run
        run = run.record_within_epoch(done["batch"], done["batches"], done["train_seconds"],
                                      cpu_seconds=done.get("cpu_seconds"))

    trainer = Trainer(
        p.model, p.stack, p.splits, cfg.train, device=p.device, seed=cfg.seed,
        run_dir=run_dir, progress=progress, augment=augmentation(cfg),
        meta={"name": cfg.name}, on_epoch_end=log_epoch, on_partial=log_partial,
    )
    try:
        result = trainer.fit(resume=resume)
    finally:
        if writer is not None:
            writer.close()
    record = dict(run.metrics)
    record.update({
        "name": cfg.name,
        "device": str(p.device),
        "dataset": cfg.data.name,
        "defenses": p.stack.describe(),
        "noise_sigma": p.stack.noise_sigma,
        "cem_lambda": cfg.cem.lam if cfg.cem is not None else 0.0,
        "client_parameters": sum(q.numel() for q in p.model.client.parameters()),
        "feature_shape": list(p.model.feature_shape),
        # what ran: bf16 or float32, layout and why, CPU capability, threads
        "numerics": {**result.numerics, "threads": torch.get_num_threads()},
        "train": {
            "test_accuracy": result.test_accuracy,
            "test_loss": result.test_loss,
            "seconds": result.seconds,
            # on a CPU, the process's CPU seconds (all threads; what --list counts as cost)
            **({} if result.cpu_seconds is None else {"cpu_seconds": result.cpu_seconds}),
            "epochs": len(result.history),
            "history": result.history,
        },
    })
    last = result.history[-1] if result.history else {}
    cem = {k.split("/", 1)[1]: v for k, v in last.items() if k.startswith("cem/")}
    if cem:
        record["cem"] = cem
    # why the I(x; z) bound does not apply to this stack (None: it does)
    ne = p.stack.noise_entropy()
    record["leakage_note"] = ne.note if ne.per_dim is None else None
    record.pop("attacks", None)  # attacks of an older model no longer apply
    record = run.finish_training(record).metrics
    report.write_summary(run_dir, record, cfg)
    return record


def load_trained(
    run_dir: str | Path, *, device: str | torch.device | None = None
) -> Prepared:
    """Rebuild a trained run (config + last checkpoint) for attacking or serving."""
    run_dir = Path(run_dir)
    run = RunRecord.load(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise CheckpointError(
            f"{run_dir} is not a run directory (no {CONFIG_FILE}); train one with "
            "splitcem train CONFIG --out DIR"
        )
    if run.config is None:
        raise ConfigError(f"{run_dir / CONFIG_FILE}: {run.config_error}")
    cfg = run.config
    p = prepare(cfg, device=device)
    state = load_checkpoint(run_dir / "checkpoints" / LAST, p.device)
    p.model.to(p.device)
    p.stack.to(p.device)
    p.stack.setup(setup_context(p.model, p.stack, p.splits, cfg.train, device=p.device))
    if int(state["epoch"]) < cfg.train.epochs:
        log.warning("%s: training stopped at epoch %d of %d; attacking that model "
                    "(finish it with --resume)", run_dir, state["epoch"], cfg.train.epochs)
    try:
        p.model.load_state_dict(state["model"])
        p.stack.load_state_dict(state["defenses"])
    except RuntimeError as e:
        raise CheckpointError(f"{run_dir}: checkpoint does not match its config: {e}") from e
    p.model.to(p.device).eval()
    p.stack.to(p.device).eval()
    return p


def attack_run(
    run_dir: str | Path,
    *,
    attacks: list[dict[str, Any]] | None = None,
    all_attacks: bool = False,
    threat: str | dict[str, Any] | Sequence[str | dict[str, Any]] | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    progress: bool = True,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Attack a trained run's features; adds ``attacks`` to its metrics.json and summary.

    Args:
        run_dir: A directory written by :func:`train_run`.
        attacks: Attack specs (``{"name": ..., **params}``); default: the config's.
        all_attacks: Run every registered attack that the threat model allows, and
            record the worst case for the defender.
        threat: Threat model (a setting name or a ThreatModel mapping), or a list of them
            (worst case across all); default: the config's.
        overrides: ``attack.*=value`` overrides of the run's attack section (e.g.
            ``attack.attacks.0.epochs=10``); the trained model itself cannot change here.
    """
    from splitcem.attacks import AttackTarget, all_attack_specs, parse_threats, run_attacks

    run_dir = Path(run_dir)
    bad = [o for o in overrides if not o.strip().startswith("attack.")]
    if bad:  # before loading data and model: a wrong flag should fail at once
        raise ConfigError(f"only attack.* settings can change after training, not {bad}; "
                          "train a new run for the others")
    p = load_trained(run_dir, device=device)
    cfg = p.cfg
    if overrides:
        cfg = load_config(cfg.to_dict(), overrides)
        check_attacks(cfg)
    specs = attacks if attacks is not None else list(cfg.attack.attacks)
    if all_attacks:
        # the config's attacks keep their parameters; every other registered attack is added
        named = {s.get("label", s["name"]) for s in specs}
        specs = specs + [s for s in all_attack_specs() if s["name"] not in named]
    threats = parse_threats(cfg.attack.threat if threat is None else threat)
    target = AttackTarget(p.model.client, p.stack, p.splits.train.info, p.device)
    clock = Clock(p.device)
    rep = run_attacks(target, p.splits, specs, threat=threats,
                      progress=progress)
    attacked = {**rep.to_dict(), **clock.times()}  # seconds; cpu_seconds on a CPU
    saved = _save_attack_decoder(run_dir, rep)
    if saved is not None:
        attacked["saved_decoder"] = saved
    run = RunRecord.load(run_dir)
    if cfg.attack.leakage:
        from splitcem.leakage import heldout_leakage

        run.metrics["leakage"] = heldout_leakage(p)
    as_configured = attacks is None and not all_attacks and threat is None
    record = run.record_attacks(attacked, cfg, device=p.device.type,
                                as_configured=as_configured).metrics
    report.save_reconstructions(run_dir, rep, show=cfg.attack.show)
    report.write_summary(run_dir, record, cfg)
    return record


def _save_attack_decoder(run_dir: Path, rep: Any) -> dict[str, Any] | None:
    """Keep the strongest decoder-based attack's decoder (RUN_DIR/attack_decoder.*) for
    ``splitcem lens``; remove a stale one when no decoder attack ran."""
    import hashlib

    from splitcem.attacks.decoder import save_decoder

    path = run_dir / ATTACK_DECODER
    best = rep.strongest_decoder()
    if best is None:
        path.unlink(missing_ok=True)
        path.with_suffix(".json").unlink(missing_ok=True)
        return None
    label, decoder = best
    ckpt = hashlib.sha256((run_dir / "checkpoints" / LAST).read_bytes()).hexdigest()
    meta = {"attack": label, "threat": rep.result_threat.get(label),
            "metrics": dict(rep.results[label].metrics), "checkpoint_sha256": ckpt}
    save_decoder(path, decoder, meta)
    return {"attack": label, "file": ATTACK_DECODER}


def leakage_run(
    run_dir: str | Path, *, write: bool = True, device: str | torch.device | None = None,
) -> dict[str, Any]:
    """The held-out I(x; z) plug-in estimate (:mod:`splitcem.leakage`) of a trained run.

    With ``write`` it goes into the run's metrics.json (``leakage``) and summary; without,
    the run directory is only read (e.g. runs made before the estimate existed, owned by
    someone else).
    """
    from splitcem.leakage import heldout_leakage

    run_dir = Path(run_dir)
    p = load_trained(run_dir, device=device)
    est = heldout_leakage(p)
    if write:
        run = RunRecord.load(run_dir)
        record = run.save({**run.metrics, "leakage": est}).metrics
        report.write_summary(run_dir, record, p.cfg)
    return est


def run_experiment(
    cfg: RunConfig | str | Path,
    run_dir: str | Path | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    attack: bool = True,
    progress: bool = True,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Train, attack and report one run; returns its results record (metrics.json)."""
    if not isinstance(cfg, RunConfig):
        cfg = load_config(cfg)
    run_dir = Path(run_dir) if run_dir is not None else Path("runs") / cfg.name
    record = train_run(cfg, run_dir, resume=resume, overwrite=overwrite, progress=progress,
                       device=device)
    if attack and cfg.attack.attacks:
        record = attack_run(run_dir, progress=progress, device=device)
    return record
