"""What code and machine made a run: one entry per phase in its ``metrics.json``.

:class:`splitcem.record.RunRecord` appends :func:`made_by` to ``metrics["made_by"]`` when
training starts or resumes and when attacks are recorded, so a committed run says which
commit trained and attacked it, on which CPU, with which torch: the provenance that a
results folder's README otherwise has to state by hand. Nothing here changes what a run
computes or how runs compare (the config and attack hashes do that).

The commit is read from the git checkout ``splitcem`` is imported from (``git rev-parse``),
with ``+dirty`` when the package's tracked files differ from it; ``None`` for an installed
wheel or where git is missing.
"""

from __future__ import annotations

import functools
import platform
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

__all__ = ["made_by"]

_ROOT = Path(__file__).resolve().parents[1]  # the checkout (or site-packages) above splitcem/


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(_ROOT), *args], capture_output=True,
                             text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


@functools.cache
def _commit() -> str | None:
    """The checkout's commit (``+dirty`` if ``splitcem/``'s tracked files are changed), read
    once per process: the code it imported, even if the checkout moves on meanwhile."""
    if shutil.which("git") is None or not (_ROOT / ".git").exists():
        return None
    sha = _git("rev-parse", "HEAD")
    if not sha:
        return None
    dirty = _git("status", "--porcelain", "--untracked-files=no", "--", "splitcem")
    return sha + ("+dirty" if dirty else "")


@functools.cache
def _cpu() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what ``platform`` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _accelerator(device: str) -> str | None:
    if not device.startswith("cuda"):
        return None
    import torch

    return str(torch.cuda.get_device_name(torch.device(device)))


def made_by(phase: str, device: str) -> dict[str, Any]:
    """One provenance entry: ``phase`` (``train``, ``resume`` or ``attacks``), when, the
    splitcem version and commit, torch and Python versions, the CPU, (on CUDA) the GPU, and
    what runs bf16 autocast's convolutions there (:func:`splitcem.runtime.bf16_kernels`: the
    phases of one run may differ, e.g. a run resumed by a newer splitcem).

    >>> e = made_by("train", "cpu")
    >>> sorted(e)
    ['at', 'bf16', 'commit', 'cpu', 'gpu', 'phase', 'python', 'splitcem', 'torch']
    """
    import torch

    import splitcem
    from splitcem.runtime import bf16_kernels

    return {"phase": phase, "at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "splitcem": splitcem.__version__, "commit": _commit(),
            "torch": str(torch.__version__), "python": platform.python_version(),
            "cpu": _cpu(), "gpu": _accelerator(device), "bf16": bf16_kernels(device)}
