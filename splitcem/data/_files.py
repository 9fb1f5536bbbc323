"""Uniform access to files in a directory or inside a .tar / .tar.gz / .zip archive.

Every reader (ImageFolder, TinyImageNet, CIFAR pickles, IDX) works on a :class:`FileTree`,
so each format is readable from a folder or an archive alike. Archives are streamed once
(a .tar.gz has no random access) and their members held in memory as bytes; that is a few
hundred MB at most for the datasets here, and only on a cache miss.
"""

from __future__ import annotations

import io
import os
import tarfile
import zipfile
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from splitcem.errors import DataError

__all__ = [
    "IMAGE_EXTENSIONS",
    "FileTree",
    "common_prefix",
    "decode_images",
    "is_archive",
    "open_tree",
    "probe_image",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp",
                    ".gif")
_ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".zip")


def is_archive(path: Path) -> bool:
    """Whether ``path`` is a file whose name says it is an archive we can read."""
    return path.is_file() and path.name.lower().endswith(_ARCHIVE_SUFFIXES)


def _hidden(name: str) -> bool:
    return any(p.startswith(".") or p == "__MACOSX" for p in PurePosixPath(name).parts)


class FileTree:
    """Files (and folders) under one root, by relative POSIX path.

    Attributes:
        source: The directory or archive this tree was read from.
        names: Sorted relative paths of regular files (hidden files skipped).
        dirs: Relative paths of folders, including ones that hold no file.
    """

    def __init__(self, source: Path, names: list[str], dirs: set[str]) -> None:
        self.source = source
        self.names = sorted(names)
        self.dirs = dirs
        self._name_set = frozenset(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self._name_set

    def read(self, name: str) -> bytes:
        """The bytes of file ``name``."""
        raise NotImplementedError

    def where(self, name: str) -> str:
        """A human-readable location of ``name`` for error messages."""
        return str(self.source / name)


class _DirTree(FileTree):
    def __init__(self, root: Path) -> None:
        names: list[str] = []
        dirs: set[str] = set()
        for dirpath, dirnames, filenames in os.walk(root):
            rel = Path(dirpath).relative_to(root).as_posix()
            dirnames[:] = [d for d in dirnames if not _hidden(d)]
            for d in dirnames:
                dirs.add(d if rel == "." else f"{rel}/{d}")
            for f in filenames:
                if not _hidden(f):
                    names.append(f if rel == "." else f"{rel}/{f}")
        super().__init__(root, names, dirs)

    def read(self, name: str) -> bytes:
        try:
            return (self.source / name).read_bytes()
        except OSError as e:
            raise DataError(f"cannot read {self.where(name)}: {e}") from e


class _MemTree(FileTree):
    """Archive members held in memory."""

    def __init__(self, source: Path, files: dict[str, bytes], dirs: set[str]) -> None:
        # Folders implied by member paths count as folders even without their own entry.
        for n in files:
            parts = PurePosixPath(n).parts
            dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))
        super().__init__(source, list(files), dirs)
        self._files = files

    def read(self, name: str) -> bytes:
        return self._files[name]

    def where(self, name: str) -> str:
        return f"{self.source} (member {name})"


def _clean(name: str) -> str:
    return PurePosixPath(name.lstrip("/")).as_posix().removeprefix("./")


def _read_tar(path: Path) -> _MemTree:
    files: dict[str, bytes] = {}
    dirs: set[str] = set()
    member = "(header)"
    try:
        with tarfile.open(path, "r|*") as tf:  # streaming: one pass over the compressed file
            for m in tf:
                member = m.name
                name = _clean(m.name)
                if not name or name == "." or _hidden(name):
                    continue
                if m.isdir():
                    dirs.add(name.rstrip("/"))
                elif m.isfile():
                    f = tf.extractfile(m)
                    files[name] = f.read() if f is not None else b""
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise DataError(
            f"cannot read archive {path} (at member {member}): {e}; the file is corrupt or "
            "truncated; download or copy it again"
        ) from e
    return _MemTree(path, files, dirs)


