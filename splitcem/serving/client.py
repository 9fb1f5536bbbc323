"""The client side: the encoder and the deployed defense run here; only features leave.

* :class:`ClientHalf` loads the client encoder and the deployed defense transforms from a
  deployment's ``client.safetensors`` (the server weights are never read).
* :class:`ServerConnection` speaks the HTTP API (stdlib ``http.client``, one keep-alive
  connection; one per thread).
* :class:`Client` puts them together: images -> normalise -> encoder -> defense transform
  (eval mode, fresh noise per call) -> binary body -> the server -> predictions. It checks
  the server's spec against its own before the first request and names the model it was
  exported for on every request.

Example:
    >>> with Client("runs/demo/noise", "http://127.0.0.1:8000") as c:  # doctest: +SKIP
    ...     print(c.classify(["shoe.png"])[0].name)
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import torch
from torch import Tensor

from splitcem.errors import ServingError, SpecMismatchError
from splitcem.serving.auth import read_token
from splitcem.serving.deploy import contract
from splitcem.serving.export import ensure_export
from splitcem.serving.halves import ClientHalf, OnnxClientHalf
from splitcem.serving.wire import BINARY, JSON, encode_features

__all__ = ["Client", "ClientHalf", "InferResult", "Prediction", "ServerConnection",
           "load_images"]

#: most bytes of an image file the client reads
MAX_IMAGE_BYTES = 64 * 2**20
#: most pixels of an image the client decodes (the model sees it resized anyway)
MAX_IMAGE_PIXELS = 8192 * 8192


def load_images(paths: Sequence[str | Path | bytes], *, channels: int, size: int) -> Tensor:
    """Image files (paths, or the file bytes) -> (B, C, size, size) float32 in [0, 1].

    Converted to RGB or grayscale as the model expects and resized (bicubic) to the
    model's square input if needed.
    """
    import io

    from PIL import Image, UnidentifiedImageError

    out = []
    for p in paths:
        name = "uploaded image" if isinstance(p, bytes) else str(p)
        try:
            if not isinstance(p, bytes) and Path(p).stat().st_size > MAX_IMAGE_BYTES:
                raise ServingError(f"{name}: over {MAX_IMAGE_BYTES} bytes; use a smaller image")
            data = p if isinstance(p, bytes) else Path(p).read_bytes()
            if len(data) > MAX_IMAGE_BYTES:
                raise ServingError(f"{name}: over {MAX_IMAGE_BYTES} bytes; use a smaller image")
            with Image.open(io.BytesIO(data)) as src:
                if src.width * src.height > MAX_IMAGE_PIXELS:  # checked before decoding
                    raise ServingError(f"{name}: {src.width}x{src.height} pixels is over "
                                       f"{MAX_IMAGE_PIXELS}; use a smaller image")
                im = src.convert("RGB" if channels == 3 else "L")
            if im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.BICUBIC)
            arr = np.asarray(im, dtype=np.uint8)
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as e:
            raise ServingError(f"{name}: cannot read it as an image ({e})") from e
        if arr.ndim == 2:
            arr = arr[:, :, None]
        out.append(torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255))
    if not out:
        raise ServingError("no images given")
    return torch.stack(out)  # (B, C, H, W)


@dataclass
class Prediction:
    """One image's answer: the label index, its class name, its probability, all probs."""

    label: int
    name: str
    prob: float
    probs: list[float]


@dataclass
class InferResult:
    """A batch's answer: probabilities (B, K) float64 and labels (B,)."""

    model_id: str
    probs: Tensor
    labels: Tensor
    classes: list[str]

    def predictions(self) -> list[Prediction]:
        """One :class:`Prediction` per sample."""
        return [Prediction(int(lab), name, float(p[int(lab)]), p.tolist())
                for lab, name, p in zip(self.labels, self.classes, self.probs, strict=True)]


