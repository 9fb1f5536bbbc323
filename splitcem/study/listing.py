"""What a sweep will do, without doing it: every trial's state and the core-hours left.

``splitcem sweep FILE --dry-run`` and ``splitcem reproduce ... --list`` both print
:func:`list_sweep`: the sweep's trials and the seeds earlier rounds of seeds until decided
added. :func:`list_trials` reads (never writes) the sweep's folder and the ``--adopt`` folders
through the run record and gives each trial one state:

* ``finished``: its run in the sweep folder finished exactly its config;
* ``adopted``: a finished run for its config is in an ``--adopt`` folder (the sweep would
  copy it instead of training);
* ``failed``: its last attempt in the sweep folder failed (the sweep retries it);
* ``running``: a process is running it now (its ``trial.json`` names a live process on this
  host; another host's claim is shown as pending with that host named, since it cannot be
  checked from here);
* ``pending``: anything else (not started, interrupted, trained here but not attacked, or
  adoptable as *trained* only: in those two cases only its attacks are left). A run made
  for it on another numeric path (``amp: auto`` resolved otherwise where it ran) is named in
  its note, and the listing ends with the ``--amp`` that would keep that path.

The cost of a finished run is what it recorded: ``metrics.json``'s training seconds plus its
attacks' seconds, times the threads it ran with (``numerics.threads``, else ``trial.json``'s
``threads``, else 1: runs before either was recorded ran one thread). A trial left to do is
estimated at the mean cost of the finished runs of its own defense with CEM on or off as it
has it, else of its defense either way (adversarial learning trains about 3x longer than
dropout: an all-runs mean would understate it), else of all finished runs; the train and
attack parts are averaged separately, so a trial adoptable as trained costs its attacks only.
A trial whose training recorded epochs (running, or killed and resuming from its checkpoint:
``metrics.json``'s ``progress``) shows them, and its training is estimated as the epochs left
times its last epoch's seconds: measured on the machine running it, not on the machines that
made the finished runs.
"""

from __future__ import annotations

import os
import socket
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from splitcem.record import RunRecord
from splitcem.runid import attack_split, train_hash
from splitcem.study.adaptive import adaptive, plan_round, with_earlier_rounds
from splitcem.study.grid import SweepSpec, Trial, expand
from splitcem.study.paper import defense_of
from splitcem.study.trials import find_adoptable, other_paths, pin_advice

__all__ = ["TrialState", "core_hours_left", "format_listing", "list_sweep", "list_trials",
           "run_cost"]


@dataclass
class TrialState:
    """One trial as ``--list`` shows it."""

    name: str
    state: str  # finished / adopted / failed / running / pending
    kind: tuple[str, bool]  # (defense, CEM on)
    note: str = ""
    #: recorded (train, attack) core-seconds of the run behind a finished / adopted trial
    cost: tuple[float, float] | None = None
    #: pending / running: only the attacks are left (trained here, or a trained run to adopt)
    attacks_only: bool = False
    estimate: float | None = None  # core-seconds left (filled by core_hours_left)
    #: its setting's seeds until decided, e.g. ``seeds 1..5 until decided`` (else empty)
    policy: str = ""
    #: training in flight or killed: core-seconds left of it, from its last recorded epoch
    #: (:attr:`splitcem.record.RunRecord.progress`); the estimate uses it
    train_left: float | None = None
    #: pending: a run trained for it in all but the numeric path, and that path
    #: (:func:`~splitcem.study.trials.other_paths`)
    other: tuple[RunRecord, str] | None = None


def run_cost(rec: RunRecord) -> tuple[float, float]:
    """(train, attack) core-seconds a finished run recorded (0 where a part is missing)."""
    m = rec.metrics
    threads = (m.get("numerics") or {}).get("threads") or rec.trial.get("threads") or 1
    train = float((m.get("train") or {}).get("seconds") or 0.0)
    attack = float((m.get("attacks") or {}).get("seconds") or 0.0)
    return train * threads, attack * threads


def _kind(trial: Trial) -> tuple[str, bool]:
    lam = trial.cfg.cem.lam if trial.cfg.cem is not None else 0.0
    return defense_of(trial.cfg)[0], lam > 0


def _why_not_attacked(rec: RunRecord, trial: Trial) -> str:
    """Why a run trained for ``trial`` is not its result: where its attacks differ."""
    split = {k: v for k, v in (rec.split or {}).items() if k != "legacy"}
    if split != {k: v for k, v in attack_split(trial.cfg).items() if k in split}:
        return "attacked on another partition"
    if rec.config is not None and rec.config.attack != trial.cfg.attack:
        return "attacked with other attacks"
    return "attacked otherwise (another numeric path)"


