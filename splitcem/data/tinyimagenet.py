"""TinyImageNet's standard layout (``tiny-imagenet-200/``), from a folder or an archive.

``wnids.txt`` lists the 200 class ids; ``train/<wnid>/images/*.JPEG`` are the training
images; ``val/images/*.JPEG`` labelled by ``val/val_annotations.txt`` serve as the test split
(the official test set has no labels). Classes are the sorted wnids, as an ImageFolder over
``train/`` orders them.
"""

from __future__ import annotations

from pathlib import PurePosixPath

import numpy as np

from splitcem.data._cache import Decoded
from splitcem.data._files import IMAGE_EXTENSIONS, FileTree, common_prefix, decode_images
from splitcem.errors import DataError

__all__ = ["has_tinyimagenet", "read_tinyimagenet"]


def has_tinyimagenet(tree: FileTree) -> bool:
    """Whether ``tree`` holds a ``wnids.txt`` (the TinyImageNet marker)."""
    return common_prefix(tree.names, "wnids.txt") is not None


def read_tinyimagenet(tree: FileTree, *, size: int = 64) -> dict[str, Decoded]:
    """Both splits (train, and val as test) as (N, size, size, 3) uint8 arrays."""
    prefix = common_prefix(tree.names, "wnids.txt")
    if prefix is None:
        raise DataError(f"{tree.source}: no wnids.txt; not the TinyImageNet layout")
    top = f"{prefix}/" if prefix else ""
    wnids_file = f"{top}wnids.txt"
    wnids = [w.strip() for w in tree.read(wnids_file).decode().split() if w.strip()]
    if not wnids:
        raise DataError(f"{tree.where(wnids_file)} lists no class")
    classes = tuple(sorted(set(wnids)))
    index = {c: i for i, c in enumerate(classes)}

    by_class: dict[str, list[str]] = {c: [] for c in classes}
    for n in tree.names:
        p = PurePosixPath(n)
        if (n.startswith(f"{top}train/") and len(p.parts) >= 4 and p.parts[-2] == "images"
                and n.lower().endswith(IMAGE_EXTENSIONS) and p.parts[-3] in by_class):
            by_class[p.parts[-3]].append(n)
    for c, names in by_class.items():
        if not names:
            raise DataError(f"class folder {tree.where(f'{top}train/{c}/images')} holds no image "
                            "(or is missing); the TinyImageNet copy is incomplete")
    train_names = [n for c in classes for n in sorted(by_class[c])]
    train_labels = np.array([index[c] for c in classes for _ in by_class[c]], np.int64)

    ann_file = f"{top}val/val_annotations.txt"
    if ann_file not in tree:
        raise DataError(f"{tree.where(ann_file)} is missing; the val split cannot be labelled")
    val: list[tuple[str, int]] = []
    for line_no, line in enumerate(tree.read(ann_file).decode().splitlines(), 1):
        fields = line.split("\t")
        if not line.strip():
            continue
        if len(fields) < 2 or fields[1] not in index:
            raise DataError(f"{tree.where(ann_file)} line {line_no}: cannot parse {line!r} "
                            "(expected <file>\\t<wnid>... with a wnid from wnids.txt)")
        name = f"{top}val/images/{fields[0]}"
        if name not in tree:
            raise DataError(f"{tree.where(name)} is listed in {ann_file} but missing")
        val.append((name, index[fields[1]]))
    val.sort()
    out = {
        "train": Decoded(decode_images(tree, train_names, mode="RGB", size=size), train_labels,
                         classes),
        "test": Decoded(decode_images(tree, [n for n, _ in val], mode="RGB", size=size),
                        np.array([lab for _, lab in val], np.int64), classes),
    }
    return out