class ServerConnection:
    """One keep-alive HTTP connection to a splitcem server (use one per thread).

    Args:
        url: ``http://host:port`` (``https://`` works too).
        token: Bearer token, if the server has one.
        timeout: Seconds per request.
        cafile: For ``https://``: a PEM file of the certificates to trust (e.g. the
            server's own self-signed one); default: the system's.
    """

    def __init__(self, url: str, *, token: str | None = None, timeout: float = 30.0,
                 cafile: str | Path | None = None) -> None:
        u = urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ServingError(f"--url must look like http://127.0.0.1:8000, got {url!r}")
        self.url = url.rstrip("/")
        self._https = u.scheme == "https"
        self._host, self._port = u.hostname, u.port
        self._base = u.path.rstrip("/")
        self.token = token
        self.timeout = timeout
        self._ssl = (ssl.create_default_context(cafile=str(cafile) if cafile else None)
                     if self._https else None)
        self._conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            conn: http.client.HTTPConnection
            if self._https:
                conn = http.client.HTTPSConnection(self._host, self._port,
                                                   timeout=self.timeout, context=self._ssl)
            else:
                conn = http.client.HTTPConnection(self._host, self._port, timeout=self.timeout)
            conn.connect()
            # http.client sends the headers and the body in two writes; without NODELAY,
            # Nagle's algorithm holds the body back until the server's delayed ACK (~40 ms)
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._conn = conn
        return self._conn

    def close(self) -> None:
        """Close the connection (the next request opens a new one)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        """Send one request; returns (status, body). Retries once on a dropped keep-alive."""
        h = dict(headers or {})
        if self.token is not None:
            h["Authorization"] = f"Bearer {self.token}"
        for attempt in (0, 1):
            try:
                conn = self._connection()
                conn.request(method, self._base + path, body=body, headers=h)
                resp = conn.getresponse()
                data = resp.read()
                if resp.getheader("connection", "").lower() == "close":
                    self.close()
                return resp.status, data
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as e:
                self.close()  # the server closed an idle keep-alive connection: reconnect
                if attempt:
                    raise ServingError(f"the server at {self.url} closed the connection "
                                       f"({type(e).__name__})") from e
            except ssl.SSLError as e:
                self.close()
                raise ServingError(f"TLS with the server at {self.url} failed ({e}); for a "
                                   "self-signed certificate give it with --ca-file CERT") from e
            except (OSError, http.client.HTTPException) as e:
                self.close()
                raise ServingError(f"cannot reach the server at {self.url} ({e}); is "
                                   "`splitcem serve` running there?") from e
        raise AssertionError("unreachable")

    def _json(self, method: str, path: str, body: bytes | None = None,
              headers: dict[str, str] | None = None) -> dict[str, Any]:
        status, data = self.request(method, path, body, headers)
        try:
            obj = json.loads(data)
        except ValueError:
            obj = {"detail": data[:200].decode("utf-8", "replace")}
        if status != 200:
            detail = obj.get("detail", obj) if isinstance(obj, dict) else obj
            err = SpecMismatchError if status == 409 else ServingError
            raise err(f"server answered {status}: {detail}", status=status)
        return obj

    def health(self) -> dict[str, Any]:
        """``GET /v1/health``."""
        return self._json("GET", "/v1/health")

    def spec(self) -> dict[str, Any]:
        """``GET /v1/spec``."""
        return self._json("GET", "/v1/spec")

    def infer_bytes(self, body: bytes, *, content_type: str = BINARY,
                    model_id: str | None = None) -> dict[str, Any]:
        """``POST /v1/infer`` with a ready body; returns the JSON answer."""
        headers = {"Content-Type": content_type}
        if model_id is not None:
            headers["X-Splitcem-Model"] = model_id
        return self._json("POST", "/v1/infer", body, headers)


class Client:
    """Classify images with a deployed split: the encoder here, the tail on the server.

    Args:
        path: The run directory (its ``deploy/`` is exported first if needed) or a
            deployment directory holding ``spec.json`` and ``client.safetensors``.
        url: The server, e.g. ``http://127.0.0.1:8000``.
        token: Bearer token (or ``token_file``: a file holding it).
        dtype: Wire dtype of the features, ``"float32"`` or ``"float16"`` (half the bytes).
        check: Compare the server's spec with this client's before the first request
            (raises :class:`~splitcem.errors.SpecMismatchError` on any difference).
        timeout: Seconds per request.
        cafile: For an ``https://`` server: PEM certificates to trust (its own, if
            self-signed).
        onnx: Encode with the deployment's ``client.onnx`` in onnxruntime (the edge client,
            ``splitcem export ... --onnx``) instead of torch.
    """

    def __init__(self, path: str | Path, url: str, *, token: str | None = None,
                 token_file: str | Path | None = None, dtype: str = "float32",
                 check: bool = True, timeout: float = 30.0,
                 device: str | torch.device = "cpu", cafile: str | Path | None = None,
                 onnx: bool = False) -> None:
        if token is None and token_file is not None:
            token = read_token(token_file)
        d = ensure_export(path)  # onnx: the edge client's client.onnx, run by onnxruntime
        self.half: ClientHalf | OnnxClientHalf = OnnxClientHalf(d) if onnx else ClientHalf(
            d, device=device)
        self.spec = self.half.spec
        self.model_id: str = self.spec["model_id"]
        self.dtype = dtype
        self.conn = ServerConnection(url, token=token, timeout=timeout, cafile=cafile)
        self._lock = threading.Lock()
        self.server_spec: dict[str, Any] | None = None
        if check:
            self.check_spec()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()

    def check_spec(self) -> dict[str, Any]:
        """Fetch the server's spec and compare it with this client's; returns it."""
        remote = self.conn.spec()
        mine = contract(self.spec)
        diff = [k for k in mine if remote.get(k) != mine[k]]
        if diff:
            lines = "; ".join(f"{k}: server {remote.get(k)!r}, client {mine[k]!r}"
                              for k in diff)
            raise SpecMismatchError(f"the server at {self.conn.url} serves another model or "
                                    f"contract ({lines}); start it from the same run "
                                    "(splitcem serve RUN_DIR)", status=None)
        self.server_spec = remote
        return remote

    def encode(self, x01: Tensor) -> Tensor:
        """Images in [0, 1] (B, C, H, W) -> the features this client sends (defense on)."""
        return self.half.encode(x01)

    def load_images(self, paths: Sequence[str | Path | bytes]) -> Tensor:
        """Image files -> (B, C, H, W) in [0, 1] at the model's input size."""
        return load_images(paths, channels=self.half.channels, size=self.half.size)

    def infer_features(self, z: Tensor | np.ndarray, *, as_json: bool = False) -> InferResult:
        """Send features (B, C, H, W) as they are; returns the server's answer."""
        if as_json:
            arr = z.detach().cpu().numpy() if isinstance(z, Tensor) else np.asarray(z)
            body, ctype = json.dumps({"features": arr.tolist()}).encode(), JSON
        else:
            body, ctype = encode_features(z, self.dtype), BINARY
        with self._lock:  # one connection: one request at a time
            ans = self.conn.infer_bytes(body, content_type=ctype, model_id=self.model_id)
        return InferResult(ans["model_id"], torch.tensor(ans["probs"], dtype=torch.float64),
                           torch.tensor(ans["labels"], dtype=torch.long), list(ans["classes"]))

    def classify(self, images: Sequence[str | Path | bytes] | Tensor) -> list[Prediction]:
        """Image files (or a (B, C, H, W) tensor in [0, 1]) -> one prediction per image.

        Splits a long list into batches the server accepts.
        """
        x01 = images if isinstance(images, Tensor) else self.load_images(images)
        limit = int((self.server_spec or {}).get("limits", {}).get("max_batch", 64))
        out: list[Prediction] = []
        for i in range(0, x01.shape[0], limit):
            out += self.infer_features(self.encode(x01[i:i + limit])).predictions()
        return out
