"""On-disk cache of decoded datasets (uint8 images, int64 labels, class names).

Keyed on the source path, its size and mtime (for a folder: those of its entries two levels
deep), the split, the target image size and a format version, so editing or replacing the
data invalidates it. Files are written atomically (temporary file + ``os.replace``), so an
interrupted run never leaves a half-written entry under the final name; an unreadable entry
is rebuilt with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

__all__ = ["Decoded", "cache_path", "default_cache_dir", "fingerprint", "load", "save"]

log = logging.getLogger(__name__)

_VERSION = 1  # bump when the decoding changes what a cached array holds


class Decoded(NamedTuple):
    """One decoded split: images (N, H, W, C) uint8, labels (N,) int64, class names."""

    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]


def default_cache_dir() -> Path:
    """``$SPLITCEM_CACHE`` or ``~/.cache/splitcem``."""
    env = os.environ.get("SPLITCEM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "splitcem"


def fingerprint(source: Path) -> list:
    """Path, size and mtime of ``source``; for a folder, of its entries up to depth 2."""
    source = source.resolve()
    st = source.stat()
    fp: list = [str(source), st.st_size, st.st_mtime_ns]
    if source.is_dir():
        for child in sorted(source.iterdir()):
            cst = child.stat()
            fp.append([child.name, cst.st_size, cst.st_mtime_ns])
            if child.is_dir():  # class folders: their mtime changes when files come or go
                fp.extend([f"{child.name}/{g.name}", g.stat().st_size, g.stat().st_mtime_ns]
                          for g in sorted(child.iterdir()))
    return fp


def cache_path(cache_dir: Path, name: str, split: str, fp: list, size: int | None) -> Path:
    """Where the cached ``split`` of dataset ``name`` from source ``fp`` lives."""
    key = json.dumps([_VERSION, name, split, size, fp], sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    return cache_dir / f"{name}-{split}-{digest}.npz"


def load(path: Path) -> Decoded | None:
    """The cached entry at ``path``; None if absent; None plus a warning if unreadable."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            images, labels, classes = z["images"], z["labels"], z["classes"]
            version = int(z["version"])
        ok = (version == _VERSION and images.dtype == np.uint8 and images.ndim == 4
              and labels.dtype == np.int64 and labels.shape == (len(images),)
              and classes.ndim == 1)
        if not ok:
            raise ValueError("unexpected arrays")
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        warnings.warn(f"dataset cache {path} is unreadable ({e}); rebuilding it",
                      RuntimeWarning, stacklevel=3)
        return None
    log.debug("dataset cache hit %s", path)
    return Decoded(images, labels, tuple(str(c) for c in classes))


def save(path: Path, data: Decoded) -> None:
    """Write ``data`` to ``path`` atomically; a failure only warns (the cache is optional)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, images=data.images, labels=data.labels,
                         classes=np.array(data.classes, dtype=str), version=np.int64(_VERSION))
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:
        warnings.warn(f"cannot write dataset cache {path} ({e}); continuing without it",
                      RuntimeWarning, stacklevel=3)