def list_sweep(spec: SweepSpec, out: Path, *, adopt: Sequence[str | Path] = (),
               device: str | None = None) -> tuple[list[TrialState], str]:
    """What running ``spec`` into ``out`` would do: the state of each of its trials and of
    the seeds earlier rounds added (:func:`~splitcem.study.adaptive.with_earlier_rounds`),
    and the listing's text; nothing is run or written. With seeds until decided, the text
    ends with what the next round would add (:func:`~splitcem.study.adaptive.plan_round`:
    its notes, one per setting), planned from the runs finished so far here or in ``adopt``
    (a fresh ``out`` that adopts an earlier sweep's runs plans as that sweep would)."""
    first = expand(spec)
    records = [r for d in adopt if Path(d).is_dir() for r in RunRecord.find([d])]
    trials = with_earlier_rounds(first, out, device=device, adopt=records)
    states = list_trials(trials, out, records=records, device=device)
    text = format_listing(states)
    if found := {s.name: s.other for s in states if s.other is not None}:
        text += "\n" + pin_advice(trials, found, device=device)
    if adaptive(first):
        # ``trials`` already holds the earlier rounds' seeds: plan_round finds none to load
        # as the engine plans when a slot frees: settings with a trial left wait
        listed = {s.name for s in states}
        busy = {t.setting for t, s in zip(trials, states, strict=True)
                if s.state not in ("finished", "adopted")}
        new, notes = plan_round(trials, out, device=device, per_round=spec.per_round,
                                adopt=records, busy=busy)
        new = [t for t in new if t.name not in listed]
        cap = "every undecided setting" if spec.per_round is None else \
            f"at most {spec.per_round} setting(s)"
        text += (f"\nthen seeds until decided, {cap} per round; the next round, planned from "
                 f"the runs finished so far (here or to adopt), adds {len(new)} trial(s)"
                 + (f": {', '.join(t.name for t in new)}" if new else "")
                 + "".join(f"\n  {n}" for n in notes))
    return states, text


def list_trials(trials: Sequence[Trial], out: Path, *, adopt: Sequence[str | Path] = (),
                device: str | None = None,
                records: Sequence[RunRecord] | None = None) -> list[TrialState]:
    """Each trial's state (module docstring); nothing is written. ``records``: the ``adopt``
    folders' runs, already loaded (then ``adopt`` is not read)."""
    if records is None:
        records = [r for d in adopt if Path(d).is_dir() for r in RunRecord.find([d])]
    states: list[TrialState] = []
    for t in trials:
        states.append(_state(t, out, records, device))
        if t.policy is not None and t.policy.until is not None:
            states[-1].policy = f"seeds {t.policy.min}..{t.policy.max} until {t.policy.until}"
    bare = [t for t, s in zip(trials, states, strict=True) if s.state == "pending" and not s.note]
    own = [RunRecord.load(Path(out) / t.name) for t in bare]
    by_name = {s.name: s for s in states}
    for name, (rec, path) in other_paths(bare, [*own, *records], device=device).items():
        by_name[name].other = (rec, path)
        by_name[name].note = f"{rec.path} ran {path}: another numeric path"
    return states


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (never on Windows, where os.kill would
    end it: a trial there shows as pending)."""
    if os.name == "nt":
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _running(rec: RunRecord) -> tuple[bool, str]:
    """(running here now, a note) from a trial's ``trial.json``: a ``running`` status whose
    process is alive on this host; another host's claim is only reported."""
    tr = rec.trial
    if tr.get("status") != "running":
        return False, ""
    pid, host, since = tr.get("pid"), tr.get("host"), tr.get("started", "?")
    if host and host != socket.gethostname():
        return False, f"claimed by pid {pid} on {host} since {since}, not checked from here"
    if isinstance(pid, int) and _alive(pid):
        return True, f"pid {pid} since {since}"
    return False, ""


