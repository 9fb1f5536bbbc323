"""Per-machine choices made at run time: the numeric path and the number of CPU threads.

Why one module, decided at run time: the fastest path depends on the machine, not on the
experiment. bfloat16 autocast roughly halves a training step where the hardware has bf16
units (CUDA GPUs from compute capability 8.0, CPUs with AVX512-BF16 or AMX) and buys no speed
where it has not, only rounding, so configs say ``auto`` and :func:`resolve_numeric_path`
decides. Explicit ``true`` / ``false`` win. ``true`` on a CPU without bf16 units (a sweep that
keeps the path of runs made where bf16 is native) runs bf16 autocast's convolutions and
matmuls as float32 kernels on bf16-rounded operands (:mod:`splitcem._bf16`): the arithmetic
bf16 autocast defines, at float32's speed, where PyTorch's own bf16 kernels there measured
2.7x (AVX512) and 12.6x (AVX2) slower than float32.

Channels-last rule (measured, not calibrated per run): with PyTorch's oneDNN convolutions on
x86 CPUs it was faster in every case measured (the CPU protocol's model, the demo's model
and the decoder attack; float32 and bfloat16; AVX512-BF16, and AVX2 with oneDNN limited to
it): 1.1x to 2.7x. On CUDA it goes with bf16 autocast (the tensor-core kernels of cuDNN are
NHWC); elsewhere (MPS, non-x86 CPUs) nothing was measured and the default layout stays. A
fixed rule keeps a run's numerics independent of how busy the machine was at its start;
``benchmarks/train_throughput.py`` checks it per machine (``auto_over_best``).

Threads: :func:`set_threads` uses, in order, its argument (``--threads N``), the
environment variable ``SPLITCEM_THREADS`` (a sweep sets it per trial), or
:func:`default_threads`: the cores this process may use (CPU affinity and a cgroup CPU
quota) minus the cores other processes keep busy right now. OpenMP threads that share a core
with another busy process wait for each other at every parallel region: on this project's
2-core machine, shared with other jobs (load average about 6), 30 training steps of the demo's
model took 29 s and 51 s with two threads against 1.6 s and 3.3 s with one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
import warnings
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch

from splitcem._bf16 import bf16_autocast
from splitcem.errors import ConfigError

__all__ = [
    "BF16_KERNELS",
    "ENV_THREADS",
    "NumericPath",
    "Setting",
    "bf16_kernels",
    "check_setting",
    "cpu_capability",
    "default_threads",
    "describe_path",
    "native_bf16",
    "ran_bf16",
    "resolve_device",
    "resolve_numeric_path",
    "set_threads",
    "usable_cores",
]

log = logging.getLogger(__name__)

#: ``true``, ``false`` or ``"auto"`` (decide per device)
Setting = bool | Literal["auto"]

ENV_THREADS = "SPLITCEM_THREADS"

def check_setting(name: str, value: Any) -> Setting:
    """``True`` / ``False`` / ``"auto"``, or a :class:`ConfigError` naming ``name``."""
    if isinstance(value, bool) or value == "auto":
        return value  # type: ignore[no-any-return]
    raise ConfigError(f"{name} must be true, false or auto, got {value!r}")


# --------------------------------------------------------------------------- capabilities
def cpu_capability() -> str:
    """The SIMD level torch's CPU kernels use (``AVX512``, ``AVX2``, ``DEFAULT``, ...)."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # an old or unusual build: treat as unknown
        return "unknown"


def _cpu_probe(name: str) -> bool:
    """One of torch's private CPU feature probes; missing or failing means "no"."""
    fn = getattr(torch.cpu, name, None)
    if not callable(fn):
        return False
    try:
        return bool(fn())
    except Exception:
        return False


def _cpu_native_bf16() -> bool:
    # the capability guards an ATEN_CPU_CAPABILITY override below AVX512 (kernels then lack
    # the bf16 instructions even where the hardware has them)
    return cpu_capability().startswith("AVX512") and (
        _cpu_probe("_is_avx512_bf16_supported") or _cpu_probe("_is_amx_tile_supported"))


