"""Learning-based inversion: a residual decoder trained to map features back to images.

``ResDecoder`` (:mod:`splitcem.models.decoder`) is the paper's "res_normN8C64" attack
network; adversarial training reuses it as its simulated attacker. Three registered attacks
train it:

* ``decoder``: the paper's attack. Query access: each epoch the attacker submits its
  auxiliary images to the deployed client and trains on what comes back, so the features
  carry the defense exactly as deployed (noise, dropout, top-k, pruning: the reference
  implementation applied only the noise) and a **fresh noise draw every epoch** (one query
  per image per epoch). MSE on images in [0, 1], Adam 1e-3, weight decay 1e-4, cosine to
  1e-5, 50 epochs, batch 256.
* ``decoder_strong``: the same attack, wider (96) and deeper (12 blocks), trained longer
  with MSE + 0.1 * (1 - SSIM) (perceptual-free: no downloaded weights) on auxiliary images
  augmented with horizontal flips.
* ``decoder_adaptive``: a defense-aware attacker (white-box): it computes the clean
  features itself and applies the known defense stack (eval mode, as deployed) ``draws``
  times per image and step, i.e. several fresh noise / mask draws per image, which averages
  the gradient over the defense's randomness instead of fitting one draw.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from splitcem.attacks.base import (
    Attack,
    AttackTarget,
    _choice,
    _nonneg_float,
    _nonneg_int,
    _positive_int,
    iterate_images,
    register_attack,
)
from splitcem.attacks.features import ENCODE_CHOICES, SplitFeatures, cache_refusal
from splitcem.attacks.threat import Access
from splitcem.attacks.training import (
    EarlyStop,
    decode,
    reconstruction_loss,
    total_variation,
    train_decoder,
)
from splitcem.data.dataset import ArrayDataset
from splitcem.errors import ConfigError, DataError
from splitcem.models.decoder import ResBlock, ResDecoder
from splitcem.runtime import NumericPath, Setting, check_setting, resolve_numeric_path

__all__ = [
    "AdaptiveDecoderAttack",
    "DecoderAttack",
    "MeanImageAttack",
    "ResBlock",
    "ResDecoder",
    "decode",
    "decoder_strong",
    "load_decoder",
    "reconstruction_loss",
    "save_decoder",
    "total_variation",
    "train_decoder",
]

log = logging.getLogger(__name__)


#: relative fall of the held-out MSE that counts as an improvement for ``early_stop``
MIN_DELTA = 0.001


@register_attack("decoder")
class DecoderAttack(Attack):
    """The paper's decoder attack: a ResDecoder trained on (observed features, image)
    pairs of the auxiliary set, scored on the held-out set's observed features.

    Query access: the features are what ``target.observe`` returns (the deployed defense in
    eval mode) with a fresh draw each epoch. ``encode="once"`` (default) computes them as
    ``target.transform`` of clean features cached once, which is what a query returns, at
    a fraction of the cost; ``"every_epoch"`` is the reference, querying every epoch.

    Args:
        epochs, batch_size, lr, weight_decay, lr_min: Adam + cosine schedule (paper: 50,
            256, 1e-3, 1e-4, 1e-5).
        width, depth: Decoder size (paper: 64, 8).
        ssim_weight, tv_weight: Optional extra loss terms (0 = the paper's plain MSE).
        amp: bfloat16 autocast: ``"auto"`` (default) where bf16 is native, or true / false;
            the layout follows :func:`splitcem.runtime.resolve_numeric_path`.
        flip: Also train on mirrored auxiliary images (random horizontal flips).
        encode: ``"once"`` or ``"every_epoch"`` (the reference path; same inputs).
        early_stop: Stop after this many epochs without improvement of the MSE on a
            held-out ``val_fraction`` of the auxiliary set (which is then not trained on);
            the best epoch's weights are kept. 0 (default): train all ``epochs``.
        seed: Seeds the noise of the queries and the shuffling.

    Given another decoder attack's trained decoder (the suite's ``init_from``, same width
    and depth), it continues that decoder's training for its own ``epochs`` (a fresh
    optimiser and cosine schedule) instead of starting from random weights.
    """

    requires: ClassVar[Access] = "query"
    accepts_decoder: ClassVar[bool] = True

    def __init__(self, *, epochs: int = 50, batch_size: int = 256, lr: float = 1e-3,
                 weight_decay: float = 1e-4, lr_min: float = 1e-5, width: int = 64,
                 depth: int = 8, ssim_weight: float = 0.0, tv_weight: float = 0.0,
                 amp: Setting = "auto", flip: bool = False, encode: str = "once",
                 early_stop: int = 0, val_fraction: float = 0.05, seed: int = 0) -> None:
        super().__init__(seed=seed, batch_size=batch_size)
        self.epochs = _positive_int("epochs", epochs)
        self.lr = _nonneg_float("lr", lr, positive=True)
        self.weight_decay = _nonneg_float("weight_decay", weight_decay)
        self.lr_min = _nonneg_float("lr_min", lr_min)
        self.width = _positive_int("width", width)
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
            raise ConfigError(f"depth must be an integer >= 0, got {depth!r}")
        self.depth = depth
        self.ssim_weight = _nonneg_float("ssim_weight", ssim_weight)
        self.tv_weight = _nonneg_float("tv_weight", tv_weight)
        self.amp: Setting = check_setting("decoder amp", amp)
        self.flip = bool(flip)
        self.encode = _choice("encode", encode, ENCODE_CHOICES)
        self.early_stop = _nonneg_int("early_stop", early_stop)
        self.val_fraction = _nonneg_float("val_fraction", val_fraction, positive=True)
        if self.val_fraction >= 1:
            raise ConfigError(f"val_fraction must be below 1, got {val_fraction!r}")
        self.decoder: ResDecoder | None = None
        self.numerics: NumericPath | None = None  # resolved for the target's device in fit

    def _features(self, target: AttackTarget) -> tuple[Callable[[Tensor], Tensor],
                                                       SplitFeatures]:
        """(what the reference path calls per batch, the same as encode + transform)."""
        return target.observe, SplitFeatures(target.clean, target.transform)

    def _held_out(self, aux: ArrayDataset, features: Callable[[Tensor], Tensor],
                  device: torch.device) -> tuple[ArrayDataset, EarlyStop | None]:
        """(images to train on, the early stop on the others); only auxiliary images."""
        if not self.early_stop:
            return aux, None
        n_val = max(1, round(self.val_fraction * len(aux)))
        if n_val >= len(aux):
            raise DataError(f"attack {self.name!r}: val_fraction {self.val_fraction} of "
                            f"{len(aux)} auxiliary images leaves none to train on")
        perm = np.random.default_rng(self.seed).permutation(len(aux))
        val = aux.subset(np.sort(perm[:n_val]))
        zs, xs = [], []
        for x, x01 in iterate_images(val, batch_size=self.batch_size, device=device):
            zs.append(features(x)[:len(x)])  # one draw per image, fixed over the epochs
            xs.append(x01)
        stop = EarlyStop(torch.cat(zs), torch.cat(xs), patience=self.early_stop,
                         min_delta=MIN_DELTA)
        return aux.subset(np.sort(perm[n_val:])), stop

    def fit(self, target: AttackTarget, aux: ArrayDataset, *, progress: bool = True
            ) -> dict[str, Any]:
        self.decoder = self._initial_decoder(target)
        self.numerics = resolve_numeric_path(self.amp, "auto", target.device,
                                             what=self.name or "decoder")
        features, split = self._features(target)
        train_aux, stop = self._held_out(aux, features, target.device)
        why = (cache_refusal(train_aux, target.device, split.encode, target.feature_shape,
                             flip=self.flip) if self.encode == "once" else None)
        cached = split if self.encode == "once" and why is None else None
        curve = train_decoder(
            self.decoder, target, train_aux, features, epochs=self.epochs,
            batch_size=self.batch_size, lr=self.lr, weight_decay=self.weight_decay,
            lr_min=self.lr_min, ssim_weight=self.ssim_weight, tv_weight=self.tv_weight,
            numerics=self.numerics, flip=self.flip, cached=cached, early_stop=stop,
            progress=progress, desc=self.name or "decoder",
        )
        out: dict[str, Any] = {
            "train_loss": [round(v, 6) for v in curve],
            "decoder_params": sum(p.numel() for p in self.decoder.parameters()),
            "numerics": f"{self.numerics.describe()} ({self.numerics.reason})",
            "features": {"encode": self.encode, "path": (
                "clean features encoded once, defense transform fresh at every step"
                if cached is not None else "re-encoded every epoch (reference)"),
                "fallback": why},
            "epochs_run": len(curve),
            "started_from": "random weights" if self.init_decoder is None else
                            "another attack's trained decoder (init_from)",
        }
        if stop is not None:
            out["early_stop"] = {"val_images": len(stop.x01), "patience": stop.patience,
                                 "val_loss": [round(v, 6) for v in stop.val_loss],
                                 "best_epoch": stop.best_epoch}
        return out

    def _initial_decoder(self, target: AttackTarget) -> ResDecoder:
        """A fresh decoder for ``target``, with ``init_decoder``'s weights when given."""
        dec = ResDecoder.for_target(target, width=self.width, depth=self.depth)
        src = self.init_decoder
        if src is None:
            return dec
        if not isinstance(src, ResDecoder) or src.config != dec.config:
            have = src.config if isinstance(src, ResDecoder) else type(src).__name__
            raise ConfigError(f"attack {self.name!r}: init_from hands over a decoder {have}, "
                              f"but this attack builds {dec.config}; give both attacks the "
                              "same width and depth")
        dec.load_state_dict(src.state_dict())
        return dec

    def reconstruct(self, target: AttackTarget, z: Tensor) -> Tensor:
        if self.decoder is None:
            raise ConfigError("the decoder is not trained; call fit() (or run()) first")
        return decode(self.decoder, z, numerics=self.numerics)


