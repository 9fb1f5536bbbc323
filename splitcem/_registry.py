"""A tiny name -> factory registry (timm's ``@register_model``, Opacus's accountants).

Names are resolved once, at the edge (config loading, CLI); the rest of the code passes
objects around. Unknown names and unknown keyword arguments are errors that list what exists.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from splitcem.errors import ConfigError, UnknownNameError

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to factories (classes or functions) of one kind of object.

    Args:
        kind: What is registered ("defense", "attack", ...), used in error messages.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Callable[..., T]] = {}

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
        """Sorted registered names."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def get(self, name: str) -> Callable[..., T]:
        """The factory registered under ``name``; the error lists the known names."""
        try:
            return self._entries[name]
        except KeyError:
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
