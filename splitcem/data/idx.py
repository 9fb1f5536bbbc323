"""MNIST / Fashion-MNIST in the IDX format (LeCun), gzipped or raw.

Header: two zero bytes, a dtype byte (0x08 = uint8), the number of dimensions, then one
big-endian uint32 size per dimension; then the raw data.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import PurePosixPath

import numpy as np

from splitcem.data._cache import Decoded
from splitcem.data._files import FileTree
from splitcem.errors import DataError, DatasetNotFoundError

__all__ = ["parse_idx", "read_idx_dataset"]

# split -> (images stem, labels stem); both the usual dashed names and Kaggle's dotted ones.
_STEMS = {
    "train": (("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
              ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte")),
    "test": (("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
             ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte")),
}


def parse_idx(data: bytes, where: str) -> np.ndarray:
    """Decode one IDX file (gzip detected by its magic bytes) to a uint8 array."""
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{where}: corrupt gzip stream ({e}); download the file again") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{where}: not an IDX file (bad magic bytes {data[:4]!r})")
    if data[2] != 0x08:
        raise DataError(f"{where}: IDX dtype byte 0x{data[2]:02x} unsupported (expected 0x08 "
                        "= uint8)")
    ndim = data[3]
    if ndim not in (1, 3) or len(data) < 4 + 4 * ndim:
        raise DataError(f"{where}: corrupt IDX header ({ndim} dimensions)")
    shape = tuple(int(s) for s in np.frombuffer(data, ">u4", count=ndim, offset=4))
    body = len(data) - 4 - 4 * ndim
    if body != int(np.prod(shape)):
        raise DataError(f"{where}: IDX header says shape {shape} ({int(np.prod(shape))} bytes) "
                        f"but {body} data bytes follow; the file is truncated or corrupt")
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape).copy()


def _find(tree: FileTree, stems: tuple[str, ...]) -> str | None:
    for n in tree.names:
        base = PurePosixPath(n).name
        if any(base in (s, s + ".gz") for s in stems):
            return n
    return None


def read_idx_dataset(tree: FileTree, classes: tuple[str, ...], splits: tuple[str, ...]
                     ) -> dict[str, Decoded]:
    """The requested ``splits`` of an MNIST-style dataset as (N, 28, 28, 1) uint8 images."""
    out: dict[str, Decoded] = {}
    for split in splits:
        img_stems, lab_stems = _STEMS[split]
        img, lab = _find(tree, img_stems), _find(tree, lab_stems)
        if img is None or lab is None:
            missing = img_stems[0] if img is None else lab_stems[0]
            raise DatasetNotFoundError(f"{tree.source}: no {missing}[.gz] for the {split} split")
        images = parse_idx(tree.read(img), tree.where(img))
        labels = parse_idx(tree.read(lab), tree.where(lab)).astype(np.int64)
        if images.ndim != 3 or labels.ndim != 1:
            raise DataError(f"{tree.where(img)}: expected (N, H, W) images and (N,) labels, got "
                            f"{images.shape} and {labels.shape}")
        if len(images) != len(labels):
            raise DataError(f"{tree.where(img)} holds {len(images)} images but "
                            f"{tree.where(lab)} holds {len(labels)} labels")
        if images.shape[1] != images.shape[2]:
            raise DataError(f"{tree.where(img)}: images are {images.shape[1:]}, not square")
        if len(labels) and labels.max() >= len(classes):
            raise DataError(f"{tree.where(lab)}: label {labels.max()} out of range for "
                            f"{len(classes)} classes")
        out[split] = Decoded(images[..., None], labels, classes)
    return out
