"""What an audit's figures rest on: the number of scored images and an interval for the MSE.

The suite reports each attack's *mean* MSE over the held-out images. For a decoder-based
attack :func:`mse_intervals` re-scores the trained decoder on the same held-out images with
the same seeded noise draws as the attack's own scoring (so the per-image MSEs average to
the reported mean, up to the decoder's numeric path) and adds a 95% normal-approximation
interval of the mean over images (mean +- 1.96 sd / sqrt(n)). The interval covers the
sampling of the scored images only, not the randomness of the attacker's training: a second
attack seed can land outside it.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from splitcem.attacks.base import AttackTarget, iterate_images
from splitcem.attacks.suite import AttackReport
from splitcem.attacks.threat import ThreatModel

__all__ = ["FEW_IMAGES", "mse_intervals", "scoring_note"]

#: below this many scored images an audit warns that its MSE is imprecise
FEW_IMAGES = 100


@torch.no_grad()
def _per_image_mse(target: AttackTarget, decoder: torch.nn.Module, heldout: Any, seed: int,
                   batch_size: int) -> torch.Tensor:
    from splitcem.attacks.decoder import decode

    dev = target.device
    devices = [dev] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)  # the draws Attack.run observed the victims with
        z = [target.observe(x) for x, _ in iterate_images(heldout, batch_size=batch_size,
                                                            device=dev)]
    out = []
    for zb, (_, x01) in zip(z, iterate_images(heldout, batch_size=batch_size, device=dev),
                            strict=True):
        r = decode(decoder, zb).clamp(0, 1)
        out.append((r - x01).pow(2).flatten(1).mean(1).double().cpu())
    return torch.cat(out)


def mse_intervals(report: AttackReport, target: AttackTarget, splits: Any,
                  threats: list[ThreatModel]) -> None:
    """Add ``images`` to every result's and the worst case's record, and a 95% interval of
    the MSE (``mse_ci95``) for decoder-based attacks; warn below :data:`FEW_IMAGES`."""
    held = {t.short: t.select(splits)[1] for t in threats}
    for label, res in report.results.items():
        res.extra["images"] = int(res.extra.get("heldout_images", 0))
        dec = report.decoders.get(label)
        ds = held.get(report.result_threat.get(label, threats[0].short), held[threats[0].short])
        if dec is None or len(ds) < 2:
            continue
        params = res.extra.get("params", {})
        v = _per_image_mse(target, dec, ds, int(params.get("seed", 0)),
                           int(params.get("batch_size", 256)))
        m, sd = float(v.mean()), float(v.std())
        half = 1.96 * sd / math.sqrt(len(v))
        res.extra["mse_rescored"] = m
        res.extra["mse_ci95"] = [m - half, m + half]
    if "mse" in report.worst:
        w = report.worst["mse"]
        res = report.results[w["attack"]]
        w["images"] = res.extra["images"]
        if "mse_ci95" in res.extra:
            w["ci95"] = list(res.extra["mse_ci95"])
        if w["images"] < FEW_IMAGES:
            warnings.warn(
                f"audit: the worst-case MSE rests on {w['images']} scored images (< "
                f"{FEW_IMAGES}); pass more images, or a larger held-out share "
                "(aux_fraction=) so its interval is narrow enough to compare", stacklevel=3)


def scoring_note(report: AttackReport) -> str:
    """One line: how many images the worst-case MSE rests on, with its interval."""
    w = report.worst.get("mse")
    if not w:
        return "no attack was scored"
    ci = w.get("ci95")
    iv = f", 95% interval over images [{ci[0]:.5f}, {ci[1]:.5f}]" if ci else ""
    return (f"worst-case MSE {w['value']:.5f} ({w['attack']}) on {w.get('images', '?')} "
            f"scored images{iv}")
