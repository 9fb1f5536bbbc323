"""A tiny name -> factory registry (timm's ``@register_model``, Opacus's accountants).

Names are resolved once, at the edge (config loading, CLI); the rest of the code passes
objects around. Unknown names and unknown keyword arguments are errors that list what exists.

Third-party packages add entries through an entry point group (``splitcem.defenses``,
``splitcem.attacks``, ``splitcem.models``), declared in their ``pyproject.toml``::

    [project.entry-points."splitcem.defenses"]
    uniform = "my_pkg.defenses:UniformNoise"   # an object: registered under "uniform"
    extras = "my_pkg.more_defenses"            # a module: registers its own on import

Plugins load lazily, the first time a registry is asked for its names or for an entry, so
``import splitcem`` stays fast. A plugin that fails to load is skipped with a warning, and
asking for its name raises :class:`~splitcem.errors.PluginError` saying why.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import types
import warnings
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from splitcem.errors import ConfigError, PluginError, UnknownNameError

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to factories (classes or functions) of one kind of object.

    Args:
        kind: What is registered ("defense", "attack", ...), used in error messages.
        group: Entry point group whose plugins add entries (``None``: no plugins).
        adopt: Called as ``adopt(name, obj)`` for objects registered from an entry point
            (e.g. to set a defense class's ``name`` as its decorator would).
    """

    def __init__(self, kind: str, *, group: str | None = None,
                 adopt: Callable[[str, Any], None] | None = None) -> None:
        self.kind = kind
        self.group = group
        self._adopt = adopt
        self._entries: dict[str, Callable[..., T]] = {}
        self._plugins_loaded = group is None
        self._failed: dict[str, str] = {}  # entry point name -> why it did not load

    def load_plugins(self) -> None:
        """Load the entry point group's plugins (once; called by every lookup)."""
        if self._plugins_loaded:
            return
        self._plugins_loaded = True  # first: a plugin's own imports must not recurse here
        for ep in importlib.metadata.entry_points(group=self.group or ""):
            dist = getattr(getattr(ep, "dist", None), "name", None) or "?"
            where = f"entry point {ep.name} = {ep.value!r} (group {self.group}, package {dist})"
            try:
                obj = ep.load()
                if not isinstance(obj, types.ModuleType):
                    if ep.name in self._entries and self._entries[ep.name] is not obj:
                        raise ValueError(f"{self.kind} {ep.name!r} is already registered")
                    self._entries[ep.name] = obj
                    if self._adopt is not None:
                        self._adopt(ep.name, obj)
            except Exception as e:  # any failure of third-party code: report, keep going
                why = f"{where} failed to load: {type(e).__name__}: {e}"
                self._failed[ep.name] = why
                warnings.warn(f"splitcem: {why}; fix or uninstall that package",
                              stacklevel=3)

    def failed_plugins(self) -> dict[str, str]:
        """Entry point name -> why its plugin did not load."""
        self.load_plugins()
        return dict(self._failed)

    def register(
        self, name: str, *, force: bool = False
    ) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator registering ``fn`` under ``name``; a duplicate raises unless ``force``."""

        def deco(fn: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries and not force:
                raise ValueError(
                    f"{self.kind} {name!r} is already registered; pass force=True to replace it"
                )
            self._entries[name] = fn
            return fn

        return deco

    def names(self) -> list[str]:
        """Sorted registered names (built-in and plugins')."""
        self.load_plugins()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        self.load_plugins()
        return name in self._entries

    def get(self, name: str) -> Callable[..., T]:
        """The factory registered under ``name``; the error lists the known names."""
        self.load_plugins()
        try:
            return self._entries[name]
        except KeyError:
            if name in self._failed:
                raise PluginError(f"{self.kind} {name!r} comes from a plugin that did not "
                                  f"load: {self._failed[name]}") from None
            known = ", ".join(self.names()) or "(none)"
            raise UnknownNameError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def create(self, name: str, /, **kwargs: Any) -> T:
        """Build the object registered under ``name`` from keyword arguments.

        Unknown keyword arguments raise a :class:`ConfigError` naming them and listing the
        accepted ones, so a typo in a YAML file is caught before any work starts.
        """
        fn = self.get(name)
        params = inspect.signature(fn).parameters
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            accepted = [
                n for n, p in params.items()
                if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and n != "self"
            ]
            unknown = sorted(set(kwargs) - set(accepted))
            if unknown:
                raise ConfigError(
                    f"{self.kind} {name!r} has no parameter(s) {', '.join(map(repr, unknown))}; "
                    f"accepted: {', '.join(accepted) or '(none)'}"
                )
        try:
            return fn(**kwargs)
        except TypeError as e:  # e.g. a missing required argument
            raise ConfigError(f"cannot create {self.kind} {name!r}: {e}") from e

    def doc(self, name: str) -> str:
        """First line of the registered factory's docstring (for listings)."""
        d = inspect.getdoc(self.get(name)) or ""
        return d.splitlines()[0] if d else ""
