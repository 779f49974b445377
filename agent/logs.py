"""Logging to stderr, one line per event; ``log_format = "json"`` (or ``--log-format json``) for
log shippers (journald → Fluent Bit / Promtail, docs/fleet-observability.md).

A JSON line holds ``time`` (RFC 3339, UTC, ms), ``level``, ``logger``, ``message``, ``exc`` when
an exception is logged, and ``device``, ``job`` and ``model`` when known: ``device`` from
``setup(device=...)``, any of the three from a call's ``extra={"job": ..., "model": ...}``.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Callable

FORMATS = ("text", "json")
CONTEXT_FIELDS = ("device", "job", "model")


class JsonFormatter(logging.Formatter):
    """One JSON object per record; ``context`` (e.g. the device id) is added to every line."""

    def __init__(self, context: dict[str, str] | None = None) -> None:
        super().__init__()
        self.context = dict(context or {})

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        for key in CONTEXT_FIELDS:
            value = getattr(record, key, None) or self.context.get(key)
            if value:
                doc[key] = str(value)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


def setup(level: str = "info", fmt: str = "text", device: str | None = None) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter({"device": device} if device else None))
    else:
        # journald adds its own timestamps; a terminal user still wants them.
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-5s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))


class RateLimit:
    """At most one pass per ``interval_s``; counts what it held back (for per-message log lines
    and events a flood could otherwise multiply). Thread-safe."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._next = 0.0
        self._held = 0

    def allow(self) -> int | None:
        """None while limited (the call is counted); else how many calls were held back since
        the last pass."""
        with self._lock:
            now = self._clock()
            if now < self._next:
                self._held += 1
                return None
            self._next = now + self.interval_s
            held, self._held = self._held, 0
            return held

    def log(self, logger: logging.Logger, level: int, msg: str, *args: object) -> None:
        """``logger.log(level, msg, *args)`` at most once per interval, saying how many were held."""
        held = self.allow()
        if held is None:
            return
        if held:
            msg += " (%d more like it in the last %.0f s not logged)"
            args = (*args, held, self.interval_s)
        logger.log(level, msg, *args)