def _state(t: Trial, out: Path, records: Sequence[RunRecord], device: str | None) -> TrialState:
    """One trial's state (module docstring)."""
    rec = RunRecord.load(Path(out) / t.name)
    kind = _kind(t)
    if rec.finished(t.cfg, device=device):
        return TrialState(t.name, "finished", kind, cost=run_cost(rec))
    src = find_adoptable(t, [], device=device, records=records) if records else None
    if src is not None:
        found = RunRecord.load(src)
        if found.finished(t.cfg, device=device):
            return TrialState(t.name, "adopted", kind, f"from {src}", cost=run_cost(found))
    if rec.trial.get("status") == "failed" or rec.metrics.get("status") == "failed":
        err = rec.trial.get("error") or rec.metrics.get("error") or "see trial.json"
        return TrialState(t.name, "failed", kind, str(err).splitlines()[0])
    running, where = _running(rec)
    trained = rec.config is not None and rec.trained_for(t.cfg, device=device)
    prog = rec.progress if rec.config_hash == train_hash(t.cfg, device=device) else None
    left, done = None, ""
    if prog is not None:  # training's last checkpointed epoch: what is left of it
        threads = rec.trial.get("threads") or 1
        left = max(prog["of"] - prog["epoch"], 0) * float(prog["epoch_seconds"]) * threads
        done = f"epoch {prog['epoch']}/{prog['of']} done ({prog['epoch_seconds'] / 60:.1f} min)"
    if running:
        phase = "attacking" if trained else \
            "training" if rec.metrics.get("status") == "training" else "starting"
        return TrialState(t.name, "running", kind, ", ".join(n for n in (phase, done) if n)
                          + f": {where}", attacks_only=trained, train_left=left)
    if trained:
        note = "trained here, attacks left"
    elif src is not None:
        note = "trained run to adopt, attacks left"
    elif rec.config is not None:
        note = ", ".join(n for n in (rec.unfinished() or "", done, where) if n)
    elif elsewhere := [r for r in records if r.trained_for(t.cfg, device=device)]:
        note = f"trained under --adopt, {_why_not_attacked(elsewhere[0], t)}, no " \
               "checkpoint: runs again"
    else:
        note = ""
    return TrialState(t.name, "pending", kind, note, attacks_only=trained or src is not None,
                      train_left=left)


def core_hours_left(states: Sequence[TrialState]) -> tuple[float | None, int]:
    """Estimated core-hours of the trials not finished or adopted (module docstring), and
    the number of recorded runs the estimate rests on; ``None`` without any."""
    done = [s for s in states if s.cost is not None]
    if not done:
        return None, 0
    by_kind: dict[tuple[str, bool], list[tuple[float, float]]] = defaultdict(list)
    by_defense: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for s in done:
        by_kind[s.kind].append(s.cost)  # type: ignore[arg-type]
        by_defense[s.kind[0]].append(s.cost)  # type: ignore[arg-type]

    def mean(costs: list[tuple[float, float]], i: int) -> float:
        xs = [c[i] for c in costs if c[i] > 0]  # a resumed run may record 0 train seconds
        return sum(xs) / len(xs) if xs else 0.0

    everything = [s.cost for s in done if s.cost is not None]
    total = 0.0
    for s in states:
        if s.state in ("finished", "adopted"):
            continue
        costs = by_kind.get(s.kind) or by_defense.get(s.kind[0]) or everything
        train = s.train_left if s.train_left is not None else \
            mean(costs, 0) or mean(everything, 0)
        attack = mean(costs, 1) or mean(everything, 1)
        s.estimate = attack if s.attacks_only else train + attack
        total += s.estimate
    return total / 3600.0, len(done)


def format_listing(states: Sequence[TrialState]) -> str:
    """The ``--list`` text: one line per trial, then counts and the core-hours left."""
    width = max((len(s.name) for s in states), default=0)
    hours, n = core_hours_left(states)
    lines = []
    for s in states:
        est = f" ~{s.estimate / 3600:.2f} core-h" if s.estimate is not None else ""
        note = f" ({s.note})" if s.note else ""
        policy = f" [{s.policy}]" if s.policy else ""
        lines.append(f"{s.name:<{width}}  {s.state:<8}{est}{note}{policy}")
    counts: dict[str, Any] = defaultdict(int)
    for s in states:
        counts[s.state] += 1
    lines.append(", ".join(f"{counts[k]} {k}" for k in ("finished", "adopted", "running",
                                                        "pending", "failed"))
                 + f" of {len(states)} trials")
    if hours is None:
        lines.append("core-hours left: unknown (no finished run has recorded times yet)")
    else:
        lines.append(f"core-hours left: about {hours:.1f} (from the recorded times of {n} "
                     "finished run(s), train + attack seconds x threads, per defense with / "
                     "without CEM where it has finished runs, else per defense)")
    return "\n".join(lines)
