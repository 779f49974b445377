"""The registry's observer (LatencyWindows.observe) batches calls and folds them; what it records
must equal Window.add call by call, and /metrics must read exact Prometheus buckets from it."""

from __future__ import annotations

import bisect
import math
import random

import pytest

from agent.telemetry.histogram import Histogram
from agent.telemetry.metrics import Metrics
from agent.telemetry.windows import FOLD_CALLS, MAX_SAMPLES, PROM_BUCKETS_S, LatencyWindows, Window


def _latencies(n: int, seed: int) -> list[float]:
    """Log-uniform latencies from 0.1 µs to 30 s, a third of them on or next to a log2/8 bucket
    edge or a Prometheus bound (where a batch and a call-by-call count could disagree)."""
    rng = random.Random(seed)
    edges = [2 ** (i / 8) / 1e6 for i in range(260)] + list(PROM_BUCKETS_S)
    near = [x for e in edges for x in (e, math.nextafter(e, 0.0), math.nextafter(e, 1.0))] + [0.0, 1e-6]
    return [rng.choice(near) if rng.random() < 0.3 else math.exp(rng.uniform(math.log(1e-7), math.log(30.0)))
            for _ in range(n)]


def test_observe_records_what_window_add_does() -> None:
    vals = _latencies(20_000, 1)
    lw, ref, got = LatencyWindows(), Window(1, "cpu"), Histogram()
    windows: list[Window] = []
    for i, x in enumerate(vals):
        ok = i % 7 != 0
        lw.observe("det", 1, "cpu", x, ok)
        ref.add(x, ok)
        if i % 3001 == 0:
            windows += lw.swap().values()
    windows += lw.swap().values()
    for w in windows:
        got.merge(w.hist)
    assert got.counts == ref.hist.counts
    assert sum(w.count for w in windows) == ref.count == len(vals)
    assert sum(w.errors for w in windows) == ref.errors
    assert max(w.max_s for w in windows) == ref.max_s
    assert sum(w.total_s for w in windows) == pytest.approx(ref.total_s)
    assert [sum(c) for c in zip(*(w.le for w in windows), strict=True)] == ref.le
    assert all(len(w.samples) == min(w.count, MAX_SAMPLES) for w in windows)


def test_metrics_buckets_are_exact_and_survive_swaps() -> None:
    vals = _latencies(5 * FOLD_CALLS + 17, 2)
    lw = LatencyWindows()
    m = Metrics(lambda: {}, lambda: {}, windows=lw)
    for i, x in enumerate(vals):
        lw.observe('a"b', 3, "onnxruntime:CPU", x, i % 5 != 0)
        if i == 700:
            lw.swap()  # /metrics counts never go back when the telemetry window is swapped out
    text = m.render()[0].decode()
    cum = 0
    for k, bound in enumerate((*PROM_BUCKETS_S, math.inf)):
        cum = sum(1 for x in vals if bisect.bisect_left(PROM_BUCKETS_S, x) <= k)
        le = "+Inf" if bound == math.inf else repr(bound)
        line = f'edge_agent_inference_latency_seconds_bucket{{backend="onnxruntime:CPU",le="{le}",model="a\\"b"}} {float(cum)!r}'
        assert line in text
    errors = sum(1 for i in range(len(vals)) if i % 5 == 0)
    assert f'edge_agent_inferences_total{{backend="onnxruntime:CPU",model="a\\"b",outcome="error"}} {float(errors)!r}' in text
    assert f'edge_agent_inferences_total{{backend="onnxruntime:CPU",model="a\\"b",outcome="ok"}} {float(len(vals) - errors)!r}' in text
    assert 'edge_agent_inferences_created{backend="onnxruntime:CPU",model="a\\"b",outcome="ok"}' in text


def test_reservoir_past_max_samples_is_uniform() -> None:
    random.seed(5)
    n, trials, hits = 3 * MAX_SAMPLES, 12, [0] * 6
    for _ in range(trials):
        lw = LatencyWindows()
        for i in range(n):
            lw.observe("det", 1, "cpu", 1.0 + i, True)
        w = lw.swap()["det"]
        assert len(w.samples) == MAX_SAMPLES and w.count == n
        for s in w.samples:
            hits[int(s - 1.0) * 6 // n] += 1
    expected = trials * MAX_SAMPLES / 6
    assert all(abs(h - expected) < 0.03 * expected for h in hits), hits
