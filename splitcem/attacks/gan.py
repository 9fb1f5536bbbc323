"""GAN-based inversion: WGAN-GP fine-tuning of a trained decoder (the paper's GAN attack).

The generator is a :class:`ResDecoder` first trained as in the ``decoder`` attack (or
handed over trained by the suite's ``init_from``); it is then fine-tuned against a small
convolutional critic with the Wasserstein loss and gradient penalty (Gulrajani et al. 2017):

    critic:     D(G(z)) - D(x) + gp_weight * (||grad_xhat D(xhat)|| - 1)^2
    generator:  -D(G(z)) + alpha * MSE(G(z), x)            (alpha = 1500, paper)

with ``n_critic`` critic steps per generator step (paper: 10). The large alpha keeps the
generator anchored to pixel accuracy; the critic pushes it toward sharp, natural images.
Query access, as the decoder attack: features are the deployed client's outputs.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

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
    _nonneg_int,
    _positive_int,
    images_to_device,
    iterate_images,
    register_attack,
)
from splitcem.attacks.decoder import ResDecoder, decode, train_decoder
from splitcem.data.dataset import ArrayDataset
from splitcem.errors import ConfigError

__all__ = ["Critic", "GanAttack", "gradient_penalty"]

log = logging.getLogger(__name__)


class Critic(nn.Module):
    """A small WGAN critic: (B, C, S, S) images -> (B,) scores.

    Stride-2 4x4 convs with LeakyReLU(0.2), channels doubling, while the map is >= 8
    pixels (3 stages for 32x32), then global average pooling and a linear layer. No batch
    norm: the gradient penalty is per sample, which batch norm would couple.
    """

    def __init__(self, channels: int, size: int, *, width: int = 64) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin, cout = channels, width
        while size >= 8 and len(layers) < 8:
            layers += [nn.Conv2d(cin, cout, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
            cin, cout, size = cout, cout * 2, size // 2
        if not layers:  # tiny images: one stride-1 stage
            layers = [nn.Conv2d(cin, cout, 3, padding=1), nn.LeakyReLU(0.2)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.features(x).mean((2, 3))  # (B, C')
        return self.head(h).squeeze(1)  # (B,)


def gradient_penalty(critic: nn.Module, real: Tensor, fake: Tensor) -> Tensor:
    """WGAN-GP penalty, mean over the batch of (||grad D(xhat)||_2 - 1)^2 with xhat on
    random points between real and fake images."""
    eps = torch.rand(real.shape[0], 1, 1, 1, device=real.device)
    xhat = (eps * real + (1 - eps) * fake).requires_grad_(True)
    (g,) = torch.autograd.grad(critic(xhat).sum(), xhat, create_graph=True)
    return (g.flatten(1).norm(2, dim=1) - 1).pow(2).mean()


@register_attack("gan")
class GanAttack(Attack):
    """WGAN-GP fine-tuning of a trained decoder (generator loss -D(G(z)) + alpha * MSE).

    Args:
        pretrain_epochs: Epochs of plain decoder training first (0 only with ``init_from``
            in the suite, which hands over a trained decoder).
        epochs: Epochs of adversarial fine-tuning (one critic step per batch).
        alpha: Weight of the MSE term in the generator loss (paper: 1500).
        gp_weight: Gradient penalty weight (10).
        n_critic: Critic steps per generator step (paper: 10).
        lr, critic_lr: Adam learning rates of the generator fine-tuning and the critic,
            betas (0.5, 0.9).
        decoder_lr, weight_decay: The pre-training (as ``decoder``).
        width, depth: Decoder size; critic_width: critic base channels.
        batch_size, seed: As the other attacks.
    """

    requires = "query"
    starts_from_decoder = True

    def __init__(self, *, pretrain_epochs: int = 50, epochs: int = 20, alpha: float = 1500.0,
                 gp_weight: float = 10.0, n_critic: int = 10, lr: float = 1e-4,
                 critic_lr: float = 1e-4, decoder_lr: float = 1e-3, weight_decay: float = 1e-4,
                 width: int = 64, depth: int = 8, critic_width: int = 64,
                 batch_size: int = 256, seed: int = 0) -> None:
        super().__init__(seed=seed, batch_size=batch_size)
        self.pretrain_epochs = _nonneg_int("pretrain_epochs", pretrain_epochs)
        self.epochs = _nonneg_int("epochs", epochs)
        self.alpha = _nonneg_float("alpha", alpha)
        self.gp_weight = _nonneg_float("gp_weight", gp_weight)
        self.n_critic = _positive_int("n_critic", n_critic)
        self.lr = _nonneg_float("lr", lr, positive=True)
        self.critic_lr = _nonneg_float("critic_lr", critic_lr, positive=True)
        self.decoder_lr = _nonneg_float("decoder_lr", decoder_lr, positive=True)
        self.weight_decay = _nonneg_float("weight_decay", weight_decay)
        self.width = _positive_int("width", width)
        self.depth = _nonneg_int("depth", depth)
        self.critic_width = _positive_int("critic_width", critic_width)
        #: a trained decoder to fine-tune (set by the suite's ``init_from``); copied
        self.init_decoder: nn.Module | None = None
        self.decoder: nn.Module | None = None

    def fit(self, target: AttackTarget, aux: ArrayDataset, *, progress: bool = True
            ) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if self.init_decoder is not None:
            gen = copy.deepcopy(self.init_decoder).to(target.device)
        elif self.pretrain_epochs > 0:
            gen = ResDecoder.for_target(target, width=self.width, depth=self.depth)
            curve = train_decoder(gen, target, aux, target.observe, epochs=self.pretrain_epochs,
                                  batch_size=self.batch_size, lr=self.decoder_lr,
                                  weight_decay=self.weight_decay, progress=progress,
                                  desc="gan pretrain")
            extra["pretrain_loss"] = [round(v, 6) for v in curve]
        else:
            raise ConfigError("gan needs pretrain_epochs >= 1, or a trained decoder through "
                              "the suite's init_from")
        c, s, _ = target.image_shape
        critic = Critic(c, s, width=self.critic_width).to(target.device)
        opt_g = torch.optim.Adam(gen.parameters(), lr=self.lr, betas=(0.5, 0.9))
        opt_d = torch.optim.Adam(critic.parameters(), lr=self.critic_lr, betas=(0.5, 0.9))
        rng = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,)).item()))
        imgs = images_to_device(aux, target.device)
        hist: dict[str, list[float]] = {"critic_loss": [], "generator_loss": [],
                                        "wasserstein": [], "gen_mse": []}
        step = 0
        gen.train()
        for epoch in progress_bar(range(self.epochs), desc="gan", progress=progress,
                                  leave=False):
            sums = torch.zeros(4, device=target.device)  # critic, generator, W, mse
            n_d = n_g = 0
            for x, x01 in iterate_images(aux, batch_size=self.batch_size, device=target.device,
                                         shuffle=True, generator=rng, uint8_on_device=imgs):
                z = target.observe(x)  # (B, Cz, Hz, Wz), fresh defense draw
                # -- critic step
                with torch.no_grad():
                    fake = gen(z)
                d_real, d_fake = critic(x01).mean(), critic(fake).mean()
                loss_d = d_fake - d_real + self.gp_weight * gradient_penalty(critic, x01, fake)
                opt_d.zero_grad(set_to_none=True)
                loss_d.backward()
                opt_d.step()
                sums[0] += loss_d.detach()
                sums[2] += (d_real - d_fake).detach()
                n_d += 1
                step += 1
                # -- generator step every n_critic critic steps
                if step % self.n_critic == 0:
                    r = gen(z)
                    mse = F.mse_loss(r, x01)
                    loss_g = -critic(r).mean() + self.alpha * mse
                    opt_g.zero_grad(set_to_none=True)
                    loss_g.backward()
                    opt_g.step()
                    sums[1] += loss_g.detach()
                    sums[3] += mse.detach()
                    n_g += 1
            _check_finite(sums, "gan losses")  # one sync per epoch
            v = sums.tolist()
            hist["critic_loss"].append(round(v[0] / max(n_d, 1), 6))
            hist["wasserstein"].append(round(v[2] / max(n_d, 1), 6))
            if n_g:
                hist["generator_loss"].append(round(v[1] / n_g, 6))
                hist["gen_mse"].append(round(v[3] / n_g, 6))
            epoch_log(log, progress, "gan epoch %d/%d: critic loss %.4f, wasserstein %.4f",
                      epoch + 1, self.epochs, hist["critic_loss"][-1], hist["wasserstein"][-1])
        gen.eval()
        self.decoder = gen
        extra.update(hist)
        extra["generator_steps"] = step // self.n_critic
        return extra

    def reconstruct(self, target: AttackTarget, z: Tensor) -> Tensor:
        if self.decoder is None:
            raise ConfigError("the generator is not trained; call fit() (or run()) first")
        return decode(self.decoder, z)
