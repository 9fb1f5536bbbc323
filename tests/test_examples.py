"""The examples run (at their tiny size, as CI runs them) and keep their promise of three
added lines."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


def test_the_own_loop_example_adds_exactly_three_marked_lines():
    src = (EXAMPLES / "byo_cifar10.py").read_text()
    marked = [line.strip() for line in src.splitlines() if re.search(r"###\s*\d\s*$", line)]
    assert len(marked) == 3, marked
    assert "splitcem.protect(" in marked[0]
    assert ".loss(y)" in marked[1] and ".epoch_end()" in marked[2]
    # nothing else in the loop touches the protected client beyond plain nn.Module calls
    loop = src.split("# ---- the user's own training loop")[1].split("# ---- what can")[0]
    extra = [ln for ln in loop.splitlines()
             if "client." in ln and "###" not in ln and "client.train()" not in ln]
    assert extra == []


def _run(script: str, cifar_tar, tmp_path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "SPLITCEM_EXAMPLES_TINY": "1"}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--root", str(cifar_tar),
         "--out", str(tmp_path / "out")],
        env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("script", ["byo_cifar10.py", "byo_cifar10_yaml.py"])
def test_examples_run_tiny(script, cifar_tar, tmp_path):
    out = _run(script, cifar_tar, tmp_path)
    assert 0.0 <= out["test_accuracy"] <= 1.0
    assert 0.0 < out["attack_mse"] < 0.5 and out["attack_psnr_db"] > 0
    report = tmp_path / "out" / "metrics.json"  # audit's report, or the YAML run's record
    assert json.loads(report.read_text())["attacks"]["worst"]["mse"]["value"] == \
        pytest.approx(out["attack_mse"])
