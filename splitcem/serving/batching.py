"""Dynamic batching: requests that arrive close together run as one forward pass.

A request's features join a queue; one task takes what is queued (at most ``max_samples``
samples), concatenates it, runs the forward pass in one worker thread, and hands each
request its own rows. While a pass runs, new requests queue for the next one. Before a pass
starts it waits at most ``window_s`` for more requests, but only while some may come: while
requests are being received (head in, body not yet decoded), or while fewer requests are
queued than there are open connections (``peers()``: other clients that may send one
any moment). A lone client's request runs at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

__all__ = ["DynamicBatcher"]


class DynamicBatcher:
    """Runs ``forward`` on batches of queued requests, one pass at a time.

    Args:
        forward: float32 (N, ...) features -> (N, K) outputs (a tensor or an array).
        max_samples: Most samples in one pass (requests are never split).
        window_s: Most seconds a pass waits for requests still being received.
        on_batch: Called with (samples, requests) for every pass (metrics).
        peers: How many clients may send a request soon (open connections); None: only
            requests being received are waited for.
    """

    def __init__(self, forward: Callable[[np.ndarray], Any], *, max_samples: int,
                 window_s: float = 0.002,
                 on_batch: Callable[[int, int], None] | None = None,
                 peers: Callable[[], int] | None = None) -> None:
        if max_samples < 1 or not 0 <= window_s <= 0.05:
            raise ValueError("max_samples >= 1 and 0 <= window_s <= 0.05 (50 ms)")
        self.forward = forward
        self.max_samples = max_samples
        self.window_s = window_s
        self.on_batch = on_batch
        self.peers = peers
        self._queue: list[tuple[np.ndarray, asyncio.Future[Any]]] = []
        self._queued = 0  # samples in the queue
        self._arriving = 0  # requests received but not yet queued
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="splitcem-forward")

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Mark a request as on its way (its body being read); a pass may wait for it."""
        self._arriving += 1
        try:
            yield
        finally:
            self._arriving -= 1

    async def submit(self, z: np.ndarray) -> Any:
        """Queue one request's features; returns its rows of the forward pass's output."""
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run())
        assert self._wake is not None
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((z, fut))
        self._queued += len(z)
        self._wake.set()
        return await fut

    def _more_may_come(self) -> bool:
        if self._queued >= self.max_samples:
            return False
        if self._arriving > 0:
            return True
        return self.peers is not None and len(self._queue) < self.peers()

    def _take(self) -> list[tuple[np.ndarray, asyncio.Future[Any]]]:
        taken: list[tuple[np.ndarray, asyncio.Future[Any]]] = []
        n = 0
        while self._queue and (not taken or n + len(self._queue[0][0]) <= self.max_samples):
            item = self._queue.pop(0)
            n += len(item[0])
            taken.append(item)
        self._queued -= n
        return taken

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._queue:
                continue
            deadline = loop.time() + self.window_s
            while self._more_may_come() and loop.time() < deadline:
                await asyncio.sleep(min(0.0005, max(0.0, deadline - loop.time())))
            taken = self._take()
            if self._queue:
                self._wake.set()  # the rest goes in the next pass
            taken = [(z, f) for z, f in taken if not f.cancelled()]
            if not taken:
                continue
            sizes = [len(z) for z, _ in taken]
            batch = taken[0][0] if len(taken) == 1 else np.concatenate([z for z, _ in taken])
            try:
                out = await loop.run_in_executor(self._pool, self.forward, batch)
            except Exception as e:  # every request of the pass gets the error
                for _, f in taken:
                    if not f.done():
                        f.set_exception(e)
                continue
            if self.on_batch is not None:
                self.on_batch(len(batch), len(taken))
            start = 0
            for (_, f), n in zip(taken, sizes, strict=True):
                if not f.done():
                    f.set_result(out[start:start + n])
                start += n

    def close(self) -> None:
        """Stop the batching task and the forward thread."""
        if self._task is not None:
            self._task.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)
