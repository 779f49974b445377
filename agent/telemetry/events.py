"""Threshold events: disk low, memory pressure, latency SLO breach, error rate (PROTOCOL.md events).

Invariants:
- An event fires when a condition starts (``"active": true``) and once more when it ends
  (``"active": false``), never on every check: a device that stays low on disk for a week sends
  two events, not ten thousand.
- A condition ends only once the figure is back past the threshold by a margin
  (``HYSTERESIS``), so a value hovering at the threshold does not flap.
- Latency and error-rate judgements need ``MIN_CALLS`` calls in the window: three slow calls on an
  idle device are not an SLO breach.
- A threshold of 0 turns its check off. Thresholds are read on every check, so a remote config
  change applies at the next heartbeat or window.
- Pure logic: the caller supplies figures and publishes the returned events.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from agent.telemetry.windows import Window

HYSTERESIS = 0.1  # a condition clears 10 % past its threshold (disk: 10 % more free than the limit)
MIN_CALLS = 20  # calls in a window before its latency or error rate is judged

DISK_LOW = "disk_low"
MEMORY_PRESSURE = "memory_pressure"
SLO_BREACH = "slo_breach"
ERROR_RATE = "error_rate"


@dataclass
class Thresholds:
    """The configurable limits (``[telemetry]`` keys); 0 disables a check."""

    disk_low_mb: float = 0.0
    memory_pressure_pct: float = 0.0
    error_rate_pct: float = 0.0
    slo_p99_ms: float = 0.0


Event = tuple[str, dict[str, Any]]  # (event name, fields)
SloLookup = Callable[[str], float | None]  # model name → its manifest's max_p95_ms, if any


class EventMonitor:
    """Turns figures into start/end events, remembering which conditions are active."""

    def __init__(self, thresholds: Callable[[], Thresholds]) -> None:
        self._thresholds = thresholds
        self.active: dict[tuple[str, str], dict[str, Any]] = {}  # (event, subject) → start fields

    def _edge(self, name: str, subject: str, on: bool, off: bool, fields: dict[str, Any]) -> list[Event]:
        key = (name, subject)
        if key not in self.active and on:
            self.active[key] = fields
            return [(name, {"active": True, **fields})]
        if key in self.active and off:
            del self.active[key]
            return [(name, {"active": False, **fields})]
        return []

    def check_system(self, fig: Mapping[str, Any]) -> list[Event]:
        """Disk and memory figures of one heartbeat (``system_figures``)."""
        t = self._thresholds()
        out: list[Event] = []
        free = fig.get("disk_free_mb")
        if isinstance(free, (int, float)) and free >= 0:
            if t.disk_low_mb > 0:
                out += self._edge(DISK_LOW, "state_dir", free < t.disk_low_mb,
                                  free >= t.disk_low_mb * (1 + HYSTERESIS),
                                  {"free_mb": free, "limit_mb": t.disk_low_mb})
            else:
                out += self._edge(DISK_LOW, "state_dir", False, True, {"free_mb": free, "limit_mb": 0})
        used = fig.get("mem_used_pct")
        if isinstance(used, (int, float)):
            limit = t.memory_pressure_pct
            on = limit > 0 and used >= limit
            off = limit <= 0 or used < limit * (1 - HYSTERESIS)
            fields: dict[str, Any] = {"mem_used_pct": used, "limit_pct": limit}
            if "mem_available_mb" in fig:
                fields["mem_available_mb"] = fig["mem_available_mb"]
            out += self._edge(MEMORY_PRESSURE, "system", on, off, fields)
        return out

    def check_windows(self, windows: Mapping[str, Window], window_s: float,
                      slo_for: SloLookup | None = None) -> list[Event]:
        """Latency SLO and error rate of each model's finished window."""
        t = self._thresholds()
        out: list[Event] = []
        for key, w in sorted(windows.items()):
            if "@" in key or w.count < MIN_CALLS:
                continue  # an old version's tail, or too few calls to judge
            base = {"model": key, "version": w.version, "backend": w.backend, "window_s": window_s,
                    "count": w.count}
            # Latency: the manifest's p95 limit for this model, and the device-wide p99 limit.
            limits: list[tuple[str, float, float]] = []
            manifest_p95 = slo_for(key) if slo_for is not None else None
            if manifest_p95:
                limits.append(("p95", manifest_p95, w.percentile_ms(95)))
            if t.slo_p99_ms > 0:
                limits.append(("p99", t.slo_p99_ms, w.percentile_ms(99)))
            breached = [(q, lim, got) for q, lim, got in limits if got > lim]
            cleared = all(got <= lim * (1 - HYSTERESIS) for _, lim, got in limits)
            detail = breached[0] if breached else (limits[0] if limits else ("p99", 0.0, w.percentile_ms(99)))
            out += self._edge(SLO_BREACH, key, bool(breached), cleared,
                              {**base, "quantile": detail[0], "latency_ms": round(detail[2], 3),
                               "limit_ms": detail[1]})
            rate = 100.0 * w.errors / w.count
            limit = t.error_rate_pct
            out += self._edge(ERROR_RATE, key, limit > 0 and rate >= limit,
                              limit <= 0 or rate < limit * (1 - HYSTERESIS),
                              {**base, "errors": w.errors, "error_pct": round(rate, 2), "limit_pct": limit})
        return out
