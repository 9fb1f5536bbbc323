"""The committed report says what the committed runs say: ``results/frontier/cifar10_cpu/
paper_table.md`` is :func:`~splitcem.study.paper.write_paper` of ``results/cifar10_cpu`` read
at the bundled sweep's looks, and the README's per-defense tables are its tables (no data, no
training: the run records only)."""

from __future__ import annotations

from pathlib import Path

import pytest

from splitcem.study.adaptive import looks
from splitcem.study.grid import expand, load_sweep
from splitcem.study.paper import write_paper
from splitcem.study.reproduce import sweep_file

REPO = Path(__file__).resolve().parents[1]
RUNS = Path("results") / "cifar10_cpu"
REPORT = REPO / "results" / "frontier" / "cifar10_cpu" / "paper_table.md"


def test_the_committed_paper_table_and_the_readme_are_what_the_committed_runs_say(
        tmp_path, monkeypatch):
    if not (REPO / RUNS).is_dir() or not REPORT.is_file():
        pytest.skip(f"{RUNS} or its report is not in this checkout")
    monkeypatch.chdir(REPO)  # the report names the folder as the command was given it
    n = looks(expand(load_sweep(sweep_file("cifar10", "cpu"))))
    rec = write_paper([RUNS], tmp_path, looks=n)
    assert (tmp_path / "paper_table.md").read_text() == REPORT.read_text(), (
        "results/frontier/cifar10_cpu/paper_table.md is stale: regenerate it with `splitcem "
        f"frontier results/cifar10_cpu --looks {n} --paper --out results/frontier/cifar10_cpu`")
    readme = (REPO / "README.md").read_text()
    for part, what in ((rec["table"], "per-defense CEM table"),
                       (rec["curves"], "table of defense curves against noise alone")):
        assert part in readme, (
            f"the README's {what} is not the committed one: copy it from "
            "results/frontier/cifar10_cpu/paper_table.md")
    assert (REPORT.parent / "defenses.png").is_file(), (
        "paper_table.md shows defenses.png, which is not committed: regenerate the report")
