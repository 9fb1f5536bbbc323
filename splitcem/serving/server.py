"""The server process: the tail and classifier of a split model behind a small HTTP API.

    GET  /v1/health   liveness: {"status": "ok"} (no token needed, nothing else said)
    GET  /v1/spec     what a client must send: feature shape and dtypes, model id, class
                      names, the noise contract, the limits
    POST /v1/infer    a batch of features (docs/serving.md) -> class probabilities, labels
    GET  /metrics     Prometheus text format (:mod:`splitcem.serving.metrics`)

The process holds only the server half (:class:`~splitcem.serving.halves.ServerHalf` reads
``spec.json`` and ``server.safetensors``, nothing else). Requests are checked in this order,
each refusal a 4xx JSON ``{"error": code, "detail": message}``: token (401), model id header
(409), content type (415), body size (413, the binary and the JSON limit each its own),
body deadline (408), then the body itself (400 / 422, see :mod:`splitcem.serving.wire`).
The model runs in eval mode under ``inference_mode``; requests arriving together run as one
forward pass (:mod:`splitcem.serving.batching`) and are answered each with its own rows.
``serve`` binds the socket, checks TLS and auth settings, and runs uvicorn (``--workers N``:
N processes on the one socket).
"""

# No `from __future__ import annotations` here: FastAPI resolves the endpoints'
# annotations (Request, imported inside the factory so that clients need no FastAPI) when
# they are defined.

import asyncio
import dataclasses
import hmac
import json
import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from splitcem.errors import ServingError
from splitcem.serving.auth import read_token
from splitcem.serving.batching import DynamicBatcher
from splitcem.serving.deploy import contract
from splitcem.serving.export import ensure_export
from splitcem.serving.halves import ServerHalf
from splitcem.serving.metrics import MetricsMiddleware, ServerMetrics
from splitcem.serving.transport import (
    OPEN,
    Deadlines,
    is_loopback,
    listen_socket,
    require_extra,
)
from splitcem.serving.wire import (
    BINARY,
    DTYPES,
    JSON,
    FeatureLimits,
    WireError,
    content_kind,
    decode_features,
)

__all__ = ["MODEL_HEADER", "ServeSettings", "ServerHalf", "create_app", "listen_socket",
           "read_token", "serve", "worker_app"]

log = logging.getLogger(__name__)

#: request header a client may send with the model id it was exported with (409 if it differs)
MODEL_HEADER = "X-Splitcem-Model"
#: environment variable carrying a worker process's :class:`ServeSettings` (JSON)
SETTINGS_ENV = "SPLITCEM_SERVE_SETTINGS"


class _ClientGone(Exception):
    """The client disconnected before its body was read."""


