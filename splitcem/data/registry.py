"""Datasets by name: ``load_dataset("cifar10", "train")``, ``list_datasets()``.

Each registered entry is a function with explicit keyword arguments that finds the data
(``_roots``), returns the cached decoded arrays or decodes them (``_cache``, readers) and
wraps them with the dataset's :class:`DatasetInfo`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from splitcem._registry import Registry
from splitcem.data import _cache
from splitcem.data._cache import Decoded
from splitcem.data._files import FileTree, is_archive, open_tree
from splitcem.data._roots import locate
from splitcem.data.cifar import has_cifar_pickles, read_cifar_pickles
from splitcem.data.dataset import ArrayDataset
from splitcem.data.idx import read_idx_dataset
from splitcem.data.imagefolder import read_image_folder
from splitcem.data.info import NORMALIZATION, DatasetInfo
from splitcem.data.tinyimagenet import has_tinyimagenet, read_tinyimagenet
from splitcem.errors import ConfigError, DatasetNotFoundError

__all__ = ["DATASETS", "list_datasets", "load_dataset", "register_dataset"]

DATASETS: Registry[ArrayDataset] = Registry("dataset")
register_dataset = DATASETS.register

PathLike = str | os.PathLike | None
SPLITS = ("train", "test")

_FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                    "Sneaker", "Bag", "Ankle boot")


@dataclass(frozen=True)
class _Spec:
    """How to find and read one dataset."""

    name: str
    candidates: tuple[str, ...]
    accepts: Callable[[Path], bool]
    read: Callable[[FileTree, int | None], dict[str, Decoded]]
    hint: str
    system: tuple[str, ...] = ()


def _load(spec: _Spec, split: str, root: PathLike, cache_dir: PathLike,
          image_size: int | None) -> ArrayDataset:
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {SPLITS}, got {split!r}")
    if image_size is not None and image_size <= 0:
        raise ConfigError(f"image_size must be positive, got {image_size}")
    source = locate(spec.name, root, candidates=spec.candidates, accepts=spec.accepts,
                    hint=spec.hint, system=spec.system)
    cdir = Path(cache_dir).expanduser() if cache_dir is not None else _cache.default_cache_dir()
    fp = _cache.fingerprint(source)
    dec = _cache.load(_cache.cache_path(cdir, spec.name, split, fp, image_size))
    if dec is None:
        parts = spec.read(open_tree(source), image_size)
        for s, d in parts.items():
            _cache.save(_cache.cache_path(cdir, spec.name, s, fp, image_size), d)
        dec = parts[split]
    channels = dec.images.shape[3]
    mean, std = NORMALIZATION.get(spec.name, ((0.5,) * channels, (0.5,) * channels))
    info = DatasetInfo(spec.name, len(dec.classes), channels, dec.images.shape[1], mean, std,
                       dec.classes)
    return ArrayDataset(dec.images, dec.labels, info)


# ------------------------------------------------------------------ accept tests (cheap)

def _folder_ok(p: Path) -> bool:
    return is_archive(p) or (p.is_dir() and any(p.iterdir()))


def _split_dirs(p: Path) -> bool:
    return (p / "train").is_dir() and ((p / "test").is_dir() or (p / "val").is_dir())


def _cifar10_ok(p: Path) -> bool:
    return is_archive(p) or (p.is_dir() and ((p / "data_batch_1").is_file() or _split_dirs(p)))


def _cifar100_ok(p: Path) -> bool:
    return is_archive(p) or (p.is_dir() and (
        ((p / "train").is_file() and (p / "meta").is_file()) or _split_dirs(p)))


def _idx_ok(p: Path) -> bool:
    return is_archive(p) or (p.is_dir() and any(
        c.name.startswith("train-images") for c in p.iterdir()))


def _tiny_ok(p: Path) -> bool:
    return is_archive(p) or (p.is_dir() and (p / "wnids.txt").is_file())


# ------------------------------------------------------------------ readers

def _native(name: str, size: int | None, native: int) -> None:
    if size not in (None, native):
        raise ConfigError(f"{name} images are {native}x{native} in this format; image_size="
                          f"{size} is not supported (leave it unset)")


def _read_cifar(fine: bool) -> Callable[[FileTree, int | None], dict[str, Decoded]]:
    def read(tree: FileTree, size: int | None) -> dict[str, Decoded]:
        if has_cifar_pickles(tree, fine):
            _native("cifar100" if fine else "cifar10", size, 32)
            return read_cifar_pickles(tree, fine)
        return read_image_folder(tree, mode="RGB", size=size or 32)

    return read


def _read_idx(classes: tuple[str, ...]) -> Callable[[FileTree, int | None], dict[str, Decoded]]:
    def read(tree: FileTree, size: int | None) -> dict[str, Decoded]:
        _native("MNIST-style data", size, 28)
        return read_idx_dataset(tree, classes, SPLITS)

    return read


_CIFAR_HINT = ("Use the official cifar-10-python.tar.gz (or its extracted cifar-10-batches-py/) "
               "or a train/<class>/ + test/<class>/ image folder, .tar or .tar.gz; the shared "
               "copy is ../shared/datasets/cifar10-jpeg.tar.gz (see its README.md).")
_SPECS = {
    "cifar10": _Spec(
        "cifar10",
        ("cifar-10-batches-py", "cifar-10-python.tar.gz", "cifar10", "cifar-10", "CIFAR10",
         "cifar10-jpeg.tar.gz", "cifar10-jpeg"),
        _cifar10_ok, _read_cifar(False), _CIFAR_HINT),
    "cifar100": _Spec(
        "cifar100",
        ("cifar-100-python", "cifar-100-python.tar.gz", "cifar100", "cifar-100", "CIFAR100"),
        _cifar100_ok, _read_cifar(True),
        "Download cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html "
        "(pass the archive or its extracted cifar-100-python/ folder)."),
    "mnist": _Spec(
        "mnist", ("mnist", "MNIST", "MNIST/raw", "mnist/raw"), _idx_ok,
        _read_idx(tuple(str(i) for i in range(10))),
        "Put the four IDX files (train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
        "t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]) in a folder.",
        ("/usr/share/datasets/mnist",)),
    "fashion_mnist": _Spec(
        "fashion_mnist", ("fashion_mnist", "fashion-mnist", "FashionMNIST", "FashionMNIST/raw",
                          "fashion-mnist/raw"),
        _idx_ok, _read_idx(_FASHION_CLASSES),
        "Install it with `apt-get update && apt-get install -y dataset-fashion-mnist` (files "
        "go to /usr/share/datasets/fashion-mnist), or pass a folder with the four IDX files.",
        ("/usr/share/datasets/fashion-mnist",)),
    "facescrub": _Spec(
        "facescrub", ("facescrub", "FaceScrub", "facescrub.tar.gz", "facescrub.tar",
                      "facescrub.zip"),
        _folder_ok, lambda tree, size: read_image_folder(tree, mode="RGB", size=size or 48),
        "FaceScrub is not redistributable; download it (http://vintage.winklerbros.net/"
        "facescrub.html), crop the faces and arrange them as [train|test/]<person>/<image>."),
    "tinyimagenet": _Spec(
        "tinyimagenet", ("tiny-imagenet-200", "tinyimagenet", "tiny-imagenet-200.zip",
                         "tiny-imagenet-200.tar.gz", "tiny-imagenet-200.tar"),
        _tiny_ok, lambda tree, size: read_tinyimagenet(tree, size=size or 64),
        "Download tiny-imagenet-200.zip (http://cs231n.stanford.edu/tiny-imagenet-200.zip) "
        "and pass the zip or its extracted tiny-imagenet-200/ folder."),
}


def _tiny_or_folder(tree: FileTree, size: int | None) -> dict[str, Decoded]:
    """A generic image folder, or TinyImageNet's layout if ``wnids.txt`` marks it."""
    if has_tinyimagenet(tree):
        return read_tinyimagenet(tree, size=size or 64)
    return read_image_folder(tree, size=size)


