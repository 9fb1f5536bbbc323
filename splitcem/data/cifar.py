"""CIFAR-10 / CIFAR-100 in the official python-pickle format.

``cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}`` and
``cifar-100-python/{train, test, meta}``, extracted or inside the official ``.tar.gz``.
The pickles are read with an allow-list unpickler (numpy arrays, builtins only), so a
tampered file cannot run code.
"""

from __future__ import annotations

import io
import pickle
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from splitcem.data._cache import Decoded
from splitcem.data._files import FileTree
from splitcem.errors import DataError

__all__ = ["has_cifar_pickles", "read_cifar_pickles"]

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")


def _unpickle(tree: FileTree, name: str) -> dict:
    try:
        obj = _SafeUnpickler(io.BytesIO(tree.read(name)), encoding="bytes").load()
    except Exception as e:
        raise DataError(f"cannot read CIFAR batch {tree.where(name)}: {e}; the file is "
                        "corrupt, download the archive again") from e
    if not isinstance(obj, dict):
        raise DataError(f"{tree.where(name)} is not a CIFAR batch (no dict inside)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _find(tree: FileTree, base: str) -> str | None:
    hits = sorted((n for n in tree.names if PurePosixPath(n).name == base), key=len)
    return hits[0] if hits else None


def has_cifar_pickles(tree: FileTree, fine: bool) -> bool:
    """Whether ``tree`` holds the CIFAR-100 (``fine``) or CIFAR-10 pickles."""
    if fine:
        return _find(tree, "meta") is not None and _find(tree, "train") is not None
    return _find(tree, "data_batch_1") is not None


def _batch(tree: FileTree, name: str, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    d = _unpickle(tree, name)
    if "data" not in d or label_key not in d:
        raise DataError(f"{tree.where(name)} lacks 'data' or '{label_key}'; not a CIFAR batch")
    data = np.asarray(d["data"], dtype=np.uint8)
    labels = np.asarray(d[label_key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{tree.where(name)}: data has shape {data.shape}, expected (N, 3072)")
    if len(labels) != len(data):
        raise DataError(f"{tree.where(name)}: {len(data)} images but {len(labels)} labels")
    # Rows are channel-planar (R plane, G plane, B plane): (N, 3, 32, 32) -> (N, 32, 32, 3).
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels


def read_cifar_pickles(tree: FileTree, fine: bool) -> dict[str, Decoded]:
    """Both splits of CIFAR-10 (``fine=False``) or CIFAR-100 (``fine=True``)."""
    if fine:
        meta_name, label_key, names_key = "meta", "fine_labels", "fine_label_names"
        files = {"train": ["train"], "test": ["test"]}
    else:
        meta_name, label_key, names_key = "batches.meta", "labels", "label_names"
        files = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    meta = _find(tree, meta_name)
    if meta is None:
        raise DataError(f"{tree.source}: no '{meta_name}' file; the CIFAR folder is incomplete")
    prefix = PurePosixPath(meta).parent.as_posix()
    classes = tuple(
        c.decode() if isinstance(c, bytes) else str(c) for c in _unpickle(tree, meta)[names_key]
    )
    out: dict[str, Decoded] = {}
    for split, names in files.items():
        parts = []
        for n in names:
            full = n if prefix == "." else f"{prefix}/{n}"
            if full not in tree:
                raise DataError(f"{tree.where(full)} is missing; the CIFAR folder is incomplete")
            parts.append(_batch(tree, full, label_key))
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        if len(labels) and labels.max() >= len(classes):
            raise DataError(f"{tree.source}: label {labels.max()} but only {len(classes)} "
                            "class names in the meta file")
        out[split] = Decoded(images, labels, classes)
    return out
