"""Helpers for the serving tests: real processes on loopback, a recording TCP proxy.

Every process listens on 127.0.0.1 with a port it picks itself (``--port 0``) and prints;
every loop here is bounded by a count or a deadline.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

URL_RE = re.compile(r"(https?)://127\.0\.0\.1:(\d+)")

# Runs the splitcem CLI with an audit hook that logs every file the process opens
# (builtins.open, io.open and os.open all raise the "open" audit event), so a test can list
# exactly which files a server process read. Usage: python -c AUDITED LOG_PATH ARGS...
AUDITED = r"""
import json, os, sys
_log = open(sys.argv.pop(1), "a", buffering=1)
def _hook(event, args):
    if event == "open" and args:
        p = args[0]
        if isinstance(p, (str, bytes, os.PathLike)):
            try:
                _log.write(json.dumps(os.path.abspath(os.fsdecode(p))) + "\n")
            except Exception:
                pass
sys.addaudithook(_hook)
from splitcem.cli import main
sys.argv = ["splitcem"] + sys.argv[1:]
main()
"""


class Proc:
    """A child process started with ``sys.executable``; waits for its "http://127.0.0.1:PORT"
    line on stdout. Output is drained by a thread into ``lines``."""

    def __init__(self, args: list[str], *, timeout: float = 180.0,
                 env: dict[str, str] | None = None, url_re: re.Pattern[str] = URL_RE) -> None:
        self.args = args
        self.lines: list[str] = []
        self._q: queue.Queue[str | None] = queue.Queue()
        full_env = {**os.environ, **(env or {})}
        full_env.setdefault("OMP_NUM_THREADS", "1")
        self.p = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, env=full_env)
        threading.Thread(target=self._drain, daemon=True).start()
        deadline = time.monotonic() + timeout
        self.port = 0
        self.scheme = "http"
        self.line = ""
        while time.monotonic() < deadline:
            try:
                line = self._q.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            m = url_re.search(line)
            if m:
                self.scheme, self.port, self.line = m.group(1), int(m.group(2)), line
                break
        if not self.port:
            self.stop()
            raise RuntimeError(f"{args[:3]} did not start:\n" + "".join(self.lines[-30:]))
        self.url = f"{self.scheme}://127.0.0.1:{self.port}"

    def _drain(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            self.lines.append(line)
            self._q.put(line)
        self._q.put(None)

    def alive(self) -> bool:
        return self.p.poll() is None

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(timeout=15)


def start_server(target: Path, *, token_file: Path | None = None, audit_log: Path | None = None,
                 extra: tuple[str, ...] = ()) -> Proc:
    """``splitcem serve TARGET --port 0`` (optionally under the open-file audit hook)."""
    cli = ["serve", str(target), "--port", "0", "--threads", "1", *extra]
    if token_file is not None:
        cli += ["--token-file", str(token_file)]
    if audit_log is not None:
        return Proc(["-c", AUDITED, str(audit_log), *cli])
    return Proc(["-m", "splitcem.cli", *cli])


def opened_files(audit_log: Path) -> set[str]:
    """The absolute paths an audited process opened."""
    return {json.loads(line) for line in audit_log.read_text().splitlines() if line.strip()}


class RecordingProxy:
    """A loopback TCP proxy that forwards to ``port`` and records every byte sent upstream
    (what the server receives). ``received()`` returns them all."""

    def __init__(self, port: int) -> None:
        self.upstream = port
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._chunks: list[bytes] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def received(self) -> bytes:
        with self._lock:
            return b"".join(self._chunks)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                down, _ = self.sock.accept()
            except OSError:  # timeout: check the stop flag
                continue
            up = socket.create_connection(("127.0.0.1", self.upstream), timeout=30)
            threading.Thread(target=self._pipe, args=(down, up, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(up, down, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, record: bool) -> None:
        src.settimeout(60)
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if record:
                    with self._lock:
                        self._chunks.append(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()
