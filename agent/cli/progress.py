"""Progress of long agentctl operations (install, bench, rollback) on stderr.

On a terminal one line is redrawn in place; otherwise (a pipe, a log) one line is printed per
step, so scripts and CI logs stay readable. ``--json`` output on stdout is never touched.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

MIB = 1024 * 1024
REDRAW_MIN_INTERVAL_S = 0.1  # a terminal redraw at most ten times a second


def _amount(n: Any, unit: str) -> str:
    if isinstance(n, bool) or not isinstance(n, (int, float)):
        return "?"
    if unit == "B":
        return f"{n / MIB:.1f} MiB" if n >= MIB else f"{int(n)} B"
    return f"{n:g}"


def describe(p: dict[str, Any]) -> str:
    """One line for a progress update: ``downloading 45% 12.0/27.0 MiB``."""
    words = [str(p.get("step") or p.get("state") or "working")]
    done, total, unit = p.get("done"), p.get("total"), str(p.get("unit", "B"))
    if isinstance(total, (int, float)) and not isinstance(total, bool) and total > 0 and isinstance(done, (int, float)):
        words.append(f"{100.0 * done / total:3.0f}% {_amount(done, unit)}/{_amount(total, unit)}")
    elif done is not None:
        words.append(_amount(done, unit))
    if p.get("message"):
        words.append(str(p["message"]))
    return " ".join(words)


class Progress:
    """Callable that takes progress dicts (``step``, ``done``, ``total``, ``unit``, ``message``)."""

    def __init__(self, stream: TextIO | None = None, enabled: bool = True) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last_step: str | None = None
        self._last_draw = 0.0
        self._width = 0

    def __call__(self, p: dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = describe(p)
        step = str(p.get("step") or p.get("state") or "")
        if self.tty:
            now = time.monotonic()
            if step == self._last_step and now - self._last_draw < REDRAW_MIN_INTERVAL_S:
                return
            self._last_draw = now
            pad = max(0, self._width - len(line))
            self.stream.write("\r" + line + " " * pad)
            self._width = len(line)
        elif step != self._last_step:
            self.stream.write(line + "\n")
        self._last_step = step
        self.stream.flush()

    def finish(self) -> None:
        """End the redrawn line (call once the operation answered)."""
        if self.enabled and self.tty and self._width:
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()
