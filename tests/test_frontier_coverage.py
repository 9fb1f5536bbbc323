"""Coverage of the frontier's intervals, by simulation of the shipped study design
(:mod:`splitcem.study.frontier_sim`: the committed CIFAR-10 CPU study, with a per-seed effect shared
by every run of a seed). Pure numpy: seconds. Figures for other designs and for the old
percentile bootstrap: ``python benchmarks/frontier_coverage.py``."""

from __future__ import annotations

import pytest

from splitcem.study.frontier_sim import SHIPPED_SEEDS, coverage, unpaired


@pytest.mark.parametrize("gain", [0.0, 0.2])
@pytest.mark.parametrize("design", ["paired", "unpaired"])
def test_coverage_of_the_shipped_design(gain, design):
    r = coverage(gain, 2000, SHIPPED_SEEDS if design == "paired" else unpaired())
    # lambda 3 (3 seeds) gets an interval unless its accuracy falls outside the noise
    # curve (about 1% of studies: "no comparison", never a verdict); one-seed settings never
    assert r["with_interval"] >= 0.97 * 2000
    assert 0.93 <= r["coverage"] <= 0.97, r
    assert r["false_verdicts"] <= 0.05, r
    if gain:
        assert r["verdicts"] > 0.3, r  # and it can find a +20% gain (power)
