"""Logging to stderr, one line per event; ``--log-format json`` for machines."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Callable


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
               "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


def setup(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
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