def _read_zip(path: Path) -> _MemTree:
    files: dict[str, bytes] = {}
    dirs: set[str] = set()
    member = "(header)"
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                member = info.filename
                name = _clean(info.filename)
                if not name or _hidden(name):
                    continue
                if info.is_dir():
                    dirs.add(name.rstrip("/"))
                else:
                    files[name] = zf.read(info)
    except (zipfile.BadZipFile, EOFError, zlib.error, OSError) as e:
        raise DataError(f"cannot read archive {path} (at member {member}): {e}; the file is "
                        "corrupt or truncated; download or copy it again") from e
    return _MemTree(path, files, dirs)


def open_tree(path: Path) -> FileTree:
    """A :class:`FileTree` over a directory or an archive file."""
    if path.is_dir():
        return _DirTree(path)
    if path.name.lower().endswith(".zip"):
        return _read_zip(path)
    return _read_tar(path)


def common_prefix(names: list[str], marker: str) -> str | None:
    """The folder holding file ``marker`` (e.g. ``wnids.txt``), '' for the root, or None."""
    hits = sorted((n for n in names if PurePosixPath(n).name == marker), key=len)
    if not hits:
        return None
    parent = PurePosixPath(hits[0]).parent.as_posix()
    return "" if parent == "." else parent


# ---------------------------------------------------------------- decoding

def _decode_one(data: bytes, where: str, mode: str, size: int) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format == "JPEG" and (im.width > 2 * size or im.height > 2 * size):
                im.draft(mode, (size, size))  # decode big JPEGs at reduced scale: much faster
            im = im.convert(mode)
            if im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except Exception as e:  # Pillow raises many types (OSError, SyntaxError, ValueError, ...)
        raise DataError(f"cannot decode image {where}: {e}; remove or replace the file") from e
    return arr.reshape(size, size, -1)


def _decode_chunk(args: tuple[list[bytes], list[str], str, int]) -> np.ndarray:
    blobs, wheres, mode, size = args
    out = np.empty((len(blobs), size, size, 1 if mode == "L" else 3), np.uint8)
    for i, (b, w) in enumerate(zip(blobs, wheres, strict=True)):
        out[i] = _decode_one(b, w, mode, size)
    return out


def _default_workers(n: int) -> int:
    env = os.environ.get("SPLITCEM_DECODE_WORKERS")
    if env:
        return max(1, int(env))
    cpus = os.cpu_count() or 1
    # A pool pays off only with spare cores and many images (start-up is ~0.1-0.5 s).
    return min(8, cpus // 2) if cpus >= 4 and n >= 20_000 else 1


def decode_images(tree: FileTree, names: list[str], *, mode: str, size: int,
                  workers: int | None = None) -> np.ndarray:
    """Decode ``names`` to a uint8 array (N, size, size, C), resizing where needed.

    Args:
        mode: Pillow mode, "RGB" (C = 3) or "L" (C = 1).
        workers: Processes to decode with; default 1 on small machines, else up to 8
            (override with env ``SPLITCEM_DECODE_WORKERS``).
    """
    if mode not in ("RGB", "L"):
        raise ValueError(f"mode must be 'RGB' or 'L', got {mode!r}")
    workers = _default_workers(len(names)) if workers is None else workers
    wheres = [tree.where(n) for n in names]
    blobs = [tree.read(n) for n in names]
    if workers <= 1 or len(names) < 2 * workers:
        return _decode_chunk((blobs, wheres, mode, size))
    step = -(-len(names) // (4 * workers))
    chunks = [(blobs[i:i + step], wheres[i:i + step], mode, size)
              for i in range(0, len(names), step)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        parts = list(pool.map(_decode_chunk, chunks))
    return np.concatenate(parts, axis=0)


def probe_image(tree: FileTree, name: str) -> tuple[str, int, int]:
    """(mode, width, height) of one image, to pick a dataset's channels and size."""
    try:
        with Image.open(io.BytesIO(tree.read(name))) as im:
            return im.mode, im.width, im.height
    except Exception as e:
        raise DataError(f"cannot decode image {tree.where(name)}: {e}; remove or replace the "
                        "file") from e