@register_attack("decoder_strong")
def decoder_strong(*, epochs: int = 100, batch_size: int = 128, lr: float = 1e-3,
                   weight_decay: float = 1e-4, lr_min: float = 1e-5, width: int = 96,
                   depth: int = 12, ssim_weight: float = 0.1, tv_weight: float = 0.0,
                   amp: Setting = "auto", flip: bool = True, encode: str = "once",
                   early_stop: int = 0, val_fraction: float = 0.05,
                   seed: int = 0) -> DecoderAttack:
    """A wider, deeper decoder trained longer with MSE + 0.1 (1 - SSIM) on flip-augmented
    auxiliary images (query access)."""
    return DecoderAttack(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                         lr_min=lr_min, width=width, depth=depth, ssim_weight=ssim_weight,
                         tv_weight=tv_weight, amp=amp, flip=flip, encode=encode,
                         early_stop=early_stop, val_fraction=val_fraction, seed=seed)


@register_attack("decoder_adaptive")
class AdaptiveDecoderAttack(DecoderAttack):
    """A defense-aware decoder: trained on features produced exactly as the deployed
    defense produces them (``target.defenses`` in eval mode, applied by the attacker to
    the clean features), with ``draws`` fresh noise / mask draws per image and step
    (also with ``encode="once"``: only the clean features are cached).

    Needs white-box access (clean features and the defense's configuration). With no
    randomness in the defense, draws > 1 would only repeat the batch, so it uses one.

    Args:
        draws: Fresh defense draws per image per step (the step's batch is
            ``batch_size * draws`` feature maps).
        Others: as :class:`DecoderAttack`.
    """

    requires = "whitebox"

    def __init__(self, *, draws: int = 4, epochs: int = 50, batch_size: int = 128,
                 lr: float = 1e-3, weight_decay: float = 1e-4, lr_min: float = 1e-5,
                 width: int = 64, depth: int = 8, ssim_weight: float = 0.0,
                 tv_weight: float = 0.0, amp: Setting = "auto", flip: bool = False,
                 encode: str = "once", early_stop: int = 0, val_fraction: float = 0.05,
                 seed: int = 0) -> None:
        super().__init__(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                         lr_min=lr_min, width=width, depth=depth, ssim_weight=ssim_weight,
                         tv_weight=tv_weight, amp=amp, flip=flip, encode=encode,
                         early_stop=early_stop, val_fraction=val_fraction, seed=seed)
        self.draws = _positive_int("draws", draws)

    def _features(self, target: AttackTarget) -> tuple[Callable[[Tensor], Tensor],
                                                       SplitFeatures]:
        k = self.draws if _is_random(target) else 1

        def transform(z: Tensor) -> Tensor:  # (B, Cz, Hz, Wz) -> (k*B, ...), fresh draws
            return target.transform(z.repeat(k, 1, 1, 1) if k > 1 else z)

        def features(x: Tensor) -> Tensor:
            return transform(target.clean(x))

        return features, SplitFeatures(target.clean, transform)


