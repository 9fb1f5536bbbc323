"""Configs ship inside the package and are found by name; files still work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import splitcem
from splitcem.config import CONFIG_DIR, bundled_configs, resolve_config
from splitcem.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_configs_live_in_the_package_and_the_root_path_still_works():
    assert Path(splitcem.__file__).resolve().parent / "configs" == CONFIG_DIR
    names = bundled_configs()
    assert "cpu/cifar10_noise_cem" in names and "paper/cifar10" in names
    assert (REPO / "configs" / "cpu" / "cifar10.yaml").resolve() == names["cpu/cifar10"]
    assert not any(n.startswith("sweeps/") for n in names)  # sweep files are not run configs
    assert (CONFIG_DIR / "sweeps" / "cifar10_cpu.yaml").is_file()  # but they are bundled


@pytest.mark.parametrize("name", ["cifar10_noise_cem", "cpu/cifar10_noise_cem",
                                  "cifar10_noise_cem.yaml", "configs/cpu/cifar10_noise_cem"])
def test_bundled_config_by_name(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the repository: only the package's copy can match
    cfg = splitcem.load_config(name, ["train.epochs=2"])
    assert cfg.name == "cifar10_cpu_noise0.1_cem" and cfg.train.epochs == 2


def test_files_win_and_ambiguous_or_unknown_names_are_explained(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cifar10_noise_cem").write_text("name: mine\n")  # a file of that name wins
    assert splitcem.load_config("cifar10_noise_cem").name == "mine"
    with pytest.raises(ConfigError, match="ambiguous: cpu/cifar10, paper/cifar10"):
        resolve_config("cifar10")
    with pytest.raises(ConfigError, match="splitcem configs"):
        resolve_config("no_such_config")


def test_cli_lists_configs():
    out = subprocess.run([sys.executable, "-m", "splitcem.cli", "configs"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("cpu/cifar10_noise_cem "))
    assert "CIFAR-10 CPU protocol" in line
