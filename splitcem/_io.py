"""Small I/O helpers: atomic writes, so a crash never leaves a half-written file behind, and
a module's fingerprint."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["atomic_write", "load_checkpoint", "read_json_object", "save_checkpoint",
           "weights_sha256", "write_json", "write_text"]


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place.

    ``os.replace`` is atomic on POSIX and Windows, so readers see the old or the new file,
    never a torn one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        # mkstemp makes the file private (0600); give it the mode a plain open() would
        os.chmod(tmp, 0o666 & ~_umask())
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    """The process umask (reading it means setting it; restored at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text(path: str | Path, text: str) -> Path:
    """Atomically write a text file."""
    return atomic_write(path, lambda p: p.write_text(text))


def write_json(path: str | Path, obj: Any) -> Path:
    """Atomically write ``obj`` as indented JSON (NaN written as null-free strings is not
    attempted: callers pass finite numbers)."""
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json_object(path: str | Path) -> dict[str, Any] | None:
    """The JSON object in ``path``; ``None`` if it is missing, unreadable, not JSON or not an
    object (a half-written or foreign file is treated as absent)."""
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Atomically ``torch.save`` a checkpoint dict."""
    return atomic_write(path, lambda p: torch.save(state, p))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`, with a clear error if unusable."""
    from splitcem.errors import CheckpointError

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; train first (splitcem train CONFIG)")
    try:
        # weights_only=False: our checkpoints hold optimizer state, RNG states and dicts we
        # wrote ourselves. Do not load checkpoints from untrusted sources.
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # corrupt / truncated file
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); delete it and "
            "re-run without --resume, or resume from an earlier copy"
        ) from e


def weights_sha256(module: torch.nn.Module) -> str:
    """SHA-256 of a module's state (names, dtypes, shapes, values): the fingerprint an
    audit's saved decoder and a BYO deployment share, so the lens can tell they match."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
