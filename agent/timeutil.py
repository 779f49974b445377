"""RFC 3339 UTC timestamps as the protocol writes them, and their parsing."""

from __future__ import annotations

import time
from datetime import datetime, timezone


def now_rfc3339(ts: float | None = None) -> str:
    """``2026-11-26T21:00:00.123Z`` for ``ts`` (default: now)."""
    t = time.time() if ts is None else ts
    dt = datetime.fromtimestamp(t, tz=timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def parse_rfc3339(text: str) -> float:
    """Seconds since the epoch; raises ValueError naming the text when it is not RFC 3339."""
    if not isinstance(text, str) or len(text) > 64:
        raise ValueError(f"not an RFC 3339 timestamp: {text!r}")
    s = text.strip()
    if s.endswith(("Z", "z")):
        s = s[:-1] + "+00:00"
    try:
        dt = datetime.fromisoformat(s)
    except ValueError as e:
        raise ValueError(f"not an RFC 3339 timestamp: {text!r}") from e
    if dt.tzinfo is None:
        raise ValueError(f"timestamp without a time zone: {text!r}")
    return dt.timestamp()