def _is_random(target: AttackTarget) -> bool:
    """Whether the deployed transform is stochastic (two observations of one input differ)."""
    x = torch.zeros(1, *target.image_shape, device=target.device)
    z = target.clean(x)
    return not torch.equal(target.transform(z), target.transform(z))


@register_attack("mean_image")
class MeanImageAttack(Attack):
    """The trivial baseline: always answer the mean auxiliary image. Needs only outputs
    (it ignores them); any attack worth the name must beat it."""

    requires = "outputs"

    def __init__(self, *, seed: int = 0, batch_size: int = 256) -> None:
        super().__init__(seed=seed, batch_size=batch_size)
        self.mean: Tensor | None = None

    def fit(self, target: AttackTarget, aux: ArrayDataset, *, progress: bool = True
            ) -> dict[str, Any]:
        total = torch.zeros(*target.image_shape, device=target.device, dtype=torch.float64)
        for _, x01 in iterate_images(aux, batch_size=self.batch_size, device=target.device):
            total += x01.sum(0, dtype=torch.float64)
        self.mean = (total / len(aux)).float()  # (C, H, W)
        return {}

    def reconstruct(self, target: AttackTarget, z: Tensor) -> Tensor:
        if self.mean is None:
            raise ConfigError("the mean image is not computed; call fit() (or run()) first")
        return self.mean.expand(z.shape[0], *self.mean.shape)


