"""Protect a user's own client encoder inside the user's own training loop (Opacus style).

``protect(client, defenses=[...], cem=...)`` wraps the encoder in :class:`Protected`, an
``nn.Module`` whose forward is what the deployed client sends (encoder, then the defense
stack's transforms) and which hands the defenses' hooks to the user's loop::

    client = splitcem.protect(client, defenses=[{"name": "noise", "sigma": 0.1}],
                              cem={"lambda": 3.0}, num_classes=10)        # added line 1
    for epoch in range(epochs):
        for x, y in loader:
            logits = server(client(x))
            loss = F.cross_entropy(logits, y) + client.loss(y)             # added line 2
            opt.zero_grad(); loss.backward(); opt.step()
        client.epoch_end()                                                 # added line 3

It drives the same :class:`~splitcem.defenses.DefenseStack` hooks as
:class:`splitcem.train.Trainer` (``setup`` once, ``transform`` + ``loss`` per step with a
:class:`StepContext`, ``on_epoch_end`` with an :class:`EpochContext`), so every registered
defense, CEM included, behaves as in a YAML run; the optimizer, schedule, data and loop are
the user's. ``state_dict()`` holds the encoder, every defense's state (CEM's mixture,
pruning masks, the simulated attacker and its optimizer) and the epoch / step counters.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from splitcem.defenses._protect_checks import (
    Bounded,
    cem_settings_error,
    check_input_shape,
    check_labels,
    resolve_bound,
    warn_unbounded,
)
from splitcem.defenses.base import (
    Defense,
    DefenseStack,
    EpochContext,
    SetupContext,
    StepContext,
    create_defense,
)
from splitcem.errors import ConfigError, ProtectError

if TYPE_CHECKING:
    from splitcem.models import SplitModel

__all__ = ["DefenseSpec", "Protected", "make_stack", "protect"]

#: a defense as ``protect`` takes it: a registered name, ``{"name": ..., **params}`` (the
#: YAML form) or a built :class:`Defense`
DefenseSpec = str | Mapping[str, Any] | Defense


def make_stack(
    defenses: Iterable[DefenseSpec] | DefenseStack = (),
    cem: float | Mapping[str, Any] | Defense | None = None,
) -> DefenseStack:
    """The defense stack a YAML run would build: ``defenses`` in order, CEM appended last.

    ``cem`` is lambda (a number), the config's ``cem:`` mapping (``{"lambda": 3.0, ...}``,
    validated like a YAML file) or a built ``CEM``.
    """
    items: list[Defense] = []
    for spec in defenses:
        if isinstance(spec, Defense):
            items.append(spec)
        elif isinstance(spec, str):
            items.append(create_defense(spec))
        elif isinstance(spec, Mapping) and "name" in spec:
            items.append(create_defense(spec["name"], **{k: v for k, v in spec.items()
                                                         if k != "name"}))
        else:
            raise ConfigError(f"a defense is a registered name, a {{'name': ..., **params}} "
                              f"mapping or a Defense, got {spec!r}")
    if cem is not None:
        if isinstance(cem, Defense):
            items.append(cem)
        else:
            from splitcem.config import CEMConfig

            raw = {"lambda": cem} if isinstance(cem, int | float) else dict(cem)
            try:
                kwargs = CEMConfig.model_validate(raw).kwargs()
            except ValueError as e:  # pydantic's ValidationError
                raise cem_settings_error(raw, e) from None
            items.append(create_defense("cem", **kwargs))
    return DefenseStack(items)


class Protected(nn.Module):
    """A client encoder followed by its deployed defenses, driven from the user's loop.

    Build it with :func:`protect`. ``forward(x)`` returns what the client sends: the
    encoder's features after the stack's transforms (noise included, also in eval mode: that
    is the deployed client). In training mode each forward is remembered for the next
    :meth:`loss`.

    Attributes:
        client: The wrapped encoder.
        defenses: The :class:`DefenseStack` (CEM last).
        epoch: Completed epochs (:meth:`epoch_end` calls); saved in ``state_dict``.
        step: Training steps (:meth:`loss` calls); saved in ``state_dict``.
        last_terms: Each defense's loss term of the last step (detached), for logging.
    """

    _server: nn.Module | None
    _view: SplitModel | None
    encoder: nn.Module

    def __init__(
        self,
        client: nn.Module,
        defenses: DefenseStack,
        *,
        num_classes: int | None = None,
        server: nn.Module | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        train_size: int | None = None,
        bound: str = "sigmoid",
    ) -> None:
        super().__init__()
        self.client = client
        self.bound = bound
        extra = resolve_bound(client, bound)
        #: what the deployed client computes before its defenses: the encoder, then the
        #: feature bound when one is added (not registered: the state is the client's)
        self.__dict__["encoder"] = client if extra is None else Bounded(client, extra)
        self._input_shape: tuple[int, ...] = ()
        #: (min, max) of the first batch's inputs: tells audit whether they were normalised
        self.input_range: tuple[float, float] | None = None
        self.defenses = defenses
        self.num_classes = num_classes
        self.mean = tuple(float(v) for v in mean) if mean is not None else ()
        self.std = tuple(float(v) for v in std) if std is not None else ()
        if len(self.mean) != len(self.std):
            raise ConfigError(f"mean and std need one value per input channel each, got "
                              f"{len(self.mean)} and {len(self.std)}")
        self.train_size = train_size
        # the server is the user's, trained and saved by them: held, not registered
        self.__dict__["_server"] = server
        self.__dict__["_view"] = None  # the SplitModel view the defenses' contexts carry
        self.epoch = 0
        self.step = 0
        self.last_terms: dict[str, Tensor] = {}
        self._pending: tuple[Tensor, Tensor, Tensor] | None = None  # x, z_clean, z_sent

    # ------------------------------------------------------------------ setup
    @property
    def is_setup(self) -> bool:
        """Whether the defenses were attached (done by the first forward, or :meth:`setup`)."""
        return self._view is not None

    @torch.no_grad()
    def setup(self, example: Tensor) -> None:
        """Attach the defenses, given a batch of inputs (the first forward does it).

        The features' shape comes from one eval-mode pass of ``example`` through the
        encoder (BatchNorm statistics untouched); with ``bound="none"`` their scale is
        measured on it and compared with the noise sigma in a warning.
        """
        from splitcem.models import SplitModel

        saved = [(m, m.training) for m in self.client.modules()]
        self.client.eval()
        try:
            z = self.encoder(example[:256])
        finally:
            for m, was in saved:
                m.training = was
        self._input_shape = tuple(int(v) for v in example.shape[1:])
        if example.numel():
            xf = example.detach().float()
            self.input_range = (float(xf.min()), float(xf.max()))
        example = example[:1]
        if not isinstance(z, Tensor):
            raise ConfigError(f"the client must return one tensor of features, got "
                              f"{type(z).__name__}")
        feature_shape = tuple(int(v) for v in z.shape[1:])
        if self.bound == "none":
            warn_unbounded(z, self.defenses.noise_sigma, resolve_bound(self.client, "sigmoid")
                           is None or resolve_bound(self.client, "tanh") is None)
        needs_classes = [d.name for d in self.defenses if d.name == "cem"]
        if needs_classes and self.num_classes is None:
            raise ConfigError("CEM fits a mixture per class: protect(..., num_classes=N)")
        if self.mean and len(self.mean) != example.shape[1]:
            raise ConfigError(f"mean/std have {len(self.mean)} values but the inputs have "
                              f"{example.shape[1]} channels")
        server = self._server if self._server is not None else _NoServer()
        config = {"in_channels": int(example.shape[1]), "image_size": int(example.shape[-1])}
        view = SplitModel(self.encoder, server, feature_shape=_pad3(feature_shape),
                          config=config)
        self.__dict__["_view"] = view
        self.defenses.setup(SetupContext(
            model=view, num_classes=int(self.num_classes or 0), device=example.device,
            noise_sigma=self.defenses.noise_sigma, train_size=int(self.train_size or 0),
            steps_per_epoch=0, epochs=0, feature_shape=_pad3(feature_shape),
            mean=self.mean, std=self.std, noise_entropy=self.defenses.noise_entropy(),
        ))

    def _require_view(self) -> SplitModel:
        if self._view is None:
            raise ProtectError("the defenses are attached by the first forward: call "
                               "protected(x) before protected.loss(y) or epoch_end()")
        return self._view

    # ------------------------------------------------------------------ per step
    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, *feature_shape)
        if not self.is_setup:
            self.setup(x)
        elif self._input_shape:
            check_input_shape(self._input_shape, x)
        # features leave the client in float32: noise and CEM see full precision under AMP
        z_clean = self.encoder(x).float()
        z_sent = self.defenses.transform(z_clean)
        if self.training and torch.is_grad_enabled():
            self._pending = (x, z_clean, z_sent)
        return z_sent

    def loss(self, labels: Tensor, *, lr: float | None = None) -> Tensor:
        """The defenses' loss terms for the last training forward (a scalar; 0 if none).

        Add it to the task loss before ``backward()``. Defenses with an attacker of their
        own (``adversarial``) take their own optimizer step here.

        Args:
            labels: The batch's labels (B,), as given to the task loss.
            lr: The optimizer's current learning rate; needed only by CEM with
                ``lr_scaling`` (``opt.param_groups[0]["lr"]``).
        """
        if self._pending is None:
            raise ProtectError(
                "protected.loss(labels) needs the batch's features: call protected(x) in "
                "training mode, with gradients on, before it (once per step)"
            )
        x, z_clean, z_sent = self._pending
        self._pending = None
        # the values cost a host sync: every step on the CPU, the first one elsewhere
        check_labels(labels, int(x.shape[0]), self.num_classes,
                     values=self.step == 0 or labels.device.type == "cpu")
        if lr is None and any(getattr(d, "lr_scaling", False) for d in self.defenses):
            raise ConfigError('cem lr_scaling needs the learning rate: '
                              'protected.loss(y, lr=opt.param_groups[0]["lr"])')
        ctx = StepContext(x=x, y=labels.to(z_clean.device), z_clean=z_clean, z_sent=z_sent,
                          model=self._require_view(), epoch=self.epoch, step=self.step,
                          lr=float(lr) if lr is not None else math.nan)
        total, self.last_terms = self.defenses.loss(ctx)
        self.step += 1
        return total if total is not None else z_clean.new_zeros(())

    # ------------------------------------------------------------------ epoch end
    def epoch_end(self, batches: Iterable[tuple[Tensor, Tensor]] | None = None
                  ) -> dict[str, float]:
        """Run the defenses' epoch-end hooks (CEM refits its mixture, PATROL prunes).

        Args:
            batches: ``(x, y)`` batches of the training set without augmentation (a
                DataLoader), for defenses that need a pass over the data at epoch end
                (PATROL's importance, CEM with ``bank="pass"``); others ignore it.

        Returns:
            The defenses' metrics, ``{"cem/mi_bound_bits": ..., ...}``.
        """
        view = self._require_view()
        device = next(iter(self.defenses.buffers()), None)
        dev = device.device if device is not None else _device_of(self.client)
        ctx = EpochContext(model=view, epoch=self.epoch, device=dev,
                           train_batches=_batches(batches, dev), metrics={})
        out = self.defenses.on_epoch_end(ctx)
        self.epoch += 1
        return out

    # ------------------------------------------------------------------ state
    def get_extra_state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.epoch, self.step = int(state["epoch"]), int(state["step"])

    def extra_repr(self) -> str:
        return f"defenses={self.defenses.describe()}, epoch={self.epoch}, step={self.step}"


class _NoServer(nn.Module):
    """Stands in for a server ``protect`` was not given; fails clearly if a defense needs it."""

    def forward(self, z: Tensor) -> Tensor:
        raise ConfigError("this defense runs the server (e.g. patrol's importance uses the "
                          "task loss): protect(client, ..., server=server)")


def _pad3(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """Feature shapes are (C, H, W) in the contexts; vector features read as (D, 1, 1)."""
    if len(shape) == 3:
        return (shape[0], shape[1], shape[2])
    return (math.prod(shape), 1, 1)


def _device_of(module: nn.Module) -> torch.device:
    p = next(iter(module.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _batches(batches: Iterable[tuple[Tensor, Tensor]] | None, device: torch.device
             ) -> Callable[[], Iterator[tuple[Tensor, Tensor]]]:
    def missing() -> Iterator[tuple[Tensor, Tensor]]:
        raise ProtectError("a defense needs a pass over the training data at epoch end: "
                           "protected.epoch_end(batches=train_loader_without_augmentation)")

    if batches is None:
        return missing

    def it() -> Iterator[tuple[Tensor, Tensor]]:
        for x, y in batches:
            yield x.to(device), y.to(device)

    return it


def protect(
    client: nn.Module,
    defenses: Iterable[DefenseSpec] | DefenseStack = (),
    *,
    cem: float | Mapping[str, Any] | Defense | None = None,
    num_classes: int | None = None,
    server: nn.Module | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    train_size: int | None = None,
    bound: str = "sigmoid",
) -> Protected:
    """Wrap a client encoder with obfuscation defenses (and CEM) for the user's own loop.

    Args:
        client: The encoder (e.g. the first half from :func:`splitcem.split`).
        defenses: Registered names, ``{"name": "noise", "sigma": 0.1}`` mappings (as in a
            YAML config) or built :class:`Defense` objects, applied in order.
        cem: CEM on top of them: lambda as a number, the YAML ``cem:`` mapping
            (``{"lambda": 3.0, "clusters": 5}``) or a built ``CEM``. Needs a noise defense.
        num_classes: Number of classes (CEM fits a mixture per class).
        server: The server half; only defenses that run the task loss (``patrol``) need it.
        mean, std: The per-channel normalisation of the inputs (for defenses and attacks
            that look at images in [0, 1], e.g. ``adversarial``; default: none).
        train_size: Training images per epoch, if known (CEM preallocates its feature bank;
            without it the bank grows as needed).
        bound: What bounds the features before the defenses, as a YAML run's ``activation``:
            ``"sigmoid"`` (default; nothing is added when the encoder already ends with a
            sigmoid), ``"tanh"``, or ``"none"``. Noise sigma is absolute, in feature units:
            with bounded features it is relative to their range; with ``"none"`` a warning
            measures the features' scale against it.

    Returns:
        A :class:`Protected` module. Train it with your optimizer over its
        ``parameters()``; add :meth:`Protected.loss` to your loss every step and call
        :meth:`Protected.epoch_end` after every epoch.

    Example:
        >>> from torch import nn
        >>> enc = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Sigmoid())
        >>> p = protect(enc, [{"name": "noise", "sigma": 0.1}],
        ...             cem={"lambda": 1.0, "clusters": 2}, num_classes=2)
        >>> z = p(torch.randn(8, 3, 4, 4)); l = p.loss(torch.randint(0, 2, (8,)))
        >>> z.shape, float(l), p.epoch_end()["cem/kmeans_iters"] >= 1
        (torch.Size([8, 4, 4, 4]), 0.0, True)
    """
    if isinstance(client, Protected):
        raise ConfigError("this client is protected already; pass its .client to re-protect")
    stack = defenses if isinstance(defenses, DefenseStack) and cem is None else make_stack(
        list(defenses) if isinstance(defenses, DefenseStack) else defenses, cem)
    if num_classes is None and any(d.name == "cem" for d in stack):
        raise ConfigError("CEM fits a mixture per class: protect(..., num_classes=N)")
    return Protected(client, stack, num_classes=num_classes, server=server, mean=mean, std=std,
                     train_size=train_size, bound=bound)
