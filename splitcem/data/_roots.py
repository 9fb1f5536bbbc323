"""Where datasets are looked for when no ``root`` is given, and the not-found message.

Order: ``$SPLITCEM_DATA``, ``./data``, ``../shared/datasets`` (both relative to the current
directory), then ``data/`` and ``../shared/datasets`` relative to the repository root (the
parent of the ``splitcem`` package), then system folders such as Debian's
``/usr/share/datasets/fashion-mnist``. In each folder a dataset's usual names are tried
(``cifar-10-batches-py``, ``cifar10-jpeg.tar.gz``, ``FashionMNIST/raw``, ...).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from splitcem.errors import DatasetNotFoundError

__all__ = ["locate", "search_bases"]

_REPO = Path(__file__).resolve().parents[2]


def search_bases() -> list[Path]:
    """The folders searched, in order, when ``root`` is None (duplicates removed)."""
    env = os.environ.get("SPLITCEM_DATA")
    cwd = Path.cwd()
    raw = [Path(env).expanduser()] if env else []
    raw += [cwd / "data", cwd.parent / "shared" / "datasets", _REPO / "data",
            _REPO.parent / "shared" / "datasets"]
    out: list[Path] = []
    for p in raw:
        if p.resolve() not in {q.resolve() for q in out}:
            out.append(p)
    return out


def locate(name: str, root: str | os.PathLike | None, *, candidates: tuple[str, ...],
           accepts: Callable[[Path], bool], hint: str, system: tuple[str, ...] = ()) -> Path:
    """The file or folder holding dataset ``name``.

    With ``root`` given, ``root`` itself, then ``root/<candidate>`` and
    ``root/<candidate>/<candidate>`` are tried; else the search folders are. Raises
    :class:`DatasetNotFoundError` listing every place looked and how to get the data.
    """

    def probe(p: Path, depth: int) -> Path | None:
        if p.exists() and accepts(p):
            return p
        if depth and p.is_dir():
            for c in candidates:
                hit = probe(p / c, depth - 1)
                if hit is not None:
                    return hit
        return None

    wanted = ", ".join(candidates)
    if root is not None:
        r = Path(root).expanduser()
        if not r.exists():
            raise DatasetNotFoundError(f"{name}: {r} does not exist. {hint}")
        hit = probe(r, 2)
        if hit is None:
            raise DatasetNotFoundError(
                f"{name}: {r} holds no {name} data (looked at it and inside it for: {wanted}). "
                f"{hint}"
            )
        return hit
    bases = search_bases()
    for base in bases:
        for c in candidates:
            hit = probe(base / c, 1)
            if hit is not None:
                return hit
    for s in system:
        hit = probe(Path(s), 1)
        if hit is not None:
            return hit
    places = "; ".join(str(b) for b in bases) + (f"; {'; '.join(system)}" if system else "")
    raise DatasetNotFoundError(
        f"{name}: not found. Looked in {places} (set $SPLITCEM_DATA to add a folder) for any "
        f"of: {wanted}. {hint} Or pass root=<path>."
    )
