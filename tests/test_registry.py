"""The generic registry: names, duplicates, kwarg checking, error messages."""

from __future__ import annotations

import pytest

from splitcem._registry import Registry
from splitcem.errors import ConfigError, UnknownNameError


def test_register_create_and_errors():
    reg: Registry[object] = Registry("widget")

    @reg.register("b")
    def make_b(*, size: int = 1):
        """A widget of a size."""
        return ("b", size)

    @reg.register("a")
    class A:
        def __init__(self, *, x: int = 0) -> None:
            self.x = x

    assert reg.names() == ["a", "b"]
    assert reg.create("b", size=3) == ("b", 3)
    assert reg.doc("b") == "A widget of a size."
    with pytest.raises(UnknownNameError, match=r"unknown widget 'c'; known: a, b"):
        reg.get("c")
    with pytest.raises(ConfigError, match=r"has no parameter\(s\) 'sise'; accepted: size"):
        reg.create("b", sise=3)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a")(make_b)
    reg.register("a", force=True)(make_b)
    assert reg.create("a") == ("b", 1)
