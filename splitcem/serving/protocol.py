"""uvicorn's h11 protocol with a request-head deadline and a connection limit, and the
uvicorn settings of the server and the lens.

Imported only when a server starts (it imports uvicorn); :func:`uvicorn_config` sets
:attr:`GuardedH11Protocol.deadlines` before any connection is made.
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

from uvicorn.protocols.http.h11_impl import H11Protocol

from splitcem.serving.transport import OPEN, STATS, Deadlines

__all__ = ["GuardedH11Protocol", "uvicorn_config"]


class GuardedH11Protocol(H11Protocol):
    """Closes a connection whose request head has not arrived within ``header_s`` of its
    start (or of the end of its last response), and any connection beyond
    ``max_connections``; marks the ``max_requests_per_connection``-th answer
    ``Connection: close``."""

    deadlines: ClassVar[Deadlines] = Deadlines()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._requests = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        OPEN[0] = len(self.connections)
        if len(self.connections) > self.deadlines.max_connections:
            STATS["connection_limit"] += 1
            transport.close()
            return
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self.deadlines.header_s, self._head_timeout)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _waiting_for_head(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _head_timeout(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing() and self._waiting_for_head():
            STATS["header_timeout"] += 1
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        before = self.cycle
        super().data_received(data)
        if self.cycle is not before:  # a request head is complete
            self._disarm()
            self._requests += 1
            if self._requests >= self.deadlines.max_requests_per_connection:
                # uvicorn closes after the answer; the header tells the client beforehand
                self.cycle.keep_alive = False
                self.cycle.default_headers = [*self.cycle.default_headers,
                                              (b"connection", b"close")]

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self._waiting_for_head():
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)
        OPEN[0] = len(self.connections)


def uvicorn_config(app: Any, deadlines: Deadlines, *, log_level: str = "warning",
                   **kwargs: Any) -> Any:
    """A ``uvicorn.Config`` for ``app`` with :class:`GuardedH11Protocol` and ``deadlines``."""
    import uvicorn

    GuardedH11Protocol.deadlines = deadlines
    return uvicorn.Config(
        app, http=GuardedH11Protocol, loop="asyncio", log_level=log_level, access_log=False,
        timeout_keep_alive=deadlines.keep_alive_s,  # type: ignore[arg-type]
        h11_max_incomplete_event_size=deadlines.max_head_bytes, timeout_graceful_shutdown=5,
        **kwargs)
