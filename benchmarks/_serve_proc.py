"""``splitcem serve TARGET --port 0`` as a child process, for the serving benchmarks: reads
its URL from stdout, keeps draining it (so the child never blocks on a full pipe) into
``lines``, and stops it with terminate-then-kill."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from pathlib import Path

URL_RE = re.compile(r"http://127\.0\.0\.1:\d+")


class ServeProcess:
    """A running ``splitcem serve TARGET --port 0 ARGS...``; ``url`` once it listens."""

    def __init__(self, target: Path, args: list[str], timeout: float = 180.0) -> None:
        self.p = subprocess.Popen(
            [sys.executable, "-m", "splitcem.cli", "serve", str(target), "--port", "0", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        found: list[str] = []
        ready = threading.Event()

        def drain() -> None:
            assert self.p.stdout is not None
            for line in self.p.stdout:
                self.lines.append(line)
                m = URL_RE.search(line)
                if m and not found:
                    found.append(m.group(0))
                    ready.set()
            ready.set()

        threading.Thread(target=drain, daemon=True).start()
        ready.wait(timeout)
        if not found:
            self.stop()
            raise RuntimeError("splitcem serve did not start:\n" + "".join(self.lines[-20:]))
        self.url = found[0]

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.p.kill()
