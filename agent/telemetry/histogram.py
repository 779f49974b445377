"""Sparse log-bucket latency histograms (PROTOCOL.md scheme ``log2/8``).

Bucket i covers [2^(i/8), 2^((i+1)/8)) microseconds, so adjacent bucket bounds differ by 9 %;
reporting a bucket's geometric middle bounds the relative error of a percentile at ~4.4 %.
Histograms from many windows and devices merge by adding counts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

SCHEME = "log2/8"
SUB_BUCKETS = 8
MIN_US = 1.0  # everything faster than 1 µs lands in bucket 0
# Worst relative error of a percentile read from a bucket's geometric middle: half a bucket's
# width on the log scale, 2^(1/16) - 1 ≈ 4.43 %.
MAX_RELATIVE_ERROR = 2 ** (1 / (2 * SUB_BUCKETS)) - 1


def bucket_of(latency_s: float) -> int:
    us = latency_s * 1e6
    if us <= MIN_US:
        return 0
    return math.floor(math.log2(us) * SUB_BUCKETS)


def bucket_mid_ms(i: int) -> float:
    """Geometric middle of bucket ``i`` in milliseconds."""
    return 2 ** ((i + 0.5) / SUB_BUCKETS) / 1000.0


class Histogram:
    def __init__(self, counts: Mapping[int, int] | None = None) -> None:
        self.counts: dict[int, int] = dict(counts or {})

    def add(self, latency_s: float) -> None:
        b = bucket_of(latency_s)
        self.counts[b] = self.counts.get(b, 0) + 1

    def merge(self, other: Histogram) -> None:
        for b, n in other.counts.items():
            self.counts[b] = self.counts.get(b, 0) + n

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def percentile_ms(self, q: float) -> float:
        """The q-th percentile (0..100) in ms, from bucket middles."""
        total = self.total
        if total == 0:
            return 0.0
        rank = max(1, math.ceil(q / 100.0 * total))
        seen = 0
        for b in sorted(self.counts):
            seen += self.counts[b]
            if seen >= rank:
                return bucket_mid_ms(b)
        return bucket_mid_ms(max(self.counts))

    def to_wire(self) -> dict[str, object]:
        return {"scheme": SCHEME, "counts": {str(b): n for b, n in sorted(self.counts.items())}}

    @classmethod
    def from_wire(cls, doc: Mapping[str, object]) -> Histogram:
        if doc.get("scheme") != SCHEME:
            raise ValueError(f"histogram scheme {doc.get('scheme')!r}, expected {SCHEME}")
        counts = doc.get("counts") or {}
        if not isinstance(counts, Mapping):
            raise ValueError("histogram counts is not an object")
        return cls({int(k): int(v) for k, v in counts.items()})


def merge_all(hists: Iterable[Histogram]) -> Histogram:
    out = Histogram()
    for h in hists:
        out.merge(h)
    return out