def _cuda_native_bf16(device: torch.device) -> bool:
    try:
        if getattr(torch.version, "hip", None):
            return bool(torch.cuda.is_bf16_supported())
        return torch.cuda.get_device_capability(device)[0] >= 8  # Ampere and later
    except Exception:
        return False


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` runs bfloat16 matmuls / convolutions in hardware."""
    device = torch.device(device)
    if device.type == "cuda":
        return _cuda_native_bf16(device)
    if device.type == "cpu":
        return _cpu_native_bf16()
    return False


#: What can run bf16 autocast's convolutions and matmuls, as runs record it per phase
#: (:func:`bf16_kernels`): bf16 units, float32 kernels on a CPU without them
#: (:mod:`splitcem._bf16`), or PyTorch's own kernels without bf16 units (a pre-Ampere GPU;
#: on a CPU, runs made before splitcem had the float32 kernels, which recorded nothing).
BF16_KERNELS: tuple[str, str, str] = ("native", "float32 kernels", "emulated by torch")


def bf16_kernels(device: torch.device | str) -> str:
    """What runs bf16 autocast's convolutions and matmuls on ``device`` here: one of
    :data:`BF16_KERNELS`, as runs record it per phase (:func:`splitcem.provenance.made_by`)."""
    device = torch.device(device)
    native = native_bf16(device)
    native_, float32_, torch_ = BF16_KERNELS
    if native:
        return native_
    return float32_ if _via_float32(device, native) else torch_


def _via_float32(device: torch.device, native: bool) -> bool:
    """Whether bf16 on ``device`` runs through float32 kernels (:mod:`splitcem._bf16`): a
    CPU without bf16 units."""
    return device.type == "cpu" and not native


def _channels_last_fast(device: torch.device, amp: bool) -> bool:
    if device.type == "cpu":
        return torch.backends.mkldnn.is_available() and cpu_capability().startswith("AVX")
    if device.type == "cuda":
        return amp
    return False


# --------------------------------------------------------------------------- numeric path
def describe_path(amp: bool, channels_last: bool) -> str:
    """A numeric path in words, as runs record it: ``bf16 autocast + channels-last``,
    ``float32`` and the like (:func:`ran_bf16` reads it back).

    Example:
        >>> describe_path(True, True), ran_bf16(describe_path(True, False))
        ('bf16 autocast + channels-last', True)
    """
    return ("bf16 autocast" if amp else "float32") + (" + channels-last" if channels_last else "")


def ran_bf16(described: str) -> bool:
    """Whether a path :func:`describe_path` wrote (maybe followed by more words) is bf16."""
    return described.startswith(describe_path(True, False))


@dataclass(frozen=True)
class NumericPath:
    """How a model runs on one device: bf16 autocast or float32, and the memory layout.

    Attributes:
        device: ``cpu``, ``cuda``, ``mps``, ...
        amp: bfloat16 autocast of the convolutions (features and losses stay float32).
        channels_last: NHWC memory layout of the weights and inputs.
        native_bf16: Whether the device has bf16 in hardware.
        cpu_capability: torch's CPU kernel level (recorded with every run).
        reason: One line: why this path (``auto: ...`` or ``set in the config``).
        bf16_via_float32: bf16 autocast's convolutions and matmuls run as float32 kernels
            on bf16-rounded operands (:mod:`splitcem._bf16`): set for ``amp`` on a CPU
            without bf16 units.
    """

    device: str
    amp: bool
    channels_last: bool
    native_bf16: bool
    cpu_capability: str
    reason: str
    bf16_via_float32: bool = False

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def autocast(self) -> AbstractContextManager[Any]:
        """The autocast context (a reusable object; a no-op for float32)."""
        if not self.amp:
            return contextlib.nullcontext()
        return bf16_autocast(self.device, via_float32=self.bf16_via_float32)

    def describe(self) -> str:
        """``bf16 autocast + channels-last`` and the like (:func:`describe_path`)."""
        return describe_path(self.amp, self.channels_last)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "path": self.describe()}


def resolve_numeric_path(
    amp: Setting = "auto",
    channels_last: Setting = "auto",
    device: torch.device | str = "cpu",
    *,
    what: str = "train",
    quiet: bool = False,
) -> NumericPath:
    """Pick bf16 autocast and channels-last for ``device``; ``"auto"`` follows the rules in
    the module docstring, ``True`` / ``False`` are kept.

    ``amp=True`` on a CPU without bf16 units takes float32 kernels on bf16-rounded operands
    (``bf16_via_float32``); on a GPU without it, it warns (:class:`RuntimeWarning`) that it
    is slower; on devices without bf16 autocast (MPS) it is switched off with a warning.
    ``what`` names the settings in messages (``train`` -> ``train.amp``). ``quiet`` resolves
    the same path without those warnings: for code that asks which path a config would
    take (run ids, sweep planning), not code about to run it.

    Example:
        >>> resolve_numeric_path(False, False, "cpu").describe()
        'float32'
    """
    amp, channels_last = check_setting(f"{what}.amp", amp), check_setting(
        f"{what}.channels_last", channels_last)
    dev = torch.device(device)
    native = native_bf16(dev)
    cap = cpu_capability()
    why: list[str] = []
    if amp == "auto":
        use_amp = native
        why.append("bf16 native" if native else "no native bf16: float32")
    else:
        use_amp = bool(amp)
        if use_amp and dev.type not in ("cpu", "cuda"):
            if not quiet:
                warnings.warn(f"{what}.amp: true is not supported on {dev.type}; training "
                              "in float32 (set amp: auto to silence this)", RuntimeWarning,
                              stacklevel=2)
            use_amp = False
        elif use_amp and not native and dev.type == "cuda" and not quiet:
            warnings.warn(f"{what}.amp: true asks for bfloat16 autocast, but this GPU has no "
                          "native bf16 (before Ampere): expect it to run slower than float32; "
                          "use amp: auto (or false) unless runs made with native bf16 must be "
                          "matched", RuntimeWarning, stacklevel=2)
    if channels_last == "auto":
        use_cl = _channels_last_fast(dev, use_amp)
        why.append("channels-last" if use_cl else "default layout")
    else:
        use_cl = bool(channels_last)
    if amp != "auto" and channels_last != "auto":
        reason = "set in the config"
    else:
        reason = f"auto on {dev.type}" + (f" ({cap})" if dev.type == "cpu" else "") + ": " + \
            ", ".join(why)
    return NumericPath(device=dev.type, amp=use_amp, channels_last=use_cl, native_bf16=native,
                       cpu_capability=cap, reason=reason,
                       bf16_via_float32=use_amp and _via_float32(dev, native))


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; an explicit device that is absent is an error."""
    if isinstance(spec, torch.device):
        return spec
    spec = (spec or "auto").lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {spec!r} requested but CUDA is not available; use cpu or auto")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {spec!r} requested but MPS is not available; use cpu or auto")
    return dev


# --------------------------------------------------------------------------- threads
def _affinity() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return set(range(os.cpu_count() or 1))


def _cgroup_quota() -> int | None:
    """CPUs allowed by a cgroup v2 quota (``cpu.max``, rounded up); None when there is none."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        return None if quota == "max" else max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        return None


def usable_cores() -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup CPU quota."""
    quota = _cgroup_quota()
    cores = len(_affinity())
    return max(1, cores if quota is None else min(cores, quota))


def _cpu_jiffies(cpus: set[int], stat: str = "/proc/stat") -> tuple[int, int] | None:
    """(busy, total) jiffies summed over ``cpus`` from /proc/stat; None where unreadable."""
    busy = total = 0
    try:
        with open(stat) as f:
            for line in f:
                if not (line.startswith("cpu") and line[3:4].isdigit()):
                    continue
                name, *vals = line.split()
                if int(name[3:]) not in cpus:
                    continue
                v = [int(x) for x in vals[:8]]  # user nice system idle iowait irq softirq steal
                total += sum(v)
                busy += sum(v) - v[3] - v[4]
    except (OSError, ValueError, IndexError):
        return None
    return (busy, total) if total else None


def busy_cores(interval: float = 0.25) -> float:
    """Cores of this process's CPU set kept busy by other processes, sampled over
    ``interval`` seconds while this process sleeps (0.0 where /proc/stat is unavailable)."""
    cpus = _affinity()
    a = _cpu_jiffies(cpus)
    if a is None:
        return 0.0
    time.sleep(interval)
    b = _cpu_jiffies(cpus)
    if b is None or b[1] <= a[1]:
        return 0.0
    return len(cpus) * (b[0] - a[0]) / (b[1] - a[1])


def default_threads() -> int:
    """The cores this process may use (:func:`usable_cores`) minus those other processes
    keep busy now (:func:`busy_cores`, rounded), at least 1."""
    return max(1, usable_cores() - int(busy_cores() + 0.5))


def _env_threads() -> int | None:
    raw = os.environ.get(ENV_THREADS, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError(f"{ENV_THREADS} must be a positive integer, got {raw!r}; unset it "
                          "to use the free cores")
    return int(raw)


_pinned = False  # set_threads(n) was called with an explicit n


def set_threads(n: int | None = None) -> int:
    """Set torch's intra-op CPU threads and return the number.

    ``n`` (``--threads N``) if given (then it holds for the rest of the process); else
    ``$SPLITCEM_THREADS``; else :func:`default_threads`. A sweep trial calls ``set_threads()``
    (or only sets the variable: :func:`splitcem.experiment.prepare` honours it too).

    Example:
        >>> set_threads(2)  # doctest: +SKIP
        2
    """
    global _pinned
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"threads must be a positive integer, got {n!r}")
        _pinned, why = True, "--threads"
    else:
        env = _env_threads()
        if env is not None:
            n, why = env, f"${ENV_THREADS}"
        else:
            n = default_threads()
            why = f"{usable_cores()} usable cores, the others busy" if n < usable_cores() \
                else "usable cores"
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    log.info("%d CPU thread%s (%s)", n, "" if n == 1 else "s", why)
    return n


def honour_env_threads() -> int | None:
    """Apply ``$SPLITCEM_THREADS`` unless :func:`set_threads` was given a number; returns
    the threads set (None: nothing to do). Library entry points call this."""
    if _pinned:
        return None
    env = _env_threads()
    if env is not None and torch.get_num_threads() != env:
        torch.set_num_threads(env)
    return env
