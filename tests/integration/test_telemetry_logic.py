"""Telemetry parts in-process on real SQLite: budget pacing, threshold events, window merging,
thinning, Prometheus exposition, and fleet-wide percentiles merged from device histograms."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.config import Config
from agent.mqtt.queue import mqtt_publish_bytes
from agent.mqtt.topics import Topics
from agent.telemetry.budget import DAY_S, PACE_SLACK, DailyBudget
from agent.telemetry.events import MIN_CALLS, EventMonitor, Thresholds
from agent.telemetry.histogram import MAX_RELATIVE_ERROR, Histogram
from agent.telemetry.metrics import Metrics
from agent.telemetry.outbox import KIND_EVENT, KIND_JOB, Outbox
from agent.telemetry.reporting import THINNED_EVENT, TelemetryReporter, manifest_max_p95_ms
from agent.telemetry.windows import LatencyWindows, Window, merge_windows
from fleetctl.fleetstats import FleetStats

MIB = 2**20


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


# -- budget ---------------------------------------------------------------------------------------
def test_mqtt_publish_bytes_matches_the_packet_layout() -> None:
    # fixed header 1 + length 1 + topic (2 + 3) + packet id 2 + properties 1 + payload 10
    assert mqtt_publish_bytes("a/b", 10) == 20
    assert mqtt_publish_bytes("a/b", 10, mqtt5=False) == 19
    assert mqtt_publish_bytes("a/b", 200) == 1 + 2 + 2 + 3 + 2 + 1 + 200  # two length bytes


def test_budget_paces_over_the_day_and_resets_at_midnight() -> None:
    day0 = 1_800_000_000 - 1_800_000_000 % DAY_S
    clock = Clock(day0 + DAY_S / 2)  # noon UTC: half the budget (+ slack) may be used
    b = DailyBudget(1000, clock)
    assert not b.thinned()
    b.record("heartbeat", int(1000 * (0.5 + PACE_SLACK)) - 1)
    assert not b.thinned()
    b.record("job", 5000)  # job updates, events and status have their own share: never thin telemetry
    b.record("status", 5000)
    assert not b.thinned() and b.used() == int(1000 * (0.5 + PACE_SLACK)) - 1 + 10_000
    b.record("telemetry", 1)
    assert b.thinned(), "ahead of the even spread plus slack"
    clock.t += DAY_S / 4  # 18:00: the pace caught up
    assert not b.thinned()
    b.record("telemetry", 400)
    assert b.thinned() and b.telemetry_used() == 1000  # the whole budget: thinned until midnight
    clock.t = day0 + DAY_S + 1  # the next UTC day starts from zero
    assert b.used() == 0 and not b.thinned()
    assert not DailyBudget(0, clock).thinned(), "0 means no budget"


def test_budget_survives_a_restart_on_the_same_day_only() -> None:
    clock = Clock(5 * DAY_S + 100)
    b = DailyBudget(10_000, clock)
    b.record("telemetry", 1234)
    saved = b.dumps()
    again = DailyBudget(10_000, clock)
    again.loads(saved)
    assert again.used() == 1234 and again.snapshot()["by_kind"] == {"telemetry": 1234}
    tomorrow = DailyBudget(10_000, Clock(6 * DAY_S + 5))
    tomorrow.loads(saved)
    assert tomorrow.used() == 0
    tomorrow.loads("not json")  # ignored
    assert tomorrow.used() == 0


# -- threshold events ---------------------------------------------------------------------------
def _window(latencies_ms: list[float], errors: int = 0, version: int = 1) -> Window:
    w = Window(version, "onnxruntime:CPUExecutionProvider")
    for i, ms in enumerate(latencies_ms):
        w.add(ms / 1000.0, ok=i >= errors)
    return w


def test_system_events_fire_once_per_episode_with_hysteresis() -> None:
    t = Thresholds(disk_low_mb=100, memory_pressure_pct=90)
    mon = EventMonitor(lambda: t)
    assert mon.check_system({"disk_free_mb": 500, "mem_used_pct": 50}) == []
    ev = mon.check_system({"disk_free_mb": 80, "mem_used_pct": 95, "mem_available_mb": 40})
    assert [(n, f["active"]) for n, f in ev] == [("disk_low", True), ("memory_pressure", True)]
    assert ev[0][1]["free_mb"] == 80 and ev[1][1]["mem_available_mb"] == 40
    assert mon.check_system({"disk_free_mb": 70, "mem_used_pct": 96}) == [], "no repeat while active"
    assert mon.check_system({"disk_free_mb": 105, "mem_used_pct": 85}) == [], "inside the hysteresis band"
    ev = mon.check_system({"disk_free_mb": 111, "mem_used_pct": 80})
    assert [(n, f["active"]) for n, f in ev] == [("disk_low", False), ("memory_pressure", False)]
    t.disk_low_mb = 0  # a check turned off never fires
    assert mon.check_system({"disk_free_mb": 1, "mem_used_pct": 10}) == []


def test_latency_slo_and_error_rate_events() -> None:
    t = Thresholds(error_rate_pct=10, slo_p99_ms=50)
    mon = EventMonitor(lambda: t)
    fast = [5.0] * MIN_CALLS
    assert mon.check_windows({"det": _window(fast)}, 60) == []
    # Too few calls: not judged, however slow.
    assert mon.check_windows({"det": _window([500.0] * (MIN_CALLS - 1))}, 60) == []
    # p99 over the device-wide limit.
    ev = mon.check_windows({"det": _window([5.0] * 30 + [80.0] * 2)}, 60)
    assert [(n, f["active"], f["quantile"]) for n, f in ev] == [("slo_breach", True, "p99")]
    assert ev[0][1]["latency_ms"] == pytest.approx(80.0) and ev[0][1]["limit_ms"] == 50
    # The manifest's p95 limit applies to its model.
    ev = mon.check_windows({"cls": _window([5.0] * 90 + [30.0] * 10)}, 60, slo_for=lambda m: 20.0)
    assert [(n, f["model"], f["quantile"]) for n, f in ev] == [("slo_breach", "cls", "p95")]
    # Errors: 3 of 20 = 15 % >= 10 %.
    ev = mon.check_windows({"det": _window(fast, errors=3)}, 60)
    names = [(n, f["active"]) for n, f in ev]
    assert ("slo_breach", False) in names and ("error_rate", True) in names
    ev = mon.check_windows({"det": _window(fast, errors=0)}, 60)
    assert [(n, f["active"]) for n, f in ev] == [("error_rate", False)]
    # An old version's tail (name@v) is not judged.
    assert mon.check_windows({"det@0": _window([900.0] * 40, errors=40)}, 60) == []


def test_manifest_max_p95_ms() -> None:
    assert manifest_max_p95_ms({"validation": {"max_p95_ms": 12}}) == 12.0
    assert manifest_max_p95_ms({"validation": {}}) is None
    assert manifest_max_p95_ms(None) is None


# -- window merging -------------------------------------------------------------------------------
def test_merged_windows_count_everything_and_keep_versions_apart() -> None:
    rng = random.Random(7)
    a, b = Window(1, "cpu"), Window(1, "cpu")
    for _ in range(6000):
        a.add(rng.uniform(0.001, 0.002), True)
    for _ in range(5000):
        b.add(rng.uniform(0.003, 0.004), rng.random() < 0.1)
    merged: dict[str, Window] = {}
    merge_windows(merged, {"det": a})
    merge_windows(merged, {"det": b})
    w = merged["det"]
    assert w.count == 11000 and w.errors == b.errors and w.hist.total == 11000
    assert len(w.samples) <= 8192
    share = sum(1 for s in w.samples if s < 0.0025) / len(w.samples)
    assert share == pytest.approx(6000 / 11000, abs=0.02), "reservoir keeps each side's share"
    merge_windows(merged, {"det": _window([1.0] * 3, version=2)})
    assert merged["det"].version == 2 and merged["det@1"].count == 11000


# -- thinning by the budget ----------------------------------------------------------------------
def _reporter(tmp_path: Path, budget: DailyBudget, cfg: Config) -> tuple[TelemetryReporter, Outbox, list[tuple[str, dict[str, Any]]]]:
    box = Outbox(tmp_path / "outbox.db", 8 * MIB)
    events: list[tuple[str, dict[str, Any]]] = []

    def emit(name: str, **fields: Any) -> None:
        events.append((name, fields))
        box.add("edge/d/events", {"event": name, **fields}, KIND_EVENT, stream="events")

    rep = TelemetryReporter(cfg, box, Topics("edge", "d"), LatencyWindows(), budget, emit,
                            lambda: {"reconnects": 0}, system_figures=lambda _: {"disk_free_mb": 10})
    return rep, box, events


def test_thinning_stretches_heartbeats_and_merges_windows_but_never_events(tmp_path: Path) -> None:
    cfg = Config(device_id="d")
    cfg.telemetry.daily_budget_mb = 1.0
    cfg.telemetry.thin_period_s = 3600.0
    cfg.telemetry.window_s = 60.0
    cfg.telemetry.disk_low_mb = 100.0
    budget = DailyBudget(MIB, Clock(DAY_S * 10 + 1))  # just after midnight: pace ~ slack
    rep, box, events = _reporter(tmp_path, budget, cfg)
    assert rep.heartbeat() is not None
    assert events[0][0] == "disk_low"
    budget.record("telemetry", MIB)  # the whole day's budget gone
    for _ in range(3):
        rep.windows.observe("det", 1, "cpu", 0.002, True)
        assert rep.window() is None, "merged, not published"
    assert rep.heartbeat() is None, "thinned"
    assert [n for n, f in events if n == THINNED_EVENT] == [THINNED_EVENT]
    # Events still go while thinned.
    cfg.telemetry.disk_low_mb = 0.0
    rep.heartbeat()
    assert events[-1][0] == "disk_low" and events[-1][1]["active"] is False
    # The final flush (stop) publishes the merged windows: every call counted once.
    doc = rep.window(final=True)
    assert doc is not None and doc["models"]["det"]["count"] == 3
    assert doc["window_s"] >= 180.0
    kinds = [r.kind for r in box.peek(0, 100)]
    assert kinds.count("heartbeat") == 1 and kinds.count("telemetry") == 1
    assert kinds.count("event") == 3  # disk_low on, thinned on, disk_low off
    box.close()


# -- Prometheus -----------------------------------------------------------------------------------
def test_metrics_exposition(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", MIB)
    m = Metrics(box.stats, lambda: {"connected": True, "state": "connected", "reconnects": 2},
                budget=lambda: {"used": 10, "limit": 100, "thinned": False},
                sent=lambda: {"heartbeat": (3, 900)})
    box.on_add = m.on_outbox_add
    for i in range(5):
        m.observe_inference("det", 1, "onnxruntime:CPUExecutionProvider", 0.002 * (i + 1), ok=i != 4)
    box.add("edge/d/jobs/j1", {"type": "deploy", "state": "SUCCEEDED"}, KIND_JOB, stream="jobs")
    box.add("edge/d/events", {"event": "rollback", "model": "det"}, KIND_EVENT, stream="events")
    body, ctype = m.render()
    text = body.decode()
    assert ctype.startswith("text/plain")
    for line in ('edge_agent_inferences_total{backend="onnxruntime:CPUExecutionProvider",model="det",outcome="ok"} 4.0',
                 'edge_agent_inferences_total{backend="onnxruntime:CPUExecutionProvider",model="det",outcome="error"} 1.0',
                 'edge_agent_inference_latency_seconds_count{backend="onnxruntime:CPUExecutionProvider",model="det"} 5.0',
                 'edge_agent_deploys_total{state="SUCCEEDED"} 1.0', 'edge_agent_rollbacks_total{model="det"} 1.0',
                 'edge_agent_events_total{event="rollback"} 1.0', "edge_agent_outbox_depth 2.0",
                 "edge_agent_mqtt_connected 1.0", "edge_agent_mqtt_reconnects_total 2.0",
                 'edge_agent_mqtt_state{state="connected"} 1.0', 'edge_agent_mqtt_sent_bytes_total{kind="heartbeat"} 900.0',
                 "edge_agent_budget_used_bytes 10.0"):
        assert line in text, line
    box.close()


# -- fleet-wide percentiles ------------------------------------------------------------------------
def test_fleet_percentiles_from_merged_histograms_match_the_raw_samples() -> None:
    """Three devices with different latency profiles, several windows each, sent through the
    agent's own window code and JSON; the merged p50/p99 must match the raw samples' within the
    histogram's error, and a re-delivered message must not count twice."""
    rng = np.random.default_rng(11)
    profiles = {"pi-1": (np.log(0.004), 0.5), "pi-2": (np.log(0.009), 0.7), "jetson-1": (np.log(0.0015), 0.3)}
    stats = FleetStats()
    raw: list[float] = []
    for device, (mu, sigma) in profiles.items():
        lw = LatencyWindows()
        for seq in range(1, 6):
            samples = rng.lognormal(mu, sigma, size=int(rng.integers(500, 3000)))
            for s in samples:
                lw.observe("detector", 7, "onnxruntime:CPUExecutionProvider", float(s), True)
            raw.extend(samples.tolist())
            doc = {"v": 1, "device": device, "seq": seq, "window_s": 60,
                   "models": {k: w.summary() for k, w in lw.swap().items()}}
            wire = json.loads(json.dumps(doc, separators=(",", ":")))
            assert stats.add(device, wire) == 1
            if seq == 3:
                assert stats.add(device, wire) == 0, "a duplicate is ignored"
    fleet = stats.per_model()["detector"]
    assert fleet["count"] == len(raw) and fleet["devices"] == 3 and fleet["errors"] == 0
    assert stats.duplicates == 3
    for q, key in ((50, "p50_ms"), (99, "p99_ms")):
        exact_ms = float(np.percentile(np.asarray(raw), q, method="inverted_cdf")) * 1000
        assert abs(fleet[key] / exact_ms - 1) <= MAX_RELATIVE_ERROR + 1e-9, (q, fleet[key], exact_ms)


