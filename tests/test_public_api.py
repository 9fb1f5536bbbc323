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

    assert len(splitcem.__all__) <= 16  # 16th: export, the BYO deployment (issue 22)
    assert {"cem", "noise"} <= set(splitcem.list_defenses())


# what each package may not import (lazy imports included): dependencies point down the
# pipeline, so the maths of CEM knows no defense and the defenses know no attacker
FORBIDDEN = {
    "splitcem/cem": ("splitcem.defenses", "splitcem.attacks", "splitcem.train",
                     "splitcem.experiment"),
    "splitcem/defenses": ("splitcem.attacks", "splitcem.train", "splitcem.experiment"),
    "splitcem/models": ("splitcem.defenses", "splitcem.attacks", "splitcem.cem"),
    "splitcem/metrics.py": ("splitcem.defenses", "splitcem.attacks", "splitcem.cem"),
}


def _imports(path):
    import ast

    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.module
            yield from (f"{node.module}.{a.name}" for a in node.names)


@pytest.mark.parametrize("where", sorted(FORBIDDEN))
def test_layering(where):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    p = root / where
    files = sorted(p.rglob("*.py")) if p.is_dir() else [p]
    assert files
    bad = [(str(f.relative_to(root)), m) for f in files for m in _imports(f)
           if m.startswith(FORBIDDEN[where])]
    assert not bad, f"{where} must not import {bad}"