@register_dataset("cifar10")
def cifar10(*, split: str = "train", root: PathLike = None, cache_dir: PathLike = None,
            image_size: int | None = None) -> ArrayDataset:
    """CIFAR-10: 32x32 RGB, 10 classes (pickle archive / folder, or an image folder / tar)."""
    return _load(_SPECS["cifar10"], split, root, cache_dir, image_size)


@register_dataset("cifar100")
def cifar100(*, split: str = "train", root: PathLike = None, cache_dir: PathLike = None,
             image_size: int | None = None) -> ArrayDataset:
    """CIFAR-100: 32x32 RGB, 100 fine classes (pickle archive / folder, or an image folder)."""
    return _load(_SPECS["cifar100"], split, root, cache_dir, image_size)


@register_dataset("mnist")
def mnist(*, split: str = "train", root: PathLike = None, cache_dir: PathLike = None,
          image_size: int | None = None) -> ArrayDataset:
    """MNIST: 28x28 grayscale digits from IDX files (gzipped or raw)."""
    return _load(_SPECS["mnist"], split, root, cache_dir, image_size)


@register_dataset("fashion_mnist")
def fashion_mnist(*, split: str = "train", root: PathLike = None, cache_dir: PathLike = None,
                  image_size: int | None = None) -> ArrayDataset:
    """Fashion-MNIST: 28x28 grayscale, 10 classes, IDX files (Debian dataset-fashion-mnist)."""
    return _load(_SPECS["fashion_mnist"], split, root, cache_dir, image_size)