def test_fleetstats_horizon_versions_and_bad_input() -> None:
    clock = Clock(1000.0)
    stats = FleetStats(horizon_s=60, clock=clock)
    h = Histogram()
    for ms in (1, 2, 3):
        h.add(ms / 1000)
    stats.add("a", {"seq": 1, "models": {"det@6": {"count": 3, "errors": 1, "hist": h.to_wire()}}})
    assert stats.add("b", {"seq": 1, "models": {"det": {"count": 2, "hist": {"scheme": "linear"}}}}) == 1
    assert stats.add("c", {"models": "nope"}) == 0
    m = stats.per_model()["det"]
    assert (m["count"], m["errors"], m["devices"]) == (5, 1, 2)
    assert m["p50_ms"] == pytest.approx(2.0, rel=MAX_RELATIVE_ERROR)
    assert stats.skipped == 2
    assert stats.lines()[0].startswith("det: p50=")
    clock.t += 61
    assert stats.per_model() == {}


# -- temperatures -----------------------------------------------------------------------------------
def _zones(root: Path, zones: list[tuple[str, str]]) -> None:
    for i, (kind, temp) in enumerate(zones):
        z = root / f"thermal_zone{i}"
        z.mkdir(parents=True)
        (z / "type").write_text(kind + "\n")
        (z / "temp").write_text(temp + "\n")


