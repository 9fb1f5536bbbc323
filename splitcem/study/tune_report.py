"""What a tune tells people: the recommended setting, its gain over noise alone at its
accuracy, the runner-up per family (``tune.md`` / ``tune.json``) and every trial on one plot
(``tune.png``). Reads only the tune's observations (the run record read them)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from splitcem._io import atomic_write, write_json, write_text
from splitcem.report import markdown_table
from splitcem.study.frontier import UNDECIDED, Comparison, baseline_curve, compare, within_reach
from splitcem.study.frontier_plan import sequential_level
from splitcem.study.space import NOISE, SearchSpace

if TYPE_CHECKING:
    from splitcem.study.tune import Observation, TuneResult

__all__ = ["Setting", "gain_over_noise", "recommend", "settings", "write"]


@dataclass
class Setting:
    """One point of the space with every seed it ran: seed means of what they measured."""

    family: str
    values: dict[str, Any]
    label: str
    runs: list[Observation]

    def _mean(self, k: str) -> float:
        v = [getattr(o, k) for o in self.runs]
        return float(np.mean(v)) if v else float("nan")

    @property
    def accuracy(self) -> float:
        return self._mean("accuracy")

    @property
    def mse(self) -> float:
        return self._mean("mse")

    @property
    def seeds(self) -> list[int]:
        return sorted(o.seed for o in self.runs)

    def cell(self) -> dict[int, tuple[float, float]]:
        return {o.seed: (o.accuracy, o.mse) for o in self.runs}

    def summary(self) -> dict[str, Any]:
        return {"family": self.family, "values": self.values, "label": self.label,
                "accuracy": self.accuracy, "mse": self.mse, "ssim": self._mean("ssim"),
                "psnr": self._mean("psnr"), "seeds": self.seeds,
                "run_dirs": [o.run_dir for o in self.runs]}


def settings(obs: Sequence[Observation], space: SearchSpace) -> list[Setting]:
    """The finished observations grouped by setting (family and values), in first-seen order."""
    out: dict[str, Setting] = {}
    for o in obs:
        if o.status != "finished" or not math.isfinite(o.mse):
            continue
        label = space.label(o.family, o.values)
        s = out.setdefault(label, Setting(o.family, dict(o.values), label, []))
        if all(r.seed != o.seed for r in s.runs):
            s.runs.append(o)
    return list(out.values())


def recommend(sets: Sequence[Setting], budget: float) -> list[Setting]:
    """Feasible settings (seed-mean accuracy >= budget), least leaky (highest MSE) first."""
    return sorted((s for s in sets if s.accuracy >= budget), key=lambda s: -s.mse)


def gain_over_noise(best: Setting, sets: Sequence[Setting], *, level: float = 0.95
                    ) -> Comparison | None:
    """``best``'s gain over the noise-alone frontier at its accuracy, with a ``level``
    interval (``None``: no noise settings, or ``best`` is one)."""
    base = {s.label: s.cell() for s in sets if s.family == NOISE and s is not best}
    if best.family == NOISE or not base:
        return None
    return compare(base, best.cell(), level=level)


def _plot(result: TuneResult, sets: Sequence[Setting], best: Setting | None,
          path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.8))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    fams = sorted({o.family for o in result.observations})
    colors = dict(zip(fams, ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e",
                             "#8c564b"] * 3, strict=False))
    for fam in fams:
        for feas, marker in ((True, "o"), (False, "x")):
            pts = [(100 * o.accuracy, o.mse) for o in result.observations
                   if o.family == fam and o.status == "finished"
                   and (o.accuracy >= result.budget) == feas]
            if pts:
                a, m = zip(*pts, strict=True)
                ax.scatter(a, m, marker=marker, color=colors[fam], s=36,
                           label=f"{fam} ({'feasible' if feas else 'infeasible'})")
    noise = {s.label: s.cell() for s in sets if s.family == NOISE}
    if noise:
        xs, ys = baseline_curve(noise)
        ax.plot(100 * xs, ys, color=colors.get(NOISE, "gray"), lw=1.5,
                label="noise alone (frontier)")
    ax.axvline(100 * result.budget, color="black", ls="--", lw=1,
               label=f"budget {100 * result.budget:.2f}%")
    if best is not None:
        ax.scatter([100 * best.accuracy], [best.mse], s=180, facecolors="none",
                   edgecolors="black", lw=1.5, label="recommended")
    stopped = sum(o.status == "stopped" for o in result.observations)
    ax.set_xlabel("test accuracy (%)  (higher = more useful)")
    ax.set_ylabel("worst-case attack MSE  (higher = more private)")
    ax.set_title(f"tune: {len(result.observations)} trials"
                 + (f", {stopped} stopped early (not shown)" if stopped else ""), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110))


def _fmt_values(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items()) or "-"


def write(result: TuneResult, space: SearchSpace, *, mode: str) -> dict[str, Any]:
    """Write ``tune.json``, ``tune.md`` and ``tune.png`` into the tune's folder."""
    sets = settings(result.observations, space)
    ranked = recommend(sets, result.budget)
    best = ranked[0] if ranked else None
    level = sequential_level(result.looks)
    cmp = gain_over_noise(best, sets, level=level) if best is not None else None
    runner: dict[str, Any] = {}
    for s in ranked[1:]:
        runner.setdefault(s.family, s.summary())
    chosen = best.runs[0].run_dir if best is not None else None
    ready = chosen is not None and (Path(chosen) / "checkpoints" / "last.pt").is_file()
    counts = {k: sum(o.status == k for o in result.observations)
              for k in ("finished", "stopped", "failed")}
    rep = {
        "budget": result.budget, "reference_accuracy": result.reference_accuracy,
        "mode": mode, "trials": len(result.observations), "counts": counts,
        "paid_this_call": len(result.ran),
        "warm_start": sum(o.source == "warm-start" for o in result.observations),
        "recommended": best.summary() if best is not None else None,
        "gain_over_noise": cmp.to_dict() if cmp is not None else None,
        "level": level, "looks": result.looks,
        "runner_up": runner, "chosen_run": chosen, "chosen_ready": ready,
        "stop_rule": result.rule.to_dict() if result.rule is not None else None,
        "observations": [asdict(o) for o in result.observations],
    }
    out = result.out
    write_json(out / "tune.json", rep)
    _plot(result, sets, best, out / "tune.png")
    lines = [f"# Tune: the least leaky setting within {100 * result.reference_accuracy:.2f}% "
             f"- {100 * (result.reference_accuracy - result.budget):.2f} points "
             f"= {100 * result.budget:.2f}% accuracy", "",
             f"{len(result.observations)} trials ({counts['finished']} finished, "
             f"{counts['stopped']} stopped early, {counts['failed']} failed; "
             f"{rep['warm_start']} from warm start), search `{mode}`.", ""]
    if best is None:
        lines += ["No trial reached the budget: no recommendation.", ""]
    else:
        lines += ["## Recommended", "", markdown_table(
            ["family", "setting", "accuracy", "worst MSE", "worst SSIM", "worst PSNR", "seeds"],
            [[best.family, _fmt_values(best.values), best.accuracy, best.mse,
              best.summary()["ssim"], best.summary()["psnr"],
              " ".join(map(str, best.seeds))]]), ""]
        if len(best.seeds) == 1:
            lines += [f"Its accuracy rests on one seed, {100 * (best.accuracy - result.budget):.2f}"
                      " points above the budget, and it was chosen for clearing the budget: "
                      "near the budget a one-seed recommendation is often truly below it "
                      "(docs/tune.md, \"One seed at the budget's edge\"). `--confirm-seeds N` "
                      "re-checks it on the mean of more seeds.", ""]
        if cmp is not None:
            iv = (f"[{100 * cmp.interval[0]:+.1f}%, {100 * cmp.interval[1]:+.1f}%]"
                  if cmp.interval else "none (one seed)")
            g = f"{100 * cmp.gain:+.1f}%" if cmp.gain is not None else "-"
            seq = (f", judged up to {result.looks} times while `--confirm-seeds` added seeds, "
                   "so that a false verdict stays at most 5% over all of them"
                   if result.looks > 1 else "")
            most, stop = result.looks + 1, ""  # --confirm-seeds
            if result.looks > 1 and cmp.verdict == UNDECIDED:
                if cmp.n_seeds >= most:
                    stop = f"; the confirmation stopped at the {most} seeds it was allowed"
                elif not within_reach(cmp, most):
                    stop = ("; the confirmation stopped: a decision is out of reach of "
                            f"`--confirm-seeds {most}` at this spread")
            lines += [f"Gain over noise alone at its accuracy: {g}, {100 * level:.4g}% "
                      f"interval{seq} {iv}, "
                      f"verdict **{cmp.verdict}** ({cmp.n_seeds} seed(s)"
                      + (f"; about {cmp.seeds_needed} more would decide it"
                         if cmp.seeds_needed else "") + stop + ").", ""]
        else:
            lines += ["Gain over noise alone: no comparison (the recommendation is noise "
                      "alone, or no noise setting ran).", ""]
        lines += [f"Chosen run: `{chosen}`"
                  + (f" (ready: `splitcem export {chosen}`, then `splitcem serve`)" if ready
                     else " (its checkpoint stayed on the node that trained it)"), ""]
    if runner:
        lines += ["## Runner-up per family", "", markdown_table(
            ["family", "setting", "accuracy", "worst MSE", "seeds"],
            [[f, _fmt_values(s["values"]), s["accuracy"], s["mse"],
              " ".join(map(str, s["seeds"]))] for f, s in runner.items()]), ""]
    lines += ["## Every trial", "", markdown_table(
        ["trial", "status", "source", "accuracy", "worst MSE", "feasible"],
        [[o.name, o.status, o.source, o.accuracy, o.mse,
          "yes" if o.feasible(result.budget) else "no"] for o in result.observations]),
        "", "A stopped trial's accuracy is its training accuracy at the epoch it stopped.", "",
        "![trials](tune.png)", ""]
    write_text(out / "tune.md", "\n".join(lines))
    return rep
