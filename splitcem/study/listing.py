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
  adoptable as *trained* only: in those two cases only its attacks are left; or queued by
  the last sweep into the folder: a round it planned whose trials have not started, which
  it runs next, or, stopped, first when it restarts). A run made for it on another numeric
  path (``amp: auto`` resolved otherwise where it ran) is named in its note, and the
  listing ends with the ``--amp`` that would keep that path.

The cost of a finished run is what it recorded: ``metrics.json``'s training core-seconds plus
its attacks'. A run on a CPU records each phase's ``cpu_seconds``, its process's CPU time over
all its threads: other work on a busy machine (another trial, a test run) slows its wall
clock but not that. Runs from before splitcem recorded it, and runs on a GPU, count their
seconds times the threads they ran with (``numerics.threads``, else ``trial.json``'s
``threads``, else 1: runs before either was recorded ran one thread). A trial left to do is
estimated at the mean cost of the finished runs of its own defense with CEM on or off as it
has it, else of its defense either way (adversarial learning trains about 3x longer than
dropout: an all-runs mean would understate it), else of all finished runs; the train and
attack parts are averaged separately, so a trial adoptable as trained costs its attacks only.
A trial whose training recorded epochs (running, or killed and resuming from its checkpoint:
``metrics.json``'s ``progress``) shows them, and its training is estimated as the epochs left
(less the share of the epoch in flight that a checkpoint within it recorded) times its last
epoch's core-seconds, counted as above (before a first epoch ends: that share's pace):
measured on the machine running it, not on the machines that made the finished runs.

