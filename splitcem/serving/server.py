"""The server process: the tail and classifier of a split model behind a small HTTP API.

    GET  /v1/health   liveness: {"status": "ok", "model_id": ...} (no token needed)
    GET  /v1/spec     what a client must send: feature shape and dtypes, model id, class
                      names, the noise contract, the limits
    POST /v1/infer    a batch of features (docs/serving.md) -> class probabilities, labels

The process holds only the server half (:class:`ServerHalf` reads ``spec.json`` and
``server.safetensors``, nothing else). Requests are checked in this order, each refusal a
4xx JSON ``{"error": code, "detail": message}``: token (401), model id header (409),
content type (415), body size (413), then the body itself (400 / 422, see
:mod:`splitcem.serving.wire`). The model runs in eval mode under ``inference_mode`` and
one forward at a time (a lock), so no request can change what the next one gets.
"""

# No `from __future__ import annotations` here: FastAPI resolves the endpoints'
# annotations (Request, imported inside the factory so that clients need no FastAPI) when
# they are defined.

import hmac
import logging
import socket
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from splitcem.errors import ServingError
from splitcem.serving.deploy import contract, read_half
from splitcem.serving.program import build_half
from splitcem.serving.wire import (
    BINARY,
    DTYPES,
    JSON,
    FeatureLimits,
    WireError,
    content_kind,
    decode_features,
)

__all__ = ["MODEL_HEADER", "ServerHalf", "create_app", "listen_socket", "read_token", "serve"]

log = logging.getLogger(__name__)

#: request header a client may send with the model id it was exported with (409 if it differs)
MODEL_HEADER = "X-Splitcem-Model"


