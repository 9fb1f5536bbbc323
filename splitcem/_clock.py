"""How long a phase took: wall seconds, and on a CPU its process's CPU seconds.

A phase's record (``metrics.json``'s ``attacks``, an audit's) carries ``seconds`` and, where
it ran on a CPU, ``cpu_seconds``: the process's CPU time over all its threads, which other
work on a busy machine does not inflate (what ``splitcem reproduce --list`` counts as a run's
cost, :func:`splitcem.study.listing.run_cost`). On a GPU the host's CPU time is not the cost,
so it is left out.
"""

from __future__ import annotations

import time

import torch

__all__ = ["Clock"]


class Clock:
    """Started on creation; :meth:`times` reads it.

    Example:
        >>> clock = Clock("cpu")
        >>> sorted(clock.times())
        ['cpu_seconds', 'seconds']
        >>> sorted(Clock("cuda").times())
        ['seconds']
    """

    def __init__(self, device: str | torch.device) -> None:
        self.on_cpu = torch.device(device).type == "cpu"
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()

    def times(self) -> dict[str, float]:
        """``{"seconds": wall seconds}`` since the start, with ``"cpu_seconds"`` on a CPU."""
        out = {"seconds": time.perf_counter() - self.wall0}
        if self.on_cpu:
            out["cpu_seconds"] = time.process_time() - self.cpu0
        return out
