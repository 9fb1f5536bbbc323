"""The HTTP transport of the server and the lens: the listening socket, uvicorn's settings,
and the deadlines and limits that keep slow or idle clients from holding the server.

uvicorn (h11) bounds the size of a request head (``h11_max_incomplete_event_size``) and the
idle time between requests (``timeout_keep_alive``); it has no deadline for a request head
that arrives slowly and no connection limit that does not answer 503. Those two live in
:mod:`splitcem.serving.protocol` (a small subclass of uvicorn's h11 protocol, imported only
when a server starts); the body deadline is the app's (it reads the body itself).
"""

from __future__ import annotations

import importlib
import socket
from dataclasses import dataclass

from splitcem.errors import ServingError

__all__ = ["OPEN", "STATS", "Deadlines", "is_loopback", "listen_socket", "require_extra"]

#: connections the transport closed itself, by reason (the server's /metrics reports them)
STATS: dict[str, int] = {"header_timeout": 0, "connection_limit": 0}
#: connections open now in this process (kept by the guarded protocol; the batcher reads it)
OPEN: list[int] = [0]

#: what ``pip install 'splitcem[serve]'`` brings, by import name
SERVE_MODULES = ("fastapi", "uvicorn", "prometheus_client")


def require_extra(modules: tuple[str, ...] = SERVE_MODULES) -> None:
    """Raise one clear :class:`ServingError` naming the extra to install if any is missing."""
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ServingError(f"serving needs {', '.join(missing)} (the 'serve' extra): "
                           "pip install 'splitcem[serve]'")


@dataclass(frozen=True)
class Deadlines:
    """Per-connection bounds.

    Attributes:
        header_s: Most seconds from a connection's start (or the end of its last response)
            to the end of the next request head; then the connection is closed.
        body_s: Most seconds to receive a request body once its head has arrived (408).
        keep_alive_s: Most idle seconds between requests on one connection.
        max_connections: Open connections per process; one more is closed at once.
        max_requests_per_connection: Then the answer says ``Connection: close``.
        max_head_bytes: Largest request line + headers (h11 answers 400 above it).
    """

    header_s: float = 10.0
    body_s: float = 30.0
    keep_alive_s: float = 5.0
    max_connections: int = 512
    max_requests_per_connection: int = 10_000
    max_head_bytes: int = 16 * 1024


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (or ``localhost``)."""
    return host in ("::1", "localhost") or host.startswith("127.")


def listen_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (0: any free port) for uvicorn to serve on.

    Bound here, not by uvicorn, so the port is known (and connections queue) before the
    server starts. proto=TCP: asyncio sets TCP_NODELAY only on sockets that say so (else
    Nagle + delayed ACK add ~40 ms to every response).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ServingError(f"cannot listen on {host}:{port} ({e.strerror}); pick another "
                           "--port (0 = any free port)") from e
    sock.listen(2048)  # connections queue from now on, before uvicorn accepts them
    return sock