def create_app(
    half: ServerHalf,
    *,
    token: str | None = None,
    limits: FeatureLimits | None = None,
    max_body_bytes: int | None = None,
    max_json_body_bytes: int | None = None,
    batch_window_ms: float | None = 2.0,
    body_timeout_s: float = 30.0,
) -> Any:
    """The FastAPI app serving ``half``.

    Args:
        half: The loaded server tail.
        token: Bearer token every request but ``/v1/health`` must carry (None: no auth).
        limits: Batch and value limits (default: :class:`FeatureLimits` for the model).
        max_body_bytes: Largest binary body (default: the largest allowed binary batch).
        max_json_body_bytes: Largest JSON body (default: the largest allowed JSON batch).
        batch_window_ms: Dynamic batching: most milliseconds a forward pass waits for
            requests still arriving (at most 50). None: no batching, one forward pass per
            request, in turn.
        body_timeout_s: Most seconds to receive a body once its head has arrived (408).
    """
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import ClientDisconnect

    lim = limits or FeatureLimits(shape=half.feature_shape)
    if tuple(lim.shape) != tuple(half.feature_shape):
        raise ServingError(f"limits are for features {lim.shape}, the model takes "
                           f"{half.feature_shape}")
    body_limit = {BINARY: max_body_bytes or lim.max_binary_bytes(),
                  JSON: max_json_body_bytes or lim.max_json_bytes()}
    metrics = ServerMetrics()
    batcher = None
    if batch_window_ms is not None:
        batcher = DynamicBatcher(
            lambda z: half.logits(torch.from_numpy(z)), max_samples=lim.max_batch,
            window_s=batch_window_ms / 1e3, on_batch=metrics.observe_batch,
            peers=lambda: OPEN[0])
    app = FastAPI(title="splitcem server", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    @app.exception_handler(WireError)
    async def _refuse(request: Request, exc: WireError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else {}
        if exc.status in (408, 413):  # the rest of the body is not read: end the connection
            headers["Connection"] = "close"
        return JSONResponse({"error": exc.code, "detail": str(exc)}, status_code=exc.status or 400,
                            headers=headers)

    @app.exception_handler(_ClientGone)
    async def _gone(request: Request, exc: _ClientGone) -> Response:
        return Response(status_code=499)  # nobody reads it; counted under 499 in /metrics

    def _auth(request: Request) -> None:
        if token is None:
            return
        got = request.headers.get("authorization", "")
        scheme, _, value = got.partition(" ")
        if not got:
            raise WireError(401, "missing_token", "missing bearer token: send "
                            "'Authorization: Bearer <token>' with the server's --token-file")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(),
                                                                 token.encode()):
            raise WireError(401, "bad_token", "wrong bearer token: send 'Authorization: "
                            "Bearer <token>' with the token in the server's --token-file")

    def public_spec() -> dict[str, Any]:
        s = half.spec
        return {
            **contract(s),
            "name": s["name"],
            "dataset": s["dataset"],
            "features": {"shape": list(half.feature_shape), "dtypes": [n for n, _ in
                                                                      DTYPES.values()],
                         "content_types": [BINARY, JSON], "max_abs": lim.max_abs},
            "image": s["image"],
            "limits": {"max_batch": lim.max_batch, "max_json_batch": lim.max_json_batch,
                       "max_body_bytes": body_limit[BINARY],
                       "max_json_body_bytes": body_limit[JSON]},
            "model_header": MODEL_HEADER,
        }

    @app.get("/v1/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok"}

    @app.get("/v1/spec")
    async def get_spec(request: Request) -> dict[str, Any]:
        _auth(request)
        return public_spec()

    @app.get("/metrics")
    async def get_metrics(request: Request) -> Response:
        _auth(request)
        data, ctype = metrics.render()
        return Response(data, media_type=ctype)

    async def _read_body(request: Request, limit: int) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise WireError(400, "bad_length", f"Content-Length {declared!r} is not a "
                                "byte count")
            if int(declared) > limit:
                raise WireError(413, "body_too_large",
                                f"body of {int(declared)} bytes exceeds this server's limit of "
                                f"{limit} for this content type; send at most "
                                f"{lim.max_batch} samples per request (binary) or fewer")
        chunks: list[bytes] = []
        size = [0]

        async def read() -> bytes:
            async for chunk in request.stream():  # a body without Content-Length is capped too
                size[0] += len(chunk)
                if size[0] > limit:
                    raise WireError(413, "body_too_large",
                                    f"body exceeds this server's limit of {limit} bytes")
                chunks.append(chunk)
            return b"".join(chunks)

        try:
            if hasattr(asyncio, "timeout"):  # 3.11+: no extra task per request
                async with asyncio.timeout(body_timeout_s):
                    return await read()
            return await asyncio.wait_for(read(), body_timeout_s)
        except asyncio.TimeoutError:
            raise WireError(408, "body_timeout",
                            f"the body did not arrive within {body_timeout_s:g} s of the "
                            "request head; send it at once") from None
        except ClientDisconnect:
            metrics.disconnects.inc()
            peer = request.client.host if request.client else "?"
            log.warning("client %s disconnected after %d of %s body bytes", peer, size[0],
                        declared or "(unknown)")
            raise _ClientGone() from None

    @app.post("/v1/infer")
    async def infer(request: Request) -> Response:
        _auth(request)
        claimed = request.headers.get(MODEL_HEADER.lower())
        if claimed is not None and claimed != half.model_id:
            raise WireError(409, "spec_mismatch",
                            f"this server serves model {half.model_id!r}, the client was "
                            f"exported for {claimed!r}; use the deployment this server was "
                            "started from (GET /v1/spec)")
        ctype = request.headers.get("content-type", "")
        kind = content_kind(ctype)  # 415 before reading the body
        if batcher is None:  # one forward pass per request, in turn (ServerHalf's lock)
            z = decode_features(await _read_body(request, body_limit[kind]), ctype, lim)
            probs, labels = await run_in_threadpool(half.predict, z)
            metrics.observe_batch(len(z), 1)
        else:
            with batcher.arriving():
                z = decode_features(await _read_body(request, body_limit[kind]), ctype, lim)
            probs, labels = half.answer(await batcher.submit(z))
        ans = {"model_id": half.model_id, "labels": labels.tolist(),
               "classes": [half.classes[i] for i in labels.tolist()], "probs": probs.tolist()}
        return Response(json.dumps(ans).encode(), media_type="application/json")

    return app


@dataclass(frozen=True)
class ServeSettings:
    """Everything a server process needs to build its app (a worker gets it as JSON).

    Attributes:
        path: The deployment directory (already exported).
        token_file: File holding the bearer token (None: no auth).
        limits: :class:`FeatureLimits` fields other than ``shape`` (``max_batch``, ...).
        max_body_bytes: Largest binary body (None: fits ``max_batch``).
        max_json_body_bytes: Largest JSON body (None: fits ``max_json_batch``).
        threads: torch threads of the process (None: torch's default).
        device: Where the tail runs.
        batch_window_ms: Dynamic batching window (None: no batching).
        deadlines: Connection deadlines and limits.
    """

    path: str
    token_file: str | None = None
    limits: dict[str, Any] = field(default_factory=dict)
    max_body_bytes: int | None = None
    max_json_body_bytes: int | None = None
    threads: int | None = None
    device: str = "cpu"
    batch_window_ms: float | None = 2.0
    deadlines: Deadlines = field(default_factory=Deadlines)

    def to_json(self) -> str:
        """JSON of the settings (for a worker process)."""
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "ServeSettings":
        """The settings :meth:`to_json` wrote."""
        d = json.loads(text)
        return cls(**{**d, "deadlines": Deadlines(**d["deadlines"])})


def build_app(settings: ServeSettings) -> tuple[Any, ServerHalf, bool]:
    """(app, its server half, whether a token is required) for ``settings``."""
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    half = ServerHalf(settings.path, device=settings.device)
    token = read_token(settings.token_file)
    lim = FeatureLimits(shape=half.feature_shape, **settings.limits)
    app = create_app(half, token=token, limits=lim, max_body_bytes=settings.max_body_bytes,
                     max_json_body_bytes=settings.max_json_body_bytes,
                     batch_window_ms=settings.batch_window_ms,
                     body_timeout_s=settings.deadlines.body_s)
    return app, half, token is not None


def worker_app() -> Any:
    """The app of a worker process (``--workers N``): built from ``$SPLITCEM_SERVE_SETTINGS``."""
    from splitcem.serving.protocol import GuardedH11Protocol

    settings = ServeSettings.from_json(os.environ[SETTINGS_ENV])
    GuardedH11Protocol.deadlines = settings.deadlines
    return build_app(settings)[0]


def _check_tls(certfile: str | Path | None, keyfile: str | Path | None) -> dict[str, str]:
    if certfile is None and keyfile is None:
        return {}
    if certfile is None or keyfile is None:
        raise ServingError("TLS needs both --ssl-certfile and --ssl-keyfile")
    import ssl

    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certfile, keyfile)
    except (OSError, ssl.SSLError) as e:
        raise ServingError(f"cannot load the TLS certificate {certfile} with key {keyfile} "
                           f"({e}); give a PEM certificate and its private key") from e
    return {"ssl_certfile": str(certfile), "ssl_keyfile": str(keyfile)}


