"""Daily byte budget for device→fleet traffic (sizes from agent.mqtt.queue.mqtt_publish_bytes).

Invariants:
- Every PUBLISH the agent sends is counted (job updates, events, status, heartbeats, telemetry,
  re-sends included) at its MQTT packet size, per UTC day; the count is persisted so a restart
  does not hand out a fresh budget.
- Only heartbeats and telemetry are thinned; job updates, events and status always go (and count).
- Telemetry has its own share: thinning is judged on the bytes of heartbeats and telemetry alone
  (``THINNED_KINDS``), so job updates, events and status (however many a flood of commands or
  a busy day causes) never thin heartbeats. ``used`` still counts every byte.
- Pacing, not a cliff: telemetry is thinned while its usage runs ahead of an even spread of
  the budget plus ``PACE_SLACK`` of it, and always once the budget is spent. A device whose
  demand is a little over budget thins a little all day instead of going dark every evening.
- A limit of 0 means no budget.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable

DAY_S = 86400
PACE_SLACK = 0.1  # share of the daily budget that may run ahead of an even spread (bursts)
THINNED_KINDS = ("heartbeat", "telemetry")  # the kinds thinning judges (and thins)


class DailyBudget:
    """Bytes sent today against ``limit_bytes`` (0: unlimited); thread-safe."""

    def __init__(self, limit_bytes: int, clock: Callable[[], float] = time.time) -> None:
        self.limit_bytes = limit_bytes
        self._clock = clock
        self._lock = threading.Lock()
        self._day = self._day_of(clock())
        self._used = 0
        self._by_kind: dict[str, int] = {}

    @staticmethod
    def _day_of(t: float) -> int:
        return int(t // DAY_S)

    def _roll_locked(self, now: float) -> None:
        day = self._day_of(now)
        if day != self._day:
            self._day, self._used, self._by_kind = day, 0, {}

    def record(self, kind: str, nbytes: int) -> None:
        """Count ``nbytes`` sent now."""
        with self._lock:
            self._roll_locked(self._clock())
            self._used += nbytes
            self._by_kind[kind] = self._by_kind.get(kind, 0) + nbytes

    def used(self) -> int:
        with self._lock:
            self._roll_locked(self._clock())
            return self._used

    def telemetry_used(self) -> int:
        """Today's bytes of the kinds thinning judges (heartbeats and telemetry)."""
        with self._lock:
            self._roll_locked(self._clock())
            return sum(self._by_kind.get(k, 0) for k in THINNED_KINDS)

    def allowance(self) -> float:
        """Bytes that may have been used by now under even pacing (with the slack)."""
        now = self._clock()
        frac = (now % DAY_S) / DAY_S
        return self.limit_bytes * min(1.0, frac + PACE_SLACK)

    def thinned(self) -> bool:
        """True while heartbeats and telemetry should be thinned."""
        if self.limit_bytes <= 0:
            return False
        return self.telemetry_used() >= self.allowance()

    def snapshot(self) -> dict[str, object]:
        with self._lock:
            self._roll_locked(self._clock())
            return {"day": self._day, "used": self._used, "limit": self.limit_bytes,
                    "telemetry_used": sum(self._by_kind.get(k, 0) for k in THINNED_KINDS),
                    "by_kind": dict(self._by_kind)}

    # -- persistence (a small JSON string kept by the caller, e.g. in the outbox database) ----
    def dumps(self) -> str:
        with self._lock:
            return json.dumps({"day": self._day, "used": self._used, "by_kind": self._by_kind},
                              separators=(",", ":"))

    def loads(self, raw: str | None) -> None:
        """Resume today's count from ``dumps()`` output; another day's count is ignored."""
        if not raw:
            return
        try:
            doc = json.loads(raw)
            day, used = int(doc["day"]), int(doc["used"])
            by_kind = {str(k): int(v) for k, v in dict(doc.get("by_kind") or {}).items()}
        except (ValueError, KeyError, TypeError):
            return
        with self._lock:
            self._roll_locked(self._clock())
            if day == self._day:
                self._used = max(self._used, used)
                self._by_kind = by_kind
