"""Entry point plugins: a third-party package adds defenses, models and attacks by name."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest
import torch

import splitcem
from splitcem._registry import Registry
from splitcem.attacks import ATTACKS
from splitcem.defenses import DEFENSES
from splitcem.errors import PluginError, UnknownNameError
from splitcem.experiment import build_defenses
from splitcem.models import MODELS, create_split_model

PLUGIN = Path(__file__).resolve().parent / "plugin_pkg"
TOY_EPS = {
    "splitcem.defenses": [("toy_uniform", "splitcem_toy_plugin:UniformNoise")],
    "splitcem.models": [("toy_cnn", "splitcem_toy_plugin:toy_cnn")],
    "splitcem.attacks": [("toy_attacks", "splitcem_toy_plugin.attacks")],
}


def _fake_entry_points(table):
    def entry_points(*, group: str):
        return [importlib.metadata.EntryPoint(name=n, value=v, group=group)
                for n, v in table.get(group, [])]

    return entry_points


@pytest.fixture
def toy_plugin(monkeypatch):
    """The toy plugin package (tests/plugin_pkg) as if pip-installed: importable, its entry
    points visible, and the global registries reloading plugins (restored afterwards)."""
    monkeypatch.syspath_prepend(str(PLUGIN))
    monkeypatch.setattr(importlib.metadata, "entry_points", _fake_entry_points(TOY_EPS))
    for reg in (DEFENSES, MODELS, ATTACKS):
        monkeypatch.setattr(reg, "_entries", dict(reg._entries))
        monkeypatch.setattr(reg, "_failed", {})
        monkeypatch.setattr(reg, "_plugins_loaded", False)
    yield
    import sys

    for mod in ("splitcem_toy_plugin", "splitcem_toy_plugin.attacks"):
        sys.modules.pop(mod, None)


def test_plugin_defense_model_and_attack_by_name(toy_plugin):
    assert "toy_uniform" in splitcem.list_defenses()
    d = splitcem.create_defense("toy_uniform", scale=0.2)
    assert d.name == "toy_uniform"  # named as the decorator would
    stack = build_defenses(splitcem.load_config({"defenses": [{"name": "toy_uniform"}]}))
    z = torch.zeros(2, 3)
    assert 0 < float(stack.transform(z).abs().max()) <= 0.1
    assert "toy_gray" in ATTACKS.names()
    m = create_split_model("toy_cnn", num_classes=4, image_size=8, cut="4",
                           bottleneck_channels=None, activation="none")
    assert m.feature_shape == (4, 4, 4) and m(torch.randn(2, 3, 8, 8)).shape == (2, 4)


def test_broken_plugin_warns_once_and_its_name_says_why(monkeypatch):
    reg: Registry[object] = Registry("widget", group="test.widgets")
    reg.register("builtin")(dict)
    monkeypatch.setattr(importlib.metadata, "entry_points", _fake_entry_points({
        "test.widgets": [("broken", "no_such_module_xyz:thing"), ("builtin", "builtins:list")],
    }))
    with pytest.warns(UserWarning) as w:
        names = reg.names()
    assert names == ["builtin"]
    msgs = sorted(str(x.message) for x in w)  # the clash with a built-in is refused too
    assert "no_such_module_xyz" in msgs[0] and "already registered" in msgs[1]
    with pytest.raises(PluginError, match=r"broken.*ModuleNotFoundError"):
        reg.get("broken")
    with pytest.raises(UnknownNameError):
        reg.get("other")
    assert reg.get("builtin") is dict
    assert set(reg.failed_plugins()) == {"broken", "builtin"}