Finished runs may come from other machines: a run records its device, CPU capability,
numeric path and whether bf16 was native (``numerics``), and a trial left to do would run on
this machine's (:class:`Machine`). bf16 autocast emulated by PyTorch's kernels on a CPU
without native bf16 ran about 4x slower than where it is native (splitcem now runs it
through float32 kernels there, :mod:`splitcem._bf16`: another machine for this purpose), so
the runs made elsewhere are put on this machine's pace before averaging: their train and
attack seconds are multiplied by the geometric mean, over the settings that have finished
runs both here-like and elsewhere, of the ratio of the two (:func:`pace`). Training's factor
also counts the trials training here now: their last epoch's seconds against the finished
runs' seconds per epoch of the same setting elsewhere, so a machine slower than the ones
that made the runs shows in the estimate after the first epoch of its first trial, not only
after a whole trial has finished. Where no setting has both yet, the runs count as they are,
and the listing says so. Runs made on several other machines are paced per machine where it
shares a setting with this one (:class:`Paces`): runs from a native-bf16 machine and from
one that emulates it are then not put at one pace between the two.
With seeds until decided, the next round's trials are estimated the same way.
"""

from __future__ import annotations

import os
import socket
import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from splitcem.record import RunRecord
from splitcem.runid import attack_split, train_hash
from splitcem.runtime import BF16_KERNELS
from splitcem.study.adaptive import adaptive, plan_round, with_earlier_rounds
from splitcem.study.grid import SweepSpec, Trial, expand
from splitcem.study.paper import defense_of
from splitcem.study.trials import find_adoptable, numeric_path_here, other_paths, pin_advice, queued

__all__ = ["Machine", "Pace", "Paces", "TrialState", "core_hours_left", "format_listing",
           "list_sweep", "list_trials", "machine_paces", "pace", "run_cost"]


class Machine(NamedTuple):
    """What sets a trial's pace: the device, bf16 autocast or not, whether bf16 is native
    there, the CPU's kernel level (CPU runs only) and, where bf16 is not native on a CPU,
    whether it ran through float32 kernels (:mod:`splitcem._bf16`, about float32's pace)
    or PyTorch's own (runs made before splitcem had the former: about 10x slower)."""

    device: str
    amp: bool
    native_bf16: bool
    cpu_capability: str | None
    bf16_via_float32: bool = False

    def describe(self) -> str:
        """``cpu (AVX512), bf16 autocast emulated`` and the like."""
        where = f"{self.device} ({self.cpu_capability})" if self.cpu_capability else self.device
        how = "float32"
        if self.amp:
            how = "bf16 autocast " + ("native" if self.native_bf16 else
                                      "via float32 kernels" if self.bf16_via_float32
                                      else "emulated")
        return f"{where}, {how}"

    @classmethod
    def of_run(cls, rec: RunRecord) -> Machine | None:
        """Where a finished run trained, from its ``numerics``; ``None`` for runs that did
        not record it, and for runs whose phases ran bf16 on different kernels (a run
        resumed by a splitcem that emulates bf16 otherwise: its seconds are of neither)."""
        num = rec.numerics
        if "native_bf16" not in num or "amp" not in num:
            return None
        device = str(num.get("device") or "cpu")
        amp, native = bool(num["amp"]), bool(num["native_bf16"])
        if amp and not native:
            kernels = {e.get("bf16", BF16_KERNELS[2])
                       for e in rec.metrics.get("made_by") or [] if isinstance(e, dict)}
            if len(kernels) > 1:
                return None
        return cls(device, amp, native, num.get("cpu_capability") if device == "cpu" else None,
                   amp and not native and bool(num.get("bf16_via_float32")))

    @classmethod
    def here(cls, trial: Trial, device: str | None = None) -> Machine:
        """Where ``trial`` would train on this machine (``device``: default its own)."""
        p = numeric_path_here(trial.cfg, device)
        return cls(p.device, p.amp, p.native_bf16,
                   p.cpu_capability if p.device == "cpu" else None, p.bf16_via_float32)


class Pace(NamedTuple):
    """How the finished runs made elsewhere are put on one machine's pace (:func:`pace`)."""

    train: float  # factor on their training seconds
    attack: float  # factor on their attack seconds
    settings: int  # settings finished both ways, the factors rest on (0: none)
    elsewhere: int  # finished runs made on other machines (or not saying where)
    #: trials training here now whose last epoch the training factor also rests on, and
    #: the settings it rests on in all (``settings`` plus theirs not finished here)
    training: int = 0
    train_settings: int = 0


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
    #: the setting it is a seed of (:attr:`~splitcem.study.grid.Trial.setting`)
    setting: str = ""
    #: finished / adopted: where its run trained (``None``: not recorded); else where it
    #: would train here
    machine: Machine | None = None
    #: finished / adopted: its training's core-seconds per epoch; running here and training
    #: with an epoch recorded: that epoch's core-seconds (what :func:`pace` compares)
    epoch_cost: float | None = None


def _core_seconds(seconds: float | None, cpu_seconds: float | None, threads: int) -> float:
    """A phase's core-seconds: the CPU seconds it recorded, else its seconds x threads."""
    if cpu_seconds is not None:
        return float(cpu_seconds)
    return float(seconds or 0.0) * threads


def run_cost(rec: RunRecord) -> tuple[float, float]:
    """(train, attack) core-seconds a finished run recorded (0 where a part is missing):
    each part's CPU seconds where it recorded them (module docstring), else its seconds
    times the threads it ran with."""
    m = rec.metrics
    threads = (m.get("numerics") or {}).get("threads") or rec.trial.get("threads") or 1
    train, attack = m.get("train") or {}, m.get("attacks") or {}
    return (_core_seconds(train.get("seconds"), train.get("cpu_seconds"), threads),
            _core_seconds(attack.get("seconds"), attack.get("cpu_seconds"), threads))


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
    and the listing's text; nothing is run or written. The trials the last sweep into
    ``out`` queued but did not start (its index, :func:`~splitcem.study.trials.queued`) are
    listed too, pending: a live sweep runs them next, a stopped one when it restarts. With
    seeds until decided, the text ends with what the next round would add
    (:func:`~splitcem.study.adaptive.plan_round`: its notes, one per setting), planned from
    the runs finished so far here or in ``adopt`` (a fresh ``out`` that adopts an earlier
    sweep's runs plans as that sweep would)."""
    first = expand(spec)
    records = [r for d in adopt if Path(d).is_dir() for r in RunRecord.find([d])]
    trials = with_earlier_rounds(first, out, device=device, adopt=records)
    states = list_trials(trials, out, records=records, device=device)
    # the round the last sweep planned and had not started: a live one runs it next, a
    # stopped one when it restarts; from the trials found above, so only the queued names
    # are looked up again
    later = with_earlier_rounds(trials, out, device=device, adopt=records,
                                queued=queued(out, sweep=spec.name))[len(trials):]
    by = "the sweep running here" if any(s.state == "running" for s in states) else \
        "the sweep that stopped (it runs them first when restarted)"
    for s in (more := list_trials(later, out, records=records, device=device)):
        s.note = s.note or f"queued by {by}"
    trials, states = [*trials, *later], [*states, *more]
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
        cost = ""
        if new:  # as the listing above (pending, they leave its paces as they are)
            more = list_trials(new, out, records=records, device=device)
            if core_hours_left([*states, *more])[0] is not None:
                cost = f" (about {sum(s.estimate or 0.0 for s in more) / 3600:.1f} " \
                       "core-hours, estimated as above)"
        text += (f"\nthen seeds until decided, {cap} per round; the next round, planned from "
                 f"the runs finished so far (here or to adopt), adds {len(new)} trial(s)"
                 + cost + (f": {', '.join(t.name for t in new)}" if new else "")
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
    own: dict[str, RunRecord] = {}
    for t in trials:
        own[t.name] = RunRecord.load(Path(out) / t.name)
        state, ran = _state(t, own[t.name], records, device)
        state.machine = Machine.of_run(ran) if ran is not None else Machine.here(t, device)
        state.setting = t.setting
        if t.policy is not None and t.policy.until is not None:
            state.policy = f"seeds {t.policy.min}..{t.policy.max} until {t.policy.until}"
        states.append(state)
    bare = [t for t, s in zip(trials, states, strict=True) if s.state == "pending" and not s.note]
    by_name = {s.name: s for s in states}
    for name, (rec, path) in other_paths(bare, [*(own[t.name] for t in bare), *records],
                                         device=device).items():
        by_name[name].other = (rec, path)
        by_name[name].note = f"{rec.path} ran {path}: another numeric path"
    return states


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (never on Windows, where os.kill would
    end it: a trial there shows as pending; never for ``pid <= 0``, which os.kill reads as
    a process group or every process: a corrupt ``trial.json`` shows as pending)."""
    if os.name == "nt" or pid <= 0:
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


def _state(t: Trial, rec: RunRecord, records: Sequence[RunRecord],
           device: str | None) -> tuple[TrialState, RunRecord | None]:
    """One trial's state (module docstring), from its own record ``rec`` in the sweep
    folder, and the finished run behind it (``None`` unless finished or adopted)."""
    kind = _kind(t)
    epochs = max(t.cfg.train.epochs, 1)
    if rec.finished(t.cfg, device=device):
        cost = run_cost(rec)
        return TrialState(t.name, "finished", kind, cost=cost,
                          epoch_cost=cost[0] / epochs), rec
    src = find_adoptable(t, [], device=device, records=records) if records else None
    if src is not None:
        found = RunRecord.load(src)
        if found.finished(t.cfg, device=device):
            cost = run_cost(found)
            return TrialState(t.name, "adopted", kind, f"from {src}", cost=cost,
                              epoch_cost=cost[0] / epochs), found
    if rec.trial.get("status") == "failed" or rec.metrics.get("status") == "failed":
        err = rec.trial.get("error") or rec.metrics.get("error") or "see trial.json"
        return TrialState(t.name, "failed", kind, str(err).splitlines()[0]), None
    running, where = _running(rec)
    trained = rec.config is not None and rec.trained_for(t.cfg, device=device)
    prog = rec.progress if rec.config_hash == train_hash(t.cfg, device=device) else None
    left, done, per_epoch = None, "", None
    if prog is not None:  # training's last checkpoint: what is left of it
        part = prog["batch"] / prog["batches"] if prog.get("batches") else 0.0
        threads = rec.trial.get("threads") or 1
        if prog.get("epoch_seconds"):  # the last whole epoch
            per_epoch = _core_seconds(prog["epoch_seconds"], prog.get("epoch_cpu_seconds"),
                                      threads)
        elif part:  # the share of the first epoch done
            per_epoch = _core_seconds(prog["seconds"], prog.get("cpu_seconds"), threads) / part
        if per_epoch is not None:
            left = max(prog["of"] - prog["epoch"] - part, 0) * per_epoch
        done = ", ".join(n for n in (
            f"epoch {prog['epoch']}/{prog['of']} done ({prog['epoch_seconds'] / 60:.1f} min)"
            if prog.get("epoch_seconds") else "",
            f"{100 * part:.0f}% of epoch {prog['epoch'] + 1}" if part else "") if n)
    if running:
        phase = "attacking" if trained else \
            "training" if rec.metrics.get("status") == "training" else "starting"
        # only a live process's epoch is this machine's pace (a killed one's may be another's)
        return TrialState(t.name, "running", kind, ", ".join(n for n in (phase, done) if n)
                          + f": {where}", attacks_only=trained, train_left=left,
                          epoch_cost=per_epoch), None
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
                      train_left=left), None


def _mean(xs: Sequence[float]) -> float:
    xs = [x for x in xs if x > 0]  # a resumed run may record 0 train seconds
    return sum(xs) / len(xs) if xs else 0.0


def pace(states: Sequence[TrialState], machine: Machine) -> Pace:
    """The factors that put the finished runs made elsewhere on ``machine``'s pace (module
    docstring): per part (train, attack), the geometric mean over the settings with finished
    runs both on ``machine`` and elsewhere of (mean seconds on it / mean seconds elsewhere);
    training per epoch, counting the trials running on ``machine`` with an epoch recorded
    as runs on it."""
    done = [s for s in states if s.cost is not None]
    # per setting: attack seconds, and training seconds per epoch, on ``machine`` and off it
    attacks_on: dict[str, list[float]] = defaultdict(list)
    attacks_off: dict[str, list[float]] = defaultdict(list)
    epochs_on: dict[str, list[float]] = defaultdict(list)
    epochs_off: dict[str, list[float]] = defaultdict(list)
    for s in done:
        assert s.cost is not None
        here = s.machine == machine
        (attacks_on if here else attacks_off)[s.setting].append(s.cost[1])
        (epochs_on if here else epochs_off)[s.setting].append(
            s.epoch_cost if s.epoch_cost is not None else s.cost[0])
    training = [s for s in states if s.state == "running" and s.epoch_cost is not None
                and s.machine == machine]
    for s in training:
        epochs_on[s.setting].append(s.epoch_cost)  # type: ignore[arg-type]
    shared = sorted(set(attacks_on) & set(attacks_off))
    train_shared = sorted(set(epochs_on) & set(epochs_off))

    def ratio(a: float, b: float) -> float | None:
        return a / b if a > 0 and b > 0 else None

    def factor(rs: Sequence[float | None]) -> float:
        got = [r for r in rs if r is not None]
        return statistics.geometric_mean(got) if got else 1.0

    train = factor([ratio(_mean(epochs_on[k]), _mean(epochs_off[k])) for k in train_shared])
    attack = factor([ratio(_mean(attacks_on[k]), _mean(attacks_off[k])) for k in shared])
    return Pace(train, attack, len(shared), sum(len(v) for v in attacks_off.values()),
                sum(s.setting in epochs_off for s in training), len(train_shared))


@dataclass(frozen=True)
class Paces:
    """How one machine puts the finished runs made elsewhere on its pace: :func:`pace`
    against all of them (``pooled``) and against the runs of each machine they were made on
    alone (``by_origin``; key ``None``: runs not saying where). A run takes its own
    machine's factor for a part (train, attack) where that machine shares a setting with
    this one for it, else the pooled factor: pooling a fast and a slow machine's runs would
    put both at one pace between them."""

    pooled: Pace
    by_origin: dict[Machine | None, Pace]

    def factors(self, origin: Machine | None) -> tuple[float, float]:
        """(train, attack) factors for a run made on ``origin``."""
        own = self.by_origin.get(origin)
        return (own.train if own is not None and own.train_settings else self.pooled.train,
                own.attack if own is not None and own.settings else self.pooled.attack)


def machine_paces(states: Sequence[TrialState], machine: Machine) -> Paces:
    """:class:`Paces` of ``machine``: :func:`pace` against all other machines' runs, and
    against each of them alone."""
    origins = dict.fromkeys(s.machine for s in states
                            if s.cost is not None and s.machine != machine)
    return Paces(pace(states, machine), {
        o: pace([s for s in states if s.machine in (machine, o)], machine) for o in origins})


def _paces(states: Sequence[TrialState]) -> dict[Machine, Paces]:
    """:func:`machine_paces` for each machine the trials left would run on (in their order)."""
    left = dict.fromkeys(s.machine for s in states
                         if s.state not in ("finished", "adopted") and s.machine is not None)
    return {m: machine_paces(states, m) for m in left if m is not None}


def core_hours_left(states: Sequence[TrialState], paces: Mapping[Machine, Paces] | None = None
                    ) -> tuple[float | None, int]:
    """Estimated core-hours of the trials not finished or adopted (module docstring), and
    the number of recorded runs the estimate rests on; ``None`` without any. ``paces``: the
    :func:`machine_paces` of each machine the trials left run on, if already computed."""
    done = [s for s in states if s.cost is not None]
    if not done:
        return None, 0
    paces = _paces(states) if paces is None else paces
    Cost = tuple[float, float]
    paced: dict[Machine | None, list[tuple[tuple[str, bool], Cost]]] = {}  # (kind, cost)
    total = 0.0
    for s in states:
        if s.state in ("finished", "adopted"):
            continue
        if s.machine not in paced:  # the finished runs at this machine's pace
            p = paces.get(s.machine) if s.machine is not None else None
            paced[s.machine] = []
            for d in done:
                assert d.cost is not None
                train, attack = (1.0, 1.0) if p is None or d.machine == s.machine else \
                    p.factors(d.machine)
                paced[s.machine].append((d.kind, (d.cost[0] * train, d.cost[1] * attack)))
        runs = paced[s.machine]
        everything = [c for _, c in runs]
        costs = [c for k, c in runs if k == s.kind] or \
            [c for k, c in runs if k[0] == s.kind[0]] or everything
        train = s.train_left if s.train_left is not None else \
            _mean([c[0] for c in costs]) or _mean([c[0] for c in everything])
        attack = _mean([c[1] for c in costs]) or _mean([c[1] for c in everything])
        s.estimate = attack if s.attacks_only else train + attack
        total += s.estimate
    return total / 3600.0, len(done)


def _pace_lines(paces: Mapping[Machine, Paces]) -> list[str]:
    """One line per machine the trials left would run on, where runs made elsewhere count,
    then one per machine they were made on that shares a setting with it."""
    lines = []
    for m, ps in paces.items():
        p = ps.pooled
        if not p.elsewhere:
            continue
        flight = f"; training per epoch also from {p.training} trial(s) training here" \
            if p.training else ""
        if p.settings:
            lines.append(f"  {p.elsewhere} run(s) made elsewhere put on the pace of {m.describe()}"
                         f": train x{p.train:.2f}, attacks x{p.attack:.2f} (the ratio on "
                         f"{p.settings} setting(s) run both ways{flight})")
        elif p.train_settings:
            lines.append(f"  {p.elsewhere} run(s) made elsewhere put on the pace of {m.describe()}"
                         f": train x{p.train:.2f} (per epoch, from {p.training} trial(s) "
                         f"training here on {p.train_settings} setting(s)); attacks at their "
                         "own pace: no setting has finished here yet to compare them by")
        else:
            lines.append(f"  {p.elsewhere} run(s) made elsewhere (or not saying where) count at "
                         f"their own pace: no setting has finished on {m.describe()} yet to "
                         "compare them by")
            continue
        if len(ps.by_origin) < 2:
            continue  # one other machine: the line above is its own
        for o, q in ps.by_origin.items():
            where = o.describe() if o is not None else "a machine not saying which"
            if q.train_settings or q.settings:
                attack = f"attacks x{q.attack:.2f}" if q.settings else "attacks as above"
                lines.append(f"    of them {q.elsewhere} made on {where}: train "
                             f"x{q.train:.2f}, {attack} (on {q.train_settings} "
                             "setting(s) shared with it)")
            else:
                lines.append(f"    of them {q.elsewhere} made on {where}: as above (no "
                             "setting shared with it)")
    return lines


def format_listing(states: Sequence[TrialState]) -> str:
    """The ``--list`` text: one line per trial, then counts and the core-hours left."""
    width = max((len(s.name) for s in states), default=0)
    paces = _paces(states)
    hours, n = core_hours_left(states, paces)
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
                     "finished run(s), train + attack core-seconds: CPU seconds where "
                     "recorded, else seconds x threads; per defense with / "
                     "without CEM where it has finished runs, else per defense)")
        lines += _pace_lines(paces)
    return "\n".join(lines)
