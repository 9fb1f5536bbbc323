"""Architectures as programs: a half that loads without the user's Python code.

A deployment of a model splitcem did not build (:func:`splitcem.export`) cannot be rebuilt
from ``create_split_model`` arguments, so each half's *architecture* is saved as a
``torch.export`` program (``server.pt2`` / ``client.pt2``), exported from a copy of the
half whose parameters and buffers are all zeros, while its *weights* stay in the half's
``.safetensors`` file as for any deployment. Loading (:func:`build_half`) reads the
program's bytes, checks their SHA-256 against ``spec.json``, loads the program and then the
weights (strict: every name must match). Each side reads its own program only: the server
never opens ``client.pt2``.

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

import copy
import hashlib
import io
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from splitcem.errors import ServingError

__all__ = ["ONNX_FILE", "PROGRAM_FILES", "OnnxClientHalf", "build_half", "export_cli",
           "program_bytes", "weights_sha256", "write_onnx"]

#: the program file of each half, beside its .safetensors
PROGRAM_FILES = {"server": "server.pt2", "client": "client.pt2"}
ONNX_FILE = "client.onnx"
#: largest batch the programs accept (their batch dimension is dynamic up to this)
MAX_BATCH = 4096


def weights_sha256(module: nn.Module) -> str:
    """SHA-256 of a module's state (names, dtypes, shapes, values): the fingerprint an
    audit's saved decoder and a BYO deployment share, so the lens can tell they match."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def program_bytes(module: nn.Module, example: Tensor) -> bytes:
    """``module``'s eval-mode forward as a ``torch.export`` program without its weights
    (exported from a zeroed copy), batch dimension dynamic, as bytes."""
    twin = copy.deepcopy(module).cpu().eval()
    with torch.no_grad():
        for t in [*twin.parameters(), *twin.buffers()]:
            t.zero_()
    x = example.detach().cpu()
    if x.shape[0] < 2:  # a batch of 1 would be specialised
        x = torch.cat([x, x])
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    try:
        ep = torch.export.export(twin, (x,), dynamic_shapes=({0: batch},))
    except Exception as e:  # torch.export raises many types; one line for the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ServingError(f"cannot export the {type(module).__name__} half as a program "
                           f"(torch.export: {first[:300]}); its forward must be traceable"
                           ) from e
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    return buf.getvalue()


def _no_mode_switch(gm: nn.Module) -> nn.Module:
    """A loaded program is fixed in eval mode; make ``.eval()`` / ``.train()`` no-ops."""
    gm.train = types.MethodType(lambda self, mode=True: self, gm)  # type: ignore[method-assign]
    gm.eval = types.MethodType(lambda self: self, gm)  # type: ignore[method-assign]
    return gm


def build_half(path: str | Path, spec: dict[str, Any], half: str) -> nn.Module:
    """The architecture of one half (weights not loaded): from its program file for a
    program deployment, else rebuilt with ``create_split_model(**spec["model"])``."""
    if not spec.get("model", {}).get("program"):
        from splitcem.models import create_split_model

        return getattr(create_split_model(**spec["model"]), half)
    from splitcem.serving.deploy import find_deploy_dir, sha256_bytes

    entry = spec.get("files", {}).get(f"{half}_program", {})
    p = find_deploy_dir(path) / str(entry.get("path", PROGRAM_FILES[half]))
    if not p.is_file():
        raise ServingError(f"{p.parent} has no {p.name}, the {half}'s architecture; copy it "
                           "beside spec.json or re-export")
    data = p.read_bytes()  # the only program this process opens
    if sha256_bytes(data) != entry.get("sha256"):
        raise ServingError(f"{p} does not match spec.json (SHA-256 differs); re-export")
    try:
        ep = torch.export.load(io.BytesIO(data))
    except Exception as e:  # a corrupt or incompatible program
        raise ServingError(f"{p} cannot be loaded ({type(e).__name__}: {e}); re-export with "
                           f"this torch ({torch.__version__})") from e
    return _no_mode_switch(ep.module())


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
    from splitcem.serving.client import ClientHalf
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


class OnnxClientHalf:
    """The client half run by onnxruntime on the CPU from ``client.onnx`` (no torch model):
    the same ``encode`` as :class:`~splitcem.serving.ClientHalf`."""

    def __init__(self, path: str | Path) -> None:
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise ServingError("the edge client needs onnxruntime: pip install "
                               "'splitcem[edge]'") from e
        from splitcem.serving.deploy import find_deploy_dir, read_spec, sha256_bytes

        d = find_deploy_dir(path)
        self.spec = read_spec(d)
        entry = self.spec.get("files", {}).get("client_onnx")
        if entry is None:
            raise ServingError(f"{d} has no {ONNX_FILE}; write it with splitcem export "
                               f"{path} --onnx")
        data = (d / entry["path"]).read_bytes()
        if sha256_bytes(data) != entry["sha256"]:
            raise ServingError(f"{d / entry['path']} does not match spec.json; re-export")
        self.session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        img = self.spec["image"]
        self.channels, self.size = int(img["channels"]), int(img["size"])
        self.sigma = float(self.spec["defense"]["noise_sigma"])

    def encode(self, x01: Tensor, *, defense: bool = True) -> Tensor:
        """(B, C, H, W) images in [0, 1] -> the features to send (noise on unless told)."""
        x = x01.detach().cpu().float().numpy()
        sigma = np.float32(self.sigma if defense else 0.0)
        out = self.session.run(None, {"images": x, "noise_sigma": np.asarray(sigma)})[0]
        return torch.from_numpy(np.ascontiguousarray(out))


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
