"""The tune's searcher: Ray Tune's :class:`~ray.tune.search.optuna.OptunaSearch` over a
:class:`~splitcem.study.space.SearchSpace`, with the accuracy budget as a constraint.

Two ways to put the budget, both Optuna's TPE (``mode``):

* ``constrained`` (default): one objective, the worst-case attack MSE (maximised), with the
  budget as TPE's constraint (``budget - accuracy <= 0`` is feasible; set on each trial with
  Optuna >= 5, through ``constraints_func`` before);
* ``multi``: two objectives, MSE and accuracy, both maximised; the recommendation is read at
  the budget afterwards.

Points are flat: ``family`` (a choice) and ``FAMILY|KEY`` for every family's keys (a trial
uses only its family's). Finished runs enter as evaluated points (never run again); a trial
stopped early enters with MSE 0 (not a measurement: TPE ranks infeasible trials by how far
they miss the budget) and the accuracy it stopped at.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from splitcem.study.space import SearchSpace

__all__ = ["MODES", "Searcher"]

MODES = ("constrained", "multi")
_SEP = "|"
CONSTRAINT = "accuracy_budget"  # budget - accuracy: feasible when <= 0


def _key(params: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(params.items()))


class Searcher:
    """Ask for points, tell results; wraps OptunaSearch (driven by the tune's own loop)."""

    def __init__(self, space: SearchSpace, budget: float, *, mode: str = "constrained",
                 seed: int = 0) -> None:
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        if mode not in MODES:
            from splitcem.errors import ConfigError

            raise ConfigError(f"search mode must be one of {MODES}, got {mode!r}")
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.space, self.budget, self.mode = space, budget, mode
        self._acc: dict[tuple[tuple[str, Any], ...], float] = {}
        dist: dict[str, Any] = {"family": optuna.distributions.CategoricalDistribution(
            [f.name for f in space.families])}
        for f in space.families:
            for p in f.params:
                name = f"{f.name}{_SEP}{p.key}"
                if p.choices:
                    dist[name] = optuna.distributions.CategoricalDistribution(list(p.choices))
                elif p.integer:
                    dist[name] = optuna.distributions.IntDistribution(int(p.low or 0),
                                                                      int(p.high or 0),
                                                                      log=p.log)
                else:
                    dist[name] = optuna.distributions.FloatDistribution(
                        float(p.low or 0), float(p.high or 0), log=p.log)
        self.dist = dist
        #: Optuna >= 5 reads constraints set on the trial; older ones need constraints_func
        self._set_constraint = hasattr(optuna.trial.Trial, "set_constraint")
        if mode == "constrained":
            old: dict[str, Any] = {} if self._set_constraint else {
                "constraints_func": self._constraint}
            sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=5, **old)
            self.search = OptunaSearch(dist, metric="mse", mode="max", sampler=sampler)
        else:
            sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=5)
            self.search = OptunaSearch(dist, metric=["mse", "accuracy"], mode=["max", "max"],
                                       sampler=sampler)  # the seed is the sampler's
        self._asked = 0
        self._acc_key: dict[str, tuple[tuple[str, Any], ...]] = {}

    def _attrs(self, accuracy: float) -> dict[str, Any]:
        if self._set_constraint:
            return {f"constraints:{CONSTRAINT}": self.budget - accuracy}
        return {"constraints": [self.budget - accuracy]}

    def _constraint(self, trial: Any) -> list[float]:
        acc = self._acc.get(_key(trial.params))
        return [1.0 if acc is None else self.budget - acc]

    def ask(self) -> tuple[str, str, dict[str, Any]]:
        """A new trial id, its family and its values (rounded as configs get them)."""
        self._asked += 1
        tid = f"t{self._asked}"
        params = self.search.suggest(tid)
        assert params is not None
        fam = self.space.family(str(params["family"]))
        vals = {p.key: p.round(params[f"{fam.name}{_SEP}{p.key}"]) for p in fam.params}
        self._acc_key[tid] = _key(params)
        return tid, fam.name, vals

    def _result(self, accuracy: float, mse: float | None) -> dict[str, float]:
        return {"mse": 0.0 if mse is None or mse != mse else float(mse),
                "accuracy": float(accuracy)}

    def tell(self, tid: str, accuracy: float | None, mse: float | None) -> None:
        """The result of an asked trial (``accuracy`` ``None``: it failed)."""
        if accuracy is None or accuracy != accuracy:
            self.search.on_trial_complete(tid, None, error=True)
            return
        self._acc[self._acc_key[tid]] = float(accuracy)
        if self.mode == "constrained" and self._set_constraint:
            trial: Any = self.search._ot_trials[tid]  # OptunaSearch's trial for this id
            trial.set_constraint(CONSTRAINT, self.budget - float(accuracy))
        self.search.on_trial_complete(tid, self._result(accuracy, mse))

    def observe(self, family: str, values: Mapping[str, Any], accuracy: float,
                mse: float | None) -> None:
        """A result obtained without asking (a warm-start run, a trial of an earlier call)."""
        import optuna

        params: dict[str, Any] = {"family": family}
        for f in self.space.families:
            for p in f.params:
                v = values.get(p.key) if f.name == family else None
                params[f"{f.name}{_SEP}{p.key}"] = p.middle() if v is None else v
        res = self._result(accuracy, mse)
        self._acc[_key(params)] = float(accuracy)
        vals: Any = res["mse"] if self.mode == "constrained" else [res["mse"], res["accuracy"]]
        trial = optuna.trial.create_trial(
            params=params, distributions=self.dist,
            values=vals if isinstance(vals, list) else [vals],
            system_attrs=self._attrs(float(accuracy)) if self.mode == "constrained" else None)
        study: Any = self.search._ot_study  # OptunaSearch's own study (set up by then)
        study.add_trial(trial)
