"""PATROL-style channel pruning of the client encoder (Ding et al., WACV 2024), by first-order
Taylor importance (Molchanov et al., ICLR 2017), once, at a chosen epoch.

Pruning removes channels of the encoder so less of the image reaches the cut layer; the
optimizer keeps training what is left. Here a channel is "removed" by a 0/1 mask applied
with a forward hook at the channel's output, so the architecture, the optimizer and the
checkpoints keep their shapes:

* **which layers** (``scope``): ``"last"`` (default) masks the output channels of the last
  convolution before the bottleneck, the layer whose channels the bottleneck compresses into
  the features, so its channel count directly bounds what can reach the cut; early layers
  carry low-level image structure the task needs too, and pruning them costs accuracy
  first. ``"all"`` masks every client convolution except the bottleneck, each by ``ratio``.
* **where the mask acts**: on the output of the BatchNorm that follows the conv (on the conv
  itself if none follows). Masking the conv output alone would not silence the channel: BN
  maps a zero channel to its bias beta (and to -mean/std * gamma + beta in eval mode).
* **importance** of channel c of a masked layer with output a (B, C, H, W), summed over
  ``importance_batches`` batches of ``EpochContext.train_batches()`` with the model in eval
  mode and the clean features (no defense transforms) fed to the server:
  ``I_c = sum_b | mean_hw a[b, c] * dL/da[b, c] |``, L = cross-entropy of the task.
* at the end of epoch ``prune_epoch`` (1-based), ``floor(ratio * C)`` channels with the
  smallest importance are masked, per masked layer; they output exactly 0 from then on.

The masks are buffers of this defense (in its ``state_dict``). At every epoch end after
pruning the pruned channels are also *baked* into the model (their BN weight and bias, or
conv weight and bias, set to 0), so a checkpoint of the model alone is pruned as well.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from splitcem._validate import check_int
from splitcem.defenses.base import Defense, EpochContext, SetupContext, register_defense
from splitcem.errors import ConfigError

__all__ = ["PatrolPruning", "prunable_layers"]

_SCOPES = ("last", "all")


def prunable_layers(client: nn.Module, scope: str = "last") -> list[tuple[nn.Conv2d, nn.Module]]:
    """(conv, module whose output is masked) pairs of ``client``, in forward order.

    The bottleneck (``client.bottleneck`` of a :class:`~splitcem.models.SplitModel` client)
    is excluded; the masked module is the ``BatchNorm2d`` directly after the conv (same
    channel count) if there is one, else the conv.
    """
    bottleneck = getattr(client, "bottleneck", None)
    mods = [m for m in client.modules() if not list(m.children())]  # leaves, in order
    pairs: list[tuple[nn.Conv2d, nn.Module]] = []
    for i, m in enumerate(mods):
        if not isinstance(m, nn.Conv2d) or m is bottleneck:
            continue
        nxt = mods[i + 1] if i + 1 < len(mods) else None
        if isinstance(nxt, nn.BatchNorm2d) and nxt.num_features == m.out_channels:
            pairs.append((m, nxt))  # a BN follows: mask its output
        else:
            pairs.append((m, m))
    if scope == "last":
        pairs = pairs[-1:]
    return pairs


@register_defense("patrol")
class PatrolPruning(Defense):
    """PATROL pruning: mask the encoder's least Taylor-important channels at one epoch.

    Acts at epoch end (importance + pruning at ``prune_epoch``, baking afterwards) and
    through forward hooks on the client; no transform or loss of its own.

    Args:
        ratio: Share of each masked layer's channels to prune, in [0, 1). Reference: 0.05
            of the channels of every client convolution with more than 32 channels
            (torch_pruning). Default 0.5 (of the last conv only, ``scope="last"``).
        prune_epoch: Prune at the end of this epoch (1-based, >= 1). Reference:
            ``pruning180`` of 240 epochs (75% of training). Default 6; the CPU configs
            prune at 8 of their 10 epochs. An epoch beyond the run never prunes.
        importance_batches: Training batches for the Taylor importance (>= 1). Default 8.
        scope: ``"last"`` (default: the last conv before the bottleneck) or ``"all"``
            (every client conv except the bottleneck).
    """

    pruned: Tensor  # () bool buffer: whether the pruning epoch has passed

    strength_param = "ratio"
    mid_epoch_resumable = True  # nothing accumulates within an epoch

    def __init__(
        self,
        *,
        ratio: float = 0.5,
        prune_epoch: int = 6,
        importance_batches: int = 8,
        scope: str = "last",
    ) -> None:
        super().__init__()
        ratio = float(ratio)
        if not 0.0 <= ratio < 1.0:
            raise ConfigError(
                f"patrol ratio (share of channels pruned) must be in [0, 1), got {ratio!r}"
            )
        for name, v in (("prune_epoch", prune_epoch), ("importance_batches", importance_batches)):
            check_int(f"patrol {name}", v, lo=1)
        if scope not in _SCOPES:
            raise ConfigError(f"patrol scope must be one of {_SCOPES}, got {scope!r}")
        self.ratio = ratio
        self.prune_epoch = prune_epoch
        self.importance_batches = importance_batches
        self.scope = scope
        self.register_buffer("pruned", torch.tensor(False))
        self._layers: list[tuple[nn.Conv2d, nn.Module]] = []
        self._handles: list[RemovableHandle] = []
        self._capture: list[Tensor] | None = None  # outputs recorded during the importance pass

    # ------------------------------------------------------------------ setup
    def setup(self, ctx: SetupContext) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._layers = prunable_layers(ctx.model.client, self.scope)
        if not self._layers:
            raise ConfigError(
                "patrol found no convolution to prune in the client before its bottleneck; "
                "use a deeper cut"
            )
        for i, (conv, point) in enumerate(self._layers):
            name = f"mask{i}"
            if not hasattr(self, name) or getattr(self, name).numel() != conv.out_channels:
                self.register_buffer(name, torch.ones(conv.out_channels, device=ctx.device))
            self._handles.append(point.register_forward_hook(self._make_hook(i)))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # Loaded before setup (e.g. to attack a trained run): create the mask buffers from the
        # state so the load succeeds; setup() keeps them (the model's weights carry the
        # pruning already, see _bake).
        for k, v in state_dict.items():
            name = k[len(prefix):]
            if k.startswith(prefix) and name.startswith("mask") and not hasattr(self, name):
                self.register_buffer(name, torch.ones_like(v))
        super()._load_from_state_dict(state_dict, prefix, *args)

    def masks(self) -> list[Tensor]:
        """The 0/1 channel masks (C_i,), one per masked layer."""
        return [getattr(self, f"mask{i}") for i in range(len(self._layers))]

    def _make_hook(self, i: int) -> Any:
        def hook(module: nn.Module, inputs: Any, out: Tensor) -> Tensor:
            if self._capture is not None:
                self._capture.append(out)  # pre-mask output: gradients are taken w.r.t. it
            mask = getattr(self, f"mask{i}").to(out.dtype)
            # a new tensor (never `out` itself) so an in-place ReLU after it leaves `out` intact
            return out * mask.view(1, -1, 1, 1)  # (B, C, H, W)

        return hook

    # ------------------------------------------------------------------ epoch end
    def _importance(self, ctx: EpochContext) -> list[Tensor]:
        model = ctx.model
        was = model.training
        model.eval()  # fixed BN statistics: the extra pass must not change the model
        scores = [torch.zeros_like(m) for m in self.masks()]
        try:
            for b, (x, y) in enumerate(ctx.train_batches()):
                if b >= self.importance_batches:
                    break
                self._capture = []
                with torch.enable_grad():
                    logits = model.server(model.client(x))
                    loss = F.cross_entropy(logits.float(), y, reduction="sum")
                    acts = self._capture
                    grads = torch.autograd.grad(loss, acts)
                self._capture = None
                for s, a, g in zip(scores, acts, grads, strict=True):
                    # first-order Taylor: |mean over (H, W) of a * dL/da| per sample, summed
                    s += (a.detach() * g).float().mean(dim=(2, 3)).abs().sum(dim=0)  # (C,)
        finally:
            self._capture = None
            model.train(was)
        return scores

    @torch.no_grad()
    def _bake(self) -> None:
        """Write the masks into the model's weights (pruned channels' affine params -> 0)."""
        for (conv, point), mask in zip(self._layers, self.masks(), strict=True):
            dead = mask == 0
            target = point if isinstance(point, nn.BatchNorm2d) else conv
            if target.weight is not None:
                target.weight[dead] = 0.0
            if target.bias is not None:
                target.bias[dead] = 0.0

    def on_epoch_end(self, ctx: EpochContext) -> dict[str, float]:
        if not self._layers:
            raise RuntimeError("PatrolPruning.setup(ctx) must run before training")
        out: dict[str, float] = {}
        if not bool(self.pruned) and ctx.epoch + 1 == self.prune_epoch and self.ratio > 0:
            scores = self._importance(ctx)
            with torch.no_grad():
                for mask, s in zip(self.masks(), scores, strict=True):
                    n = math.floor(self.ratio * mask.numel())
                    if n:
                        s = s.masked_fill(mask == 0, -1.0)  # already pruned: prune again first
                        mask[s.argsort()[:n]] = 0.0
                self.pruned.fill_(True)
        if bool(self.pruned):
            self._bake()
            total = sum(m.numel() for m in self.masks())
            kept = sum(float(m.sum()) for m in self.masks())
            out = {"pruned_channels": total - kept, "kept_fraction": kept / total}
        return out