def save_decoder(path: str | Path, decoder: ResDecoder, meta: dict[str, Any]) -> Path:
    """Save a trained decoder as ``path`` (.safetensors: tensors only) and ``path`` with
    a ``.json`` suffix (its constructor arguments and ``meta``), both written atomically.

    The JSON holds ``{"class": "ResDecoder", "kwargs": decoder.config, **meta}``.
    """
    from safetensors.torch import save

    from splitcem._io import atomic_write, write_json

    path = Path(path)
    state = {k: v.detach().float().cpu().contiguous() if v.is_floating_point()
             else v.detach().cpu().contiguous() for k, v in decoder.state_dict().items()}
    data = save(state, metadata={"class": "ResDecoder"})
    def write(p: Path) -> None:
        p.write_bytes(data)

    atomic_write(path, write)
    write_json(path.with_suffix(".json"), {"class": "ResDecoder", "kwargs": decoder.config,
                                           **meta})
    return path


def load_decoder(path: str | Path, *, device: str | torch.device = "cpu"
                 ) -> tuple[ResDecoder, dict[str, Any]]:
    """Load a decoder written by :func:`save_decoder`: (decoder in eval mode, its JSON)."""
    import json

    from safetensors.torch import load

    path = Path(path)
    meta_path = path.with_suffix(".json")
    if not path.is_file() or not meta_path.is_file():
        raise ConfigError(f"no saved attack decoder at {path}; run an attack first "
                          "(splitcem attack RUN_DIR)")
    meta = json.loads(meta_path.read_text())
    if meta.get("class") != "ResDecoder":
        raise ConfigError(f"{meta_path} does not describe a ResDecoder")
    dec = ResDecoder(**meta["kwargs"])
    dec.load_state_dict(load(path.read_bytes()))
    return dec.to(device).eval(), meta
