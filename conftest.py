"""Session settings shared by the tests (tests/) and the doctests (splitcem/).

* The decoded-array cache of test runs is the repository's own ignored ``.cache/test-data``
  (``$SPLITCEM_TEST_CACHE`` overrides it), never the user's ``~/.cache/splitcem``: tests and
  CI write only inside the checkout. It persists between runs, so CIFAR-10 is decoded once.
* Doctests that load Fashion-MNIST (Debian's ``dataset-fashion-mnist``, which ``make test``
  installs) skip without it on a user's machine, and fail under CI (``CI=true``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
#: doctests (by qualified name prefix) that read Fashion-MNIST
NEEDS_FASHION = ("splitcem.data",)


def pytest_configure(config: pytest.Config) -> None:
    cache = Path(os.environ.get("SPLITCEM_TEST_CACHE", REPO / ".cache" / "test-data"))
    cache.mkdir(parents=True, exist_ok=True)
    # set before any test or doctest runs; subprocesses of tests inherit it
    os.environ["SPLITCEM_CACHE"] = str(cache)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if FASHION_DIR.exists() or os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        return
    skip = pytest.mark.skip(reason=f"{FASHION_DIR} not found (apt-get install "
                                   "dataset-fashion-mnist, or make data)")
    for item in items:
        if type(item).__name__ == "DoctestItem" and item.name.startswith(NEEDS_FASHION):
            item.add_marker(skip)
