"""Deploy a model splitcem did not build: ``splitcem.export(client, server, out, ...)``.

It writes ``OUT/deploy/``, the directory ``splitcem export RUN_DIR`` writes for a run (so
``splitcem serve OUT``, ``splitcem infer OUT``, :class:`~splitcem.serving.Client` and, after
``splitcem.audit(..., out=OUT)``, ``splitcem lens OUT`` work on it), with each half's
architecture as a ``torch.export`` program (``server.pt2``, ``client.pt2``: no user code is
needed to load them) and its weights in safetensors. The client half is what the deployed
client computes: the encoder (a :class:`~splitcem.defenses.Protected` client's, with its
feature bound), then the defenses that transform the features (noise, top-k, ...), rebuilt
by name on the client.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from splitcem._io import weights_sha256
from splitcem.data.info import DatasetInfo
from splitcem.defenses.base import Defense
from splitcem.defenses.protect import Protected
from splitcem.errors import ConfigError
from splitcem.serving.deploy import DEPLOY_DIR
from splitcem.serving.edge import write_onnx
from splitcem.serving.export import transforms_features, write_deployment
from splitcem.serving.program import program_bytes

__all__ = ["defense_spec", "export"]


def defense_spec(d: Defense) -> dict[str, Any]:
    """``{"name": ..., **constructor arguments}`` that rebuilds ``d`` with create_defense."""
    params = inspect.signature(type(d).__init__).parameters
    return {"name": d.name, **{k: v for k, v in d.hparams().items() if k in params}}


def _in_01(x: Tensor) -> bool:
    return bool(x.numel()) and float(x.min()) >= -1e-3 and float(x.max()) <= 1 + 1e-3


def export(
    client: nn.Module,
    server: nn.Module,
    out: str | Path,
    *,
    example: Tensor,
    classes: Sequence[str] | int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    name: str = "byo",
    onnx: bool = False,
) -> Path:
    """Write a deployment of the user's own split model into ``OUT/deploy``.

    Args:
        client: A :class:`~splitcem.defenses.Protected` client (its encoder, feature bound
            and deployed transforms are exported) or a plain encoder.
        server: The server half.
        out: The directory that gets ``deploy/`` (use the ``out`` of ``splitcem.audit`` so
            the lens finds the audit's decoder beside it).
        example: A batch of images in [0, 1] (N, C, H, W), square, at the model's size.
        classes: Class names in label order, or their number.
        mean, std: The input normalisation the client applies (default: a Protected
            client's; none only when it was trained on images in [0, 1]).
        name: The model name in the spec (its id is ``name@hash``).
        onnx: Also write ``client.onnx``, the edge client (:mod:`splitcem.serving.edge`).

    Returns:
        The deployment directory ``OUT/deploy``.
    """
    encoder = client.encoder if isinstance(client, Protected) else client
    pairs: list[tuple[dict[str, Any], Defense]] = []
    bound = "none"
    if isinstance(client, Protected):
        mean = mean if mean is not None else (client.mean or None)
        std = std if std is not None else (client.std or None)
        pairs = [(defense_spec(d), d) for d in client.defenses if transforms_features(d)]
        bound = client.bound
        lo_hi = client.input_range
        if mean is None and std is None and lo_hi is not None and (
                lo_hi[0] < -1e-3 or lo_hi[1] > 1 + 1e-3):
            raise ConfigError(
                f"export: the client was trained on inputs in [{lo_hi[0]:.3g}, {lo_hi[1]:.3g}] "
                "(normalised?) but no mean=/std= was given; pass the normalisation")
    if example.dim() != 4 or example.shape[-1] != example.shape[-2]:
        raise ConfigError(f"export: example must be square images (N, C, H, H), got shape "
                          f"{tuple(example.shape)}")
    if not _in_01(example):
        raise ConfigError("export: example must be images in [0, 1] (before normalisation)")
    c, size = int(example.shape[1]), int(example.shape[-1])
    names = [str(i) for i in range(classes)] if isinstance(classes, int) else list(classes)
    info = DatasetInfo(name, len(names), c, size,
                       tuple(float(v) for v in mean) if mean is not None else (0.0,) * c,
                       tuple(float(v) for v in std) if std is not None else (1.0,) * c,
                       tuple(names))
    dev = next(iter(encoder.parameters()), torch.empty(0)).device
    x = info.normalize(example[:8].float().to(dev))
    saved = [(m, m.training) for m in [*encoder.modules(), *server.modules()]]
    try:
        encoder.eval()
        server.eval()
        with torch.no_grad():
            z = encoder(x).float()
            logits = server(z)
        if logits.dim() != 2 or logits.shape[1] != len(names):
            raise ConfigError(f"export: the server outputs shape {tuple(logits.shape[1:])} per "
                              f"image but {len(names)} classes were given")
        programs = {"client": program_bytes(encoder, x), "server": program_bytes(server, z)}
    finally:
        for m, was in saved:
            m.training = was
    model_spec = {"program": "torch.export", "arch": type(encoder).__name__,
                  "num_classes": len(names), "in_channels": c, "image_size": size,
                  "activation": bound}
    d = write_deployment(
        Path(out) / DEPLOY_DIR, client=encoder, server=server,
        feature_shape=tuple(z.shape[1:]), model_spec=model_spec, info=info, name=name,
        transforms=pairs, programs=programs,
        source={"byo": True, "checkpoint_sha256": weights_sha256(encoder)})
    if onnx:
        write_onnx(d)
    return d
