"""The server's Prometheus metrics (``GET /metrics``, behind the token), one registry per app.

    splitcem_requests_total{route,status}        answers, by route and HTTP status
    splitcem_request_seconds{route}              latency histogram (head received -> answer)
    splitcem_forward_batch_samples               samples per forward pass
    splitcem_forward_batch_requests              requests per forward pass (dynamic batching)
    splitcem_client_disconnects_total            clients gone before their body was read
    splitcem_connections_closed_total{reason}    header_timeout / connection_limit
    splitcem_worker_info{pid}                    which worker process answered the scrape

With ``--workers N`` each process keeps its own counts; a scrape reaches one of them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from splitcem.serving.transport import STATS

__all__ = ["MetricsMiddleware", "ServerMetrics"]

ROUTES = ("/v1/health", "/v1/spec", "/v1/infer", "/metrics")


class ServerMetrics:
    """The counters and histograms of one server app (``prometheus_client``)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        reg = self.registry = CollectorRegistry()
        self.requests = Counter("splitcem_requests", "HTTP answers by route and status",
                                ["route", "status"], registry=reg)
        self.latency = Histogram(
            "splitcem_request_seconds", "Seconds from request head to answer", ["route"],
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5),
            registry=reg)
        self.batch_samples = Histogram(
            "splitcem_forward_batch_samples", "Samples per forward pass",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=reg)
        self.batch_requests = Histogram(
            "splitcem_forward_batch_requests", "Requests per forward pass",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64), registry=reg)
        self.disconnects = Counter("splitcem_client_disconnects",
                                   "Clients that disconnected before their body was read",
                                   registry=reg)
        Gauge("splitcem_worker_info", "The worker process that answered", ["pid"],
              registry=reg).labels(pid=str(os.getpid())).set(1)
        reg.register(_TransportCollector())

    def observe_batch(self, samples: int, requests: int) -> None:
        """Record one forward pass."""
        self.batch_samples.observe(samples)
        self.batch_requests.observe(requests)

    def render(self) -> tuple[bytes, str]:
        """(the Prometheus text exposition, its content type)."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _TransportCollector:
    """Reads the transport's close counts (:data:`splitcem.serving.transport.STATS`)."""

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily

        fam = CounterMetricFamily("splitcem_connections_closed",
                                  "Connections the server closed itself, by reason",
                                  labels=["reason"])
        for reason, n in sorted(STATS.items()):
            fam.add_metric([reason], n)
        yield fam

    def describe(self) -> Iterator[Any]:
        return iter(())


Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class MetricsMiddleware:
    """Pure ASGI middleware: counts every answer by route and status and times it."""

    def __init__(self, app: Any, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = [500]

        async def send_status(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope["path"] if scope["path"] in ROUTES else "other"
            self.metrics.requests.labels(route=route, status=str(status[0])).inc()
            self.metrics.latency.labels(route=route).observe(time.perf_counter() - t0)
