"""The deployed client pipeline an attacker faces (:class:`AttackTarget`).

``observe(x)`` is exactly what leaves the client (encoder, then the defense stack in eval
mode, i.e. the deployed transform with fresh randomness), ``clean(x)`` the encoder's output
before any defense, ``transform(z)`` the defense stack applied to clean features, and
``frozen()`` a context for white-box attacks that differentiate through the encoder.
``observe(x)`` is ``transform(clean(x))``: the encoder is deterministic in eval mode, so
an attack may encode its images once and apply the transform afresh (see
:mod:`splitcem.attacks.features`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn

from splitcem.data.info import DatasetInfo
from splitcem.defenses.base import Defense, DefenseStack

__all__ = ["AttackTarget"]


def _modes(modules: Iterable[nn.Module]) -> list[tuple[nn.Module, bool]]:
    return [(m, m.training) for mod in modules for m in mod.modules()]


@contextlib.contextmanager
def _eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Put modules in eval mode and restore every submodule's own mode afterwards."""
    saved = _modes(modules)
    try:
        for mod in modules:
            mod.eval()
        yield
    finally:
        for m, was_training in saved:
            m.training = was_training


class AttackTarget:
    """The deployed client pipeline an attacker faces.

    Args:
        client: The client encoder, (B, C, H, W) normalised images -> (B, Cz, Hz, Wz).
        defenses: A :class:`DefenseStack`, an iterable of :class:`Defense`, or ``None``.
        info: The dataset's :class:`DatasetInfo` (for (de)normalisation and image shape).
        device: Where attacks run. The client and defenses are moved there (``.to`` is
            in place, as for any module).
    """

    def __init__(
        self,
        client: nn.Module,
        defenses: DefenseStack | Iterable[Defense] | None,
        info: DatasetInfo,
        device: torch.device | str = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.client = client.to(self.device)
        if defenses is None:
            defenses = DefenseStack()
        elif not isinstance(defenses, DefenseStack):
            defenses = DefenseStack(defenses)
        self.defenses = defenses.to(self.device)
        self.info = info
        self._feature_shape: tuple[int, ...] | None = None

    @property
    def noise_sigma(self) -> float:
        """Total std of the Gaussian noise the deployed defenses add (0 if none)."""
        return self.defenses.noise_sigma

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the inputs."""
        return (self.info.channels, self.info.image_size, self.info.image_size)

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """(Cz, Hz, Wz) of what the server receives (found by one forward pass of the
        encoder; defense transforms keep the shape, and skipping them draws no randomness)."""
        if self._feature_shape is None:
            x = torch.zeros(1, *self.image_shape, device=self.device)
            self._feature_shape = tuple(self.clean(x).shape[1:])
        return self._feature_shape

    @torch.no_grad()
    def observe(self, x: Tensor) -> Tensor:
        """What the server receives for normalised inputs x (B, C, H, W): the deployed
        transform ``defenses(client(x))`` in eval mode, with fresh randomness per call."""
        with _eval_mode(self.client, self.defenses):
            return self.defenses.transform(self.client(x))

    @torch.no_grad()
    def clean(self, x: Tensor) -> Tensor:
        """The encoder's output before any defense (white-box access)."""
        with _eval_mode(self.client):
            return self.client(x)

    @torch.no_grad()
    def transform(self, z_clean: Tensor) -> Tensor:
        """Apply the deployed defense stack (eval mode) to clean features (white-box)."""
        with _eval_mode(self.defenses):
            return self.defenses.transform(z_clean)

    def match(self, z: Tensor, observed: Tensor) -> Tensor:
        """White-box: the deployed defenses' deterministic transforms (eval mode: clipping,
        top-k masks, dropout zeros where visible; :meth:`DefenseStack.match_transform`)
        applied to candidate features ``z`` with their graph, so that a feature-matching
        attack compares ``observed`` with the function that produced it."""
        with _eval_mode(self.defenses):
            return self.defenses.match_transform(z, observed)

    @contextlib.contextmanager
    def frozen(self) -> Iterator[nn.Module]:
        """Yield the client in eval mode with gradients off for its parameters, so a
        white-box attack can differentiate w.r.t. the *input*; everything is restored."""
        params = list(self.client.parameters())
        req = [p.requires_grad for p in params]
        try:
            with _eval_mode(self.client):
                for p in params:
                    p.requires_grad_(False)
                yield self.client
        finally:
            for p, r in zip(params, req, strict=True):
                p.requires_grad_(r)

    def to01(self, x: Tensor) -> Tensor:
        """Normalised images -> [0, 1] (clamped)."""
        return self.info.denormalize(x)
