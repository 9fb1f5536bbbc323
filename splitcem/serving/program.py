"""Architectures as programs: a half that loads without the user's Python code.

A deployment of a model splitcem did not build (:func:`splitcem.export`) cannot be rebuilt
from ``create_split_model`` arguments, so each half's *architecture* is saved as a
``torch.export`` program (``server.pt2`` / ``client.pt2``), exported from a copy of the
half whose parameters and buffers are all zeros, while its *weights* stay in the half's
``.safetensors`` file as for any deployment. Loading (:func:`build_half`) reads the
program's bytes, checks their SHA-256 against ``spec.json``, loads the program and then the
weights (strict: every name must match). Each side reads its own program only: the server
never opens ``client.pt2``.

The edge client (``client.onnx``) is :mod:`splitcem.serving.edge`.
"""

from __future__ import annotations

import copy
import io
import types
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from splitcem.errors import ServingError

__all__ = ["ONNX_FILE", "PROGRAM_FILES", "build_half", "program_bytes"]

#: the program file of each half, beside its .safetensors
PROGRAM_FILES = {"server": "server.pt2", "client": "client.pt2"}
ONNX_FILE = "client.onnx"
#: largest batch the programs accept (their batch dimension is dynamic up to this)
MAX_BATCH = 4096


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
