"""Old import paths of modules that moved, kept for one release with a DeprecationWarning.

The evidence layer moved into :mod:`splitcem.study` (0.2): ``import splitcem.trials`` and
``from splitcem.frontier import matched_gain`` still work and warn once per module; no file
is left at the old paths (an import hook maps the names), so nothing is defined twice.
Remove this module (and its install in ``splitcem/__init__.py``) in the next release.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType

#: old module -> new module
MOVED = {f"splitcem.{m}": f"splitcem.study.{m}" for m in (
    "grid", "trials", "frontier", "frontier_report", "reproduce", "sweep", "demo")}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the old names and hands back the new module object itself."""

    def find_spec(self, name: str, path: object = None,
                  target: object = None) -> importlib.machinery.ModuleSpec | None:
        if name not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(name, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        new = MOVED[spec.name]
        warnings.warn(f"{spec.name} moved to {new}; the old path goes in the next release",
                      DeprecationWarning, stacklevel=2)
        return importlib.import_module(new)

    def exec_module(self, module: ModuleType) -> None:
        """The new module is already executed."""


def install() -> None:
    """Put the alias finder on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.insert(0, _Alias())  # before an editable install's own finder
