"""log2/8 latency histograms and per-model windows (PROTOCOL.md telemetry)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from agent.telemetry.histogram import SCHEME, Histogram, bucket_mid_ms, bucket_of, merge_all
from agent.telemetry.windows import LatencyWindows, Window


def _us(x: float) -> float:
    return x / 1e6


@pytest.mark.parametrize("i", [1, 7, 8, 9, 63, 64, 80, 120, 160])
def test_bucket_of_boundaries(i: int) -> None:
    lo = 2 ** (i / 8)
    hi = 2 ** ((i + 1) / 8)
    assert bucket_of(_us(lo * 1.000001)) == i
    assert bucket_of(_us(hi * 0.999999)) == i
    assert bucket_of(_us(hi * 1.000001)) == i + 1


def test_bucket_of_exact_powers_of_two() -> None:
    # 2^k µs is the lower bound of bucket 8k.
    for k in range(1, 30):
        assert bucket_of((2 ** k) / 1e6) == 8 * k
        assert bucket_of((2 ** k) * 0.9999999 / 1e6) == 8 * k - 1
    assert bucket_of(1024e-6) == 80  # 1.024 ms


def test_bucket_of_small_values_land_in_bucket_zero() -> None:
    assert bucket_of(0.0) == 0
    assert bucket_of(1e-9) == 0
    assert bucket_of(1e-6) == 0
    assert bucket_of(-1.0) == 0


def test_bucket_mid_is_inside_bucket() -> None:
    for i in (0, 8, 80, 133):
        mid_us = bucket_mid_ms(i) * 1000
        assert 2 ** (i / 8) < mid_us < 2 ** ((i + 1) / 8)
        assert bucket_of(mid_us / 1e6) == i


def test_percentiles_within_5_percent_of_numpy() -> None:
    rng = np.random.default_rng(42)
    samples = rng.lognormal(mean=np.log(0.004), sigma=0.6, size=10_000)  # seconds, ~4 ms median
    h = Histogram()
    for s in samples:
        h.add(float(s))
    assert h.total == 10_000
    for q in (10, 50, 90, 99):
        exact_ms = float(np.percentile(samples, q)) * 1000
        assert h.percentile_ms(q) == pytest.approx(exact_ms, rel=0.05), q
    assert h.percentile_ms(100) == pytest.approx(samples.max() * 1000, rel=0.05)


def test_empty_histogram_percentile_is_zero() -> None:
    assert Histogram().percentile_ms(50) == 0.0


def test_merge_equals_histogram_of_union() -> None:
    rng = np.random.default_rng(1)
    a = rng.lognormal(np.log(0.002), 0.5, 3000)
    b = rng.lognormal(np.log(0.010), 0.8, 2000)
    ha, hb, hu = Histogram(), Histogram(), Histogram()
    for x in a:
        ha.add(float(x))
    for x in b:
        hb.add(float(x))
    for x in np.concatenate([a, b]):
        hu.add(float(x))
    merged = merge_all([ha, hb])
    assert merged.counts == hu.counts
    ha.merge(hb)
    assert ha.counts == hu.counts
    assert ha.total == 5000


def test_wire_round_trip() -> None:
    h = Histogram()
    for x in (1e-5, 2e-5, 2e-5, 3e-3, 0.5):
        h.add(x)
    wire = h.to_wire()
    assert wire["scheme"] == SCHEME == "log2/8"
    # Through JSON, as it travels (keys become strings).
    back = Histogram.from_wire(json.loads(json.dumps(wire)))
    assert back.counts == h.counts
    assert all(isinstance(k, str) for k in wire["counts"])  # type: ignore[union-attr]


def test_from_wire_wrong_scheme_raises() -> None:
    with pytest.raises(ValueError, match="scheme"):
        Histogram.from_wire({"scheme": "linear/1", "counts": {"1": 2}})
    with pytest.raises(ValueError):
        Histogram.from_wire({"scheme": SCHEME, "counts": [1, 2]})


def test_window_summary_figures() -> None:
    w = Window(3, "onnxruntime:CPUExecutionProvider")
    for i in range(1, 101):
        w.add(i / 1000.0, ok=(i % 10 != 0))
    s = w.summary()
    assert s["count"] == 100 and s["errors"] == 10
    assert s["version"] == 3 and s["backend"] == "onnxruntime:CPUExecutionProvider"
    lat = s["latency_ms"]
    assert lat["max"] == 100.0
    assert lat["mean"] == pytest.approx(50.5)
    assert lat["p50"] == pytest.approx(50.0, abs=1.0)
    assert lat["p90"] == pytest.approx(90.0, abs=1.0)
    assert lat["p99"] == pytest.approx(99.0, abs=1.0)
    assert Histogram.from_wire(s["hist"]).total == 100


def test_windows_swap_returns_and_resets() -> None:
    lw = LatencyWindows()
    lw.observe("det", 1, "cpu", 0.002, True)
    lw.observe("det", 1, "cpu", 0.004, False)
    lw.observe("cls", 5, "gpu", 0.001, True)
    out = lw.swap()
    assert set(out) == {"det", "cls"}
    assert out["det"].count == 2 and out["det"].errors == 1
    assert out["cls"].version == 5
    assert lw.swap() == {}
    lw.observe("det", 1, "cpu", 0.003, True)
    again = lw.swap()
    assert again["det"].count == 1


def test_version_change_inside_a_window_keeps_old_figures() -> None:
    lw = LatencyWindows()
    for _ in range(3):
        lw.observe("det", 6, "cpu", 0.002, True)
    for _ in range(2):
        lw.observe("det", 7, "cpu", 0.001, True)
    out = lw.swap()
    assert set(out) == {"det", "det@6"}
    assert (out["det@6"].version, out["det@6"].count) == (6, 3)
    assert (out["det"].version, out["det"].count) == (7, 2)
