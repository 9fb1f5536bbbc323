"""The top-level surface stays small and every name in ``__all__`` exists."""

from __future__ import annotations

import importlib

import pytest

PACKAGES = ["splitcem", "splitcem.data", "splitcem.models", "splitcem.defenses", "splitcem.cem",
            "splitcem.attacks", "splitcem.metrics", "splitcem.config", "splitcem.train",
            "splitcem.experiment", "splitcem.serving", "splitcem.lens"]


@pytest.mark.parametrize("name", PACKAGES)
def test_all_names_exist(name):
    mod = importlib.import_module(name)
    missing = [n for n in mod.__all__ if not hasattr(mod, n)]
    assert not missing, f"{name}.__all__ names missing attributes: {missing}"
    ns: dict = {}
    exec(f"from {name} import *", ns)  # the Opacus __all__ typo lesson
    assert set(mod.__all__) <= set(ns)


def test_top_level_is_small():
    import splitcem

    assert len(splitcem.__all__) <= 15
    assert {"cem", "noise"} <= set(splitcem.list_defenses())
