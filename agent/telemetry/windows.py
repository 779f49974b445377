"""Per-model latency windows: count, errors, exact p50/p90/p99/max/mean and a mergeable histogram.

Recording runs on every inference (``LatencyWindows.observe`` is the registry's observer), so it
only appends the latency to the window's pending list under one lock; every ``FOLD_CALLS`` calls,
and before a window is read (swap, scrape), the pending calls are folded into its figures in one
pass over the sorted batch (sum, max, one histogram update per bucket run, one bisection per
Prometheus bound): the same figures ``Window.add`` gives call by call, at a fraction of the
interpreter work. A window is swapped out whole when it is reported. Exact percentiles come from a
bounded sample list (a uniform reservoir past ``MAX_SAMPLES``: Li's Algorithm L, which draws
random numbers only for the calls that enter it), the histogram from every call. Windows merge
(``Window.merge``, ``merge_windows``) when the daily byte budget thins telemetry: fewer, longer
windows, nothing uncounted.

The same record feeds ``GET /metrics``: each window also counts its calls per Prometheus bucket
(``PROM_BUCKETS_S``, exact: ``latency <= bound``); a swapped-out window is folded into per
(model, backend) totals that never reset, and ``LatencyWindows.totals()`` adds the live windows to
them at scrape time.
"""

from __future__ import annotations

import math
import random
import threading
import time
from bisect import bisect_left, bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.telemetry.histogram import SUB_BUCKETS, Histogram, bucket_of

MAX_SAMPLES = 8192  # per model per window: bounds memory at ~64 KiB per model
FOLD_CALLS = 256  # pending calls folded at once (≈ 10 µs of work, 2 KiB of pending floats)
# Latency buckets of the Prometheus histogram in seconds: 0.25 ms .. 10 s, roughly ×2.5 apart
# (edge models span µs to s). Bucket i of ``Window.le`` counts bound[i-1] < latency <= bound[i].
PROM_BUCKETS_S = (0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                  1.0, 2.5, 5.0, 10.0)
_random = random.random


def _le_counts() -> list[int]:
    return [0] * (len(PROM_BUCKETS_S) + 1)


@dataclass(slots=True)
class Window:
    version: int
    backend: str
    count: int = 0
    errors: int = 0
    total_s: float = 0.0
    max_s: float = 0.0
    samples: list[float] = field(default_factory=list)
    hist: Histogram = field(default_factory=Histogram)
    le: list[int] = field(default_factory=_le_counts, repr=False)  # calls per Prometheus bucket
    # Calls recorded by LatencyWindows.observe and not folded into the figures above yet.
    pending: list[float] = field(default_factory=list, repr=False)
    # Algorithm L once the reservoir is full: the position of the next call to enter it, and the
    # reservoir's largest priority. 0: not drawn yet (drawn from the count when next needed).
    _next: int = field(default=0, repr=False)
    _w: float = field(default=0.0, repr=False)

    def add(self, latency_s: float, ok: bool) -> None:
        """One call, straight into the figures."""
        n = self.count = self.count + 1
        if not ok:
            self.errors += 1
        self.total_s += latency_s
        if latency_s > self.max_s:
            self.max_s = latency_s
        self.hist.add(latency_s)
        self.le[bisect_left(PROM_BUCKETS_S, latency_s)] += 1
        if n <= MAX_SAMPLES:
            self.samples.append(latency_s)
        elif n >= self._next:
            self._offer((latency_s,), n)

    def fold(self) -> None:
        """Fold the pending calls into the figures (what ``add`` would have done for each)."""
        batch = self.pending
        if not batch:
            return
        self.pending = []
        batch.sort()
        k = len(batch)
        first = self.count + 1
        self.count += k
        self.total_s += sum(batch)
        if batch[-1] > self.max_s:
            self.max_s = batch[-1]
        counts = self.hist.counts
        i = 0
        while i < k:  # runs of one histogram bucket in the sorted batch
            b = bucket_of(batch[i])
            j = bisect_left(batch, 2 ** ((b + 1) / SUB_BUCKETS) / 1e6, i + 1)
            # bucket_of is the definition: put the run's end where it says, to the last float
            while j < k and bucket_of(batch[j]) == b:
                j += 1
            while j > i + 1 and bucket_of(batch[j - 1]) != b:
                j -= 1
            counts[b] = counts.get(b, 0) + (j - i)
            i = j
        le = self.le
        below = 0
        for idx, bound in enumerate(PROM_BUCKETS_S):
            upto = bisect_right(batch, bound)
            le[idx] += upto - below
            below = upto
        le[-1] += k - below
        if first + k - 1 <= MAX_SAMPLES:
            self.samples.extend(batch)
        elif first + k - 1 >= self._next:
            self._offer(batch, first)

    def _offer(self, calls: Sequence[float], first: int) -> None:
        """Offer calls at positions ``first``, ``first + 1``, ... of this window to the samples."""
        s = self.samples
        room = min(MAX_SAMPLES - len(s), len(calls))  # a merged window can hold fewer samples than calls
        if room > 0:
            s.extend(calls[:room])
        last = first + len(calls) - 1
        if first + room > last:
            return
        if self._next == 0:
            # The reservoir is a uniform sample of the n calls before; the largest of its
            # MAX_SAMPLES priorities is distributed Beta(MAX_SAMPLES, n - MAX_SAMPLES + 1).
            n = first + room - 1
            self._w = random.betavariate(MAX_SAMPLES, n - MAX_SAMPLES + 1)
            self._next = n + self._skip() + 1
        while self._next <= last:
            s[int(_random() * MAX_SAMPLES)] = calls[self._next - first]
            self._w *= math.exp(math.log(1.0 - _random()) / MAX_SAMPLES)
            self._next += self._skip() + 1

    def _skip(self) -> int:
        """Calls to pass over before the next one enters: geometric with success ``_w``."""
        w = self._w
        if w >= 1.0:
            return 0
        d = math.log1p(-w)
        if d == 0.0:  # w below 1e-16: no call enters in any realistic time
            return 1 << 62
        return int(math.log(1.0 - _random()) / d)

    def merge(self, other: Window) -> None:
        """Add ``other`` (a later window of the same version) into this one."""
        self.fold()
        other.fold()
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
        self.le = [a + b for a, b in zip(self.le, other.le, strict=True)]
        self._next = 0  # the reservoir's state is drawn anew when next needed

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


