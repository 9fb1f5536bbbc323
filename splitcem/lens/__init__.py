"""The privacy lens: a local page showing what crosses the wire for one image, and what the
run's strongest attacker rebuilds from exactly that.

``splitcem lens RUN_DIR --url URL`` starts a small FastAPI app on 127.0.0.1 (the client's
machine). For an uploaded image it: encodes the image with the run's client encoder and
deployed defense (:class:`~splitcem.serving.Client`), sends the features to the server at
URL and shows its prediction; renders the features that were sent as an image; and runs
the decoder that ``splitcem attack`` saved (``RUN_DIR/attack_decoder.safetensors``, the
decoder-based attack with the lowest MSE) on those same features, with the MSE / SSIM /
PSNR of its reconstruction against the image.

The page and the image stay on the client's machine: only the features reach the server.
The lens answers only its own Host names, and every API call must carry the random token of
this launch (the printed URL holds it in its fragment; the page sends it in a header), so
another site cannot drive it, with or without DNS rebinding (:class:`LensGuard`).
The lens lives outside :mod:`splitcem.serving` because it uses attack code (the decoder),
which the serving package must not.
"""

# No `from __future__ import annotations` here: FastAPI resolves the endpoints'
# annotations (Request, imported inside the factory so that clients need no FastAPI) when
# they are defined.

import base64
import io
import logging
import math
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from splitcem.errors import ServingError, SplitcemError

__all__ = ["Lens", "LensGuard", "allowed_hosts", "create_lens_app", "run_lens", "wait_for_server"]

log = logging.getLogger(__name__)

#: largest upload the page accepts
MAX_UPLOAD = 16 * 2**20


def _png(x: Tensor, *, scale: int = 1) -> str:
    """(C, H, W) in [0, 1] -> a PNG data URL (nearest-neighbour upscaled by ``scale``)."""
    from PIL import Image

    arr = (x.clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy())  # (H, W, C)
    im = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def feature_grid(z: Tensor, *, sigmoid: bool = True) -> Tensor:
    """(C, H, W) features -> one (1, H', W') grayscale mosaic of the channels (1 px gaps).

    Sigmoid features are shown on their own scale [0, 1] (clamped: the noise can push them
    out); other activations are min-max scaled.
    """
    c, h, w = z.shape
    v = z.clamp(0, 1) if sigmoid else (z - z.min()) / (z.max() - z.min()).clamp_min(1e-12)
    cols = math.ceil(math.sqrt(c))
    rows = math.ceil(c / cols)
    grid = torch.full((rows * (h + 1) - 1, cols * (w + 1) - 1), 1.0)
    for i in range(c):
        r, k = divmod(i, cols)
        grid[r * (h + 1):r * (h + 1) + h, k * (w + 1):k * (w + 1) + w] = v[i]
    return grid.unsqueeze(0)


