"""The wire format features travel in: a small typed header and raw little-endian floats.

No pickle and no ``torch.load`` touch what a client sends: a body is parsed by ``struct``
and ``numpy.frombuffer`` only, and every field is checked before any byte of data is read
(docs/serving.md has the byte layout and a worked example)::

    offset  size     field
    0       4        magic b"SCF1"
    4       1        dtype code: 1 = float32, 2 = float16
    5       1        ndim, must be 4
    6       2        reserved, 0 (uint16 LE)
    8       4*ndim   shape (B, C, H, W), uint32 LE each
    8+4*ndim B*C*H*W*itemsize   the values, little-endian, C order

Content type ``application/x-splitcem-features``. Small batches may come as JSON instead,
``{"features": [[[[...]]]]}`` (nested lists of shape (B, C, H, W)), content type
``application/json``.

Every rejection is a :class:`WireError` carrying the HTTP status the server answers with
and a message that says what was expected.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from splitcem.errors import ServingError

__all__ = [
    "BINARY",
    "DTYPES",
    "JSON",
    "MAGIC",
    "FeatureLimits",
    "WireError",
    "content_kind",
    "decode_features",
    "encode_features",
    "header_size",
]

MAGIC = b"SCF1"
BINARY = "application/x-splitcem-features"
JSON = "application/json"
#: dtype code -> (name, numpy little-endian dtype)
DTYPES: dict[int, tuple[str, str]] = {1: ("float32", "<f4"), 2: ("float16", "<f2")}
_CODES = {name: code for code, (name, _) in DTYPES.items()}
_FIXED = struct.Struct("<4sBBH")  # magic, dtype code, ndim, reserved
_NDIM = 4


class WireError(ServingError):
    """A request body the server refuses: ``status`` (4xx), ``code`` (short machine name)
    and a message saying what was expected."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message, status=status)
        self.code = code


@dataclass(frozen=True)
class FeatureLimits:
    """What a server accepts: the feature shape (C, H, W) and the batch and value limits.

    Attributes:
        shape: (C, H, W) of one sample's features.
        max_batch: Most samples per request (binary body).
        max_json_batch: Most samples per JSON request (JSON costs ~10x the bytes and time).
        max_abs: Largest accepted |value|; sigmoid features lie in (0, 1) plus the noise,
            so anything near this is not a feature (it keeps the logits finite).
    """

    shape: tuple[int, int, int]
    max_batch: int = 256
    max_json_batch: int = 16
    max_abs: float = 1e4

    @property
    def dim(self) -> int:
        """Values per sample, C * H * W."""
        c, h, w = self.shape
        return c * h * w

    def max_binary_bytes(self) -> int:
        """Size of the largest binary body the limits allow (float32)."""
        return header_size() + self.max_batch * self.dim * 4

    def max_json_bytes(self) -> int:
        """A JSON body limit that fits the largest JSON batch (up to 32 characters a value)."""
        return self.max_json_batch * self.dim * 32 + 4096

    def default_body_limit(self) -> int:
        """A body limit that fits the largest binary and the largest JSON request (up to 32
        characters per value in JSON), whichever is bigger."""
        return max(self.max_binary_bytes(), self.max_json_bytes())


def header_size(ndim: int = _NDIM) -> int:
    """Bytes before the values: 8 fixed + 4 per dimension (24 for 4-d features)."""
    return _FIXED.size + 4 * ndim


def encode_features(z: Any, dtype: str = "float32") -> bytes:
    """A (B, C, H, W) array or tensor -> one binary body (header + little-endian values).

    Example:
        >>> body = encode_features(np.zeros((2, 8, 4, 4), np.float32))
        >>> len(body), body[:4]
        (1048, b'SCF1')
    """
    if dtype not in _CODES:
        raise ServingError(f"dtype must be one of {sorted(_CODES)}, got {dtype!r}")
    if hasattr(z, "detach"):  # a torch tensor: no torch import needed here
        z = z.detach().cpu().float().numpy()
    arr = np.ascontiguousarray(np.asarray(z), dtype=DTYPES[_CODES[dtype]][1])
    if arr.ndim != _NDIM:
        raise ServingError(f"features must be 4-d (B, C, H, W), got shape {arr.shape}")
    head = _FIXED.pack(MAGIC, _CODES[dtype], _NDIM, 0) + struct.pack("<4I", *arr.shape)
    return head + arr.tobytes()


def _expected(limits: FeatureLimits) -> str:
    c, h, w = limits.shape
    return f"(B, {c}, {h}, {w}) with 1 <= B <= {{max}}"


def _check_shape(shape: Sequence[int], limits: FeatureLimits, max_batch: int) -> None:
    want = _expected(limits).format(max=max_batch)
    if len(shape) != _NDIM:
        raise WireError(422, "bad_shape",
                        f"features must be 4-d {want}; got {len(shape)}-d shape {tuple(shape)}")
    if shape[0] == 0:
        raise WireError(422, "empty_batch", f"empty batch: send at least one sample, {want}")
    if tuple(shape[1:]) != tuple(limits.shape):
        raise WireError(422, "bad_shape",
                        f"feature shape {tuple(shape)} does not match this model: expected "
                        f"{want} (see GET /v1/spec)")
    if shape[0] > max_batch:
        raise WireError(422, "batch_too_large",
                        f"batch of {shape[0]} exceeds this server's limit of {max_batch} "
                        "per request; split it into smaller requests")


