"""The one training loop: a split model, a defense stack (noise, filters, CEM, ...) and data.

Every defense plugs in through :class:`~splitcem.defenses.DefenseStack` hooks, so there is
exactly one loop for all of them (no per-defense copies):

    z_clean = client(x); z_sent = stack.transform(z_clean); logits = server(z_sent)
    loss = CE(logits, y) + stack.loss(ctx)          # L = L_task + L_D + lambda * L_C

Checkpoints are written atomically at the end of every epoch (``checkpoints/last.pt``) and
hold everything needed to continue bit-for-bit: weights, optimizer, defense state, RNG
states and history. The data order and augmentation of epoch e are a pure function of
(seed, e) (see :class:`splitcem.data.BatchLoader`), so ``resume=True`` after a kill gives
the same final weights as an uninterrupted run. Within an epoch a checkpoint is also written
every ``checkpoint_every`` seconds (``checkpoints/partial.pt``, removed at the epoch's end)
with the epoch's batches done, its running sums and what the defenses banked
(:meth:`~splitcem.defenses.Defense.epoch_state`), so that a kill loses minutes, not the
epoch (an epoch of the CPU protocol is 1.5 hours on a CPU without native bfloat16); the
resume is bit-for-bit too.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from splitcem._io import load_checkpoint, save_checkpoint
from splitcem._progress import bar as progress_bar
from splitcem._progress import epoch_log
from splitcem.config import TrainConfig
from splitcem.data import ArrayDataset, Augment, BatchLoader, DataSplits
from splitcem.defenses import DefenseStack, EpochContext, SetupContext, StepContext
from splitcem.errors import CheckpointError, ConfigError, NonFiniteError
from splitcem.models import SplitModel
from splitcem.runid import resolved_amp
from splitcem.runtime import NumericPath, resolve_device, resolve_numeric_path
from splitcem.schedule import lr_factor, steps_per_epoch

__all__ = [
    "TrainResult",
    "Trainer",
    "evaluate",
    "lr_factor",
    "resolve_device",
    "setup_context",
    "steps_per_epoch",
    "train",
]

log = logging.getLogger(__name__)

LAST = "last.pt"
#: the checkpoint written within an epoch; resumed from when it is further on than ``LAST``
PARTIAL = "partial.pt"
#: default seconds between checkpoints within an epoch
CHECKPOINT_EVERY_S = 600.0
#: training settings that change no result (a checkpoint resumes across them)
_NOT_RESULTS = {"tensorboard"}


def setup_context(
    model: SplitModel, stack: DefenseStack, splits: DataSplits, cfg: TrainConfig, *,
    device: torch.device,
) -> SetupContext:
    """What the defenses are told when attached: used for training and for reloading a run
    (defenses create their buffers in ``setup``, so it must run before ``load_state_dict``)."""
    info = splits.train.info
    return SetupContext(
        model=model, num_classes=info.num_classes, device=device,
        noise_sigma=stack.noise_sigma, train_size=len(splits.train),
        steps_per_epoch=steps_per_epoch(len(splits.train), cfg.batch_size),
        epochs=cfg.epochs, feature_shape=tuple(model.feature_shape),
        mean=tuple(info.mean), std=tuple(info.std), noise_entropy=stack.noise_entropy(),
    )


@dataclass
class TrainResult:
    """What training produced: per-epoch history and the final test metrics."""

    history: list[dict[str, Any]] = field(default_factory=list)
    test_accuracy: float = float("nan")
    test_loss: float = float("nan")
    #: wall time of all epochs, those trained before a resume included (evaluation counted)
    seconds: float = 0.0
    #: on a CPU, the CPU seconds the training process used over the same epochs (all its
    #: threads; a busy machine's other work not counted), if every epoch recorded them
    cpu_seconds: float | None = None
    checkpoint: Path | None = None
    #: the numeric path that ran (bf16 / float32, layout, why; see splitcem.runtime)
    numerics: dict[str, Any] = field(default_factory=dict)


@torch.no_grad()
def evaluate(
    model: SplitModel,
    stack: DefenseStack,
    ds: ArrayDataset,
    *,
    device: torch.device,
    batch_size: int = 512,
) -> dict[str, float]:
    """Accuracy and loss on ``ds`` under the deployed defense (noise included), in eval mode."""
    was = model.training, stack.training
    model.eval()
    stack.eval()
    loader = BatchLoader(ds, batch_size=batch_size, shuffle=False, augment=False, device=device)
    correct = torch.zeros((), device=device)
    loss_sum = torch.zeros((), device=device)
    for x, y in loader:
        logits = model.server(stack.transform(model.client(x))).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
    model.train(was[0])
    stack.train(was[1])
    n = max(len(ds), 1)
    return {"accuracy": correct.item() / n, "loss": loss_sum.item() / n}  # host sync, once


class Trainer:
    """Trains ``model`` with ``stack`` on ``splits.train``; evaluates on ``splits.test``.

    Args:
        model: The split model (moved to ``device``).
        stack: Defenses applied to the client's features (may be empty).
        splits: Data; only ``train`` and ``test`` are used here.
        cfg: Optimiser, schedule and epoch settings.
        device: Where to train. ``cfg.amp``: bfloat16 autocast (CUDA or CPU) of the client
            and server, ``cfg.channels_last``: their layout; ``auto`` picks per device
            (:func:`splitcem.runtime.resolve_numeric_path`). The features between client and
            server stay float32.
        seed: Seeds weights' RNG use during training, data order and augmentation.
        run_dir: Where ``checkpoints/last.pt`` is written each epoch (None: no checkpoints).
        checkpoint_every: Seconds between checkpoints within an epoch
            (``checkpoints/partial.pt``, written at the first of the every-25-steps host
            syncs after that long; None: epoch ends only). Only written for a defense stack
            whose every defense is ``mid_epoch_resumable``.
        progress: Show progress: bars on a terminal, one log line per epoch otherwise.
        on_epoch_end: Optional callback ``(epoch_record) -> None`` (e.g. to stop early in tests).
        on_partial: Optional callback after each checkpoint within an epoch, with the
            epoch's ``batch`` (done) and ``batches`` and its ``train_seconds`` so far (and on
            a CPU its ``cpu_seconds``, the process's CPU time, else None).
    """

    def __init__(
        self,
        model: SplitModel,
        stack: DefenseStack,
        splits: DataSplits,
        cfg: TrainConfig,
        *,
        device: torch.device,
        seed: int = 125,
        run_dir: str | Path | None = None,
        progress: bool = True,
        augment: bool | Augment = True,
        on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
        meta: dict[str, Any] | None = None,
        checkpoint_every: float | None = CHECKPOINT_EVERY_S,
        on_partial: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.model = model.to(device)
        self.stack = stack.to(device)
        self.splits = splits
        self.cfg = cfg
        self.device = device
        self.seed = seed
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.progress = progress
        self.callback = on_epoch_end
        self.meta = meta or {}
        self.checkpoint_every = checkpoint_every
        self.on_partial = on_partial
        self._last_save = time.perf_counter()
        #: the epoch in flight as a mid-epoch checkpoint left it (batches done, sums, ...)
        self._in_epoch: dict[str, Any] | None = None
        self.loader = BatchLoader(
            splits.train, batch_size=cfg.batch_size, shuffle=True, augment=augment,
            device=device, seed=seed, drop_last=len(splits.train) > cfg.batch_size,
        )
        if len(self.loader) == 0:
            raise ConfigError(
                f"the training set ({len(splits.train)} images) gives no batch of "
                f"{cfg.batch_size}; lower train.batch_size or raise data.limit_train"
            )
        # One optimizer over the split model only: defenses with parameters of their own
        # (a simulated attacker) step them themselves, inside their loss hook.
        self.optimizer: torch.optim.Optimizer = (
            torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
            if cfg.optimizer == "adam" else
            torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                            weight_decay=cfg.weight_decay)
        )
        self.numerics: NumericPath = resolve_numeric_path(cfg.amp, cfg.channels_last, device)
        if self.numerics.channels_last:
            self.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.epoch = 0
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.stack.setup(setup_context(model, stack, splits, cfg, device=device))

    # ----------------------------------------------------------------- checkpoints
    @property
    def checkpoint_path(self) -> Path | None:
        return self.run_dir / "checkpoints" / LAST if self.run_dir else None

    @property
    def partial_path(self) -> Path | None:
        """Where the checkpoint within an epoch is written (None: no run directory)."""
        return self.run_dir / "checkpoints" / PARTIAL if self.run_dir else None

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "model_config": getattr(self.model, "config", None),
            "defenses": self.stack.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "history": self.history,
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "train_config": self.cfg.model_dump(),
            "seed": self.seed,
            "meta": self.meta,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        def settings(d: dict[str, Any] | None) -> dict[str, Any]:  # those that shape results
            # settings added since the checkpoint was written take their defaults
            full = {**TrainConfig().model_dump(), **(d or {})}
            # the numeric path as it resolves here: amp true and auto are one path where
            # bf16 is native (an adopted run resumes under its new config's words)
            full["amp"], full["channels_last"] = resolved_amp(
                full["amp"], self.device.type, full["channels_last"])
            return {k: v for k, v in full.items() if k not in _NOT_RESULTS}

        if settings(state.get("train_config")) != settings(self.cfg.model_dump()) \
                or state.get("seed") != self.seed:
            raise CheckpointError(
                "the checkpoint was written by a run with other training settings or seed; "
                "resume with the run's own config.yaml, or start a new run directory"
            )
        try:
            self.model.load_state_dict(state["model"])
            self.stack.load_state_dict(state["defenses"])
        except RuntimeError as e:
            raise CheckpointError(
                f"checkpoint does not match this model / defense stack: {e}"
            ) from e
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.history = list(state["history"])
        torch.set_rng_state(state["rng_cpu"])
        if state.get("rng_cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        self._in_epoch = state.get("in_epoch")
        if self._in_epoch is not None:
            self.stack.load_epoch_state(self._in_epoch["defenses"])

    def save(self) -> None:
        """Checkpoint the end of an epoch (``last.pt``); the epoch's partial one goes."""
        if self.checkpoint_path is not None and self.partial_path is not None:
            save_checkpoint(self.checkpoint_path, self.state_dict())
            self.partial_path.unlink(missing_ok=True)  # after: a kill between keeps last.pt
        self._last_save = time.perf_counter()

    def _partial_due(self) -> bool:
        return (self.partial_path is not None and self.checkpoint_every is not None
                and self.stack.mid_epoch_resumable
                and time.perf_counter() - self._last_save >= self.checkpoint_every)

    def _save_partial(self, progress: dict[str, Any]) -> None:
        """Checkpoint the epoch in flight: ``progress`` holds its batches done and sums."""
        assert self.partial_path is not None  # _partial_due checked it
        state = self.state_dict()
        state["in_epoch"] = {**progress, "defenses": self.stack.epoch_state()}
        save_checkpoint(self.partial_path, state)
        self._last_save = time.perf_counter()
        if self.on_partial is not None:
            self.on_partial({"batch": progress["batch"], "batches": len(self.loader),
                             "train_seconds": progress["train_seconds"],
                             "cpu_seconds": progress["cpu_seconds"]
                             if self.device.type == "cpu" else None})  # None: not known

    def _furthest_checkpoint(self) -> dict[str, Any]:
        """The checkpoint to resume from: ``last.pt`` or, when further on (the epoch after
        it, part-done), ``partial.pt``; an unreadable partial one is passed over."""
        last, partial = self.checkpoint_path, self.partial_path
        if last is None or partial is None or not (last.is_file() or partial.is_file()):
            raise CheckpointError(f"--resume: no checkpoint at {last or '(no run directory)'}; "
                                  "start without --resume")
        states = [load_checkpoint(last, self.device)] if last.is_file() else []
        if partial.is_file():
            try:
                states.append(load_checkpoint(partial, self.device))
            except CheckpointError as e:
                if not states:
                    raise
                log.warning("resuming from the epoch's start: %s", e)

        def progress(st: dict[str, Any]) -> tuple[int, int]:
            return int(st["epoch"]), int((st.get("in_epoch") or {}).get("batch", 0))

        return max(states, key=progress)

    # ----------------------------------------------------------------- loop
    def _set_lr(self) -> float:
        lr = self.cfg.lr * lr_factor(self.step, len(self.loader), self.cfg)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        return lr

    def _eval_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        return iter(
            BatchLoader(self.splits.train, batch_size=max(256, self.cfg.batch_size),
                        shuffle=False, augment=False, device=self.device)
        )

    def train_epoch(self) -> dict[str, Any]:
        """One pass over the training set; returns the epoch's record."""
        model, stack, opt = self.model, self.stack, self.optimizer
        model.train()
        stack.train()
        # a run resumed mid-epoch carries on with the epoch's batches and sums as saved
        done, self._in_epoch = self._in_epoch or {}, None
        start = int(done.get("batch", 0))
        self.loader.set_epoch(self.epoch, start=start)
        autocast = self.numerics.autocast()  # re-entered twice per step: reusable
        zero = torch.zeros((), device=self.device)
        loss_sum = done.get("loss_sum", zero).to(self.device).clone()
        correct = done.get("correct", zero).to(self.device).clone()
        extra_sums: dict[str, Tensor] = dict(done.get("extra_sums", {}))
        seen = int(done.get("seen", 0))
        carried, carried_cpu = _carried(done)
        t0, c0 = time.perf_counter(), time.process_time()
        bar = progress_bar(self.loader, progress=self.progress, leave=False, initial=start,
                           total=len(self.loader),
                           desc=f"epoch {self.epoch + 1}/{self.cfg.epochs}")
        lr = self._set_lr()
        for i, (x, y) in enumerate(bar, start=start):
            lr = self._set_lr()
            x = x.contiguous(memory_format=self.numerics.memory_format)
            with autocast:
                # features leave the client in float32: noise, filters and CEM see full
                # precision even under bf16 autocast
                z_clean = model.client(x).float()  # (B, C, H, W)
            z_sent = stack.transform(z_clean)
            with autocast:
                logits = model.server(z_sent)
            task = F.cross_entropy(logits.float(), y, label_smoothing=self.cfg.label_smoothing)
            ctx = StepContext(x=x, y=y, z_clean=z_clean, z_sent=z_sent,
                              model=model, epoch=self.epoch, step=self.step, lr=lr)
            extra, terms = stack.loss(ctx)
            loss = task if extra is None else task + extra
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            self.step += 1
            seen += y.numel()
            loss_sum += task.detach() * y.numel()
            correct += (logits.detach().argmax(1) == y).sum()
            for k, v in terms.items():
                extra_sums[k] = extra_sums.get(k, 0) + v.float() * y.numel()
            if (i + 1) % 25 == 0 or i + 1 == len(self.loader):
                # host sync every 25 steps (not every step): the finiteness check and the bar
                avg = loss_sum.item() / seen
                if not math.isfinite(avg) or not torch.isfinite(loss).item():
                    raise NonFiniteError(
                        f"training loss became non-finite in epoch {self.epoch + 1}, at or "
                        f"before step {self.step} (lr {lr:.3g}); lower train.lr or the "
                        "defense weights, or enable fewer defenses to find the culprit"
                    )
                bar.set_postfix(loss=f"{avg:.3f}", acc=f"{correct.item() / seen:.3f}",
                                lr=f"{lr:.3g}")
                if i + 1 < len(self.loader) and self._partial_due():
                    self._save_partial({
                        "batch": i + 1, "seen": seen, "loss_sum": loss_sum,
                        "correct": correct, "extra_sums": extra_sums,
                        "train_seconds": carried + time.perf_counter() - t0,
                        "cpu_seconds": None if carried_cpu is None
                        else carried_cpu + time.process_time() - c0,
                    })
        bar.close()
        train_s = carried + time.perf_counter() - t0
        record: dict[str, Any] = {
            "epoch": self.epoch + 1,
            "lr": lr,
            "train_loss": loss_sum.item() / seen,
            "train_accuracy": correct.item() / seen,
            "train_seconds": train_s,
            "images_per_second": seen / train_s,
        }
        if start:
            record["resumed_at_batch"] = start  # the batches before ran in an earlier process
        for k, v in extra_sums.items():
            record[f"loss/{k}"] = float(v) / seen
        t1 = time.perf_counter()
        record.update(stack.on_epoch_end(EpochContext(
            model=model, epoch=self.epoch, device=self.device,
            train_batches=self._eval_batches, metrics=record,
        )))
        record["epoch_end_seconds"] = time.perf_counter() - t1
        return record

    def fit(self, *, resume: bool = False) -> TrainResult:
        """Train for ``cfg.epochs`` epochs (continuing a checkpoint when ``resume``)."""
        if resume:
            self.load_state_dict(self._furthest_checkpoint())
            log.info("resumed at epoch %d%s", self.epoch + 1,
                     f", batch {self._in_epoch['batch'] + 1}" if self._in_epoch else "")
        elif self.partial_path is not None:
            self.partial_path.unlink(missing_ok=True)  # a fresh start: an old run's is stale
        self._last_save = time.perf_counter()
        outer = progress_bar(total=self.cfg.epochs, initial=self.epoch, desc="training",
                             progress=self.progress)
        log.info("training %d epochs on %s: %s (%s)", self.cfg.epochs - self.epoch,
                 self.device, self.numerics.describe(), self.numerics.reason)
        while self.epoch < self.cfg.epochs:
            # an epoch resumed mid-way counts the seconds its earlier process trained it
            wall_before, cpu_before = _carried(self._in_epoch)
            t_epoch = time.perf_counter() - wall_before
            c_epoch = time.process_time() - (cpu_before or 0.0)
            # a CPU's own cost, where the whole epoch's is known
            cpu_known = self.device.type == "cpu" and cpu_before is not None
            record = self.train_epoch()
            last = self.epoch + 1 == self.cfg.epochs
            if last or (self.epoch + 1) % self.cfg.eval_every == 0:
                ev = evaluate(self.model, self.stack, self.splits.test, device=self.device)
                record["test_accuracy"], record["test_loss"] = ev["accuracy"], ev["loss"]
            record["wall_seconds"] = time.perf_counter() - t_epoch
            if cpu_known:  # on a GPU the process's CPU time is not the cost
                record["cpu_seconds"] = time.process_time() - c_epoch
            self.history.append(record)
            self.epoch += 1
            self.save()  # atomic; RNG state is captured after evaluation
            outer.update(1)
            outer.set_postfix(test_acc=f"{record.get('test_accuracy', float('nan')):.3f}")
            epoch_log(log, self.progress,
                      "epoch %d/%d: loss %.4f, train acc %.4f%s, %.1f s (%.0f img/s)",
                      self.epoch, self.cfg.epochs, record["train_loss"],
                      record["train_accuracy"],
                      f", test acc {record['test_accuracy']:.4f}" if "test_accuracy" in record
                      else "", record["train_seconds"] + record["epoch_end_seconds"],
                      record["images_per_second"])
            if self.callback is not None:
                self.callback(record)
        outer.close()
        last_rec = self.history[-1] if self.history else {}
        return TrainResult(
            history=self.history,
            test_accuracy=float(last_rec.get("test_accuracy", float("nan"))),
            test_loss=float(last_rec.get("test_loss", float("nan"))),
            seconds=sum(_epoch_wall(r) for r in self.history),
            cpu_seconds=sum(r["cpu_seconds"] for r in self.history)
            if self.history and all("cpu_seconds" in r for r in self.history) else None,
            checkpoint=self.checkpoint_path,
            numerics=self.numerics.to_dict(),
        )