@dataclass(slots=True)
class Totals:
    """Every call of one (model, backend) since the start: what ``GET /metrics`` shows."""

    created: float  # time.time() of the first call
    count: int = 0
    errors: int = 0
    total_s: float = 0.0
    le: list[int] = field(default_factory=_le_counts)

    def add(self, w: Window) -> None:
        """Add a (folded) window."""
        self.count += w.count
        self.errors += w.errors
        self.total_s += w.total_s
        self.le = [a + b for a, b in zip(self.le, w.le, strict=True)]

    def buckets(self) -> list[int]:
        """Cumulative calls at or under each of ``PROM_BUCKETS_S``, then all of them (+Inf)."""
        out, n = [], 0
        for k in self.le:
            n += k
            out.append(n)
        return out


class LatencyWindows:
    """Collects per-model windows; ``swap()`` returns the finished ones and starts anew."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._w: dict[str, Window] = {}
        self._totals: dict[tuple[str, str], Totals] = {}  # in the order first seen

    def observe(self, name: str, version: int, backend: str, latency_s: float, ok: bool) -> None:
        """Registry observer: one call, its latency and outcome."""
        lock = self._lock
        lock.acquire()
        try:
            w = self._w.get(name)
            if w is None or w.version != version or w.backend != backend:
                w = self._open(name, w, version, backend)
            if not ok:
                w.errors += 1
            pending = w.pending
            pending.append(latency_s)
            if len(pending) >= FOLD_CALLS:
                w.fold()
        finally:
            lock.release()

    def _open(self, name: str, old: Window | None, version: int, backend: str) -> Window:
        """A new window for ``name`` (first call, or another version or backend serves it)."""
        if (name, backend) not in self._totals:
            self._totals[(name, backend)] = Totals(time.time())
        if old is not None:
            old.fold()
        if old is not None and old.count:
            # A swap inside a window: keep the old version's figures under a versioned key (added
            # to what that key holds if the version served earlier in this window too).
            key = f"{name}@{old.version}"
            prior = self._w.get(key)
            if prior is not None and prior.backend == old.backend:
                prior.merge(old)
            else:
                if prior is not None:  # the same version on another backend: its calls stay in /metrics
                    self._totals[(name, prior.backend)].add(prior)
                self._w[key] = old
        w = self._w[name] = Window(version, backend)
        return w

    def swap(self) -> dict[str, Window]:
        with self._lock:
            out, self._w = self._w, {}
            for key, w in out.items():
                w.fold()
                if w.count:
                    self._totals[(key.split("@", 1)[0], w.backend)].add(w)
        return {k: v for k, v in out.items() if v.count}

    def totals(self) -> list[tuple[str, str, Totals]]:
        """(model, backend, every call since the start) in the order first seen: the swapped-out
        windows plus the live ones."""
        with self._lock:
            snaps = {key: Totals(t.created, t.count, t.errors, t.total_s, list(t.le))
                     for key, t in self._totals.items()}
            for key, w in self._w.items():
                w.fold()
                snaps[(key.split("@", 1)[0], w.backend)].add(w)
        return [(model, backend, t) for (model, backend), t in snaps.items()]


def merge_windows(into: dict[str, Window], new: Mapping[str, Window]) -> None:
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
