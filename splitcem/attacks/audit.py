"""Audit a user's own (protected) client: the attack suite on the user's own images.

``audit(client, data)`` is ``splitcem attack`` for models splitcem did not build: it turns the
user's images into the suite's datasets, runs :func:`~splitcem.attacks.run_attacks` against
the client as deployed (encoder, then its defenses in eval mode) and returns the same
:class:`~splitcem.attacks.AttackReport`; with ``out=DIR`` it also writes what a run
directory holds after ``splitcem attack``: ``metrics.json`` (its ``attacks`` section),
``reconstructions.png`` and ``summary.md``.

Images are given in [0, 1] (before normalisation); ``mean`` / ``std`` say how the client
expects them normalised (taken from a :class:`~splitcem.defenses.Protected` client when it
was told). Under the default inference-time threat model the attacker learns from a seeded
90% of ``data`` and is scored on the other 10%, as in a YAML run; ``threat="training"``
learns from ``train`` and is scored on ``data``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from splitcem._clock import Clock
from splitcem._io import write_json, write_text
from splitcem.attacks.audit_score import mse_intervals, scoring_note
from splitcem.attacks.base import AttackTarget
from splitcem.attacks.suite import AttackReport, all_attack_specs, run_attacks
from splitcem.attacks.threat import parse_threats
from splitcem.data.dataset import ArrayDataset
from splitcem.data.info import DatasetInfo
from splitcem.data.splits import DataSplits, split_aux
from splitcem.defenses.base import DefenseStack
from splitcem.defenses.protect import Protected
from splitcem.errors import ConfigError, DataError

__all__ = ["AuditData", "as_dataset", "audit"]

#: what ``audit`` takes as images: a DataSplits or ArrayDataset of splitcem, an
#: ``(images, labels)`` pair or an image tensor (N, C, H, W) in [0, 1], or any map-style
#: dataset of ``(image, label)`` pairs (a torchvision dataset with ``ToTensor()``)
AuditData = Any

#: the attack a run config uses when it names none (``AttackConfig``'s default)
DEFAULT_ATTACKS: tuple[dict[str, Any], ...] = ({"name": "decoder"},)


def _to_tensors(data: Any) -> tuple[Tensor, Tensor | None]:
    """(images (N, C, H, W), labels (N,) or None) from the forms ``audit`` accepts."""
    if isinstance(data, Tensor):
        return data, None
    if isinstance(data, tuple | list) and len(data) == 2 and isinstance(data[0], Tensor):
        return data[0], torch.as_tensor(data[1])
    if hasattr(data, "__len__") and hasattr(data, "__getitem__"):
        items = [data[i] for i in range(len(data))]
        if not items:
            raise DataError("audit: the dataset is empty")
        first = items[0]
        if isinstance(first, tuple | list) and len(first) >= 2:
            xs = torch.stack([torch.as_tensor(it[0]) for it in items])
            ys = torch.as_tensor([int(it[1]) for it in items])
            return xs, ys
        return torch.stack([torch.as_tensor(it) for it in items]), None
    raise DataError(f"audit: cannot read images from {type(data).__name__}; pass a tensor "
                    "(N, C, H, W) in [0, 1], an (images, labels) pair or a dataset of "
                    "(image, label) pairs")


def as_dataset(
    data: AuditData,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    num_classes: int | None = None,
    name: str = "user",
) -> ArrayDataset:
    """The user's images as a splitcem :class:`ArrayDataset` (uint8, labels, normalisation).

    Float images must lie in [0, 1] (they are stored as uint8, as every splitcem dataset
    is); uint8 images are taken as they are. Images are (N, C, H, W), square.
    """
    if isinstance(data, ArrayDataset):
        return data
    x, y = _to_tensors(data)
    if x.dim() != 4:
        raise DataError(f"audit: images must be (N, C, H, W), got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    if h != w:
        raise DataError(f"audit: images must be square (H == W), got {h} x {w}: splitcem's "
                        "datasets and attack decoders describe an image by one size; "
                        "center-crop or resize them to square (docs/byo.md)")
    if x.dtype == torch.uint8:
        u8 = x
    else:
        x = x.detach().float().cpu()
        bad = int((~torch.isfinite(x)).flatten(1).any(1).sum()) if n else 0
        if bad:
            raise DataError(f"audit: {bad} of {n} images hold NaN or inf pixels; drop or fix "
                            "them (images in [0, 1])")
        lo, hi = (float(x.min()), float(x.max())) if n else (0.0, 0.0)
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise DataError(
                f"audit: images must be in [0, 1] before normalisation, found [{lo:.3g}, "
                f"{hi:.3g}]; pass unnormalised images and mean=/std= for the client"
            )
        u8 = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    labels = (torch.zeros(n, dtype=torch.long) if y is None
              else y.detach().to(torch.long).cpu().reshape(-1))
    k = int(num_classes or (int(labels.max()) + 1 if n else 1))
    mean_t = tuple(float(v) for v in mean) if mean is not None else (0.0,) * c
    std_t = tuple(float(v) for v in std) if std is not None else (1.0,) * c
    try:
        info = DatasetInfo(name, k, int(c), int(h), mean_t, std_t,
                           tuple(str(i) for i in range(k)))
    except ValueError as e:
        raise DataError(f"audit: {e}") from None
    images = u8.permute(0, 2, 3, 1).contiguous().cpu().numpy()  # (N, H, W, C)
    return ArrayDataset(np.ascontiguousarray(images), labels.numpy().astype(np.int64), info)


def _attack_specs(attacks: Any) -> list[dict[str, Any]]:
    if attacks is None:
        return [dict(s) for s in DEFAULT_ATTACKS]
    if attacks == "all":
        return all_attack_specs()
    if isinstance(attacks, str | Mapping):
        attacks = [attacks]
    return [{"name": a} if isinstance(a, str) else dict(a) for a in attacks]


def audit(
    client: nn.Module,
    data: AuditData,
    *,
    attacks: Sequence[str | Mapping[str, Any]] | str | None = None,
    threat: Any = "inference",
    train: AuditData | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    out: str | Path | None = None,
    device: str | torch.device | None = None,
    seed: int = 125,
    aux_fraction: float = 0.9,
    progress: bool = True,
) -> AttackReport:
    """Attack ``client`` as deployed on the user's images; report per-attack and worst case.

    Args:
        client: A :class:`~splitcem.defenses.Protected` client (its defenses are attacked as
            deployed, in eval mode) or a plain encoder (no defense).
        data: Images in [0, 1]: a tensor (N, C, H, W), an ``(images, labels)`` pair, a
            dataset of ``(image, label)`` pairs, or a splitcem ``ArrayDataset`` /
            ``DataSplits`` (used as is). The attacker's auxiliary and held-out images.
        attacks: Attack names or specs (``[{"name": "decoder", "epochs": 10}]``), ``"all"``
            for every registered attack; default: the ``decoder`` attack.
        threat: Threat model(s) as ``splitcem attack --threat`` takes them (``"inference"``,
            ``"training"``, a mapping or a list: the worst case across all).
        train: The client's training images, for ``threat="training"``.
        mean, std: The client's input normalisation (default: a Protected client's, else
            none).
        out: Directory for ``metrics.json``, ``reconstructions.png`` and ``summary.md``.
        device: Where to attack (default: the client's device).
        seed: Seeds the aux / held-out partition of ``data`` (a YAML run uses its
            ``data.split_seed``, 125 by default).
        aux_fraction: Share of ``data`` the inference-time attacker learns from.
        progress: Progress bars.

    Returns:
        The :class:`~splitcem.attacks.AttackReport`; ``report.to_dict()`` is what
        ``metrics.json`` holds under ``attacks``, ``report.table()`` a markdown table.
    """
    stack: DefenseStack | None = None
    encoder = client
    if isinstance(client, Protected):
        encoder, stack = client.encoder, client.defenses
        mean = mean if mean is not None else (client.mean or None)
        std = std if std is not None else (client.std or None)
        lo_hi = client.input_range
        if mean is None and std is None and lo_hi is not None and (
                lo_hi[0] < -1e-3 or lo_hi[1] > 1 + 1e-3):
            raise ConfigError(
                f"audit: the client was trained on inputs in [{lo_hi[0]:.3g}, {lo_hi[1]:.3g}] "
                "(normalised?) but neither protect nor audit was given mean=/std=; pass the "
                "normalisation, e.g. audit(..., mean=MEAN, std=STD)")
    p = next(iter(encoder.parameters()), None)
    dev = torch.device(device) if device is not None else (
        p.device if p is not None else torch.device("cpu"))
    threats = parse_threats(threat)
    splits = _splits(data, train, threats, mean=mean, std=std, seed=seed,
                     aux_fraction=aux_fraction)
    info = splits.test.info
    if isinstance(client, Protected) and not client.is_setup:
        x = torch.from_numpy(splits.test.images[:1]).permute(0, 3, 1, 2).float().div(255)
        client.to(dev).setup(info.normalize(x.to(dev)))
    target = AttackTarget(encoder, stack, info, dev)
    clock = Clock(dev)
    report = run_attacks(target, splits, _attack_specs(attacks), threat=threats,
                         progress=progress)
    mse_intervals(report, target, splits, threats)
    if out is not None:
        _write(Path(out), report, clock.times(), stack, encoder)
    return report


def _splits(data: AuditData, train: AuditData | None, threats: list[Any], *,
            mean: Sequence[float] | None, std: Sequence[float] | None, seed: int,
            aux_fraction: float) -> DataSplits:
    if isinstance(data, DataSplits):
        return data
    test = as_dataset(data, mean=mean, std=std)
    train_ds = as_dataset(train, mean=mean, std=std, num_classes=test.info.num_classes) \
        if train is not None else None
    if any(t.setting == "training" for t in threats) and train_ds is None:
        raise ConfigError("the training-time threat model learns from the client's training "
                          "images: audit(..., train=train_images)")
    if train_ds is not None and train_ds.info.num_classes != test.info.num_classes:
        k = max(train_ds.info.num_classes, test.info.num_classes)
        test = as_dataset(data, mean=mean, std=std, num_classes=k)
        train_ds = as_dataset(train, mean=mean, std=std, num_classes=k)
    aux, held = split_aux(test, seed=seed, aux_fraction=aux_fraction)
    return DataSplits(train=train_ds if train_ds is not None else test.subset([]),
                      aux=aux, eval=held, test=test)


def _write(out: Path, report: AttackReport, times: dict[str, float],
           stack: DefenseStack | None, encoder: nn.Module) -> None:
    from splitcem import report as reports
    from splitcem._io import weights_sha256
    from splitcem.attacks.decoder import save_decoder
    from splitcem.experiment import ATTACK_DECODER

    record: dict[str, Any] = {
        "name": out.name,
        "defenses": stack.describe() if stack is not None else "none",
        "attacks": {**report.to_dict(), **times},  # seconds; cpu_seconds on a CPU
    }
    best = report.strongest_decoder()
    dec_path = out / ATTACK_DECODER
    if best is not None:  # what splitcem attack keeps for the lens
        label, decoder = best
        save_decoder(dec_path, decoder, {  # type: ignore[arg-type]
            "attack": label, "threat": report.result_threat.get(label),
            "metrics": dict(report.results[label].metrics),
            "checkpoint_sha256": weights_sha256(encoder)})
        record["attacks"]["saved_decoder"] = {"attack": label, "file": ATTACK_DECODER}
    else:
        dec_path.unlink(missing_ok=True)
        dec_path.with_suffix(".json").unlink(missing_ok=True)
    write_json(out / "metrics.json", record)
    grid = reports.save_reconstructions(out, report)
    lines = [f"# audit: {out.name}", "", f"- defenses: {record['defenses']}",
             f"- threat model(s): {', '.join(t.short for t in report.threats)}", "",
             report.table(), "", f"- {scoring_note(report)}"]
    if grid is not None:
        lines += ["", f"![reconstructions]({grid.name})", "",
                  "Top row: originals; below: one row per attack."]
    write_text(out / "summary.md", "\n".join(lines) + "\n")
