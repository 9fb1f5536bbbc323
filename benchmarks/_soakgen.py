"""One soak client process for benchmarks/soak.py (stdlib only). Loopback only; every loop
is bounded by a count and a deadline; every socket has a timeout.

    python benchmarks/_soakgen.py load CASES_JSON URL TOKEN N SECONDS SEED
    python benchmarks/_soakgen.py slow URL TOKEN N HOLD_S SEED

``load`` sends N requests (or stops at SECONDS): valid bodies (the answer checked against
the expected one), fuzzed bodies, wrong tokens, and mid-body disconnects. ``slow`` holds N
slow-header and N slow-body sockets, dripping a byte every 0.25 s, and records whether the
server closed each (or answered 408) in time. Each prints one JSON line of counts.
"""

from __future__ import annotations

import base64
import http.client
import json
import random
import socket
import sys
import threading
import time
from urllib.parse import urlsplit

BINARY = "application/x-splitcem-features"
CTYPES = [BINARY, BINARY, BINARY, "application/json", "text/plain", "", BINARY + "; x=1",
          "application/octet-stream"]


def _loopback(url: str) -> tuple[str, int]:
    u = urlsplit(url)
    assert u.hostname in ("127.0.0.1", "::1", "localhost") and u.port, "loopback only"
    return u.hostname, u.port


