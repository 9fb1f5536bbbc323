"""The one interface every obfuscation defense implements, and the stack that composes them.

A defense may do three things, each optional (DESIGN.md section 3):

* **transform** the client's features before they leave the client (noise, dropout,
  top-k, ...). The transform runs in training, evaluation and deployment alike; a defense
  that should behave differently at training time reads ``self.training``, which follows
  the split model's ``train()`` / ``eval()``.
* add a **loss** term to the training objective (NoPeek, adversarial training, CEM). The
  trainer sums the terms: L = L_task + sum of defense losses. Each defense applies its own
  weight (lambda, strength, ...) inside :meth:`Defense.loss`.
* act at **epoch end** (CEM refits its mixture; PATROL prunes channels).

Defenses are ``nn.Module`` s so that their parameters and buffers (a simulated decoder,
k-means centroids, pruning masks) are saved in checkpoints with the model. State that is
not a tensor (an optimizer of their own) goes into ``get_extra_state`` / ``set_extra_state``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from splitcem._registry import Registry

if TYPE_CHECKING:
    from splitcem.models import SplitModel

__all__ = [
    "DEFENSES",
    "Defense",
    "DefenseStack",
    "EpochContext",
    "SetupContext",
    "StepContext",
    "create_defense",
    "list_defenses",
    "register_defense",
]

def _adopt(name: str, obj: Any) -> None:
    """A defense class registered from an entry point gets its name, as from the decorator."""
    if isinstance(obj, type) and issubclass(obj, Defense):
        obj.name = name


DEFENSES: Registry[Defense] = Registry("defense", group="splitcem.defenses", adopt=_adopt)


def register_defense(name: str, *, force: bool = False):
    """Class decorator: register a :class:`Defense` subclass under ``name``."""

    def deco(cls: type[Defense]) -> type[Defense]:
        cls.name = name
        return DEFENSES.register(name, force=force)(cls)

    return deco


def create_defense(name: str, /, **params: Any) -> Defense:
    """Build the defense registered under ``name``; unknown names or parameters raise."""
    return DEFENSES.create(name, **params)


def list_defenses() -> list[str]:
    """Names of all registered defenses, sorted."""
    return DEFENSES.names()


@dataclass
class SetupContext:
    """What a defense may know about the run when it is attached (before epoch 0)."""

    model: SplitModel
    num_classes: int
    device: torch.device
    #: standard deviation of the Gaussian noise the whole stack adds to the features
    #: (0 when no noise defense is used). CEM needs it.
    noise_sigma: float
    #: training samples per epoch and optimizer steps per epoch
    train_size: int
    steps_per_epoch: int
    epochs: int
    #: feature shape (C, H, W) of the client's output
    feature_shape: tuple[int, int, int]
    #: per-channel mean / std used to normalise the inputs (to denormalise to [0, 1])
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()


@dataclass
class StepContext:
    """One training step, as the loss terms see it.

    ``z_clean`` still carries the autograd graph back to the client encoder, so a loss on
    it trains the encoder only; ``z_sent`` is what the server received.
    """

    x: Tensor  # (B, C, H, W) normalised inputs
    y: Tensor  # (B,) labels
    z_clean: Tensor  # (B, Cz, Hz, Wz) client output before any defense transform
    z_sent: Tensor  # (B, Cz, Hz, Wz) after all transforms (what leaves the client)
    model: SplitModel
    epoch: int  # 0-based
    step: int  # global optimizer step, 0-based
    lr: float  # current learning rate of the main optimizer


@dataclass
class EpochContext:
    """End of an epoch. ``train_batches`` iterates (x, y) over the training set without
    augmentation, in eval order, for defenses that need an extra pass (reference-mode CEM,
    Taylor importance); most defenses do not touch it."""

    model: SplitModel
    epoch: int
    device: torch.device
    train_batches: Any  # Callable[[], Iterable[tuple[Tensor, Tensor]]]
    metrics: dict[str, float] = field(default_factory=dict)


class Defense(nn.Module):
    """Base class of obfuscation defenses. Override any of the hooks; all default to no-ops.

    Subclasses document their hyperparameters and the paper's defaults in their docstring
    and take them as keyword arguments (validated in ``__init__``).
    """

    name: ClassVar[str] = ""
    #: standard deviation of Gaussian noise this defense adds (the stack sums variances)
    noise_sigma: float = 0.0

    def setup(self, ctx: SetupContext) -> None:
        """Called once when the defense is attached to a model, before training."""

    def transform(self, z: Tensor) -> Tensor:
        """Obfuscate features ``z`` (B, C, H, W); must keep the shape. Default: identity."""
        return z

    def loss(self, ctx: StepContext) -> Tensor | None:
        """Weighted extra loss term for this step, or ``None``. May step its own optimizer."""
        return None

    def on_epoch_end(self, ctx: EpochContext) -> dict[str, float]:
        """Act at the end of an epoch; returns metrics to log (names without prefix)."""
        return {}

    def forward(self, z: Tensor) -> Tensor:
        return self.transform(z)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.hparams().items())

    def hparams(self) -> dict[str, Any]:
        """Hyperparameters for reports (public, scalar attributes set in ``__init__``)."""
        return {
            k: v for k, v in vars(self).items()
            if not k.startswith("_") and k not in ("training", "noise_sigma")
            and isinstance(v, int | float | str | bool)
        }


class DefenseStack(nn.Module):
    """Defenses applied in order: ``transform`` chains, losses add, epoch hooks all run.

    Put information filters before noise: the noise is what is added last, to what is sent.
    """

    def __init__(self, defenses: Iterable[Defense] = ()) -> None:
        super().__init__()
        self.defenses = nn.ModuleList(list(defenses))

    def __iter__(self) -> Iterator[Defense]:
        return iter(self.defenses)

    def __len__(self) -> int:
        return len(self.defenses)

    @property
    def noise_sigma(self) -> float:
        """Total std of the independent Gaussian noises the stack adds."""
        return math.sqrt(sum(float(d.noise_sigma) ** 2 for d in self.defenses))

    def setup(self, ctx: SetupContext) -> None:
        for d in self.defenses:
            d.setup(ctx)

    def transform(self, z: Tensor) -> Tensor:
        for d in self.defenses:
            z = d.transform(z)
        return z

    def forward(self, z: Tensor) -> Tensor:
        return self.transform(z)

    def loss(self, ctx: StepContext) -> tuple[Tensor | None, dict[str, Tensor]]:
        """Sum of the defenses' loss terms (``None`` if none) and each term by defense name."""
        total: Tensor | None = None
        terms: dict[str, Tensor] = {}
        for d in self.defenses:
            t = d.loss(ctx)
            if t is None:
                continue
            terms[d.name or type(d).__name__] = t.detach()
            total = t if total is None else total + t
        return total, terms

    def on_epoch_end(self, ctx: EpochContext) -> dict[str, float]:
        out: dict[str, float] = {}
        for d in self.defenses:
            for k, v in d.on_epoch_end(ctx).items():
                out[f"{d.name}/{k}"] = float(v)
        return out

    def describe(self) -> str:
        """One line: ``noise(sigma=0.1) + topk(ratio=0.2)``, or ``none``."""
        if not len(self):
            return "none"
        return " + ".join(f"{d.name}({d.extra_repr()})" for d in self.defenses)
