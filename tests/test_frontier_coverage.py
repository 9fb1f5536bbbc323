"""Coverage of the frontier's intervals, by simulation of the shipped study design.

The committed CIFAR-10 CPU study (results/cifar10_cpu): noise sigma 0.1 / 0.15 / 0.2 on seeds
125 and 126, sigma 0.3 on 125; noise 0.1 + CEM lambda 1 and 10 on 125, lambda 3 on 125-127.
Each simulated study draws every run's accuracy and worst-case MSE around the committed seed
means, with a per-seed effect shared by every run of that seed (on log MSE and on accuracy)
and a per-run spread of 2-8% on MSE (3-10% in all with the seed effect), then compares each
CEM setting with :func:`splitcem.frontier.compare`. The true gain is measured against the
piecewise-linear frontier through the noise settings' true points. Pure numpy: seconds.
"""

from __future__ import annotations

import numpy as np
import pytest

from splitcem.frontier import LESS, MORE, compare

#: true (accuracy, MSE) of the noise settings: the committed seed means
BASE_TRUE = {0.1: (0.7928, 0.00947), 0.15: (0.78395, 0.01092), 0.2: (0.7717, 0.01262),
             0.3: (0.7504, 0.01600)}
#: true accuracy of the CEM settings (noise 0.1 + lambda)
CEM_ACC = {1.0: 0.7912, 3.0: 0.7855, 10.0: 0.7587}
SHIPPED_SEEDS = {"base": {0.1: [125, 126], 0.15: [125, 126], 0.2: [125, 126], 0.3: [125]},
                 "cem": {1.0: [125], 3.0: [125, 126, 127], 10.0: [125]}}


def frontier_true(acc: float) -> float:
    a, m = zip(*sorted(BASE_TRUE.values()), strict=True)
    return float(np.interp(acc, a, m))


def unpaired_seeds() -> dict[str, dict[float, list[int]]]:
    """The shipped design's seed counts, every run on a seed of its own (nothing to pair)."""
    nxt = iter(range(1000, 2000))
    return {part: {k: [next(nxt) for _ in s] for k, s in cells.items()}
            for part, cells in SHIPPED_SEEDS.items()}


def simulate(rng: np.random.Generator, gain: float, seeds=SHIPPED_SEEDS, *, seed_sd=0.05,
             seed_acc_sd=0.002, run_acc_sd=0.003):
    """One study: (baseline cells, CEM cells), each ``{key: {seed: (acc, mse)}}``."""
    all_seeds = sorted({s for part in seeds.values() for c in part.values() for s in c})
    u = dict(zip(all_seeds, rng.normal(0, seed_sd, len(all_seeds)), strict=True))
    v = dict(zip(all_seeds, rng.normal(0, seed_acc_sd, len(all_seeds)), strict=True))
    truth = {("base", k): p for k, p in BASE_TRUE.items()}
    truth |= {("cem", k): (a, (1 + gain) * frontier_true(a)) for k, a in CEM_ACC.items()}
    out: dict[str, dict[float, dict[int, tuple[float, float]]]] = {"base": {}, "cem": {}}
    for part, cells in seeds.items():
        for k, ss in cells.items():
            a0, m0 = truth[(part, k)]
            run_sd = rng.uniform(0.02, 0.08)  # this setting's own seed-to-seed spread
            out[part][k] = {s: (a0 + v[s] + rng.normal(0, run_acc_sd),
                                m0 * np.exp(u[s] + rng.normal(0, run_sd))) for s in ss}
    return out["base"], out["cem"]


def rates(gain: float, n: int = 2000, seeds=SHIPPED_SEEDS, paired: bool | None = None,
          rng_seed: int = 20261201) -> dict[str, float]:
    """Coverage and false-verdict rates over ``n`` studies (settings with an interval)."""
    rng = np.random.default_rng(rng_seed)
    covered = false = with_interval = verdicts = 0
    for _ in range(n):
        base, cem = simulate(rng, gain, seeds)
        for cell in cem.values():
            c = compare(base, cell, paired=paired)
            if c.interval is None:
                continue
            with_interval += 1
            covered += c.interval[0] <= gain <= c.interval[1]
            verdicts += c.decided
            false += c.verdict == LESS if gain > 0 else c.decided
            if gain < 0:
                false += c.verdict == MORE
    return {"coverage": covered / with_interval, "false_verdicts": false / with_interval,
            "verdicts": verdicts / with_interval, "with_interval": with_interval}


@pytest.mark.parametrize("gain", [0.0, 0.2])
@pytest.mark.parametrize("design", ["paired", "unpaired"])
def test_coverage_of_the_shipped_design(gain, design):
    seeds = SHIPPED_SEEDS if design == "paired" else unpaired_seeds()
    r = rates(gain, 2000, seeds)
    # lambda 3 (3 seeds) gets an interval unless its accuracy falls outside the noise
    # curve (about 1% of studies: "no comparison", never a verdict); the one-seed settings never
    assert r["with_interval"] >= 0.97 * 2000
    assert 0.93 <= r["coverage"] <= 0.97, r
    assert r["false_verdicts"] <= 0.05, r
