"""Bearer tokens: read from a file (one token, no spaces)."""

from __future__ import annotations

from pathlib import Path

from splitcem.errors import ServingError

__all__ = ["read_token"]


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