def serve(
    path: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    token_file: str | Path | None = None,
    insecure: bool = False,
    ssl_certfile: str | Path | None = None,
    ssl_keyfile: str | Path | None = None,
    workers: int = 1,
    log_level: str = "warning",
    **options: Any,
) -> None:
    """Serve a deployment (or a run, exported first in a subprocess) until interrupted.

    Binds ``host:port`` itself (``port=0``: a free port) and prints one line with the URL
    it listens on before serving, so a caller can read the port from stdout. ``options``
    are the other :class:`ServeSettings` fields. A non-loopback ``host`` needs a
    ``token_file`` unless ``insecure``; ``workers`` > 1 runs that many processes on the
    one socket (each with its own model copy, batcher and metrics).
    """
    require_extra()
    if token_file is None and not is_loopback(host) and not insecure:
        raise ServingError(f"refusing to serve on {host} without --token-file: anyone who "
                           "reaches it could query the model; give --token-file FILE (or "
                           "--insecure to serve without auth anyway)")
    if workers < 1:
        raise ServingError("--workers must be at least 1")
    tls = _check_tls(ssl_certfile, ssl_keyfile)
    if token_file is not None:
        read_token(token_file)  # a bad token file fails here, before any export
    d = ensure_export(path)
    settings = ServeSettings(path=str(d), token_file=None if token_file is None
                             else str(token_file), **options)
    if workers == 1:
        app, half, auth = build_app(settings)
        model_id, shape = half.model_id, list(half.feature_shape)
    else:  # load it once here too: a broken deployment fails in one line, not in N workers
        half = ServerHalf(d, device="cpu")
        model_id, shape = half.model_id, list(half.feature_shape)
        del half
        os.environ[SETTINGS_ENV] = settings.to_json()
        app, auth = "splitcem.serving.server:worker_app", token_file is not None
    if not auth and not is_loopback(host):
        log.warning("serving on %s without --token-file (--insecure): anyone who reaches it "
                    "can query the model", host)
    sock = listen_socket(host, port)
    bound = sock.getsockname()[1]
    url_host = f"[{host}]" if sock.family == socket.AF_INET6 else host
    scheme = "https" if tls else "http"
    print(f"splitcem serve: {model_id} on {scheme}://{url_host}:{bound} (features {shape}, "
          f"auth {'on' if auth else 'off'}, workers {workers}, batching "
          f"{'off' if settings.batch_window_ms is None else 'on'})", flush=True)
    import uvicorn

    from splitcem.serving.protocol import uvicorn_config

    config = uvicorn_config(app, settings.deadlines, log_level=log_level, workers=workers,
                            factory=workers > 1, **tls)
    if workers == 1:
        uvicorn.Server(config).run(sockets=[sock])
    else:
        from uvicorn.supervisors import Multiprocess

        Multiprocess(config, sockets=[sock]).run()
