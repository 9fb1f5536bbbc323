"""The input checks and the feature bound of :func:`splitcem.protect`, one line per mistake.

Kept apart from :class:`~splitcem.defenses.protect.Protected` (which drives the defense
hooks) because each is a small, independent rule about what the user hands in: labels,
image sizes, CEM settings, and what sigma means for features of a given scale.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor, nn

from splitcem.errors import ConfigError, ProtectError

__all__ = [
    "BOUNDS",
    "Bounded",
    "cem_settings_error",
    "check_input_shape",
    "check_labels",
    "resolve_bound",
    "warn_unbounded",
]

#: the feature bounds protect applies after the encoder, as the YAML path's ``activation``
BOUNDS = ("sigmoid", "tanh", "none")
_BOUND_TYPES: dict[str, type[nn.Module]] = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh}


class Bounded(nn.Sequential):
    """The encoder followed by its feature bound: what the deployed client computes."""

    def __init__(self, encoder: nn.Module, bound: nn.Module) -> None:
        super().__init__(OrderedDict(encoder=encoder, bound=bound))


def _last_leaf(m: nn.Module) -> nn.Module | None:
    leaves = [c for c in m.modules() if not list(c.children())]
    return leaves[-1] if leaves else None


def resolve_bound(client: nn.Module, bound: str) -> nn.Module | None:
    """The module ``protect`` appends to ``client`` for ``bound``, or None when nothing is
    needed (``"none"``, or the encoder already ends with that activation)."""
    if bound not in BOUNDS:
        raise ConfigError(f"protect bound must be one of {', '.join(map(repr, BOUNDS))}, got "
                          f"{bound!r}")
    if bound == "none":
        return None
    kind = _BOUND_TYPES[bound]
    if isinstance(_last_leaf(client), kind):
        return None  # already bounded (e.g. the examples' CNN ends its client with a sigmoid)
    return kind()


def warn_unbounded(z: Tensor, sigma: float, bounded_already: bool) -> None:
    """With ``bound="none"``: say what the absolute noise sigma is relative to the features."""
    if bounded_already or sigma <= 0:
        return
    zf = z.detach().float()
    std, peak = float(zf.std()) if zf.numel() > 1 else 0.0, float(zf.abs().max())
    ratio = f"{sigma / std:.2g} of their std" if std > 0 else "against constant features"
    warnings.warn(
        f"protect(bound='none'): the features are unbounded (std {std:.3g}, max |z| "
        f"{peak:.3g} on the first batch) and noise sigma {sigma:g} is absolute, {ratio}: the "
        "encoder can scale its features up until the noise does nothing; bound='sigmoid' "
        "(the default, as a YAML run) makes sigma relative to features in (0, 1)",
        stacklevel=4)


def check_input_shape(want: tuple[int, ...], x: Tensor) -> None:
    """A batch must have the per-image shape the client was set up with."""
    got = tuple(int(v) for v in x.shape[1:])
    if got != want:
        raise ProtectError(
            f"this client was set up for inputs of shape {' x '.join(map(str, want))}, got "
            f"{' x '.join(map(str, got))}: resize the images as at setup (the defenses are "
            "sized for its features)")


def check_labels(labels: Tensor, batch: int, num_classes: int | None, *, values: bool) -> None:
    """Labels are class indices (B,) in [0, num_classes); ``values`` also checks the range
    (one host sync)."""
    if labels.dim() == 2 and labels.shape[0] == batch and labels.shape[1] > 1:
        raise ProtectError(
            f"labels have shape {tuple(labels.shape)}: they look one-hot; pass class indices "
            "(B,), e.g. y.argmax(1)")
    if labels.dim() != 1 or labels.shape[0] != batch:
        raise ProtectError(f"labels must be class indices of shape ({batch},) for this batch, "
                           f"got shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.dtype == torch.bool or labels.is_complex():
        raise ProtectError(f"labels must be integer class indices, got dtype {labels.dtype}; "
                           "pass y.long()")
    if not values or not labels.numel():
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or (num_classes is not None and hi >= num_classes):
        k = f"[0, {num_classes})" if num_classes is not None else "[0, num_classes)"
        raise ProtectError(
            f"labels must lie in {k} (num_classes={num_classes}), found values from {lo} to "
            f"{hi}; pass class indices 0..num_classes-1 or set protect(num_classes=...)")


def cem_settings_error(raw: dict[str, Any], error: Any) -> ConfigError:
    """A one-line ConfigError naming the offending key of ``cem=`` from pydantic's error."""
    from splitcem.config import CEMConfig

    errs = error.errors() if hasattr(error, "errors") else []
    if not errs:
        return ConfigError(f"invalid cem settings {raw!r}: {error}")
    first = errs[0]
    key = ".".join(str(p) for p in first.get("loc", ())) or "?"
    if first.get("type") == "extra_forbidden":
        valid = sorted(f.alias or n for n, f in CEMConfig.model_fields.items())
        what = f"unknown key {key!r}; valid keys: {', '.join(valid)}"
    else:
        what = f"{key}={first.get('input')!r}: {first.get('msg', 'invalid')}"
    more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
    return ConfigError(f"cem: {what}{more}")
