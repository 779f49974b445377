"""Fleet-wide latency per model, merged from the devices' telemetry histograms (PROTOCOL.md).

Every telemetry window carries a sparse ``log2/8`` histogram of all its calls; adding bucket
counts across windows and devices gives the fleet's distribution without raw samples, and a
percentile read from it is within ``MAX_RELATIVE_ERROR`` (~4.4 %) of the raw samples' own.

Invariants:
- ``add`` never raises on odd device data: a window it cannot read is skipped and counted in
  ``skipped``.
- At-least-once delivery repeats messages (a re-send after a reconnect): a (device, seq) already
  taken is ignored, so nothing is counted twice.
- A model's windows of older versions (``name@7``) count towards ``name``.
- With ``horizon_s`` only windows received within that many seconds count (a live view);
  without it everything since the start counts.

Usage (``fleetctl watch``)::

    stats = FleetStats(horizon_s=300)
    stats.add(device, telemetry_doc)          # for each message on {prefix}/+/telemetry
    stats.per_model()  # {"detector": {"p50_ms": 3.1, "p99_ms": 7.9, "count": 1200, "errors": 0, "devices": 3}}
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from agent.telemetry.histogram import MAX_RELATIVE_ERROR, Histogram

SEEN_SEQ_PER_DEVICE = 4096  # remembered (device, seq) pairs per device, for duplicate detection

__all__ = ["MAX_RELATIVE_ERROR", "FleetStats"]


@dataclass
class _Entry:
    t: float
    device: str
    model: str
    count: int
    errors: int
    hist: Histogram | None


def _int(v: Any) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else 0


class FleetStats:
    """Merges telemetry windows from many devices into per-model fleet figures."""

    def __init__(self, horizon_s: float | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.horizon_s = horizon_s
        self._clock = clock
        self._entries: deque[_Entry] = deque()
        self._seen: dict[str, tuple[deque[int], set[int]]] = {}
        self.skipped = 0
        self.duplicates = 0

    def add(self, device: str, doc: Mapping[str, Any]) -> int:
        """Take one telemetry message; returns how many model windows it contributed."""
        if not isinstance(doc, Mapping) or not isinstance(doc.get("models"), Mapping):
            self.skipped += 1
            return 0
        seq = doc.get("seq")
        if isinstance(seq, int) and not isinstance(seq, bool):
            order, seen = self._seen.setdefault(device, (deque(), set()))
            if seq in seen:
                self.duplicates += 1
                return 0
            seen.add(seq)
            order.append(seq)
            if len(order) > SEEN_SEQ_PER_DEVICE:
                seen.discard(order.popleft())
        now = self._clock()
        taken = 0
        for key, w in doc["models"].items():
            if not isinstance(w, Mapping):
                self.skipped += 1
                continue
            hist: Histogram | None = None
            raw = w.get("hist")
            if isinstance(raw, Mapping):
                try:
                    hist = Histogram.from_wire(raw)
                except (ValueError, TypeError):
                    self.skipped += 1
            self._entries.append(_Entry(now, str(device), str(key).split("@", 1)[0],
                                        _int(w.get("count")), _int(w.get("errors")), hist))
            taken += 1
        return taken

    def _prune(self) -> None:
        if self.horizon_s is None:
            return
        cutoff = self._clock() - self.horizon_s
        while self._entries and self._entries[0].t < cutoff:
            self._entries.popleft()

    def histograms(self) -> dict[str, Histogram]:
        """The merged histogram of each model."""
        self._prune()
        out: dict[str, Histogram] = {}
        for e in self._entries:
            h = out.setdefault(e.model, Histogram())
            if e.hist is not None:
                h.merge(e.hist)
        return out

    def per_model(self) -> dict[str, dict[str, Any]]:
        """{model: {"p50_ms", "p99_ms", "count", "errors", "devices"}} over the horizon."""
        hists = self.histograms()
        out: dict[str, dict[str, Any]] = {}
        devices: dict[str, set[str]] = {}
        for e in self._entries:
            m = out.setdefault(e.model, {"count": 0, "errors": 0})
            m["count"] += e.count
            m["errors"] += e.errors
            devices.setdefault(e.model, set()).add(e.device)
        for model, m in out.items():
            h = hists[model]
            m["p50_ms"] = round(h.percentile_ms(50), 3) if h.total else None
            m["p99_ms"] = round(h.percentile_ms(99), 3) if h.total else None
            m["devices"] = len(devices[model])
        return {k: out[k] for k in sorted(out)}

    def lines(self) -> list[str]:
        """One readable line per model, for a terminal view."""
        rows = []
        for model, m in self.per_model().items():
            p50 = "?" if m["p50_ms"] is None else f"{m['p50_ms']:.2f}"
            p99 = "?" if m["p99_ms"] is None else f"{m['p99_ms']:.2f}"
            rows.append(f"{model}: p50={p50}ms p99={p99}ms n={m['count']} err={m['errors']} "
                        f"devices={m['devices']}")
        return rows