def _carried(in_epoch: dict[str, Any] | None) -> tuple[float, float | None]:
    """(wall, CPU) seconds an epoch resumed from a checkpoint within it had trained before
    (both 0 for an epoch from its start); CPU None where that checkpoint, written before
    splitcem counted CPU seconds, carries wall seconds only."""
    if not in_epoch:
        return 0.0, 0.0
    cpu = in_epoch.get("cpu_seconds")
    return float(in_epoch.get("train_seconds", 0.0)), None if cpu is None else float(cpu)


def _epoch_wall(record: dict[str, Any]) -> float:
    """An epoch's wall time (records from before ``wall_seconds`` existed: train + epoch end)."""
    if "wall_seconds" in record:
        return float(record["wall_seconds"])
    return float(record.get("train_seconds", 0.0)) + float(record.get("epoch_end_seconds", 0.0))


def train(
    model: SplitModel,
    stack: DefenseStack,
    splits: DataSplits,
    cfg: TrainConfig,
    *,
    device: torch.device | str = "auto",
    seed: int = 125,
    run_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    augment: bool = True,
) -> TrainResult:
    """Train ``model`` with the defenses in ``stack``; see :class:`Trainer`."""
    torch.manual_seed(seed)
    trainer = Trainer(model, stack, splits, cfg, device=resolve_device(device), seed=seed,
                      run_dir=run_dir, progress=progress, augment=augment)
    return trainer.fit(resume=resume)
