"""Training and running an inversion decoder: the loop every learning attack shares.

:func:`train_decoder` trains a decoder on (features, image) pairs of the auxiliary set with
Adam and a cosine schedule. Its features come either from a callable run on every batch of
every epoch (the reference path) or from a :class:`~splitcem.attacks.features.FeatureCache`
built once, with the defense's random transform applied afresh at every step (``cached``).
:class:`EarlyStop` optionally ends training when the loss on held-out *auxiliary* images
(never the victim's) has stopped improving, and restores the best epoch's weights.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from splitcem._progress import bar as progress_bar
from splitcem._progress import epoch_log
from splitcem.attacks.base import AttackTarget, _check_finite
from splitcem.attacks.features import FeatureCache, ImageBank, SplitFeatures, index_batches
from splitcem.data.dataset import ArrayDataset
from splitcem.metrics import ssim_unchecked
from splitcem.runtime import NumericPath

__all__ = ["EarlyStop", "decode", "reconstruction_loss", "total_variation", "train_decoder"]

log = logging.getLogger(__name__)

_FLOAT32 = NumericPath(device="cpu", amp=False, channels_last=False, native_bf16=False,
                       cpu_capability="", reason="float32 (the default)")


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


@torch.no_grad()
def decode(decoder: nn.Module, z: Tensor, *, numerics: NumericPath | None = None) -> Tensor:
    """Run a trained decoder in eval mode: (B, Cz, Hz, Wz) -> (B, C, H, W) in [0, 1]."""
    decoder.eval()
    path = numerics or _FLOAT32
    with path.autocast():
        return decoder(z.contiguous(memory_format=path.memory_format)).float()


@dataclass
class EarlyStop:
    """Stop when the MSE on held-out auxiliary images has not improved for ``patience``
    epochs; the best epoch's weights are restored.

    Args:
        z: Features of the held-out auxiliary images, one fixed draw each (B, Cz, Hz, Wz).
        x01: Those images in [0, 1] (B, C, H, W).
        patience: Epochs without an improvement before stopping (>= 1).
        min_delta: Relative improvement that counts (0.002: the MSE must fall by 0.2%).

    After training, ``val_loss`` holds the held-out MSE of every epoch run, ``best_epoch``
    the (1-based) epoch whose weights were kept.
    """

    z: Tensor
    x01: Tensor
    patience: int
    min_delta: float = 0.0
    val_loss: list[float] = field(default_factory=list)
    best_epoch: int = 0

    def loss(self, decoder: nn.Module, numerics: NumericPath, batch_size: int) -> float:
        total = 0.0
        for i in range(0, len(self.z), batch_size):
            r = decode(decoder, self.z[i:i + batch_size], numerics=numerics)
            total += float(F.mse_loss(r, self.x01[i:i + batch_size], reduction="sum"))
        return total / self.x01.numel()

    def update(self, loss: float, epoch: int) -> bool:
        """Record an epoch's held-out loss; True when it is the best so far."""
        self.val_loss.append(loss)
        best = min(self.val_loss[:-1], default=float("inf"))
        if loss < best * (1 - self.min_delta):
            self.best_epoch = epoch
            return True
        return False

    def should_stop(self, epoch: int) -> bool:
        return epoch - self.best_epoch >= self.patience


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
    cached: SplitFeatures | None = None,
    early_stop: EarlyStop | None = None,
    progress: bool = True,
    desc: str = "decoder",
) -> list[float]:
    """Train ``decoder`` on (features(x), x01) pairs of the auxiliary set.

    ``features`` maps normalised images (B, C, H, W) to what the attacker gets for them,
    (K * B, Cz, Hz, Wz) for K draws per image stacked along the batch (the targets are
    repeated to match). Adam with weight decay, cosine schedule per step down to ``lr_min``.
    ``flip``: mirror a random half of each batch before it is encoded (the attacker owns
    its auxiliary images, so it may augment them; twice the distinct training pairs).
    ``cached``: encode every image (and mirror image) once with ``cached.encode`` and apply
    ``cached.transform`` at every step instead of calling ``features``; it must equal
    ``features`` (``transform(encode(x)) == features(x)`` in distribution), and the random
    stream is consumed in the same order, so the decoder's inputs are the reference's.
    ``numerics``: bf16 autocast / channels-last (:func:`splitcem.runtime.resolve_numeric_path`;
    None: float32, default layout). ``early_stop``: see :class:`EarlyStop`.

    Returns:
        The mean training loss of each epoch run.
    """
    device = target.device
    steps = epochs * -(-len(aux) // batch_size)
    opt = torch.optim.Adam(decoder.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps), eta_min=lr_min)
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,)).item()))
    bank = ImageBank(aux, device)
    cache = (FeatureCache.build(bank, cached.encode, flip=flip, batch_size=batch_size)
             if cached is not None else None)
    curve: list[float] = []
    path = numerics or _FLOAT32
    autocast, layout = path.autocast(), path.memory_format
    decoder.to(memory_format=layout)  # type: ignore[call-overload]  # not in torch's stubs
    decoder.train()
    best_state: dict[str, Tensor] | None = None
    bar = progress_bar(range(epochs), desc=desc, progress=progress, leave=False)
    for epoch in bar:
        total = torch.zeros((), device=device)
        n = 0
        for idx in index_batches(len(bank), batch_size, device=device, shuffle=True,
                                 generator=gen):
            x, x01 = bank.batch(idx)
            m = None
            if flip:
                m = (torch.rand(x.shape[0], device=device) < 0.5).view(-1, 1, 1, 1)
                x01 = torch.where(m, x01.flip(-1), x01)
            if cache is not None and cached is not None:
                z = cached.transform(cache.gather(idx, m))
            else:
                z = features(torch.where(m, x.flip(-1), x) if m is not None else x)
            k = z.shape[0] // x.shape[0]  # z: (K * B, Cz, Hz, Wz), no grad
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
        if early_stop is not None:
            if early_stop.update(early_stop.loss(decoder, path, batch_size), epoch + 1):
                best_state = copy.deepcopy(decoder.state_dict())
            decoder.train()
            if early_stop.should_stop(epoch + 1):
                epoch_log(log, progress, "%s: held-out loss flat for %d epochs; stopping at "
                          "epoch %d (best %d)", desc, early_stop.patience, epoch + 1,
                          early_stop.best_epoch)
                break
    if best_state is not None:
        decoder.load_state_dict(best_state)
    decoder.eval()
    return curve
