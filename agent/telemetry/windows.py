"""Per-model latency windows: count, errors, exact p50/p90/p99/max/mean and a mergeable histogram.

Recording is O(1) and lock-light (called on every inference); a window is swapped out whole when
it is reported. Exact percentiles come from a bounded sample list (reservoir past
``MAX_SAMPLES``), the histogram from every call. Windows merge (``Window.merge``,
``merge_windows``) when the daily byte budget thins telemetry: fewer, longer windows, nothing
uncounted.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field
from typing import Any

from agent.telemetry.histogram import Histogram

MAX_SAMPLES = 8192  # per model per window: bounds memory at ~64 KiB per model


@dataclass
class Window:
    version: int
    backend: str
    count: int = 0
    errors: int = 0
    total_s: float = 0.0
    max_s: float = 0.0
    samples: list[float] = field(default_factory=list)
    hist: Histogram = field(default_factory=Histogram)

    def add(self, latency_s: float, ok: bool) -> None:
        self.count += 1
        if not ok:
            self.errors += 1
        self.total_s += latency_s
        if latency_s > self.max_s:
            self.max_s = latency_s
        self.hist.add(latency_s)
        if len(self.samples) < MAX_SAMPLES:
            self.samples.append(latency_s)
        else:
            j = random.randrange(self.count)
            if j < MAX_SAMPLES:
                self.samples[j] = latency_s

    def merge(self, other: Window) -> None:
        """Add ``other`` (a later window of the same version) into this one."""
        total = self.count + other.count
        if len(self.samples) + len(other.samples) <= MAX_SAMPLES:
            self.samples.extend(other.samples)
        elif total:
            # Keep each side's share of the reservoir proportional to the calls it stands for.
            mine = min(len(self.samples), round(MAX_SAMPLES * self.count / total))
            theirs = min(len(other.samples), MAX_SAMPLES - mine)
            self.samples = random.sample(self.samples, mine) + random.sample(other.samples, theirs)
        self.count = total
        self.errors += other.errors
        self.total_s += other.total_s
        self.max_s = max(self.max_s, other.max_s)
        self.hist.merge(other.hist)

    def percentile_ms(self, q: float) -> float:
        """The q-th percentile (0..100) of the sampled latencies, in ms (nearest rank)."""
        s = sorted(self.samples)
        if not s:
            return 0.0
        k = min(len(s) - 1, max(0, round(q / 100.0 * len(s) + 0.5) - 1))
        return s[k] * 1000.0

    def summary(self) -> dict[str, Any]:
        s = sorted(self.samples)

        def pct(q: float) -> float:
            if not s:
                return 0.0
            k = min(len(s) - 1, max(0, round(q / 100.0 * len(s) + 0.5) - 1))
            return round(s[k] * 1000.0, 3)

        return {"version": self.version, "backend": self.backend, "count": self.count,
                "errors": self.errors,
                "latency_ms": {"p50": pct(50), "p90": pct(90), "p99": pct(99),
                               "max": round(self.max_s * 1000.0, 3),
                               "mean": round(self.total_s / self.count * 1000.0, 3) if self.count else 0.0},
                "hist": self.hist.to_wire()}


class LatencyWindows:
    """Collects per-model windows; ``swap()`` returns the finished ones and starts anew."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._w: dict[str, Window] = {}

    def observe(self, name: str, version: int, backend: str, latency_s: float, ok: bool) -> None:
        with self._lock:
            w = self._w.get(name)
            if w is None or w.version != version or w.backend != backend:
                w = self._w[name] = Window(version, backend) if w is None or w.count == 0 else self._rollover(name, w, version, backend)
            w.add(latency_s, ok)

    def _rollover(self, name: str, old: Window, version: int, backend: str) -> Window:
        # A swap inside a window: keep the old version's figures under a versioned key.
        self._w[f"{name}@{old.version}"] = old
        return Window(version, backend)

    def swap(self) -> dict[str, Window]:
        with self._lock:
            out, self._w = self._w, {}
        return {k: v for k, v in out.items() if v.count}


def merge_windows(into: dict[str, Window], new: dict[str, Window]) -> None:
    """Merge finished windows ``new`` into ``into`` (keyed like ``LatencyWindows.swap``).

    A key whose version or backend changed keeps the older figures under ``name@{version}``, as
    a swap inside one window does.
    """
    for key, w in new.items():
        cur = into.get(key)
        if cur is None:
            into[key] = w
        elif cur.version == w.version and cur.backend == w.backend:
            cur.merge(w)
        else:
            old_key = f"{key.split('@', 1)[0]}@{cur.version}"
            prior = into.get(old_key)
            if prior is not None and prior.version == cur.version and prior.backend == cur.backend:
                prior.merge(cur)
            else:
                into[old_key] = cur
            into[key] = w