def test_pi_and_jetson_thermal_zones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.telemetry import system

    pi = tmp_path / "pi"
    _zones(pi, [("cpu-thermal", "48312")])
    monkeypatch.setattr(system, "THERMAL_ROOT", pi)
    assert system.temperatures_c() == {"cpu-thermal": 48.3}
    # A Jetson Nano: PMIC-Die always reads 100 °C, thermal-fan-est is derived, a disabled zone
    # reads -256 °C; eleven zones sort numerically.
    jetson = tmp_path / "jetson"
    _zones(jetson, [("AO-therm", "41500"), ("CPU-therm", "38000"), ("GPU-therm", "36500"),
                    ("PLL-therm", "35250"), ("PMIC-Die", "100000"), ("thermal-fan-est", "52000"),
                    ("Tdiode_tegra", "-256000"), ("x7", "30000"), ("x8", "30000"), ("x9", "30000"),
                    ("x10", "44000")])
    monkeypatch.setattr(system, "THERMAL_ROOT", jetson)
    temps = system.temperatures_c()
    assert "PMIC-Die" not in temps and "Tdiode_tegra" not in temps
    assert temps["CPU-therm"] == 38.0 and temps["x10"] == 44.0
    assert list(temps)[-1] == "x10", "zone 10 after zone 9"
    fig = system.system_figures(str(tmp_path))
    assert fig["temp_c"] == 44.0, "the hottest real sensor, not the fan estimate (52) or PMIC-Die (100)"
    assert {"cpu_pct", "mem_used_pct", "mem_available_mb", "disk_free_mb", "load1", "agent_rss_mb"} <= set(fig)
