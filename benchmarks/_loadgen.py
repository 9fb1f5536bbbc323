"""One load-generating client process for benchmarks/serving.py (stdlib only, so that eight
of them start in milliseconds and take no CPU importing torch).

    python benchmarks/_loadgen.py URL BODY_FILE SECONDS [TOKEN]

Opens one keep-alive connection to URL (loopback), sends one warm-up request, prints
"ready", reads a wall-clock start time from stdin, waits for it, then posts BODY_FILE's
bytes (binary features) back to back for SECONDS. Prints one JSON line: {"requests",
"errors", "latencies_ms"}.
"""

from __future__ import annotations

import http.client
import json
import socket
import sys
import time
from urllib.parse import urlsplit


def main() -> None:
    url, body_file, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    token = sys.argv[4] if len(sys.argv) > 4 else None
    body = open(body_file, "rb").read()  # noqa: SIM115
    u = urlsplit(url)
    assert u.hostname in ("127.0.0.1", "::1", "localhost"), "loopback only"
    headers = {"Content-Type": "application/x-splitcem-features"}
    if token:
        headers["Authorization"] = f"Bearer {token}"

    def connect() -> http.client.HTTPConnection:
        c = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
        c.connect()
        c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return c

    conn = connect()

    def post() -> int:
        conn.request("POST", "/v1/infer", body=body, headers=headers)
        r = conn.getresponse()
        r.read()
        return r.status

    post()  # warm
    print("ready", flush=True)
    start_at = float(sys.stdin.readline())
    time.sleep(max(0.0, start_at - time.time()))
    stop = start_at + seconds
    lat: list[float] = []
    errors = 0
    while time.time() < stop:
        t0 = time.perf_counter()
        try:
            status = post()
        except (OSError, http.client.HTTPException):
            errors += 1
            conn.close()
            conn = connect()
            continue
        if status == 200:
            lat.append(1e3 * (time.perf_counter() - t0))
        else:
            errors += 1
    conn.close()
    print(json.dumps({"requests": len(lat), "errors": errors,
                      "latencies_ms": [round(x, 3) for x in lat]}))


if __name__ == "__main__":
    main()
