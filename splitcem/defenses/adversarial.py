"""Attacker-aware adversarial training (ResSFL, Li et al. CVPR 2022).

A *simulated* inversion attacker, a :class:`~splitcem.models.decoder.ResDecoder`, is trained
alongside the split model to reconstruct the input images from the features the server
receives; the client encoder is penalised whenever that attacker does well:

    per batch:  decoder_steps x  { rec = D(z.detach()); minimise 1 - SSIM(rec, x01) (or MSE) }
                penalty = strength * relu( mean_B SSIM(D(z), x01) - threshold )

where x01 is the input denormalised to [0, 1] and z the features the attacker sees
(``features="sent"``: after the other defenses' transforms, the noisy features the server
receives, what a real attacker gets; or ``"clean"``: the encoder's output, what the
reference's simulated attacker trains on). The penalty's gradient reaches the encoder
only: the decoder's parameters are frozen while it is built, and the main optimizer holds
only the split model's parameters. The decoder has its own Adam optimizer, stepped inside
:meth:`AdversarialTraining.loss`; its state travels in ``get_extra_state`` so that resuming
a checkpoint continues exactly.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from splitcem._validate import check_float, check_int
from splitcem.defenses.base import (
    Defense,
    EpochContext,
    SetupContext,
    StepContext,
    register_defense,
)
from splitcem.errors import ConfigError
from splitcem.metrics import ssim_unchecked
from splitcem.models.decoder import ResDecoder

__all__ = ["AdversarialTraining"]

_FEATURES = ("sent", "clean")
_DECODER_LOSSES = ("ssim", "mse")


def _no_autocast(device_type: str) -> contextlib.AbstractContextManager[Any]:
    """The decoder trains in float32 even if the caller runs under autocast."""
    try:
        return torch.autocast(device_type, enabled=False)
    except RuntimeError:  # pragma: no cover - device type without autocast support
        return contextlib.nullcontext()


@register_defense("adversarial")
class AdversarialTraining(Defense):
    """Adversarial training (ResSFL): penalise the encoder when a simulated decoder inverts it.

    Acts in :meth:`loss` (decoder steps + encoder penalty) and at epoch end (reports the
    simulated decoder's mean SSIM as ``adversarial/ssim``); the features are unchanged.

    Args:
        strength: Penalty weight (>= 0). Reference: 0.3 (``AT_regularization_strength`` in
            ``run_exp.sh``; ResSFL sweeps 0.1 to 1).
        threshold: SSIM hinge in [0, 1): no penalty while the decoder's batch-mean SSIM is
            below it. Paper / reference: 0.5.
        decoder_steps: Decoder optimisation steps per training batch (>= 1). Reference: 1
            (``gan_adv_step1``).
        pretrain_epochs: Epochs (from the start) in which the decoder trains but the encoder
            is not penalised (>= 0). Reference: 100 of 240 epochs; default 1.
        width: Decoder channels (>= 1). Reference simulator ``res_normN4C64``: 64. Default 32.
        depth: Residual blocks of the decoder (>= 0). Reference: 4. Default 2.
        lr: Adam learning rate of the decoder (> 0). Default 1e-3.
        features: What the simulated attacker sees: ``"sent"`` (default, the features
            after the other transforms, i.e. what the server receives) or ``"clean"`` (the
            encoder's output before any transform, as the reference).
        decoder_loss: ``"ssim"`` (default: minimise 1 - SSIM, the reference's
            ``gan_loss_type=SSIM``) or ``"mse"`` (on [0, 1] images).
    """

    strength_param = "strength"
    mid_epoch_resumable = True  # the epoch's statistics travel in epoch_state

    def __init__(
        self,
        *,
        strength: float = 0.3,
        threshold: float = 0.5,
        decoder_steps: int = 1,
        pretrain_epochs: int = 1,
        width: int = 32,
        depth: int = 2,
        lr: float = 1e-3,
        features: str = "sent",
        decoder_loss: str = "ssim",
    ) -> None:
        super().__init__()
        strength = check_float("adversarial strength", strength)
        lr = check_float("adversarial lr", lr, positive=True)
        threshold = float(threshold)
        if not 0.0 <= threshold < 1.0:
            raise ConfigError(
                f"adversarial threshold (an SSIM) must be in [0, 1), got {threshold!r}"
            )
        for name, v, lo in (("decoder_steps", decoder_steps, 1), ("pretrain_epochs",
                            pretrain_epochs, 0), ("width", width, 1), ("depth", depth, 0)):
            check_int(f"adversarial {name}", v, lo=lo)
        if features not in _FEATURES:
            raise ConfigError(f"adversarial features must be one of {_FEATURES}, got {features!r}")
        if decoder_loss not in _DECODER_LOSSES:
            raise ConfigError(
                f"adversarial decoder_loss must be one of {_DECODER_LOSSES}, got {decoder_loss!r}"
            )
        self.strength = strength
        self.threshold = threshold
        self.decoder_steps = decoder_steps
        self.pretrain_epochs = pretrain_epochs
        self.width = width
        self.depth = depth
        self.lr = lr
        self.features = features
        self.decoder_loss = decoder_loss
        self.decoder: nn.Module | None = None  # built in setup (needs the feature shape)
        self._opt: torch.optim.Optimizer | None = None
        self._pending_opt_state: dict[str, Any] | None = None
        self._pending_decoder_state: dict[str, Tensor] | None = None
        self._mean: Tensor | None = None
        self._std: Tensor | None = None
        self._stats: Tensor | None = None  # (3,) sums over the epoch: ssim, penalty, batches

    # ------------------------------------------------------------------ setup / state
    def setup(self, ctx: SetupContext) -> None:
        cz, hz, _ = ctx.feature_shape
        config = getattr(ctx.model, "config", {}) or {}
        in_ch = int(config.get("in_channels", len(ctx.mean) or 3))
        size = config.get("image_size")
        if size is None:
            raise ConfigError(
                "adversarial training needs the image size; build the model with "
                "splitcem.models.create_split_model (its .config records image_size)"
            )
        if len(ctx.mean) not in (0, in_ch) or len(ctx.std) != len(ctx.mean):
            raise ConfigError(
                f"adversarial training: mean/std {ctx.mean}/{ctx.std} do not match the "
                f"{in_ch} input channels"
            )
        self.decoder = ResDecoder(cz, hz, in_ch, int(size), width=self.width, depth=self.depth)
        if self._pending_decoder_state is not None:  # state loaded before setup
            self.decoder.load_state_dict(self._pending_decoder_state)
            self._pending_decoder_state = None
        self.decoder.to(ctx.device)
        self._opt = torch.optim.Adam(self.decoder.parameters(), lr=self.lr)
        if self._pending_opt_state is not None:  # state loaded before setup
            self._opt.load_state_dict(self._pending_opt_state)
            self._pending_opt_state = None
        mean = ctx.mean or (0.0,) * in_ch
        std = ctx.std or (1.0,) * in_ch
        self._mean = torch.tensor(mean, device=ctx.device).view(1, -1, 1, 1)
        self._std = torch.tensor(std, device=ctx.device).view(1, -1, 1, 1)
        self._stats = torch.zeros(3, device=ctx.device)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # Loaded before setup (e.g. to attack a trained run): no decoder exists yet, so keep
        # its weights for setup() instead of failing on "unexpected keys".
        if self.decoder is None:
            key = prefix + "decoder."
            self._pending_decoder_state = {
                k[len(key):]: v for k, v in state_dict.items() if k.startswith(key)
            } or None
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith(key)}
        super()._load_from_state_dict(state_dict, prefix, *args)

    def get_extra_state(self) -> dict[str, Any]:
        return {"optimizer": self._opt.state_dict() if self._opt is not None else None}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        opt_state = state.get("optimizer")
        if opt_state is None:
            return
        if self._opt is None:
            self._pending_opt_state = opt_state
        else:
            self._opt.load_state_dict(opt_state)

    # ------------------------------------------------------------------ hooks
    def _require_setup(self) -> nn.Module:
        if self.decoder is None or self._opt is None:
            raise RuntimeError(
                "AdversarialTraining.setup(ctx) must run before training "
                "(DefenseStack.setup does it; splitcem.train.Trainer calls that)"
            )
        return self.decoder

    def _decoder_objective(self, rec: Tensor, x01: Tensor) -> tuple[Tensor, Tensor]:
        """(loss to minimise, per-image SSIM (B,)) of reconstructions ``rec`` of ``x01``."""
        s = ssim_unchecked(rec, x01)
        if self.decoder_loss == "ssim":
            return (1.0 - s).mean(), s
        return F.mse_loss(rec, x01), s

    def loss(self, ctx: StepContext) -> Tensor | None:
        decoder = self._require_setup()
        # set by setup (the check above); asserted for the type checker
        assert self._opt is not None and self._stats is not None
        assert self._mean is not None and self._std is not None
        z = ctx.z_sent if self.features == "sent" else ctx.z_clean  # (B, Cz, Hz, Wz)
        if z.shape[0] < 1:
            return None
        with _no_autocast(z.device.type), torch.enable_grad():
            z = z.float()
            x01 = (ctx.x.detach().float() * self._std + self._mean).clamp(0.0, 1.0)  # (B, C, H, W)
            was = decoder.training
            decoder.train()
            # 1) the simulated attacker: decoder_steps updates on detached features
            zd = z.detach()
            for _ in range(self.decoder_steps):
                rec = decoder(zd)
                dloss, s = self._decoder_objective(rec, x01)
                self._opt.zero_grad(set_to_none=True)
                dloss.backward()
                self._opt.step()
            self._opt.zero_grad(set_to_none=True)  # free them; the penalty adds none
            # 2) the encoder penalty against the updated decoder; its parameters are frozen so
            # the graph (and the trainer's backward) reaches the encoder only
            penalty: Tensor | None = None
            if ctx.epoch >= self.pretrain_epochs and self.strength > 0:
                flags = [p.requires_grad for p in decoder.parameters()]
                for p in decoder.parameters():
                    p.requires_grad_(False)
                try:
                    s_pen = ssim_unchecked(decoder(z), x01).mean()  # scalar, graph -> z -> encoder
                finally:
                    for p, f in zip(decoder.parameters(), flags, strict=True):
                        p.requires_grad_(f)
                penalty = self.strength * F.relu(s_pen - self.threshold)
                s_report = s_pen.detach()
            else:
                s_report = s.detach().mean()  # last decoder step (before its update)
            decoder.train(was)
        pen_val = penalty.detach() if penalty is not None else s_report.new_zeros(())
        # epoch statistics stay on the device (no host sync per step)
        self._stats += torch.stack([s_report, pen_val, s_report.new_ones(())])
        return penalty if penalty is not None else z.new_zeros(())

    def epoch_state(self) -> dict[str, Any]:
        return {"stats": None if self._stats is None else self._stats.clone()}

    def load_epoch_state(self, state: dict[str, Any]) -> None:
        stats = state.get("stats")
        if stats is not None and self._stats is not None:
            self._stats.copy_(stats)

    def on_epoch_end(self, ctx: EpochContext) -> dict[str, float]:
        if self._stats is None:
            return {}
        ssim_sum, pen_sum, n = self._stats.tolist()  # host sync, once per epoch
        self._stats.zero_()
        if n == 0:
            return {}
        return {"ssim": ssim_sum / n, "penalty": pen_sum / n}
