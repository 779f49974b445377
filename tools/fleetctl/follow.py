"""Following a command from the command line: the probation countdown, and why a device is silent.

A replaced model version serves on probation before its deploy ends (docs/deployments.md); the
agent's job update for that step carries ``probation.window_s`` (docs/protocol.md), so ``--wait``
can say how long is left instead of sitting silent. A device that sends no job update at all is
explained from its retained status: offline since when, or never seen under that id.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

PROBATION_LINE_EVERY_S = 5.0  # a countdown line at least this often while a device is on probation
PROBATION_STEP = "probation"


def _seconds(value: Any) -> float | None:
    """A non-negative finite number of seconds from device data, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    v = float(value)
    return v if 0 <= v < float("inf") else None


class ProbationCountdown:
    """Per device on probation: when it ends (by the update's ``window_s``), and the lines to print."""

    def __init__(self, every_s: float = PROBATION_LINE_EVERY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.every_s = every_s
        self.clock = clock
        self._ends: dict[str, float | None] = {}  # None: the agent did not say how long
        self._since: dict[str, float] = {}
        self._next: dict[str, float] = {}

    def update(self, device: str, update: dict[str, Any]) -> str | None:
        """Take one job update; returns a line to print now, if any."""
        now = self.clock()
        if update.get("state") != "IN_PROGRESS" or update.get("step") != PROBATION_STEP:
            for table in (self._ends, self._since, self._next):
                table.pop(device, None)
            return None
        self._since.setdefault(device, now)
        info = update.get("probation")
        window = _seconds(info.get("window_s")) if isinstance(info, dict) else None
        if window is None:
            self._ends.setdefault(device, None)
            self._next.setdefault(device, now + self.every_s)
            return None
        self._ends[device] = now + window
        self._next[device] = now + self.every_s
        return self.line(device)

    def tick(self) -> list[str]:
        """The lines due now (one per device on probation every ``every_s``)."""
        now = self.clock()
        lines = []
        for device, due in list(self._next.items()):
            if now >= due:
                self._next[device] = now + self.every_s
                lines.append(self.line(device))
        return lines

    def left_s(self, device: str) -> float | None:
        """Seconds of probation left for ``device``; None when unknown or not on probation."""
        end = self._ends.get(device)
        return None if end is None else max(0.0, end - self.clock())

    def line(self, device: str) -> str:
        left = self.left_s(device)
        if left is not None:
            return f"{device}: probation: {left:.0f} s left"
        since = self._since.get(device, self.clock())
        return (f"{device}: probation: {self.clock() - since:.0f} s so far "
                "(the agent does not say how long; deploy.probation_s in its config)")


def silent_device_message(device: str, command_id: str, timeout_s: float,
                          statuses: dict[str, dict[str, Any]] | None, prefix: str) -> str:
    """Why ``device`` sent no job update for ``command_id``, from the latest status of each device
    (``statuses``; None when they could not be watched)."""
    head = f"{device}: no job update for {command_id} within {timeout_s:g} s"
    if statuses is None:
        return (f"{head}; is device {device} online, and is its id right? "
                "`fleetctl watch` lists the devices seen")
    status = statuses.get(device)
    if status is None:
        return (f"{head}; no status ever seen for device {device} under topic prefix {prefix!r} on this broker "
                "(or this account may not read status topics). Is the device id right, and is the device online? "
                "`fleetctl watch` lists the devices seen")
    ts = str(status.get("ts") or "an unknown time")
    if status.get("online") is False:
        reason = f" ({status['reason']})" if isinstance(status.get("reason"), str) and status["reason"] else ""
        return (f"{head}; device {device} is offline since {ts}{reason}: it runs the command when it "
                "reconnects, if the command has not expired by then (--ttl)")
    return (f"{head}; device {device} is online (status at {ts}) but did not answer: it may still be busy "
            "(wait longer with --timeout), or it refused a command it could not read (`agentctl logs` on the device)")
