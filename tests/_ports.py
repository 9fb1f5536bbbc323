"""Free ports for tests that start a listener later than they choose its port.

Not ``bind(("", 0))`` and close: that hands out an ephemeral port, which any outgoing
connection on the machine (a Ray head makes dozens while it starts; a client polling that
very port can connect to itself) may take before the listener binds it. A port below the
kernel's ephemeral range is only ever taken by a listener that names it.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path


def free_port_block(n: int, host: str = "") -> list[int]:
    """``n`` consecutive ports, each bindable on ``host`` ("" = every interface), below the
    kernel's ephemeral range (read from /proc; 32768 where it cannot be read)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, low - n)
        socks: list[socket.socket] = []
        try:
            for port in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind((host, port))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
        return list(range(base, base + n))
    raise RuntimeError(f"no block of {n} free ports below {low}")
