"""Class-folder ("ImageFolder") datasets: ``[top/]{train,test}/<class>/<image>``.

Read from a folder or a .tar / .tar.gz / .zip of one; an optional single top-level folder
inside the archive is detected. ``val/`` stands in for a missing ``test/``. A layout without
split folders (``[top/]<class>/<image>``, e.g. FaceScrub as distributed) is split
deterministically: within each class, in file-name order, every fifth image goes to test.
Classes are the sorted folder names of the training split, as torchvision does.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import PurePosixPath

import numpy as np

from splitcem.data._cache import Decoded
from splitcem.data._files import IMAGE_EXTENSIONS, FileTree, decode_images, probe_image
from splitcem.errors import DataError

__all__ = ["TEST_EVERY", "choose_format", "read_image_folder"]

TEST_EVERY = 5  # split-less layouts: every 5th image of a class (by name) is a test image
_SPLIT_DIRS = ("train", "test", "val")


def _images(tree: FileTree) -> list[PurePosixPath]:
    return [PurePosixPath(n) for n in tree.names if n.lower().endswith(IMAGE_EXTENSIONS)]


def choose_format(tree: FileTree, mode: str | None, size: int | None, names: list[str]
                  ) -> tuple[str, int]:
    """Pillow mode ("RGB" / "L") and square size: given, or read off the first image."""
    if mode is None or size is None:
        m, w, h = probe_image(tree, names[0])
        mode = mode or ("L" if m in ("1", "L", "I", "I;16", "F") else "RGB")
        size = size or min(w, h)
    return mode, size


def _group(tree: FileTree, files: list[PurePosixPath], prefix: tuple[str, ...], depth: int
           ) -> dict[str, dict[str, list[str]]]:
    """split -> class -> sorted file names, for files at ``prefix/<split>/<class>/<file>``."""
    groups: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for p in files:
        if len(p.parts) != len(prefix) + depth or p.parts[:len(prefix)] != prefix:
            continue
        split = p.parts[-3] if depth == 3 else ""
        groups[split][p.parts[-2]].append(p.as_posix())
    return groups


def _check_empty(tree: FileTree, folder: str, classes: dict[str, list[str]]) -> None:
    """Raise if a class folder under ``folder`` holds no image."""
    depth = len(PurePosixPath(folder).parts) if folder else 0
    for d in sorted(tree.dirs):
        parts = PurePosixPath(d).parts
        inside = len(parts) == depth + 1 and (not folder or d.startswith(folder + "/"))
        if inside and parts[-1] not in classes:
            raise DataError(f"class folder {tree.where(d)} holds no image "
                            f"(accepted: {', '.join(IMAGE_EXTENSIONS)}); remove it or add "
                            "images")


def read_image_folder(tree: FileTree, *, mode: str | None = None, size: int | None = None
                      ) -> dict[str, Decoded]:
    """Both splits of a class-folder dataset, resized to ``size`` x ``size`` if given."""
    files = _images(tree)
    if not files:
        raise DataError(f"no images found in {tree.source}; expected train/<class>/<image> and "
                        "test/<class>/<image> (or <class>/<image>)")
    split_prefixes = Counter(p.parts[:-3] for p in files
                             if len(p.parts) >= 3 and p.parts[-3] in _SPLIT_DIRS)
    if split_prefixes:
        prefix = min(split_prefixes, key=len)
        groups = _group(tree, files, prefix, 3)
        test_dir = "test" if "test" in groups else "val"
        if "train" not in groups or test_dir not in groups:
            raise DataError(f"{tree.source}: found {sorted(groups)} folders; an image folder "
                            "needs both train/<class>/ and test/<class>/ (or val/<class>/)")
        top = "/".join(prefix)
        per_split = {"train": groups["train"], "test": groups[test_dir]}
        for split, d in (("train", "train"), ("test", test_dir)):
            _check_empty(tree, f"{top}/{d}" if top else d, per_split[split])
    else:
        prefixes = Counter(p.parts[:-2] for p in files if len(p.parts) >= 2)
        if not prefixes:
            raise DataError(f"{tree.source}: images lie directly in the root; put them in "
                            "class folders (<class>/<image>)")
        prefix = min(prefixes, key=len)
        (by_class,) = _group(tree, files, prefix, 2).values()
        _check_empty(tree, "/".join(prefix), by_class)
        per_split = {"train": defaultdict(list), "test": defaultdict(list)}
        for c, names in by_class.items():
            for i, n in enumerate(sorted(names)):
                per_split["test" if i % TEST_EVERY == TEST_EVERY - 1 else "train"][c].append(n)
            per_split["train"].setdefault(c, [])

    classes = tuple(sorted(per_split["train"]))
    unknown = sorted(set(per_split["test"]) - set(classes))
    if unknown:
        raise DataError(f"{tree.source}: test classes {unknown[:5]} have no training folder")
    index = {c: i for i, c in enumerate(classes)}
    first = next(n for c in classes for n in sorted(per_split["train"][c]))
    mode, size = choose_format(tree, mode, size, [first])
    out: dict[str, Decoded] = {}
    for split, by_class in per_split.items():
        names = [n for c in sorted(by_class) for n in sorted(by_class[c])]
        labels = np.array([index[c] for c in sorted(by_class) for _ in by_class[c]], np.int64)
        out[split] = Decoded(decode_images(tree, names, mode=mode, size=size), labels, classes)
    return out
