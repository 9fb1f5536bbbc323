"""The edge client: the client half as one ONNX graph (``splitcem export ... --onnx``).

The edge client (:func:`write_onnx`, ``splitcem export ... --onnx``) is the client half as
one ONNX graph, ``client.onnx``: images in [0, 1] (B, C, H, W) and the noise std as inputs,
normalisation, encoder and the Gaussian noise inside the graph, features out::

    sess = onnxruntime.InferenceSession("deploy/client.onnx")   # spec: deploy/spec.json
    z = sess.run(None, {"images": x01,                           # float32 (B, C, H, W)
                        "noise_sigma": np.float32(spec["defense"]["noise_sigma"])})[0]

``noise_sigma`` 0 gives the clean features. Stacks whose deployed transform is not Gaussian
noise (top-k, dropout, local DP) are refused for ONNX.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch
from torch import Tensor, nn

from splitcem.errors import ServingError
from splitcem.serving.halves import ClientHalf
from splitcem.serving.program import MAX_BATCH, ONNX_FILE

__all__ = ["export_cli", "write_onnx"]


class _Edge(nn.Module):
    """Images in [0, 1] and a noise std -> the features the client sends."""

    mean: Tensor
    std: Tensor

    def __init__(self, encoder: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.encoder = encoder
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, images: Tensor, noise_sigma: Tensor) -> Tensor:
        z = self.encoder((images - self.mean) / self.std).float()
        return z + noise_sigma * torch.randn_like(z)


def write_onnx(path: str | Path) -> Path:
    """Write ``client.onnx`` (the edge client) into a deployment and record it in its spec.

    Built from the deployment itself (:class:`~splitcem.serving.ClientHalf`), so it works
    for a run's export and for a BYO export alike.
    """
    import json

    from splitcem._io import atomic_write, write_text
    from splitcem.serving.deploy import SPEC_FILE, find_deploy_dir, read_spec, sha256_bytes

    d = find_deploy_dir(path)
    half = ClientHalf(d)
    other = [s["name"] for s in half.spec["defense"]["transforms"] if s["name"] != "noise"]
    if other:
        raise ServingError(f"--onnx exports Gaussian noise as the deployed transform only; "
                           f"this deployment also applies {', '.join(other)}: run it with "
                           "splitcem infer (torch) instead")
    img = half.spec["image"]
    edge = _Edge(half.encoder, list(img["mean"]), list(img["std"])).eval()
    x = torch.rand(2, half.channels, half.size, half.size,
                   generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    import contextlib
    import logging
    import warnings

    quiet = [logging.getLogger(n) for n in ("onnx_ir", "onnxscript", "torch.onnx")]
    levels = [lg.level for lg in quiet]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # the exporter's progress lines and notes
        for lg in quiet:
            lg.setLevel(logging.ERROR)
        prog = torch.onnx.export(edge, (x, torch.tensor(0.0)), dynamo=True, verbose=False,
                                 input_names=["images", "noise_sigma"],
                                 output_names=["features"],
                                 dynamic_shapes=({0: batch}, None))
    for lg, level in zip(quiet, levels, strict=True):
        lg.setLevel(level)
    if prog is None:  # pragma: no cover - dynamo=True always returns a program
        raise ServingError("torch.onnx.export returned nothing")
    buf = io.BytesIO()
    prog.save(buf)  # type: ignore[arg-type]
    data = buf.getvalue()
    def write(p: Path) -> None:
        p.write_bytes(data)

    atomic_write(d / ONNX_FILE, write)
    spec = read_spec(d)
    spec["files"]["client_onnx"] = {"path": ONNX_FILE, "sha256": sha256_bytes(data)}
    write_text(d / SPEC_FILE, json.dumps(spec, indent=2) + "\n")
    return d / ONNX_FILE


def export_cli(path: str | Path, out: str | Path | None = None, *, onnx: bool = False) -> Path:
    """``splitcem export PATH [--out DIR] [--onnx]``: export a run (then its edge client), or
    with ``--onnx`` add the edge client to an existing deployment (e.g. a BYO export)."""
    from splitcem.serving.deploy import SPEC_FILE, find_deploy_dir
    from splitcem.serving.export import export_run

    p = Path(path)
    if (p / "config.yaml").is_file() or not onnx:
        d = export_run(p, out)
    elif (find_deploy_dir(p) / SPEC_FILE).is_file():
        d = find_deploy_dir(p)
    else:
        raise ServingError(f"{p} is neither a run directory nor a deployment; export it first "
                           "(splitcem export RUN_DIR, or splitcem.export(...) in Python)")
    if onnx:
        write_onnx(d)
    return d
