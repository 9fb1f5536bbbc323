"""What every model inversion attack shares: the target, the result, the registry, the loop.

An attack is a curious server that wants the client's input x back from what it receives.

* :class:`~splitcem.attacks.target.AttackTarget` (re-exported here) wraps the deployed
  client pipeline: ``observe(x)`` is what leaves the client, ``clean(x)`` the encoder's
  output before any defense.
* :class:`Attack` is the ABC. Its ``run`` is a template method the subclasses do not
  override: it observes the held-out (victim) images' features once, lets the attack
  ``fit`` on the auxiliary set, then asks it to ``reconstruct`` images from the victim
  features **only** (``reconstruct`` never sees the victim images), and scores them with
  :mod:`splitcem.metrics`. Every attack declares the access it ``requires``
  (:data:`~splitcem.attacks.threat.ACCESS_LEVELS`); the suite skips attacks the threat
  model does not allow.
* Attacks are registered by name (``@register_attack("decoder")``) and created from config
  dicts through :func:`create_attack`; unknown names or parameters are errors that list
  what exists.

Runs are reproducible: ``run`` forks the global RNG (the defenses' noise uses it) and seeds
it with the attack's ``seed``, so attacks with the same seed see identical victim features
and the caller's RNG state is left untouched.
"""

from __future__ import annotations

import contextlib
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from splitcem._registry import Registry
from splitcem._validate import check_choice, check_float, check_int
from splitcem.attacks.features import images_to_device, iterate_images
from splitcem.attacks.target import AttackTarget
from splitcem.attacks.threat import Access
from splitcem.data.dataset import ArrayDataset
from splitcem.errors import DataError, NonFiniteError
from splitcem.metrics import ImageMetrics

__all__ = [
    "ATTACKS",
    "Attack",
    "AttackResult",
    "AttackTarget",
    "create_attack",
    "images_to_device",
    "iterate_images",
    "list_attacks",
    "register_attack",
]

def _adopt(name: str, obj: Any) -> None:
    """An attack class registered from an entry point gets its name, as from the decorator."""
    if isinstance(obj, type) and issubclass(obj, Attack):
        obj.name = name


ATTACKS: Registry[Attack] = Registry("attack", group="splitcem.attacks", adopt=_adopt)

#: number of held-out images kept (originals and reconstructions) for figures
NUM_KEPT = 16


def kept_indices(n: int) -> Tensor:
    """The held-out indices kept for figures: ``NUM_KEPT`` spread evenly over ``n`` images
    (held-out sets are often sorted by class; the first few would all be one class)."""
    return torch.linspace(0, n - 1, min(n, NUM_KEPT)).round().long().unique()


def register_attack(name: str, *, force: bool = False) -> Callable[[Any], Any]:
    """Decorator: register an :class:`Attack` subclass or a factory function returning one.

    Named variants are factory functions with explicit keyword arguments (timm style),
    e.g. ``decoder_strong`` is a ``DecoderAttack`` with other defaults.
    """

    def deco(fn: Any) -> Any:
        if isinstance(fn, type) and issubclass(fn, Attack):
            fn.name = name
        return ATTACKS.register(name, force=force)(fn)

    return deco


def create_attack(name: str, /, **params: Any) -> Attack:
    """Build the attack registered under ``name``; unknown names or parameters raise
    :class:`~splitcem.errors.ConfigError` listing what is accepted."""
    attack = ATTACKS.create(name, **params)
    attack.name = name  # variants built by factory functions report their registered name
    return attack


def list_attacks() -> list[str]:
    """Names of all registered attacks, sorted."""
    return ATTACKS.names()


