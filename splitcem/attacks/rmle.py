"""White-box optimisation attack: regularised maximum likelihood estimation (rMLE).

He et al. (ACSAC 2019) invert a known encoder f by searching for the input that explains
the observed features:

    x* = argmin_{x in [0,1]^d}  mean_j (T(f(x))_j - z_j)^2  +  tv_weight * TV(x)

where T is the deployed defense's deterministic part (white-box: the attacker knows the
defense): clipping (LDP), the top-k mask of the candidate's own features, dropout's zeros
where the observation shows them (its expectation where later noise hides them); noise is
zero-mean and left to the squared error. Matching f(x) alone would fit the wrong function.

The box constraint is a sigmoid parametrisation x = sigmoid(w) (smooth, no gradient
dead-zones at the borders) or, with ``param="clamp"``, plain projection after every step.
f sees the normalised image, exactly as the deployed client does; the gradient flows to the
pixels only (the encoder is frozen in eval mode). Batched: all images of a batch are
optimised together with one Adam (the per-image losses are summed, so images do not
interact). Initialisation: the mean auxiliary image, uniform noise, or the output of a
decoder (``init="decoder"``, trained here or handed over by the suite), which combines the
decoder's learned prior with an exact match to the features.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from splitcem.attacks.base import (
    Attack,
    AttackTarget,
    _check_finite,
    _choice,
    _nonneg_float,
    _nonneg_int,
    _positive_int,
    iterate_images,
    register_attack,
)
from splitcem.attacks.decoder import ResDecoder, decode, total_variation, train_decoder
from splitcem.data.dataset import ArrayDataset
from splitcem.errors import ConfigError

__all__ = ["RMLEAttack"]

_CURVE_STEPS = 50  # loss-curve length kept for diagnostics (first batch)


@register_attack("rmle")
class RMLEAttack(Attack):
    """rMLE: optimise the image to reproduce the observed features under a TV prior.

    Args:
        steps: Adam steps per batch of victim images.
        lr: Adam learning rate (on the sigmoid logits, or on pixels for ``clamp``).
        tv_weight: Weight of the total-variation prior (mean |dx| + mean |dy| per image).
        init: ``"mean"`` (mean auxiliary image), ``"random"`` (uniform) or ``"decoder"``
            (implied when the suite hands over a decoder through ``init_from``).
        param: ``"sigmoid"`` (x = sigmoid(w)) or ``"clamp"`` (project onto [0, 1]).
        decoder_epochs, decoder_width, decoder_depth: The decoder trained for
            ``init="decoder"`` (query access to observed features, as ``decoder``).
        stop_at_noise: When the deployed defense adds Gaussian noise of known total std
            sigma (white-box), stop a batch once its mean squared feature residual is
            <= sigma^2: the true image's own residual is about sigma^2, so fitting further
            only fits the noise (Morozov's discrepancy principle). Checked every 10 steps.
        batch_size: Victim images optimised together.
        seed: Seeds the random initialisation and the decoder training.
    """

    requires = "whitebox"
    starts_from_decoder = True

    def __init__(self, *, steps: int = 300, lr: float = 0.05, tv_weight: float = 0.05,
                 init: str = "decoder", param: str = "sigmoid", decoder_epochs: int = 50,
                 decoder_width: int = 64, decoder_depth: int = 8, stop_at_noise: bool = True,
                 batch_size: int = 256, seed: int = 0) -> None:
        super().__init__(seed=seed, batch_size=batch_size)
        self.steps = _nonneg_int("steps", steps)
        self.lr = _nonneg_float("lr", lr, positive=True)
        self.tv_weight = _nonneg_float("tv_weight", tv_weight)
        self.init = _choice("init", init, ("mean", "random", "decoder"))
        self.param = _choice("param", param, ("sigmoid", "clamp"))
        self.decoder_epochs = _positive_int("decoder_epochs", decoder_epochs)
        self.decoder_width = _positive_int("decoder_width", decoder_width)
        self.decoder_depth = _nonneg_int("decoder_depth", decoder_depth)
        self.stop_at_noise = bool(stop_at_noise)
        #: a trained decoder to start from (set by the suite's ``init_from``); not trained here
        self.init_decoder: nn.Module | None = None
        self._mean: Tensor | None = None
        self._curve: list[float] = []
        self._steps_run: list[int] = []

    def fit(self, target: AttackTarget, aux: ArrayDataset, *, progress: bool = True
            ) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        self._curve = []  # reconstruct() records the first batch's curve
        self._steps_run = []
        if self.init == "mean":
            total = torch.zeros(*target.image_shape, device=target.device, dtype=torch.float64)
            for _, x01 in iterate_images(aux, batch_size=self.batch_size, device=target.device):
                total += x01.sum(0, dtype=torch.float64)
            self._mean = (total / len(aux)).float()  # (C, H, W)
        elif self.init == "decoder" and self.init_decoder is None:
            dec = ResDecoder.for_target(target, width=self.decoder_width,
                                        depth=self.decoder_depth)
            curve = train_decoder(dec, target, aux, target.observe, epochs=self.decoder_epochs,
                                  batch_size=min(self.batch_size, 256), lr=1e-3,
                                  weight_decay=1e-4, progress=progress, desc="rmle init")
            self.init_decoder = dec
            extra["decoder_train_loss"] = [round(v, 6) for v in curve]
        return extra

    def _x0(self, target: AttackTarget, z: Tensor) -> Tensor:
        b = z.shape[0]
        if self.init == "decoder" or self.init_decoder is not None:  # init_from implies it
            if self.init_decoder is None:
                raise ConfigError("rmle init='decoder' needs a decoder; call fit() first")
            return decode(self.init_decoder, z)
        if self.init == "random":
            return torch.rand(b, *target.image_shape, device=z.device)
        if self._mean is None:
            raise ConfigError("rmle init='mean' needs the mean image; call fit() first")
        return self._mean.expand(b, *self._mean.shape).clone()

    def reconstruct(self, target: AttackTarget, z: Tensor) -> Tensor:
        x0 = self._x0(target, z).float()  # (B, C, H, W) in [0, 1]
        info = target.info
        mean = torch.tensor(info.mean, device=z.device).view(1, -1, 1, 1)
        std = torch.tensor(info.std, device=z.device).view(1, -1, 1, 1)
        if self.param == "sigmoid":
            w = torch.logit(x0.clamp(1e-3, 1 - 1e-3)).requires_grad_(True)
        else:
            w = x0.clone().requires_grad_(True)
        opt = torch.optim.Adam([w], lr=self.lr)
        record = not self._curve  # keep the first batch's curve only
        feat_losses: list[Tensor] = []
        floor = target.noise_sigma ** 2 if self.stop_at_noise else 0.0
        self._steps_run.append(self.steps)
        with torch.enable_grad(), target.frozen() as client:
            for step in range(self.steps):
                x01 = torch.sigmoid(w) if self.param == "sigmoid" else w
                # the candidate's features through the defense's deterministic transforms
                # (clipping, top-k, visible dropout zeros), then matched to the observation
                zc = target.match(client((x01 - mean) / std), z)
                feat = (zc - z).flatten(1).pow(2).mean(1)  # (B,)
                loss = feat + self.tv_weight * total_variation(x01) if self.tv_weight else feat
                opt.zero_grad(set_to_none=True)
                loss.sum().backward()
                opt.step()
                if self.param == "clamp":
                    with torch.no_grad():
                        w.clamp_(0, 1)
                if record and len(feat_losses) < _CURVE_STEPS:
                    feat_losses.append(feat.detach().mean())
                # sync point every 10 steps: the discrepancy-principle stop
                if floor > 0 and step % 10 == 9 and feat.detach().mean().item() <= floor:
                    self._steps_run[-1] = step + 1
                    break
        if record and feat_losses:
            curve = torch.stack(feat_losses)
            _check_finite(curve, "rmle feature-matching loss")  # sync once per batch
            self._curve = curve.tolist()
        with torch.no_grad():
            return torch.sigmoid(w) if self.param == "sigmoid" else w.clamp(0, 1)

    def diagnostics(self) -> dict[str, Any]:
        return {"feature_loss_curve": [round(v, 8) for v in self._curve],
                "steps_per_batch": list(self._steps_run)}
