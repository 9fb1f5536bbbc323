"""Shared fixtures. Tests run on the CPU, single-threaded, with fixed seeds.

Tests that need real data from ``../shared/datasets`` skip with a reason on a user's machine
without it, but fail under CI (``CI=true``), where the data must be found.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = Path(os.environ.get("SPLITCEM_SHARED", REPO.parent / "shared")) / "datasets"
CIFAR_TAR = SHARED_DATASETS / "cifar10-jpeg.tar.gz"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# a package of its own (installed by .ci/package_check.sh); importing it while collecting
# (e.g. for doctests) would register its attack in the global registry for every test
collect_ignore = ["plugin_pkg"]


def need(path: Path, how: str) -> Path:
    """Return ``path`` if it exists; otherwise skip (user machine) or fail (CI)."""
    if path.exists():
        return path
    msg = f"{path} not found ({how})"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI must have the shared data: {msg}")
    pytest.skip(msg)


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """The user's decoded-array cache, shared across sessions (decoding CIFAR takes seconds).

    Safe to share: entries are keyed on the source file's path, size and mtime, and are
    written atomically; tests of the cache itself use their own temporary folders.
    """
    return Path(os.environ.get("SPLITCEM_CACHE", Path.home() / ".cache" / "splitcem"))


@pytest.fixture(scope="session")
def cifar_tar() -> Path:
    return need(CIFAR_TAR, "the shared CIFAR-10 JPEG archive; see ../shared/datasets/README.md")


@pytest.fixture(scope="session")
def cifar_splits(cifar_tar, cache_dir):
    """A few hundred real CIFAR-10 images: 512 train, 256 test (230 aux / 26 eval)."""
    from splitcem.data import make_splits

    return make_splits(
        "cifar10", root=cifar_tar, seed=0, limit_train=512, limit_test=256, cache_dir=cache_dir
    )


@pytest.fixture(scope="session")
def fashion_dir() -> Path:
    return need(FASHION_DIR, "apt-get install dataset-fashion-mnist")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_config(cifar_tar, cache_dir):
    """Factory of small real run configs: 256 CIFAR-10 training images, quarter widths.

    ``tiny_config(**sections)`` merges each given section into the defaults, e.g.
    ``tiny_config(defenses=[{"name": "noise", "sigma": 0.1}], cem={"lambda": 0.1})``.
    """
    from splitcem.config import load_config

    def make(**sections):
        raw = {
            "name": "tiny",
            "seed": 0,
            "device": "cpu",
            "data": {"name": "cifar10", "root": str(cifar_tar), "limit_train": 256,
                     "limit_test": 128, "cache_dir": str(cache_dir)},
            "model": {"client_width": 0.25, "server_width": 0.25},
            "train": {"epochs": 2, "batch_size": 64, "lr": 0.05, "warmup_epochs": 1,
                      "milestones": [2]},
            "attack": {"attacks": [{"name": "decoder", "epochs": 2, "width": 16, "depth": 1}]},
        }
        for key, val in sections.items():
            if isinstance(val, dict) and isinstance(raw.get(key), dict):
                raw[key] = {**raw[key], **val}
            else:
                raw[key] = val
        return load_config(raw)

    return make
