"""The one interface every obfuscation defense implements, and the stack that composes them.

A defense may do three things, each optional:

* **transform** the client's features before they leave the client (noise, dropout,
  top-k, ...). The transform runs in training, evaluation and deployment alike; a defense
  that should behave differently at training time reads ``self.training``, which follows
  the split model's ``train()`` / ``eval()``.
* add a **loss** term to the training objective (NoPeek, adversarial training, CEM). The
  trainer sums the terms: L = L_task + sum of defense losses. Each defense applies its own
  weight (lambda, strength, ...) inside :meth:`Defense.loss`.
* act at **epoch end** (CEM refits its mixture; PATROL prunes channels).

What a defense accumulates *within* an epoch for its epoch end (CEM's bank of the epoch's
features, running statistics) is not in its state dict: it travels in :meth:`Defense.epoch_state`,
so that a checkpoint written mid-epoch resumes it exactly. A defense sets
``mid_epoch_resumable = True`` once that holds (nothing to carry, or ``epoch_state`` carries
it); a stack with any other defense is checkpointed at epoch ends only.

Defenses are ``nn.Module`` s so that their parameters and buffers (a simulated decoder,
k-means centroids, pruning masks) are saved in checkpoints with the model. State that is
not a tensor (an optimizer of their own) goes into ``get_extra_state`` / ``set_extra_state``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar, cast

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
    "NoiseEntropy",
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


_DefenseType = TypeVar("_DefenseType", bound="type[Defense]")


def register_defense(name: str, *, force: bool = False
                     ) -> Callable[[_DefenseType], _DefenseType]:
    """Class decorator: register a :class:`Defense` subclass under ``name``."""

    def deco(cls: _DefenseType) -> _DefenseType:
        cls.name = name
        DEFENSES.register(name, force=force)(cls)
        return cls

    return deco


def create_defense(name: str, /, **params: Any) -> Defense:
    """Build the defense registered under ``name``; unknown names or parameters raise."""
    return DEFENSES.create(name, **params)


def list_defenses() -> list[str]:
    """Names of all registered defenses, sorted."""
    return DEFENSES.names()


@dataclass(frozen=True)
class NoiseEntropy:
    """The entropy of the noise a stack adds, as the I(x; z) mixture bound needs it.

    ``per_dim``: differential entropy of the noise in nats per feature, or ``None`` when the
    bound does not apply (no noise, or a filter the mixture does not model); ``note`` then
    says why.
    """

    per_dim: float | None
    note: str | None = None


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
    feature_shape: tuple[int, ...]
    #: per-channel mean / std used to normalise the inputs (to denormalise to [0, 1])
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    #: the stack's noise entropy for the I(x; z) bound (None: Gaussian of ``noise_sigma``)
    noise_entropy: NoiseEntropy | None = None


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
    #: the hyperparameter that sets how strong the defense is (frontiers sweep it)
    strength_param: ClassVar[str | None] = None
    #: why the I(x; z) mixture bound does not hold for a stack with this defense (None: it
    #: does): the bound models clean features plus Gaussian noise, nothing else
    no_leakage_bound: ClassVar[str | None] = None
    #: whether a checkpoint written mid-epoch resumes this defense exactly: its state dict
    #: and :meth:`epoch_state` hold all it keeps (False, the safe default for a defense that
    #: has not said so: the trainer then checkpoints at epoch ends only)
    mid_epoch_resumable: ClassVar[bool] = False

    def noise_entropy(self) -> float | None:
        """Differential entropy (nats per feature) of the noise this defense adds, or
        ``None`` if it adds none. Default: Gaussian noise of std ``noise_sigma``."""
        s = float(self.noise_sigma)
        return 0.5 * math.log(2.0 * math.pi * math.e * s * s) if s > 0 else None

    def setup(self, ctx: SetupContext) -> None:
        """Called once when the defense is attached to a model, before training."""

    def transform(self, z: Tensor) -> Tensor:
        """Obfuscate features ``z`` (B, C, H, W); must keep the shape. Default: identity."""
        return z

    def match_transform(self, z: Tensor, observed: Tensor | None) -> Tensor:
        """A deterministic, differentiable stand-in for :meth:`transform`, for white-box
        attacks that search for the input whose features match what was observed (rMLE).

        Args:
            z: Candidate features (B, C, H, W), with a graph to the candidate input.
            observed: What was sent, when nothing random is added after this defense (its
                exact zeros then reveal a random mask); ``None`` when later noise hides it.

        The contract: for the true input, ``observed - match_transform(z_clean, ...)`` is
        zero-mean noise. The default, the identity, meets it for defenses that do not
        transform or that add zero-mean noise; any other transform overrides it (clipping,
        masks), or rMLE would fit the wrong function.
        """
        return z

    def loss(self, ctx: StepContext) -> Tensor | None:
        """Weighted extra loss term for this step, or ``None``. May step its own optimizer."""
        return None

    def on_epoch_end(self, ctx: EpochContext) -> dict[str, float]:
        """Act at the end of an epoch; returns metrics to log (names without prefix)."""
        return {}

    def epoch_state(self) -> dict[str, Any]:
        """What this defense has accumulated since its epoch began for :meth:`on_epoch_end`
        (tensors it owns, copied), for a checkpoint written mid-epoch. Default: nothing."""
        return {}

    def load_epoch_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`epoch_state` when a run resumes mid-epoch (after ``setup`` and
        ``load_state_dict``)."""

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

    Logs are keyed by :meth:`labels`: a defense's registered name, made unique when the stack
    holds two defenses of one type (``noise#1``, ``noise#2``), so neither overwrites the other.
    """

    def __init__(self, defenses: Iterable[Defense] = ()) -> None:
        super().__init__()
        self.defenses = nn.ModuleList(list(defenses))

    def labels(self) -> list[str]:
        """One unique log key per defense, in order: its name, or ``name#i`` (1-based among
        the defenses of that name) when the name occurs more than once.

        Example:
            >>> from splitcem.defenses import create_defense
            >>> s = DefenseStack([create_defense("noise", sigma=0.1), create_defense("topk"),
            ...                   create_defense("noise", sigma=0.2)])
            >>> s.labels()
            ['noise#1', 'topk', 'noise#2']
        """
        names = [d.name or type(d).__name__ for d in self]
        seen: dict[str, int] = {}
        out = []
        for n in names:
            if names.count(n) == 1:
                out.append(n)
            else:
                seen[n] = seen.get(n, 0) + 1
                out.append(f"{n}#{seen[n]}")
        return out

    def __iter__(self) -> Iterator[Defense]:
        return iter(cast("list[Defense]", list(self.defenses)))

    def __len__(self) -> int:
        return len(self.defenses)

    @property
    def noise_sigma(self) -> float:
        """Total std of the independent Gaussian noises the stack adds."""
        return math.sqrt(sum(float(d.noise_sigma) ** 2 for d in self))

    def noise_entropy(self) -> NoiseEntropy:
        """Entropy per feature of the stack's total noise, for the I(x; z) bound.

        Independent Gaussian noises add up to one Gaussian (variances add). Otherwise the
        largest single entropy is used: for independent X, Y, h(X + Y) >= max(h(X), h(Y)),
        so the bound I(x; z) <= h(z) bound - h(noise) stays an upper bound.
        """
        notes = [f"{d.name}: {d.no_leakage_bound}" for d in self if d.no_leakage_bound]
        if notes:
            return NoiseEntropy(None, "; ".join(notes))
        parts: list[tuple[Defense, float]] = []
        for d in self:
            h = d.noise_entropy()
            if h is not None:
                parts.append((d, h))
        if not parts:
            return NoiseEntropy(None, "no noise on the features: I(x; z) is unbounded")
        gauss = True
        for d, h in parts:  # each is Gaussian noise of its noise_sigma
            g = Defense.noise_entropy(d)
            gauss = gauss and g is not None and abs(h - g) < 1e-12
        if gauss:
            s = self.noise_sigma
            return NoiseEntropy(0.5 * math.log(2.0 * math.pi * math.e * s * s))
        return NoiseEntropy(max(h for _, h in parts),
                            "non-Gaussian noise: the largest single noise entropy is used")

    def setup(self, ctx: SetupContext) -> None:
        for d in self:
            d.setup(ctx)

    def transform(self, z: Tensor) -> Tensor:
        for d in self:
            z = d.transform(z)
        return z

    def match_transform(self, z: Tensor, observed: Tensor) -> Tensor:
        """The stack's deterministic stand-in (:meth:`Defense.match_transform`) applied in
        order; each defense sees ``observed`` only if no later defense adds noise."""
        items = list(self)
        noisy_after = [False] * len(items)
        for i in range(len(items) - 2, -1, -1):
            noisy_after[i] = noisy_after[i + 1] or float(items[i + 1].noise_sigma) > 0
        for d, hidden in zip(items, noisy_after, strict=True):
            z = d.match_transform(z, None if hidden else observed)
        return z

    def forward(self, z: Tensor) -> Tensor:
        return self.transform(z)

    def loss(self, ctx: StepContext) -> tuple[Tensor | None, dict[str, Tensor]]:
        """Sum of the defenses' loss terms (``None`` if none) and each term by its label
        (:meth:`labels`)."""
        total: Tensor | None = None
        terms: dict[str, Tensor] = {}
        for label, d in zip(self.labels(), self, strict=True):
            t = d.loss(ctx)
            if t is None:
                continue
            terms[label] = t.detach()
            total = t if total is None else total + t
        return total, terms

    def on_epoch_end(self, ctx: EpochContext) -> dict[str, float]:
        """Every defense's epoch-end metrics, keyed ``label/metric`` (:meth:`labels`)."""
        out: dict[str, float] = {}
        for label, d in zip(self.labels(), self, strict=True):
            for k, v in d.on_epoch_end(ctx).items():
                out[f"{label}/{k}"] = float(v)
        return out

    @property
    def mid_epoch_resumable(self) -> bool:
        """Whether every defense resumes exactly from a checkpoint written mid-epoch."""
        return all(d.mid_epoch_resumable for d in self)

    def epoch_state(self) -> list[dict[str, Any]]:
        """Each defense's :meth:`Defense.epoch_state`, in order."""
        return [d.epoch_state() for d in self]

    def load_epoch_state(self, states: list[dict[str, Any]]) -> None:
        """Give each defense its part of :meth:`epoch_state`."""
        if len(states) != len(self):
            raise ValueError(f"epoch state of {len(states)} defense(s) for a stack of "
                             f"{len(self)}")
        for d, st in zip(self, states, strict=True):
            d.load_epoch_state(st)

    def describe(self) -> str:
        """One line: ``noise(sigma=0.1) + topk(ratio=0.2)``, or ``none``."""
        if not len(self):
            return "none"
        return " + ".join(f"{d.name}({d.extra_repr()})" for d in self)