@dataclass
class AttackResult:
    """One attack's outcome on the held-out set.

    ``metrics`` are means over all held-out images of per-image MSE / SSIM / PSNR;
    ``originals`` / ``reconstructions`` the first few held-out images, (K, C, H, W) in
    [0, 1] on the CPU (for figures); ``extra`` attack-specific diagnostics (loss curves,
    phase times, parameters), JSON-serialisable.
    """

    name: str
    metrics: dict[str, float]
    originals: Tensor
    reconstructions: Tensor
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no images)."""
        return {"name": self.name, "metrics": dict(self.metrics),
                "seconds": round(self.seconds, 3), "extra": self.extra}


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Fork the global RNG(s) the defenses draw from, seed them, restore afterwards."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class Attack(ABC):
    """Base class of model inversion attacks.

    Subclasses implement :meth:`reconstruct` and usually :meth:`fit`, set ``requires`` to
    the least access they need, and take their hyperparameters as keyword arguments
    (validated in ``__init__`` with :class:`~splitcem.errors.ConfigError`).
    """

    name: str = ""
    #: the least access the attack needs: "outputs" < "query" < "whitebox"
    requires: ClassVar[Access] = "query"
    #: whether the attack can start from another attack's trained decoder instead of
    #: training its own: the suite's ``init_from`` then sets :attr:`init_decoder`, and
    #: ``all_attack_specs`` (``splitcem attack --all``) starts it from ``decoder``
    starts_from_decoder: ClassVar[bool] = False
    #: whether the attack *may* start from another attack's decoder when a spec names one
    #: with ``init_from`` (the decoder attacks: they then continue its training), although
    #: by default it trains its own (``splitcem attack --all`` does not wire it)
    accepts_decoder: ClassVar[bool] = False
    #: the decoder handed over by the suite (attacks with ``starts_from_decoder`` or
    #: ``accepts_decoder`` only)
    init_decoder: nn.Module | None = None

    def __init__(self, *, seed: int = 0, batch_size: int = 256) -> None:
        self.seed = int(seed)
        self.batch_size = _positive_int("batch_size", batch_size)

    # ---- what subclasses implement ----------------------------------------------------
    def fit(self, target: AttackTarget, aux: ArrayDataset, *, progress: bool = True
            ) -> dict[str, Any]:
        """Learn from the auxiliary set (default: nothing). Returns diagnostics for
        ``AttackResult.extra``."""
        return {}

    @abstractmethod
    def reconstruct(self, target: AttackTarget, z: Tensor) -> Tensor:
        """Observed features (B, Cz, Hz, Wz) -> reconstructed images (B, C, H, W) in [0, 1]."""

    def diagnostics(self) -> dict[str, Any]:
        """Extra diagnostics gathered while reconstructing (merged into ``extra``)."""
        return {}

    def hparams(self) -> dict[str, Any]:
        """Scalar hyperparameters, for reports."""
        return {k: v for k, v in vars(self).items()
                if not k.startswith("_") and isinstance(v, int | float | str | bool)}

    # ---- the template ------------------------------------------------------------------
    def run(
        self,
        target: AttackTarget,
        aux: ArrayDataset,
        heldout: ArrayDataset,
        *,
        progress: bool = True,
    ) -> AttackResult:
        """Fit on ``aux``, reconstruct ``heldout`` from its observed features, score.

        Returns:
            An :class:`AttackResult` with mean MSE / SSIM / PSNR over ``heldout``.
        """
        if len(heldout) == 0:
            raise DataError(f"attack {self.name!r}: the held-out set is empty; nothing to score")
        if len(aux) == 0 and type(self).fit is not Attack.fit:
            raise DataError(f"attack {self.name!r}: the auxiliary set is empty; it needs "
                            "images to learn from (check the threat model's splits)")
        device = target.device
        t0 = time.perf_counter()
        with _seeded(self.seed, device):
            # the victim's features: observed once, before the attack touches the RNG
            z_victim = [target.observe(x) for x, _ in
                        iterate_images(heldout, batch_size=self.batch_size, device=device)]
            torch.manual_seed(self.seed + 1)
            t_fit = time.perf_counter()
            extra = dict(self.fit(target, aux, progress=progress))
            extra["fit_seconds"] = round(time.perf_counter() - t_fit, 3)
            t_rec = time.perf_counter()
            meter = ImageMetrics()
            kept_o: list[Tensor] = []
            kept_r: list[Tensor] = []
            batches = iterate_images(heldout, batch_size=self.batch_size, device=device)
            keep = kept_indices(len(heldout))
            start = 0
            for z, (_, x01) in zip(z_victim, batches, strict=True):
                r = self.reconstruct(target, z).detach().float()
                if r.shape != x01.shape:
                    raise RuntimeError(  # a bug in the attack, not a user error
                        f"attack {self.name!r} returned shape {tuple(r.shape)} for images "
                        f"{tuple(x01.shape)}")
                meter.update(r.clamp(0, 1), x01)
                sel = keep[(keep >= start) & (keep < start + len(x01))] - start
                if len(sel):
                    kept_o.append(x01[sel].cpu())
                    kept_r.append(r[sel].clamp(0, 1).cpu())
                start += len(x01)
            extra["reconstruct_seconds"] = round(time.perf_counter() - t_rec, 3)
            extra.update(self.diagnostics())
        extra.setdefault("params", self.hparams())
        extra["heldout_images"] = len(heldout)
        extra["aux_images"] = len(aux)
        return AttackResult(
            name=self.name or type(self).__name__,
            metrics=meter.compute(),
            originals=torch.cat(kept_o),
            reconstructions=torch.cat(kept_r),
            seconds=time.perf_counter() - t0,
            extra=extra,
        )


# ---- small validators shared by the attacks ---------------------------------------------


def _positive_int(name: str, v: Any) -> int:
    return check_int(name, v, lo=1)


def _nonneg_int(name: str, v: Any) -> int:
    return check_int(name, v, lo=0)


_nonneg_float = check_float
_choice = check_choice


def _check_finite(t: Tensor, what: str) -> None:
    """Raise NonFiniteError if a scalar loss is NaN / inf. Sync point (``.item()``)."""
    if not torch.isfinite(t).all().item():
        raise NonFiniteError(f"{what} became NaN or infinite; lower the learning rate")

