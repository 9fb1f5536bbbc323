"""Config validation: unknown keys and bad values are errors that name them."""

from __future__ import annotations

from pathlib import Path

import pytest

from splitcem.config import load_config
from splitcem.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_defaults_and_override():
    cfg = load_config({"train": {"epochs": 3}}, ["train.lr=0.1", "cem.lambda=0.2"])
    assert cfg.train.epochs == 3 and cfg.train.lr == 0.1
    assert cfg.cem is not None and cfg.cem.lam == 0.2
    assert cfg.to_dict()["cem"]["lambda"] == 0.2  # written back under its YAML name


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"train\.epoch: unknown key"):
        load_config({"train": {"epoch": 3}})
    with pytest.raises(ConfigError, match=r"trian: unknown key"):
        load_config({"trian": {}})


def test_bad_value_is_named():
    with pytest.raises(ConfigError, match=r"train\.lr"):
        load_config({"train": {"lr": -1}})
    with pytest.raises(ConfigError, match=r"cem\.form"):
        load_config({"cem": {"form": "magic"}})
    with pytest.raises(ConfigError, match="milestones"):
        load_config({"train": {"milestones": [5, 3]}})
    with pytest.raises(ConfigError, match="needs a 'name'"):
        load_config({"defenses": [{"sigma": 0.1}]})


def test_list_override_and_bad_override():
    cfg = load_config({"defenses": [{"name": "noise", "sigma": 0.1}]}, ["defenses.0.sigma=0.05"])
    assert cfg.defenses[0]["sigma"] == 0.05
    with pytest.raises(ConfigError, match="not an index"):
        load_config({"defenses": []}, ["defenses.3.sigma=1"])
    with pytest.raises(ConfigError, match=r"key\.sub=value"):
        load_config({}, ["train.epochs"])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {epochs: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


@pytest.mark.parametrize("path", sorted(p for p in (REPO / "configs").rglob("*.yaml")
                                         if "sweeps" not in p.parts),  # tests/test_frontier.py
                         ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    """Every shipped config parses, and its defenses and attacks exist with those parameters."""
    from splitcem.attacks.suite import parse_specs
    from splitcem.experiment import build_defenses

    cfg = load_config(path)
    build_defenses(cfg)
    parse_specs(cfg.attack.attacks)  # the suite's own validation (labels, init_from, params)


def test_the_fast_yaml_loader_reads_what_the_python_one_reads():
    """``load_config`` reads files with libyaml's loader where PyYAML has it: every shipped
    config and committed run config comes out as PyYAML's pure-Python ``SafeLoader`` reads
    it (the oracle), and the override copy leaves the caller's dict alone."""
    import yaml

    import splitcem.config as config

    files = sorted([*(REPO / "configs").rglob("*.yaml"),
                    *(REPO / "results").rglob("config.yaml")])
    assert len(files) > 50
    for f in files:
        text = f.read_text()
        assert yaml.load(text, Loader=config._SAFE_LOADER) == yaml.safe_load(text), f
    raw = {"defenses": [{"name": "noise", "sigma": 0.1}]}
    load_config(raw, ["defenses.0.sigma=0.2"])
    assert raw == {"defenses": [{"name": "noise", "sigma": 0.1}]}