def _check_values(arr: np.ndarray, limits: FeatureLimits) -> np.ndarray:
    finite = np.isfinite(arr)
    if not finite.all():
        bad = int(arr.size - np.count_nonzero(finite))
        raise WireError(422, "non_finite",
                        f"features hold {bad} NaN or infinite value(s); expected finite floats")
    big = float(np.abs(arr).max())
    if big > limits.max_abs:
        raise WireError(422, "out_of_range",
                        f"feature magnitude {big:.4g} exceeds {limits.max_abs:g}; expected the "
                        "client encoder's outputs (after its defense transform)")
    return arr


def _decode_binary(body: bytes, limits: FeatureLimits) -> np.ndarray:
    if len(body) < _FIXED.size:
        raise WireError(400, "truncated",
                        f"body of {len(body)} bytes is shorter than the {_FIXED.size}-byte "
                        f"header; expected {MAGIC!r}, dtype code, ndim, 0, then the shape")
    magic, code, ndim, reserved = _FIXED.unpack_from(body)
    if magic != MAGIC:
        raise WireError(400, "bad_magic",
                        f"not a splitcem feature body: it starts with {magic!r}, expected "
                        f"{MAGIC!r} (or send JSON with Content-Type: {JSON})")
    if reserved != 0:
        raise WireError(400, "bad_header", f"header bytes 6-7 must be 0, got {reserved}")
    if code not in DTYPES:
        names = ", ".join(f"{c} = {n}" for c, (n, _) in DTYPES.items())
        raise WireError(422, "bad_dtype", f"dtype code {code} is unknown; expected {names}")
    if ndim != _NDIM:
        raise WireError(422, "bad_shape",
                        f"ndim is {ndim}; features must be 4-d "
                        f"{_expected(limits).format(max=limits.max_batch)}")
    hs = header_size(ndim)
    if len(body) < hs:
        raise WireError(400, "truncated",
                        f"body of {len(body)} bytes ends inside the {hs}-byte header")
    shape = struct.unpack_from(f"<{ndim}I", body, _FIXED.size)
    _check_shape(shape, limits, limits.max_batch)
    name, np_dtype = DTYPES[code]
    need = hs + math.prod(shape) * np.dtype(np_dtype).itemsize
    if len(body) != need:
        what = "truncated" if len(body) < need else "trailing bytes"
        raise WireError(400, "bad_length",
                        f"{what}: shape {tuple(shape)} {name} needs a body of {need} bytes "
                        f"(header {hs} + values), got {len(body)}")
    arr = np.frombuffer(body, dtype=np_dtype, offset=hs).reshape(shape)
    return _check_values(arr.astype(np.float32), limits)  # astype copies: writable, native


def _decode_json(body: bytes, limits: FeatureLimits) -> np.ndarray:
    example = '{"features": [[[[0.5, ...], ...], ...], ...]}'
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise WireError(400, "bad_json", f"body is not valid JSON ({type(e).__name__}: "
                        f"{str(e)[:120]}); expected {example}") from None
    if not isinstance(obj, dict) or "features" not in obj:
        raise WireError(422, "bad_json", f"expected a JSON object {example}")
    try:
        arr = np.array(obj["features"])
    except (ValueError, TypeError, OverflowError, RecursionError):
        arr = None
    if arr is None or arr.dtype.kind not in "iuf":
        raise WireError(422, "bad_json",
                        "'features' must be nested lists of numbers (B, C, H, W) of one "
                        f"rectangular shape; expected {example}")
    _check_shape(arr.shape, limits, limits.max_json_batch)
    with np.errstate(over="ignore"):  # too large for float32 -> inf -> rejected below
        return _check_values(arr.astype(np.float32), limits)


def content_kind(content_type: str) -> str:
    """:data:`BINARY` or :data:`JSON` for a Content-Type header; 415 for anything else."""
    ctype = content_type.split(";", 1)[0].strip().lower()
    if ctype in (BINARY, JSON):
        return ctype
    raise WireError(415, "bad_content_type",
                    f"content type {content_type or '(none)'!r} is not accepted; send "
                    f"{BINARY} (see docs/serving.md) or {JSON} for small batches")


def decode_features(body: bytes, content_type: str, limits: FeatureLimits) -> np.ndarray:
    """Parse and check one request body; returns float32 (B, C, H, W) features.

    Raises:
        WireError: 415 for a content type other than :data:`BINARY` / :data:`JSON`, 400 for
            bytes that are not a body of that type (garbage, truncated), 422 for a body that
            parses but does not fit the model (shape, dtype, empty, batch, NaN / inf, range).
    """
    if content_kind(content_type) == BINARY:
        return _decode_binary(body, limits)
    return _decode_json(body, limits)
