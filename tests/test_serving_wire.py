"""The feature wire format: exact round trips, and every malformed body refused with a 4xx
and a message that says what was expected (no server needed)."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splitcem.serving.wire import (
    BINARY,
    JSON,
    FeatureLimits,
    WireError,
    decode_features,
    encode_features,
    header_size,
)

LIM = FeatureLimits(shape=(8, 4, 4), max_batch=8, max_json_batch=4)


def _body(shape, code=1, ndim=None, data=None, magic=b"SCF1"):
    ndim = len(shape) if ndim is None else ndim
    head = struct.pack("<4sBBH", magic, code, ndim, 0) + struct.pack(f"<{len(shape)}I", *shape)
    itemsize = 4 if code == 1 else 2
    return head + (data if data is not None else b"\0" * (int(np.prod(shape)) * itemsize))


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 8), dtype=st.sampled_from(["float32", "float16"]),
       seed=st.integers(0, 2**16))
def test_binary_round_trip(b, dtype, seed):
    z = np.random.default_rng(seed).random((b, 8, 4, 4), dtype=np.float32)
    body = encode_features(z, dtype)
    assert len(body) == header_size() + z.size * (4 if dtype == "float32" else 2)
    got = decode_features(body, BINARY, LIM)
    assert got.dtype == np.float32 and got.shape == z.shape
    want = z if dtype == "float32" else z.astype(np.float16).astype(np.float32)
    assert np.array_equal(got, want)  # exact: the values cross bit for bit


def test_header_is_little_endian_and_documented():
    body = encode_features(np.full((2, 8, 4, 4), 0.5, np.float32))
    assert body[:8] == b"SCF1\x01\x04\x00\x00"
    assert struct.unpack("<4I", body[8:24]) == (2, 8, 4, 4)
    assert body[24:28] == struct.pack("<f", 0.5)


def test_json_round_trip_and_charset_parameter():
    z = np.random.default_rng(0).random((3, 8, 4, 4)).astype(np.float32)
    body = json.dumps({"features": z.tolist()}).encode()
    got = decode_features(body, "application/json; charset=utf-8", LIM)
    assert np.array_equal(got, z)


def _refused(body, ctype=BINARY, lim=LIM):
    with pytest.raises(WireError) as e:
        decode_features(body, ctype, lim)
    return e.value


GOOD = _body((2, 8, 4, 4))


@pytest.mark.parametrize(("body", "ctype", "status", "code", "says"), [
    (GOOD, "text/plain", 415, "bad_content_type", BINARY),
    (GOOD, "", 415, "bad_content_type", "(none)"),
    (b"", BINARY, 400, "truncated", "header"),
    (b"SCF", BINARY, 400, "truncated", "header"),
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 64, BINARY, 400, "bad_magic", "SCF1"),
    (_body((2, 8, 4, 4), magic=b"XXXX"), BINARY, 400, "bad_magic", "SCF1"),
    (_body((2, 8, 4, 4), code=3), BINARY, 422, "bad_dtype", "1 = float32, 2 = float16"),
    (_body((8, 4, 4)), BINARY, 422, "bad_shape", "4-d"),
    (_body((2, 8, 4, 5)), BINARY, 422, "bad_shape", "(B, 8, 4, 4)"),
    (_body((0, 8, 4, 4)), BINARY, 422, "empty_batch", "at least one sample"),
    (_body((9, 8, 4, 4)), BINARY, 422, "batch_too_large", "limit of 8"),
    (_body((2, 8, 4, 4))[:-1], BINARY, 400, "bad_length", "truncated"),
    (_body((2, 8, 4, 4)) + b"\0", BINARY, 400, "bad_length", "trailing bytes"),
    (_body((2, 8, 4, 4))[:15], BINARY, 400, "truncated", "header"),
    (_body((2, 8, 4, 4), data=struct.pack("<f", float("nan")) * 256), BINARY, 422,
     "non_finite", "NaN or infinite"),
    (_body((2, 8, 4, 4), data=struct.pack("<f", float("inf")) * 256), BINARY, 422,
     "non_finite", "finite"),
    (_body((2, 8, 4, 4), data=struct.pack("<f", 1e30) * 256), BINARY, 422,
     "out_of_range", "exceeds"),
    (b"{not json", JSON, 400, "bad_json", "not valid JSON"),
    (b"\xff\xfe garbage", JSON, 400, "bad_json", "not valid JSON"),
    (b"[1, 2]", JSON, 422, "bad_json", '{"features"'),
    (b'{"features": "abc"}', JSON, 422, "bad_json", "nested lists of numbers"),
    (b'{"features": [[[[1, 2]], [[1]]]]}', JSON, 422, "bad_json", "rectangular"),
    (b'{"features": [[[[NaN]]]]}', JSON, 422, "bad_shape", "(B, 8, 4, 4)"),
    (b"[" * 100_000 + b"]" * 100_000, JSON, 400, "bad_json", "not valid JSON"),
    (b'{"features": [[[[1e400]]]]}', JSON, 422, "bad_shape", "(B, 8, 4, 4)"),
])
def test_malformed_bodies_are_refused_with_what_was_expected(body, ctype, status, code, says):
    err = _refused(body, ctype)
    assert (err.status, err.code) == (status, code), str(err)
    assert says in str(err)


def test_json_values_are_checked_like_binary():
    nan = np.zeros((1, 8, 4, 4)).tolist()
    nan[0][0][0][0] = float("nan")
    err = _refused(json.dumps({"features": nan}).encode(), JSON)
    assert err.code == "non_finite"
    big = np.full((1, 8, 4, 4), 1e300).tolist()  # finite in JSON, inf in float32
    assert _refused(json.dumps({"features": big}).encode(), JSON).code == "non_finite"
    five = np.zeros((5, 8, 4, 4)).tolist()  # JSON has its own, smaller batch limit
    err = _refused(json.dumps({"features": five}).encode(), JSON)
    assert err.code == "batch_too_large" and "limit of 4" in str(err)