class _Conn:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.c: http.client.HTTPConnection | None = None
        self.reconnects = 0

    def post(self, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        for attempt in (0, 1):
            if self.c is None:
                self.c = http.client.HTTPConnection(self.host, self.port, timeout=30)
            try:
                self.c.request("POST", "/v1/infer", body=body, headers=headers)
                r = self.c.getresponse()
                data = r.read()
                if (r.getheader("connection") or "").lower() == "close":
                    self.close()
                return r.status, data
            except (http.client.RemoteDisconnected, ConnectionError, BrokenPipeError):
                self.close()  # a keep-alive closed by the server while idle: once more
                self.reconnects += 1
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.c is not None:
            self.c.close()
            self.c = None


def _fuzz(rng: random.Random, body: bytes) -> bytes:
    b = bytearray(body)
    kind = rng.randrange(5)
    if kind == 0:
        return rng.randbytes(rng.randrange(0, 4096))
    if kind == 1:
        for _ in range(rng.randrange(1, 8)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif kind == 2:
        b = b[:rng.randrange(len(b) + 1)] + bytearray(rng.randbytes(rng.randrange(64)))
    elif kind == 3:
        b[rng.randrange(24)] = rng.randrange(256)
    else:
        shape = [rng.randrange(0, 70) for _ in range(4)]
        head = b"SCF1" + bytes([rng.randrange(1, 3), 4, 0, 0])
        head += b"".join(s.to_bytes(4, "little") for s in shape)
        b = bytearray(head + rng.randbytes(rng.randrange(0, 8192)))
    return bytes(b)


def load(cases_file: str, url: str, token: str, n: int, seconds: float, seed: int) -> dict:
    cases = json.load(open(cases_file))  # noqa: SIM115
    bodies = [base64.b64decode(c["body"]) for c in cases]
    host, port = _loopback(url)
    rng = random.Random(seed)
    conn = _Conn(host, port)
    auth = {"Authorization": f"Bearer {token}"}
    c = {"requests": 0, "valid": 0, "valid_wrong": 0, "max_prob_diff": 0.0, "fuzzed": 0,
         "wrong_token": 0, "wrong_token_not_401": 0, "mid_body_disconnects": 0,
         "status_5xx": 0, "client_errors": 0, "statuses": {}}
    stop = time.monotonic() + seconds
    for _ in range(n):
        if time.monotonic() > stop:
            break
        c["requests"] += 1
        i = rng.randrange(len(bodies))
        roll = rng.random()
        try:
            if roll < 0.5:  # valid
                status, data = conn.post(bodies[i], {**auth, "Content-Type": BINARY})
                c["valid"] += 1
                ans = json.loads(data) if status == 200 else {}
                got = ans.get("probs", [])
                diff = 1.0 if len(got) != len(cases[i]["probs"]) else max(
                    (abs(a - b) for ra, rb in zip(got, cases[i]["probs"], strict=True)
                     for a, b in zip(ra, rb, strict=True)), default=1.0)
                c["max_prob_diff"] = max(c["max_prob_diff"], diff)
                if status != 200 or ans["labels"] != cases[i]["labels"] or diff > 1e-5:
                    c["valid_wrong"] += 1
            elif roll < 0.75:  # fuzzed body, random content type
                status, _ = conn.post(_fuzz(rng, bodies[i]),
                                      {**auth, "Content-Type": rng.choice(CTYPES)})
                c["fuzzed"] += 1
            elif roll < 0.87:  # wrong or missing token
                h = {"Content-Type": BINARY}
                if rng.random() < 0.7:
                    h["Authorization"] = "Bearer " + rng.choice(["nope", token[:-1], token + "x"])
                status, _ = conn.post(bodies[i], h)
                c["wrong_token"] += 1
                c["wrong_token_not_401"] += status != 401
            else:  # mid-body disconnect
                body = bodies[i]
                head = (f"POST /v1/infer HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer "
                        f"{token}\r\nContent-Type: {BINARY}\r\nContent-Length: {len(body)}"
                        "\r\n\r\n").encode()
                with socket.create_connection((host, port), timeout=10) as s:
                    s.sendall(head + body[:rng.randrange(1, len(body))])
                c["mid_body_disconnects"] += 1
                continue
        except (OSError, http.client.HTTPException):
            c["client_errors"] += 1
            conn.close()
            continue
        c["statuses"][str(status)] = c["statuses"].get(str(status), 0) + 1
        c["status_5xx"] += status >= 500
    conn.close()
    c["reconnects"] = conn.reconnects
    return c


def _slow_one(host: str, port: int, token: str, body_phase: bool, hold_s: float,
              out: list[str]) -> None:
    """Drip bytes until the server ends it; out gets "closed", "408" or "held"."""
    try:
        s = socket.create_connection((host, port), timeout=hold_s + 10)
    except OSError:
        out.append("refused")
        return
    with s:
        if body_phase:
            s.sendall((f"POST /v1/infer HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer "
                       f"{token}\r\nContent-Type: {BINARY}\r\nContent-Length: 100000\r\n\r\n"
                       ).encode())
        else:
            s.sendall(b"POST /v1/infer HTTP/1.1\r\nHost: " + host.encode() + b"\r\n")
        s.settimeout(0.25)
        t0 = time.monotonic()
        while time.monotonic() - t0 < hold_s:
            try:
                s.sendall(b"\0" if body_phase else b"X")
            except OSError:
                out.append("closed")
                return
            try:
                data = s.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                out.append("closed")
                return
            out.append("408" if data.startswith(b"HTTP/1.1 408") else "closed")
            return
        out.append("held")


def slow(url: str, token: str, n: int, hold_s: float, seed: int) -> dict:
    host, port = _loopback(url)
    res: list[str] = []
    threads = [threading.Thread(target=_slow_one, args=(host, port, token, i % 2 == 1,
                                                         hold_s, res), daemon=True)
               for i in range(2 * n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=hold_s + 30)
    return {"slow_sockets": 2 * n, "slow_closed_by_server": res.count("closed"),
            "slow_body_408": res.count("408"), "slow_held_past_deadline": res.count("held"),
            "slow_refused": res.count("refused")}


def main() -> None:
    mode, *a = sys.argv[1:]
    if mode == "load":
        out = load(a[0], a[1], a[2], int(a[3]), float(a[4]), int(a[5]))
    else:
        out = slow(a[0], a[1], int(a[2]), float(a[3]), int(a[4]))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
