"""The learning-rate schedule and the optimizer steps per epoch of the training loop
(:mod:`splitcem.train` re-exports both)."""

from __future__ import annotations

import math

from splitcem.config import TrainConfig

__all__ = ["lr_factor", "steps_per_epoch"]


def lr_factor(step: int, steps_per_epoch: int, cfg: TrainConfig) -> float:
    """Multiplier of ``cfg.lr`` at global ``step``: linear warm-up, then the schedule
    (x gamma per milestone epoch, or a cosine from 1 to 0 over the remaining steps)."""
    warm = cfg.warmup_epochs * steps_per_epoch
    if step < warm:
        return (step + 1) / warm
    if cfg.schedule == "cosine":
        total = cfg.epochs * steps_per_epoch
        t = (step - warm) / max(1, total - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))
    epoch = step // steps_per_epoch
    return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)


def steps_per_epoch(train_size: int, batch_size: int) -> int:
    """Optimizer steps per epoch (the last partial batch is dropped when there is a full one)."""
    return train_size // batch_size if train_size > batch_size else 1 if train_size else 0
