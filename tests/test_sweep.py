"""One command, several runs, one comparison: and a re-run reuses what is finished."""

from __future__ import annotations

import json

import pytest
import yaml

from splitcem.study.sweep import run_sweep
from splitcem.study.trials import Engine

#: the runs one after another in this process, no progress bars
LOOP = Engine(use_ray=False, progress=False)


@pytest.mark.slow
def test_sweep_compares_and_reuses(tiny_config, tmp_path):
    paths = []
    for name, defenses in (("plain", []), ("noisy", [{"name": "noise", "sigma": 0.3}])):
        p = tmp_path / f"{name}.yaml"
        p.write_text(yaml.safe_dump(
            tiny_config(name=name, defenses=defenses, train={"epochs": 1, "warmup_epochs": 0})
            .to_dict()))
        paths.append(p)
    out = tmp_path / "sweep"
    table = run_sweep(paths, out, baseline="plain", engine=LOOP)
    assert "| plain |" in table and "| noisy |" in table and "MSE vs baseline" in table
    for f in ("comparison.md", "comparison.json", "frontier.png"):
        assert (out / f).is_file(), f
    records = json.loads((out / "comparison.json").read_text())
    assert [r["name"] for r in records] == ["plain", "noisy"]
    assert all("history" not in r["train"] for r in records)
    ckpt = out / "plain" / "checkpoints" / "last.pt"
    before = ckpt.stat().st_mtime_ns
    assert run_sweep(paths, out, baseline="plain", engine=LOOP) == table  # reused
    assert ckpt.stat().st_mtime_ns == before