class Lens:
    """The lens's back end: a :class:`~splitcem.serving.Client` plus the saved attacker.

    Args:
        run_dir: A trained run directory (``splitcem attack`` saves the decoder there).
        url: The server serving this run.
        token, token_file: The server's bearer token, if any.
    """

    def __init__(self, run_dir: str | Path, url: str, *, token: str | None = None,
                 token_file: str | Path | None = None,
                 cafile: str | Path | None = None) -> None:
        from splitcem.attacks.decoder import load_decoder
        from splitcem.experiment import ATTACK_DECODER
        from splitcem.serving.client import Client

        self.run_dir = Path(run_dir)
        self.client = Client(self.run_dir, url, token=token, token_file=token_file,
                             cafile=cafile)
        self.spec = self.client.spec
        self.decoder: torch.nn.Module | None = None
        self.attack: dict[str, Any] = {}
        self.warning = ""
        try:
            self.decoder, self.attack = load_decoder(self.run_dir / ATTACK_DECODER)
        except SplitcemError as e:
            self.warning = f"{e}"
        if self.decoder is not None:
            want = self.spec.get("source", {}).get("checkpoint_sha256")
            if want and self.attack.get("checkpoint_sha256") not in (None, want):
                self.warning = ("the saved attack decoder was trained against another "
                                "checkpoint of this run; re-run splitcem attack RUN_DIR")

    def info(self) -> dict[str, Any]:
        """What the page shows above the upload box."""
        s = self.spec
        return {
            "model_id": s["model_id"], "dataset": s["dataset"], "classes": s["classes"],
            "feature_shape": s["features"]["shape"], "defense": s["defense"]["describe"],
            "noise_sigma": s["defense"]["noise_sigma"], "server": self.client.conn.url,
            "attack": {k: self.attack.get(k) for k in ("attack", "threat", "metrics")}
            if self.decoder is not None else None,
            "warning": self.warning,
        }

    @torch.no_grad()
    def analyze(self, data: bytes) -> dict[str, Any]:
        """One image file's bytes -> prediction, the features sent, the reconstruction."""
        from splitcem.attacks.decoder import decode
        from splitcem.metrics import image_metrics
        from splitcem.serving.wire import encode_features

        x01 = self.client.load_images([data])  # (1, C, H, W) at the model's size
        z = self.client.encode(x01)  # exactly what is sent: encoder + defense (fresh noise)
        res = self.client.infer_features(z)
        pred = res.predictions()[0]
        top = sorted(range(len(pred.probs)), key=lambda i: -pred.probs[i])[:3]
        c, h, w = x01.shape[1:]
        scale = max(1, 160 // w)
        out: dict[str, Any] = {
            "prediction": {"label": pred.label, "class": pred.name, "prob": pred.prob,
                           "top": [{"class": self.spec["classes"][i], "prob": pred.probs[i]}
                                   for i in top]},
            "original": _png(x01[0], scale=scale),
            "features": _png(feature_grid(z[0], sigmoid=self.spec["model"].get(
                "activation") == "sigmoid"), scale=max(1, 160 // (z.shape[-1] * 3))),
            "bytes": {"features_sent": len(encode_features(z)), "raw_image": c * h * w,
                      "feature_values": int(np.prod(z.shape[1:]))},
            "model_id": res.model_id,
        }
        if self.decoder is not None:
            rec = decode(self.decoder, z.to(next(self.decoder.parameters()).device)).cpu()
            rec = rec.clamp(0, 1)
            out["reconstruction"] = _png(rec[0], scale=scale)
            out["metrics"] = image_metrics(rec, x01)
        else:
            out["reconstruction"] = None
            out["metrics"] = None
        return out


#: the header every API call carries the lens's per-launch token in
TOKEN_HEADER = "X-Lens-Token"
#: what POST /api/analyze accepts (the page sends octet-stream; a form post cannot)
UPLOAD_TYPES = ("application/octet-stream", "image/png", "image/jpeg", "image/gif",
                "image/webp", "image/bmp")


def allowed_hosts(bound: str, port: int) -> set[str]:
    """The Host header values the lens answers: its own address names, with its port."""
    names = {bound, "localhost", "127.0.0.1", "[::1]"}
    return {f"{n}:{port}" for n in names}


class LensGuard:
    """Pure ASGI middleware in front of the lens: refuses (4xx, before any work) a request
    with a foreign ``Host`` (DNS rebinding), a foreign ``Origin`` or a cross-site fetch, an
    API call without the launch token, and an upload of another content type."""

    def __init__(self, app: Any, *, token: str, hosts: set[str]) -> None:
        self.app = app
        self.token = token.encode()
        self.hosts = {h.encode() for h in hosts}
        self.origins = {b"http://" + h for h in self.hosts}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        why = self._refusal(scope)
        if why is None:
            await self.app(scope, receive, send)
            return
        from starlette.responses import JSONResponse

        status, detail = why
        await JSONResponse({"detail": detail}, status, headers={"Connection": "close"})(
            scope, receive, send)

    def _refusal(self, scope: dict[str, Any]) -> tuple[int, str] | None:
        import hmac

        h = dict(scope["headers"])  # lower-case names; a repeated header keeps its last
        if h.get(b"host", b"").lower() not in self.hosts:
            return 421, "unknown Host: open the lens at the URL it printed"
        origin = h.get(b"origin")
        if origin is not None and origin.lower() not in self.origins:
            return 403, "cross-origin request refused"
        if h.get(b"sec-fetch-site", b"same-origin") not in (b"same-origin", b"none"):
            return 403, "cross-site request refused"
        path = scope["path"]
        if path == "/":
            return None if scope["method"] in ("GET", "HEAD") else (405, "GET / only")
        if not path.startswith("/api/"):
            return 404, "not found"
        if not hmac.compare_digest(h.get(TOKEN_HEADER.lower().encode(), b""), self.token):
            return 401, "missing or wrong lens token: open the lens at the URL it printed"
        if path == "/api/analyze":
            ctype = h.get(b"content-type", b"").split(b";")[0].strip().lower().decode("latin-1")
            if ctype not in UPLOAD_TYPES:
                return 415, f"send the image file's bytes as one of {', '.join(UPLOAD_TYPES)}"
        return None


def create_lens_app(lens: Lens, *, token: str, hosts: set[str]) -> Any:
    """The lens's FastAPI app: ``GET /`` (the page), ``GET /api/info``,
    ``POST /api/analyze`` (the image file's bytes as the body), behind :class:`LensGuard`
    (``token``: the launch token every ``/api/`` call carries; ``hosts``: the Host values
    answered)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse
    from starlette.concurrency import run_in_threadpool

    page = resources.files("splitcem.lens").joinpath("page.html").read_text()
    app = FastAPI(title="splitcem lens", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(LensGuard, token=token, hosts=hosts)
    security = {"Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; "
                "style-src 'unsafe-inline'; img-src data:; connect-src 'self'; "
                "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
                "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers=security)

    @app.get("/api/info")
    async def info() -> dict[str, Any]:
        return lens.info()

    @app.post("/api/analyze")
    async def analyze(request: Request) -> Any:
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_UPLOAD:
                return JSONResponse({"detail": f"image over {MAX_UPLOAD} bytes"}, 413)
            chunks.append(chunk)
        data = b"".join(chunks)
        if not data:
            return JSONResponse({"detail": "send an image file as the request body"}, 400)
        try:
            return await run_in_threadpool(lens.analyze, data)
        except ServingError as e:
            status = 502 if e.status is not None else 400  # the server refused / a bad image
            return JSONResponse({"detail": str(e)}, status)

    return app


def wait_for_server(url: str, *, wait_s: float, cafile: str | Path | None = None,
                    every_s: float = 5.0) -> None:
    """Poll ``GET /v1/health`` at ``url`` until it answers (at most ``wait_s`` seconds),
    printing a progress line every ``every_s`` seconds; raises if it never does."""
    import ssl
    import time

    from splitcem.serving.client import ServerConnection

    start = time.monotonic()
    said = start
    conn = ServerConnection(url, timeout=5.0, cafile=cafile)
    try:
        for _ in range(1_000_000):  # bounded by the deadline below; the count is a backstop
            try:
                conn.health()
                return
            except ServingError as e:
                if e.status is not None or isinstance(e.__cause__, ssl.SSLError):
                    raise  # it answered (not "ok"), or its certificate is not trusted: no wait
                waited = time.monotonic() - start
                if waited >= wait_s:
                    raise ServingError(f"cannot reach the server at {url} after waiting "
                                       f"{waited:.0f} s; is `splitcem serve` running there? "
                                       "(--wait sets how long to wait)") from e
                if time.monotonic() - said >= every_s or said == start:
                    print(f"splitcem lens: waiting for the server at {url} ({waited:.0f} s of "
                          f"{wait_s:.0f} s; it may still be exporting)", flush=True)
                    said = time.monotonic()
                time.sleep(0.25)
    finally:
        conn.close()


def run_lens(run_dir: str | Path, url: str, *, port: int = 8765,
             token_file: str | Path | None = None, cafile: str | Path | None = None,
             wait_s: float = 300.0) -> None:
    """Serve the lens page on 127.0.0.1:``port`` until interrupted (prints its URL, which
    carries the launch token). Waits up to ``wait_s`` for the server first."""
    import secrets

    from splitcem.serving.transport import Deadlines, listen_socket, require_extra

    require_extra(("fastapi", "uvicorn"))
    import uvicorn

    from splitcem.serving.protocol import uvicorn_config

    wait_for_server(url, wait_s=wait_s, cafile=cafile)
    lens = Lens(run_dir, url, token_file=token_file, cafile=cafile)
    sock = listen_socket("127.0.0.1", port)
    bound = sock.getsockname()[1]
    token = secrets.token_urlsafe(24)
    app = create_lens_app(lens, token=token, hosts=allowed_hosts("127.0.0.1", bound))
    if lens.warning:
        log.warning("%s", lens.warning)
    print(f"splitcem lens: open http://127.0.0.1:{bound}/#token={token} (server {url}, model "
          f"{lens.spec['model_id']})", flush=True)
    uvicorn.Server(uvicorn_config(app, Deadlines(body_s=60.0, max_connections=64))).run(
        sockets=[sock])