@register_dataset("facescrub")
def facescrub(*, split: str = "train", root: PathLike = None, cache_dir: PathLike = None,
              image_size: int | None = None) -> ArrayDataset:
    """FaceScrub faces: class folders (one per person, 530 in the paper), resized to 48x48."""
    return _load(_SPECS["facescrub"], split, root, cache_dir, image_size)


@register_dataset("tinyimagenet")
def tinyimagenet(*, split: str = "train", root: PathLike = None, cache_dir: PathLike = None,
                 image_size: int | None = None) -> ArrayDataset:
    """TinyImageNet-200: 64x64 RGB, 200 classes; the labelled val split serves as test."""
    return _load(_SPECS["tinyimagenet"], split, root, cache_dir, image_size)


@register_dataset("imagefolder")
def imagefolder(*, split: str = "train", root: PathLike = None, cache_dir: PathLike = None,
                image_size: int | None = None) -> ArrayDataset:
    """Any class-folder dataset (folder / .tar / .tar.gz / .zip); ``root`` is required.

    Images are resized to ``image_size`` (default: the first image's shorter side);
    grayscale if the first image is, else RGB; normalised with mean = std = 0.5.
    """
    if root is None:
        raise DatasetNotFoundError("imagefolder needs root=<folder or archive> holding "
                        "train/<class>/<image> and test/<class>/<image> (or <class>/<image>)")
    spec = _Spec("imagefolder", (), _folder_ok, _tiny_or_folder,
                 "Expected train/<class>/<image> and test/<class>/<image> (or <class>/<image>).")
    return _load(spec, split, root, cache_dir, image_size)


def list_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset`, sorted."""
    return DATASETS.names()


def load_dataset(name: str, split: str = "train", *, root: PathLike = None,
                 cache_dir: PathLike = None, image_size: int | None = None) -> ArrayDataset:
    """Load one split of a registered dataset as uint8 arrays (decoded once, then cached).

    Args:
        name: One of :func:`list_datasets`.
        split: "train" or "test".
        root: The dataset's folder or archive (or a folder holding it); None searches the
            default places (``$SPLITCEM_DATA``, ``./data``, ``../shared/datasets``, ...).
        cache_dir: Decoded-array cache; default ``$SPLITCEM_CACHE`` or ``~/.cache/splitcem``.
        image_size: Resize folder-format images to this square size (dataset default if None).

    Example:
        >>> ds = load_dataset("fashion_mnist", "test")
        >>> ds.images.shape, ds.info.num_classes
        ((10000, 28, 28, 1), 10)
    """
    return DATASETS.create(name, split=split, root=root, cache_dir=cache_dir,
                           image_size=image_size)
