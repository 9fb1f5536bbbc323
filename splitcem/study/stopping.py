"""Early stopping of tune trials that cannot reach the accuracy budget, by a rule learned from
finished runs' accuracy histories (``metrics.json`` ``train.history``).

For each epoch ``e`` before the last, the rule records the largest rise any finished run made
from its epoch-``e`` training accuracy to its final test accuracy (``margin[e]``); a trial is
stopped after epoch ``e`` only if even that rise, plus a ``slack``, leaves it below the
budget::

    stop  <=>  train_accuracy[e] + margin[e] + slack < budget

By construction it never stops a run it learned from that finished within the budget (its own
rise is at most ``margin[e]``); :meth:`StopRule.check` tests that on any set of histories.
Epochs no finished run has a history for are never stopped at, and neither is the last: a
rule learned from no runs stops nothing. Only runs with the same number of epochs as the
trial teach it (an epoch of a 2-epoch schedule is not an epoch of a 10-epoch one).

The rule is plain data (:meth:`StopRule.to_dict`), so it travels to a Ray worker, where the
trainer's epoch hook applies it (:func:`splitcem.study.execute.run_trial`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["StopRule", "TrialStopped", "learn_rule"]

#: the per-epoch accuracy the rule reads (present in every epoch of every history)
EPOCH_KEY = "train_accuracy"


class TrialStopped(Exception):
    """Raised by the epoch hook when a trial cannot reach the budget."""

    def __init__(self, epoch: int, accuracy: float, reason: str) -> None:
        super().__init__(reason)
        self.epoch, self.accuracy, self.reason = epoch, accuracy, reason


def _final(metrics: Mapping[str, Any]) -> tuple[list[dict[str, Any]], float] | None:
    tr = metrics.get("train") or {}
    hist, acc = tr.get("history"), tr.get("test_accuracy")
    if not isinstance(hist, list) or not hist or not isinstance(acc, int | float):
        return None
    return hist, float(acc)


@dataclass(frozen=True)
class StopRule:
    """Stop after epoch ``e`` (1-based) when ``acc + margins[e] + slack < budget``.

    Attributes:
        budget: The accuracy (fraction) a trial must reach to be feasible.
        epochs: The schedule length the rule was learned for.
        margins: Epoch (1-based, ``< epochs``) -> the largest rise seen to the final accuracy.
        slack: Added to every margin (a run may rise a little more than any seen).
        runs: How many finished runs it was learned from.
    """

    budget: float
    epochs: int
    margins: dict[int, float] = field(default_factory=dict)
    slack: float = 0.02
    runs: int = 0

    def should_stop(self, epoch: int, accuracy: float) -> bool:
        """Whether a trial whose epoch ``epoch`` (1-based) reached ``accuracy`` is hopeless."""
        if epoch >= self.epochs or epoch not in self.margins:
            return False
        return accuracy + self.margins[epoch] + self.slack < self.budget

    def first_stop(self, history: Sequence[Mapping[str, Any]]) -> int | None:
        """The epoch (1-based) this rule would stop a run with ``history`` at, else ``None``."""
        for i, rec in enumerate(history, start=1):
            acc = rec.get(EPOCH_KEY)
            if isinstance(acc, int | float) and self.should_stop(i, float(acc)):
                return i
        return None

    def check(self, runs: Sequence[Mapping[str, Any]]) -> list[str]:
        """Runs (``metrics.json`` dicts) that finished within the budget but that this rule
        would have stopped: must be empty for the runs it learned from."""
        bad = []
        for m in runs:
            got = _final(m)
            if got is None or len(got[0]) != self.epochs or got[1] < self.budget:
                continue
            at = self.first_stop(got[0])
            if at is not None:
                bad.append(f"{m.get('name')}: stopped at epoch {at}, finished at {got[1]:.4f}")
        return bad

    def on_epoch(self, record: Mapping[str, Any]) -> None:
        """The trainer's epoch hook: raise :class:`TrialStopped` if the trial is hopeless."""
        epoch, acc = int(record.get("epoch", 0)), record.get(EPOCH_KEY)
        if isinstance(acc, int | float) and self.should_stop(epoch, float(acc)):
            raise TrialStopped(epoch, float(acc), (
                f"epoch {epoch}: train accuracy {acc:.4f} + the largest rise seen "
                f"{self.margins[epoch]:.4f} + slack {self.slack:g} < budget {self.budget:.4f}"))

    def to_dict(self) -> dict[str, Any]:
        return {"budget": self.budget, "epochs": self.epochs, "slack": self.slack,
                "runs": self.runs, "margins": {str(k): v for k, v in self.margins.items()}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StopRule:
        return cls(float(d["budget"]), int(d["epochs"]),
                   {int(k): float(v) for k, v in (d.get("margins") or {}).items()},
                   float(d.get("slack", 0.02)), int(d.get("runs", 0)))


def learn_rule(runs: Sequence[Mapping[str, Any]], *, budget: float, epochs: int,
               slack: float = 0.02) -> StopRule:
    """The rule learned from finished runs (``metrics.json`` dicts) of ``epochs`` epochs."""
    margins: dict[int, float] = {}
    used = 0
    for m in runs:
        got = _final(m)
        if got is None or len(got[0]) != epochs:
            continue
        hist, final = got
        used += 1
        for i, rec in enumerate(hist[:-1], start=1):
            acc = rec.get(EPOCH_KEY)
            if isinstance(acc, int | float):
                margins[i] = max(margins.get(i, float("-inf")), final - float(acc))
    return StopRule(budget, epochs, margins, slack, used)
