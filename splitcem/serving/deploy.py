"""A deployment: the two halves of a trained split model as separate files, plus its spec.

``splitcem export RUN_DIR`` writes ``RUN_DIR/deploy/``::

    spec.json             what both sides must agree on (below), and the files' SHA-256
    server.safetensors    the server tail and classifier: keys "server.*" only
    client.safetensors    the client encoder ("client.*") and the state of the deployed
                          defense transforms ("defense.<i>.*")

The server needs only ``spec.json`` and ``server.safetensors`` (copy those two to the
server machine); the client only ``spec.json`` and ``client.safetensors``. Each half is
loaded by reading its file's bytes and parsing them with safetensors (tensors only, no
pickle), after checking the SHA-256 the spec records.

``spec.json`` holds: ``model_id`` (run name @ a hash of both files), ``model`` (the
:func:`~splitcem.models.create_split_model` arguments), ``image`` (channels, size, mean,
std: the client's input normalisation), ``classes``, ``features`` (shape, dtype), and the
``defense`` contract: the transforms the client applies before sending (``transforms``:
registered defense specs, run in eval mode) and their total Gaussian ``noise_sigma``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from splitcem.errors import ServingError

__all__ = [
    "CLIENT_FILE",
    "DEPLOY_DIR",
    "FORMAT",
    "SERVER_FILE",
    "SPEC_FILE",
    "contract",
    "find_deploy_dir",
    "read_half",
    "read_spec",
    "sha256_bytes",
]

DEPLOY_DIR = "deploy"
SPEC_FILE = "spec.json"
SERVER_FILE = "server.safetensors"
CLIENT_FILE = "client.safetensors"
FORMAT = "splitcem-deploy/1"
#: tensor-name prefix of each half; the loader refuses a file holding any other key
PREFIXES = {"server": ("server.",), "client": ("client.", "defense.")}


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def find_deploy_dir(path: str | Path) -> Path:
    """``path`` itself if it holds a spec.json, else ``path/deploy``."""
    path = Path(path)
    return path if (path / SPEC_FILE).is_file() else path / DEPLOY_DIR


def read_spec(path: str | Path) -> dict[str, Any]:
    """The spec of the deployment in ``path`` (a deploy directory or a run directory)."""
    d = find_deploy_dir(path)
    p = d / SPEC_FILE
    if not p.is_file():
        raise ServingError(f"no deployment in {path} (no {SPEC_FILE}); export the run first: "
                           "splitcem export RUN_DIR")
    try:
        spec = json.loads(p.read_text())
    except ValueError as e:
        raise ServingError(f"{p} is not valid JSON ({e}); re-export: splitcem export RUN_DIR"
                           ) from e
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        raise ServingError(f"{p} is not a {FORMAT} spec; re-export with this version of "
                           "splitcem: splitcem export RUN_DIR")
    return spec


def read_half(path: str | Path, half: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(spec, tensors) of one half (``"server"`` or ``"client"``) of a deployment.

    Reads exactly two files, ``spec.json`` and that half's ``.safetensors``; checks the
    file's SHA-256 against the spec and that every tensor name belongs to that half.
    """
    from safetensors.torch import load

    d = find_deploy_dir(path)
    spec = read_spec(d)
    name = SERVER_FILE if half == "server" else CLIENT_FILE
    p = d / name
    if not p.is_file():
        raise ServingError(f"{d} has no {name}; copy it beside {SPEC_FILE} or re-export "
                           "(splitcem export RUN_DIR)")
    data = p.read_bytes()  # a plain read: the process opens this file and nothing else
    want = spec.get("files", {}).get(half, {}).get("sha256")
    if sha256_bytes(data) != want:
        raise ServingError(f"{p} does not match {SPEC_FILE} (SHA-256 differs): the files come "
                           "from different exports; re-export: splitcem export RUN_DIR")
    try:
        tensors = load(data)
    except Exception as e:  # safetensors raises its own error types on corrupt bytes
        raise ServingError(f"{p} cannot be parsed ({type(e).__name__}: {e}); re-export") from e
    foreign = [k for k in tensors if not k.startswith(PREFIXES[half])]
    if foreign:
        raise ServingError(f"{p} holds tensors that are not the {half}'s ({foreign[:3]}...); "
                           "refusing to load it; re-export: splitcem export RUN_DIR")
    return spec, tensors


def contract(spec: dict[str, Any]) -> dict[str, Any]:
    """The fields a client and a server must agree on before features are sent."""
    return {
        "model_id": spec["model_id"],
        "feature_shape": list(spec["features"]["shape"]),
        "classes": list(spec["classes"]),
        "defense": {k: spec["defense"][k] for k in ("transforms", "noise_sigma")},
    }
