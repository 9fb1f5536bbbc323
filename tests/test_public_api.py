"""The top-level surface stays small and every name in ``__all__`` exists."""

from __future__ import annotations

import importlib

import pytest

PACKAGES = ["splitcem", "splitcem.data", "splitcem.models", "splitcem.defenses", "splitcem.cem",
            "splitcem.attacks", "splitcem.metrics", "splitcem.config", "splitcem.train",
            "splitcem.experiment", "splitcem.serving", "splitcem.lens", "splitcem.study",
            "splitcem.record", "splitcem.study.trials", "splitcem.study.grid"]


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
    # the evidence layer (splitcem.study) sits below the CLI and above experiment / train /
    # attacks: nothing under it imports it (or the CLI), and it never imports the CLI
    "splitcem/study": ("splitcem.cli",),
    **{where: ("splitcem.study", "splitcem.cli") for where in (
        "splitcem/experiment.py", "splitcem/train.py", "splitcem/attacks", "splitcem/report.py",
        "splitcem/record.py", "splitcem/runid.py", "splitcem/leakage.py", "splitcem/runtime.py",
        "splitcem/config.py", "splitcem/data", "splitcem/serving", "splitcem/lens")},
    # the one run record reads run directories for everyone, so it builds nothing itself
    **{where: ("splitcem.study", "splitcem.cli", "splitcem.experiment", "splitcem.train",
               "splitcem.attacks", "splitcem.report") for where in (
                   "splitcem/record.py", "splitcem/runid.py", "splitcem/provenance.py")},
    # the held-out estimate is used by the experiment: it must not import it back
    "splitcem/leakage.py": ("splitcem.study", "splitcem.cli", "splitcem.experiment"),
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


def _package(path, root):
    """The dotted package a file belongs to (``splitcem/study/grid.py`` -> splitcem.study)."""
    return ".".join(path.parent.relative_to(root).parts)


def test_no_module_imports_a_private_name_of_another_package():
    """``from splitcem.cem.kmeans import _sqdist`` in splitcem/leakage.py is what this
    forbids: a private (underscore) name belongs to its own package; import a public one."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    bad = []
    for f in sorted((root / "splitcem").rglob("*.py")):
        pkg = _package(f, root)
        for node in ast.walk(ast.parse(f.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.module and not node.level
                    and node.module.startswith("splitcem")):
                continue
            src = root.joinpath(*node.module.split("."))
            src_pkg = node.module if src.is_dir() else node.module.rsplit(".", 1)[0]
            for a in node.names:
                private = a.name.startswith("_") and not a.name.startswith("__")
                if private and src_pkg != pkg:
                    bad.append(f"{f.relative_to(root)}: from {node.module} import {a.name}")
    assert not bad, "private names imported across packages:\n" + "\n".join(bad)
