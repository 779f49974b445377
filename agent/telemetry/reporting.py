"""Heartbeats, telemetry windows and threshold events, thinned by the daily byte budget.

Invariants:
- Checks run at the configured cadence whatever the budget says: disk, memory, latency SLO and
  error-rate events are judged every heartbeat and every window, and events are never thinned.
- Thinning only stretches what is published: while the budget is ahead of its pace a heartbeat
  goes out at most every ``thin_period_s``, and finished windows are merged (counts, errors,
  histograms added) into one message per ``thin_period_s``. No call goes uncounted.
- Settings are read from the live config at every tick, so a remote ``config`` change applies
  without a restart.
- Every message is queued in the outbox, never published directly.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from agent.config import Config
from agent.mqtt.topics import Topics
from agent.telemetry.budget import DailyBudget
from agent.telemetry.events import EventMonitor, Thresholds
from agent.telemetry.outbox import KIND_HEARTBEAT, KIND_TELEMETRY, Outbox
from agent.telemetry.system import system_figures as psutil_figures
from agent.telemetry.windows import LatencyWindows, Window, merge_windows
from agent.timeutil import now_rfc3339

log = logging.getLogger(__name__)

BUDGET_META_KEY = "budget"
THINNED_EVENT = "telemetry_thinned"
OUTBOX_RECREATED_EVENT = "outbox_recreated"

EmitEvent = Callable[..., None]  # JobReporter.event(kind, **fields)
SystemFigures = Callable[[str], dict[str, Any]]


def manifest_max_p95_ms(manifest: Mapping[str, Any] | None) -> float | None:
    """``validation.max_p95_ms`` of a raw manifest document, if set."""
    if not manifest:
        return None
    v = manifest.get("validation")
    p95 = v.get("max_p95_ms") if isinstance(v, Mapping) else None
    if isinstance(p95, (int, float)) and not isinstance(p95, bool) and p95 > 0:
        return float(p95)
    return None


class TelemetryReporter:
    """Builds and queues heartbeats and telemetry windows; raises threshold events."""

    def __init__(self, cfg: Config, outbox: Outbox, topics: Topics, windows: LatencyWindows,
                 budget: DailyBudget, emit: EmitEvent, mqtt_state: Callable[[], Mapping[str, Any]],
                 slo_for: Callable[[str], float | None] | None = None,
                 system_figures: SystemFigures | None = psutil_figures, started: float | None = None) -> None:
        self.cfg = cfg
        self.outbox = outbox
        self.topics = topics
        self.windows = windows
        self.budget = budget
        self._emit = emit
        self._mqtt_state = mqtt_state
        self._slo_for = slo_for
        self._system_figures = system_figures
        self.started = time.time() if started is None else started
        self.monitor = EventMonitor(self.thresholds)
        self._lock = threading.Lock()  # the window loop and stop() may flush at once
        self._pending: dict[str, Window] = {}
        self._pending_s = 0.0
        self._last_window_pub = time.monotonic()
        self._last_heartbeat_pub = 0.0
        self._last_tick = time.monotonic()
        self._thinned = False
        self.budget.loads(outbox.meta_get(BUDGET_META_KEY))

    def thresholds(self) -> Thresholds:
        t = self.cfg.telemetry
        return Thresholds(disk_low_mb=t.disk_low_mb, memory_pressure_pct=t.memory_pressure_pct,
                          error_rate_pct=t.error_rate_pct, slo_p99_ms=t.slo_p99_ms)

    def _event(self, name: str, fields: dict[str, Any]) -> None:
        try:
            self._emit(name, **fields)
        except Exception:
            log.exception("event %s could not be queued", name)

    def report_recoveries(self) -> None:
        """Events for outbox databases found corrupt and replaced (at start or since)."""
        while self.outbox.recoveries:
            self._event(OUTBOX_RECREATED_EVENT, self.outbox.recoveries.pop(0))

    # -- budget -----------------------------------------------------------------------------
    def thinned(self) -> bool:
        """Whether heartbeats and telemetry are thinned now; an event marks each change."""
        self.budget.limit_bytes = int(self.cfg.telemetry.daily_budget_mb * 2**20)
        now = self.budget.thinned()
        if now != self._thinned:
            self._thinned = now
            snap = self.budget.snapshot()
            log.warning("telemetry %s: %d of %d bytes used today", "thinned" if now else "back to normal",
                        snap["used"], snap["limit"])
            self._event(THINNED_EVENT, {"active": now, "used_bytes": snap["used"],
                                        "limit_bytes": snap["limit"],
                                        "period_s": self.cfg.telemetry.thin_period_s})
        return now

    def save_budget(self) -> None:
        """Persist today's byte count (each heartbeat and at stop), so a restart keeps it."""
        self.outbox.meta_set(BUDGET_META_KEY, self.budget.dumps())

    def budget_status(self) -> dict[str, Any]:
        snap = self.budget.snapshot()
        return {**snap, "thinned": self._thinned}

    # -- heartbeat --------------------------------------------------------------------------
    def heartbeat(self) -> dict[str, Any] | None:
        """One heartbeat tick: system checks and events, then the heartbeat unless thinned."""
        self.report_recoveries()
        fig: dict[str, Any] = {}
        if self._system_figures is not None:
            fig = self._system_figures(self.cfg.state_dir)
            for name, fields in self.monitor.check_system(fig):
                self._event(name, fields)
        self.save_budget()
        thinned = self.thinned()
        now = time.monotonic()
        if thinned and now - self._last_heartbeat_pub < self.cfg.telemetry.thin_period_s:
            return None
        ob = self.outbox.stats()
        mq = self._mqtt_state()
        doc: dict[str, Any] = {"v": 1, "device": self.cfg.device_id, "ts": now_rfc3339(),
                               "uptime_s": round(time.time() - self.started),
                               "system": fig,
                               "outbox": {"depth": ob["depth"], "oldest_s": ob["oldest_s"],
                                          "dropped": ob["dropped"]},
                               "mqtt": {"reconnects": mq.get("reconnects", 0)}}
        if thinned:
            snap = self.budget.snapshot()
            doc["budget"] = {"used_bytes": snap["used"], "limit_bytes": snap["limit"], "thinned": True}
        self.outbox.add(self.topics.heartbeat, doc, KIND_HEARTBEAT)
        self._last_heartbeat_pub = now
        return doc

    # -- telemetry windows ------------------------------------------------------------------
    def window(self, final: bool = False) -> dict[str, Any] | None:
        """One window tick: judge the finished windows, then publish (or merge while thinned).

        ``final`` (at stop) publishes whatever is pending, covering the time since the last tick.
        """
        with self._lock:
            tick = time.monotonic()
            window_s = round(tick - self._last_tick, 3) if final else self.cfg.telemetry.window_s
            self._last_tick = tick
            done = self.windows.swap()
            if done:
                for name, fields in self.monitor.check_windows(done, window_s, self._slo_for):
                    self._event(name, fields)
                merge_windows(self._pending, done)
            self._pending_s += window_s
            if not self._pending:
                self._pending_s = 0.0
                self._last_window_pub = time.monotonic()
                return None
            now = time.monotonic()
            if not final and self.thinned() and now - self._last_window_pub < self.cfg.telemetry.thin_period_s:
                return None
            doc: dict[str, Any] = {"v": 1, "device": self.cfg.device_id, "ts": now_rfc3339(),
                                   "window_s": round(self._pending_s, 3),
                                   "models": {name: w.summary() for name, w in sorted(self._pending.items())}}
            self._pending, self._pending_s, self._last_window_pub = {}, 0.0, now
        self.outbox.add(self.topics.telemetry, doc, KIND_TELEMETRY)
        return doc
