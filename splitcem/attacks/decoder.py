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

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from splitcem._progress import bar as progress_bar
from splitcem._progress import epoch_log
from splitcem.attacks.base import (
    Attack,
    AttackTarget,
    _check_finite,
    _nonneg_float,
    _positive_int,
    images_to_device,
    iterate_images,
    register_attack,
)
from splitcem.attacks.threat import Access
from splitcem.data.dataset import ArrayDataset
from splitcem.errors import ConfigError
from splitcem.metrics import ssim_unchecked
from splitcem.models.decoder import ResBlock, ResDecoder
from splitcem.runtime import NumericPath, Setting, check_setting, resolve_numeric_path

__all__ = [
    "AdaptiveDecoderAttack",
    "DecoderAttack",
    "MeanImageAttack",
    "ResBlock",
    "ResDecoder",
    "decoder_strong",
    "load_decoder",
    "save_decoder",
    "total_variation",
    "train_decoder",
]

log = logging.getLogger(__name__)


def total_variation(x: Tensor) -> Tensor:
    """Anisotropic TV per image, mean |dx| + mean |dy|: (B, C, H, W) -> (B,)."""
    dh = (x[:, :, 1:, :] - x[:, :, :-1, :]).abs().flatten(1).mean(1)
    dw = (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().flatten(1).mean(1)
    return dh + dw


def reconstruction_loss(r: Tensor, x01: Tensor, *, ssim_weight: float = 0.0,
                        tv_weight: float = 0.0) -> Tensor:
    """Batch loss: MSE + ssim_weight * (1 - SSIM) + tv_weight * TV(r), means over images."""
    loss = F.mse_loss(r, x01)
    if ssim_weight:
        loss = loss + ssim_weight * (1 - ssim_unchecked(r, x01).mean())
    if tv_weight:
        loss = loss + tv_weight * total_variation(r).mean()
    return loss


_FLOAT32 = NumericPath(device="cpu", amp=False, channels_last=False, native_bf16=False,
                       cpu_capability="", reason="float32 (the default)")


def train_decoder(
    decoder: nn.Module,
    target: AttackTarget,
    aux: ArrayDataset,
    features: Callable[[Tensor], Tensor],
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    lr_min: float = 1e-5,
    ssim_weight: float = 0.0,
    tv_weight: float = 0.0,
    numerics: NumericPath | None = None,
    flip: bool = False,
    progress: bool = True,
    desc: str = "decoder",
) -> list[float]:
    """Train ``decoder`` on (features(x), x01) pairs of the auxiliary set.

    ``features`` maps normalised images (B, C, H, W) to what the attacker gets for them,
    (K * B, Cz, Hz, Wz) for K draws per image stacked along the batch (the targets are
    repeated to match). Adam with weight decay, cosine schedule per step down to ``lr_min``.
    ``flip``: mirror a random half of each batch before it is encoded (the attacker owns
    its auxiliary images, so it may augment them; twice the distinct training pairs).
    ``numerics``: bf16 autocast / channels-last (:func:`splitcem.runtime.resolve_numeric_path`;
    None: float32, default layout).

    Returns:
        The mean training loss of each epoch.
    """
    device = target.device
    steps = epochs * -(-len(aux) // batch_size)
    opt = torch.optim.Adam(decoder.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps), eta_min=lr_min)
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,)).item()))
    imgs = images_to_device(aux, device)
    curve: list[float] = []
    path = numerics or _FLOAT32
    autocast, layout = path.autocast(), path.memory_format
    decoder.to(memory_format=layout)  # type: ignore[call-overload]  # not in torch's stubs
    decoder.train()
    bar = progress_bar(range(epochs), desc=desc, progress=progress, leave=False)
    for epoch in bar:
        total = torch.zeros((), device=device)
        n = 0
        for x, x01 in iterate_images(aux, batch_size=batch_size, device=device, shuffle=True,
                                     generator=gen, uint8_on_device=imgs):
            if flip:
                m = (torch.rand(x.shape[0], device=device) < 0.5).view(-1, 1, 1, 1)
                x, x01 = torch.where(m, x.flip(-1), x), torch.where(m, x01.flip(-1), x01)
            z = features(x)  # (K * B, Cz, Hz, Wz), no grad
            k = z.shape[0] // x.shape[0]
            tgt = x01.repeat(k, 1, 1, 1) if k > 1 else x01
            with autocast:
                r = decoder(z.contiguous(memory_format=layout))
            loss = reconstruction_loss(r.float(), tgt, ssim_weight=ssim_weight,
                                       tv_weight=tv_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.detach() * x.shape[0]
            n += x.shape[0]
        _check_finite(total, f"{desc} training loss")  # one sync per epoch
        curve.append(total.item() / max(1, n))
        bar.set_postfix(loss=f"{curve[-1]:.4f}")
        epoch_log(log, progress, "%s epoch %d/%d: loss %.5f", desc, epoch + 1, epochs, curve[-1])
    decoder.eval()
    return curve


@torch.no_grad()
def decode(decoder: nn.Module, z: Tensor, *, numerics: NumericPath | None = None) -> Tensor:
    """Run a trained decoder in eval mode: (B, Cz, Hz, Wz) -> (B, C, H, W) in [0, 1]."""
    decoder.eval()
    path = numerics or _FLOAT32
    with path.autocast():
        return decoder(z.contiguous(memory_format=path.memory_format)).float()


@register_attack("decoder")
class DecoderAttack(Attack):
    """The paper's decoder attack: a ResDecoder trained on (observed features, image)
    pairs of the auxiliary set, scored on the held-out set's observed features.

    Query access: features come from ``target.observe`` (the deployed defense in eval
    mode), re-queried every epoch, so noise is fresh each epoch.

    Args:
        epochs, batch_size, lr, weight_decay, lr_min: Adam + cosine schedule (paper: 50,
            256, 1e-3, 1e-4, 1e-5).
        width, depth: Decoder size (paper: 64, 8).
        ssim_weight, tv_weight: Optional extra loss terms (0 = the paper's plain MSE).
        amp: bfloat16 autocast: ``"auto"`` (default) where bf16 is native, or true / false;
            the layout follows :func:`splitcem.runtime.resolve_numeric_path`.
        flip: Also train on mirrored auxiliary images (random horizontal flips).
        seed: Seeds the noise of the queries and the shuffling.
    """

    requires: ClassVar[Access] = "query"

    def __init__(self, *, epochs: int = 50, batch_size: int = 256, lr: float = 1e-3,
                 weight_decay: float = 1e-4, lr_min: float = 1e-5, width: int = 64,
                 depth: int = 8, ssim_weight: float = 0.0, tv_weight: float = 0.0,
                 amp: Setting = "auto", flip: bool = False, seed: int = 0) -> None:
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
        self.decoder: ResDecoder | None = None
        self.numerics: NumericPath | None = None  # resolved for the target's device in fit

    def _features(self, target: AttackTarget) -> Callable[[Tensor], Tensor]:
        return target.observe

    def fit(self, target: AttackTarget, aux: ArrayDataset, *, progress: bool = True
            ) -> dict[str, Any]:
        self.decoder = ResDecoder.for_target(target, width=self.width, depth=self.depth)
        self.numerics = resolve_numeric_path(self.amp, "auto", target.device,
                                             what=self.name or "decoder")
        curve = train_decoder(
            self.decoder, target, aux, self._features(target), epochs=self.epochs,
            batch_size=self.batch_size, lr=self.lr, weight_decay=self.weight_decay,
            lr_min=self.lr_min, ssim_weight=self.ssim_weight, tv_weight=self.tv_weight,
            numerics=self.numerics, flip=self.flip, progress=progress,
            desc=self.name or "decoder",
        )
        return {"train_loss": [round(v, 6) for v in curve],
                "decoder_params": sum(p.numel() for p in self.decoder.parameters()),
                "numerics": f"{self.numerics.describe()} ({self.numerics.reason})"}

    def reconstruct(self, target: AttackTarget, z: Tensor) -> Tensor:
        if self.decoder is None:
            raise ConfigError("the decoder is not trained; call fit() (or run()) first")
        return decode(self.decoder, z, numerics=self.numerics)


@register_attack("decoder_strong")
def decoder_strong(*, epochs: int = 100, batch_size: int = 128, lr: float = 1e-3,
                   weight_decay: float = 1e-4, lr_min: float = 1e-5, width: int = 96,
                   depth: int = 12, ssim_weight: float = 0.1, tv_weight: float = 0.0,
                   amp: Setting = "auto", flip: bool = True, seed: int = 0) -> DecoderAttack:
    """A wider, deeper decoder trained longer with MSE + 0.1 (1 - SSIM) on flip-augmented
    auxiliary images (query access)."""
    return DecoderAttack(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                         lr_min=lr_min, width=width, depth=depth, ssim_weight=ssim_weight,
                         tv_weight=tv_weight, amp=amp, flip=flip, seed=seed)


@register_attack("decoder_adaptive")
class AdaptiveDecoderAttack(DecoderAttack):
    """A defense-aware decoder: trained on features produced exactly as the deployed
    defense produces them (``target.defenses`` in eval mode, applied by the attacker to
    the clean features), with ``draws`` fresh noise / mask draws per image and step.

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
                 seed: int = 0) -> None:
        super().__init__(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                         lr_min=lr_min, width=width, depth=depth, ssim_weight=ssim_weight,
                         tv_weight=tv_weight, amp=amp, flip=flip, seed=seed)
        self.draws = _positive_int("draws", draws)

    def _features(self, target: AttackTarget) -> Callable[[Tensor], Tensor]:
        k = self.draws if _is_random(target) else 1

        def features(x: Tensor) -> Tensor:
            z = target.clean(x)  # (B, Cz, Hz, Wz)
            return target.transform(z.repeat(k, 1, 1, 1) if k > 1 else z)  # (k*B, ...)

        return features


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