class ServerHalf:
    """The server tail and classifier of a deployment, loaded from its server file only.

    Args:
        path: A deployment directory (or a run directory holding ``deploy/``).
        device: Where the tail runs.

    The architecture is rebuilt from the spec; only the ``server`` sub-module is kept (the
    freshly initialised client layers of the rebuild are dropped at once, and the
    deployment's client weights are never read).
    """

    def __init__(self, path: str | Path, *, device: str | torch.device = "cpu") -> None:
        spec, tensors = read_half(path, "server")
        self.spec = spec
        self.device = torch.device(device)
        tail: nn.Module = build_half(path, spec, "server")  # a program, or rebuilt
        state = {k[len("server."):]: v for k, v in tensors.items()}
        try:
            tail.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ServingError(f"server weights do not fit the spec's model ({e}); re-export"
                               ) from e
        self.tail = tail.to(self.device).eval()
        #: tensor names loaded (all "server.*"), for audits
        self.loaded_keys = sorted(tensors)
        self.model_id: str = spec["model_id"]
        self.classes: list[str] = list(spec["classes"])
        self.feature_shape: tuple[int, int, int] = tuple(spec["features"]["shape"])  # type: ignore[assignment]
        self._lock = threading.Lock()

    @torch.inference_mode()
    def logits(self, z: Tensor) -> Tensor:
        """(B, C, H, W) features -> (B, K) float32 logits on the CPU."""
        with self._lock:  # one forward at a time: each gets all intra-op threads
            return self.tail(z.to(self.device, torch.float32)).float().cpu()

    def predict(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """float32 (B, C, H, W) features -> (probabilities (B, K) float64, labels (B,))."""
        logits = self.logits(torch.from_numpy(z)).double()
        if not torch.isfinite(logits).all():
            raise WireError(422, "out_of_range",
                            "these features drive the model's logits to infinity; expected "
                            "the client encoder's outputs (after its defense transform)")
        probs = torch.softmax(logits, dim=1)
        return probs.numpy(), probs.argmax(dim=1).numpy()


def read_token(path: str | Path | None) -> str | None:
    """The bearer token in ``path`` (surrounding whitespace stripped), or None."""
    if path is None:
        return None
    p = Path(path)
    try:
        token = p.read_text().strip()
    except OSError as e:
        raise ServingError(f"cannot read the token file {p} ({e.strerror})") from e
    if not token or any(c.isspace() for c in token):
        raise ServingError(f"the token file {p} must hold one token without spaces")
    return token


def create_app(
    half: ServerHalf,
    *,
    token: str | None = None,
    limits: FeatureLimits | None = None,
    max_body_bytes: int | None = None,
) -> Any:
    """The FastAPI app serving ``half``.

    Args:
        half: The loaded server tail.
        token: Bearer token every request but ``/v1/health`` must carry (None: no auth).
        limits: Batch and value limits (default: :class:`FeatureLimits` for the model).
        max_body_bytes: Largest request body (default: enough for the largest allowed
            binary or JSON batch).
    """
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool

    lim = limits or FeatureLimits(shape=half.feature_shape)
    if tuple(lim.shape) != tuple(half.feature_shape):
        raise ServingError(f"limits are for features {lim.shape}, the model takes "
                           f"{half.feature_shape}")
    body_limit = max_body_bytes or lim.default_body_limit()
    started = time.time()
    counts = {"infer_ok": 0, "rejected": 0}
    app = FastAPI(title="splitcem server", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(WireError)
    async def _refuse(request: Request, exc: WireError) -> JSONResponse:
        counts["rejected"] += 1
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse({"error": exc.code, "detail": str(exc)}, status_code=exc.status or 400,
                            headers=headers)

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
                       "max_body_bytes": body_limit},
            "model_header": MODEL_HEADER,
        }

    @app.get("/v1/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model_id": half.model_id,
                "uptime_s": round(time.time() - started, 3), **counts}

    @app.get("/v1/spec")
    async def get_spec(request: Request) -> dict[str, Any]:
        _auth(request)
        return public_spec()

    async def _read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise WireError(400, "bad_length", f"Content-Length {declared!r} is not a "
                                "byte count")
            if int(declared) > body_limit:
                raise WireError(413, "body_too_large",
                                f"body of {int(declared)} bytes exceeds this server's limit of "
                                f"{body_limit}; send at most {lim.max_batch} samples per "
                                "request (binary) or fewer")
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():  # a body without Content-Length is capped too
            size += len(chunk)
            if size > body_limit:
                raise WireError(413, "body_too_large",
                                f"body exceeds this server's limit of {body_limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    @app.post("/v1/infer")
    async def infer(request: Request) -> dict[str, Any]:
        _auth(request)
        claimed = request.headers.get(MODEL_HEADER.lower())
        if claimed is not None and claimed != half.model_id:
            raise WireError(409, "spec_mismatch",
                            f"this server serves model {half.model_id!r}, the client was "
                            f"exported for {claimed!r}; use the deployment this server was "
                            "started from (GET /v1/spec)")
        ctype = request.headers.get("content-type", "")
        content_kind(ctype)  # 415 before reading the body
        body = await _read_body(request)
        z = decode_features(body, ctype, lim)
        probs, labels = await run_in_threadpool(half.predict, z)
        counts["infer_ok"] += 1
        return {"model_id": half.model_id, "labels": labels.tolist(),
                "classes": [half.classes[i] for i in labels.tolist()],
                "probs": probs.tolist()}

    return app


def _is_loopback(host: str) -> bool:
    return host in ("127.0.0.1", "::1", "localhost") or host.startswith("127.")


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


def serve(
    path: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    token_file: str | Path | None = None,
    limits: dict[str, Any] | None = None,
    max_body_bytes: int | None = None,
    threads: int | None = None,
    device: str | torch.device = "cpu",
    log_level: str = "warning",
) -> None:
    """Serve a deployment (or a run, exported first in a subprocess) until interrupted.

    Binds ``host:port`` itself (``port=0``: a free port) and prints one line with the URL
    it listens on before serving, so a caller can read the port from stdout.
    """
    import uvicorn

    from splitcem.serving.export import ensure_export

    if threads is not None:
        torch.set_num_threads(threads)
    d = ensure_export(path)
    half = ServerHalf(d, device=device)
    token = read_token(token_file)
    lim = FeatureLimits(shape=half.feature_shape, **(limits or {}))
    app = create_app(half, token=token, limits=lim, max_body_bytes=max_body_bytes)
    if token is None and not _is_loopback(host):
        log.warning("serving on %s without --token-file: anyone who reaches it can query "
                    "the model", host)
    sock = listen_socket(host, port)
    bound = sock.getsockname()[1]
    url_host = f"[{host}]" if sock.family == socket.AF_INET6 else host
    print(f"splitcem serve: {half.model_id} on http://{url_host}:{bound} "
          f"(features {list(half.feature_shape)}, auth {'on' if token else 'off'})", flush=True)
    config = uvicorn.Config(app, log_level=log_level, access_log=False, timeout_keep_alive=30)
    uvicorn.Server(config).run(sockets=[sock])
