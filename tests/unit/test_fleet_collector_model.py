"""The fleet collector's model (fleetctl.fleetmetrics, fleetctl.seqtrack) and JSON log lines:
merged buckets, duplicates, loss after a grace period, caps, labels, and odd device data."""

from __future__ import annotations

import io
import json
import logging
import random
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agent import logs
from agent.config import from_dict
from agent.errors import ConfigError
from agent.telemetry.histogram import SUB_BUCKETS, bucket_of
from agent.telemetry.windows import Window
from fleetctl import commands
from fleetctl.fleetmetrics import OVERFLOW, Caps, FleetMetrics, latency_bounds
from fleetctl.keys import generate_keypair, load_private_key
from fleetctl.seqtrack import MAX_OPEN_GAPS, WINDOW, SeqTracker


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def scrape(m: FleetMetrics) -> dict[str, list[Any]]:
    """Samples by name, as Prometheus would parse the exposition."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(m)
    out: dict[str, list[Any]] = {}
    for fam in text_string_to_metric_families(generate_latest(reg).decode()):
        for s in fam.samples:
            out.setdefault(s.name, []).append(s)
    return out


def value(samples: dict[str, list[Any]], name: str, **labels: str) -> float:
    hits = [s.value for s in samples.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(hits) == 1, (name, labels, hits)
    return float(hits[0])


def window_doc(seq: int, latencies: list[float], model: str = "det", version: int = 3, errors: int = 0) -> bytes:
    w = Window(version, "onnxruntime:cpu")
    for i, lat in enumerate(latencies):
        w.add(lat, i >= errors)
    return json.dumps({"v": 1, "seq": seq, "window_s": 60, "models": {model: w.summary()}}).encode()


# -- sequence numbers ------------------------------------------------------------------------------
def test_gaps_count_as_lost_only_after_the_grace_and_late_arrivals_are_not_lost() -> None:
    t = SeqTracker(grace_s=10)
    assert all(t.see("d", "heartbeat", n, 0.0) for n in (1, 2, 3, 6))  # 4 and 5 missing
    t.settle(5.0)
    assert t.lost == {} and t.open_gaps == 2
    assert t.see("d", "heartbeat", 4, 6.0)  # late, e.g. re-sent after a reconnect
    t.settle(10.0)
    assert t.lost == {"heartbeat": 1} and t.open_gaps == 0
    assert not t.see("d", "heartbeat", 4, 11.0)  # a duplicate now
    assert t.duplicates == {"heartbeat": 1}


def test_huge_gap_is_bounded_and_a_restart_of_numbering_is_not_loss() -> None:
    t = SeqTracker(grace_s=0)
    t.see("d", "telemetry", 1, 0.0)
    t.see("d", "telemetry", 10_002, 0.0)
    assert t.open_gaps == MAX_OPEN_GAPS
    t.settle(1.0)
    assert t.lost == {"telemetry": 10_000}
    assert t.see("d", "telemetry", 1, 2.0)  # far below the window: numbering restarted
    assert t.resets == 1 and t.duplicates == {}
    assert t.see("d", "telemetry", 2, 2.0)
    t.settle(3.0)
    assert t.lost == {"telemetry": 10_000}


def test_partial_streams_count_duplicates_but_never_gaps() -> None:
    t = SeqTracker(grace_s=0, count_gaps=False)
    for n in (1, 3, 7, 7, 20):
        t.see("d", "jobs", n, 0.0)
    t.settle(100.0)
    assert t.lost == {} and t.duplicates == {"jobs": 1}
    assert WINDOW >= 32  # at least the agent's in-flight window of unacknowledged messages


# -- latency buckets -------------------------------------------------------------------------------
@pytest.mark.parametrize("per_octave", [8, 2])
def test_latency_buckets_are_the_sum_of_the_devices_bucket_counts(per_octave: int) -> None:
    rng = random.Random(7)
    m = FleetMetrics(per_octave=per_octave)
    raw: list[float] = []
    for d in range(3):
        for seq in range(1, 4):
            lat = [rng.lognormvariate(0, 0.6) * (2 + 3 * d) / 1000 for _ in range(200)]
            raw += lat
            m.take(f"edge/dev-{d}/telemetry", window_doc(seq, lat))
    m.take("edge/dev-0/telemetry", window_doc(3, [0.5] * 50))  # a re-sent window: not counted again
    s = scrape(m)
    for j in latency_bounds(per_octave):
        le = 2 ** (j / SUB_BUCKETS) / 1e6
        want = sum(1 for x in raw if bucket_of(x) + 1 <= j)  # device bucket i lies under bound i + 1
        got = next(x.value for x in s["edge_fleet_inference_latency_seconds_bucket"]
                   if x.labels["le"] != "+Inf" and float(x.labels["le"]) == le)
        assert got == want, (j, le)
    assert value(s, "edge_fleet_inference_latency_seconds_count") == len(raw)
    assert value(s, "edge_fleet_messages_duplicate_total", stream="telemetry") == 1
    assert value(s, "edge_fleet_inferences_total", outcome="ok") == len(raw)


def test_caps_fold_labels_into_overflow_and_versions_rotate() -> None:
    m = FleetMetrics(caps=Caps(models=2, versions=2))
    for seq, (model, version) in enumerate([("a", 1), ("b", 1), ("c", 1), ("a", 2), ("a", 3)], start=1):
        m.take("edge/d1/telemetry", window_doc(seq, [0.004] * 5, model, version))
    s = scrape(m)
    models = {(x.labels["model"], x.labels["version"]) for x in s["edge_fleet_inference_latency_seconds_count"]}
    assert models == {("a", "2"), ("a", "3"), ("b", "1"), (OVERFLOW, "1")}  # a v1 rotated out, c folded
    assert value(s, "edge_fleet_label_overflow_total", label="model") == 1
    assert value(s, "edge_fleet_label_overflow_total", label="version") == 1


def test_devices_past_the_cap_are_refused_and_counted() -> None:
    m = FleetMetrics(caps=Caps(devices=2))
    for d in ("a", "b", "c"):
        m.take(f"edge/{d}/heartbeat", b'{"seq":1}')
    s = scrape(m)
    assert value(s, "edge_fleet_devices_tracked") == 2
    assert value(s, "edge_fleet_devices_refused_total") == 1


# -- device state, jobs, events --------------------------------------------------------------------
def test_groups_online_state_heartbeat_ages_and_versions() -> None:
    clock = Clock()
    m = FleetMetrics(group_rules=[("doors", "door-*")], per_device=True, clock=clock)
    m.take("edge/cam-1/status", json.dumps({"seq": 1, "online": True, "groups": ["cams"],
                                            "models": [{"name": "det", "version": 3}]}).encode())
    m.take("edge/cam-2/status", json.dumps({"seq": 1, "online": False, "groups": ["cams"]}).encode())
    m.take("edge/cam-2/heartbeat", b'{"seq":1}')  # offline now: counted offline, not as a stale heartbeat
    m.take("edge/door-1/heartbeat", b'{"seq":1,"budget":{"thinned":true}}')
    m.take("edge/x-1/heartbeat", b'{"seq":1}')
    clock.t += 100
    m.take("edge/cam-1/heartbeat", b'{"seq":1}')
    clock.t += 20
    s = scrape(m)
    assert value(s, "edge_fleet_devices", group="cams", state="online") == 1
    assert value(s, "edge_fleet_devices", group="cams", state="offline") == 1
    assert value(s, "edge_fleet_devices", group="doors", state="unknown") == 1
    assert value(s, "edge_fleet_devices", group="ungrouped", state="unknown") == 1
    assert value(s, "edge_fleet_devices_thinned", group="doors") == 1
    assert value(s, "edge_fleet_model_devices", model="det", version="3", group="cams") == 1
    assert value(s, "edge_fleet_heartbeat_age_seconds_bucket", group="doors", le="90.0") == 0
    assert value(s, "edge_fleet_heartbeat_age_seconds_bucket", group="doors", le="120.0") == 1
    assert value(s, "edge_fleet_heartbeat_age_seconds_bucket", group="cams", le="30.0") == 1
    assert value(s, "edge_fleet_heartbeat_age_seconds_bucket", group="cams", le="+Inf") == 1
    assert value(s, "edge_fleet_device_heartbeat_age_seconds", device="door-1") == 120
    assert "edge_fleet_device_heartbeat_age_seconds" not in scrape(FleetMetrics())


def test_job_outcomes_take_the_model_from_the_signed_command_and_events_count_starts(tmp_path: Any) -> None:
    kp = generate_keypair(tmp_path, "k")
    doc = commands.command_document("deploy", {"model": "det", "manifest_url": "http://x"}, {"device": "d1"},
                                    command_id="deploy-1")
    m = FleetMetrics()
    m.take("edge/d1/cmd", commands.sign_document(doc, [load_private_key(kp.private_path)]))
    m.take("edge/d1/jobs/deploy-1", b'{"seq":1,"job":"deploy-1","type":"deploy","state":"IN_PROGRESS"}')
    m.take("edge/d1/jobs/deploy-1", json.dumps({"seq": 2, "job": "deploy-1", "type": "deploy", "state": "FAILED",
                                                "error": {"code": "validation_failed"}}).encode())
    m.take("edge/d1/jobs/deploy-2", json.dumps({"seq": 3, "job": "deploy-2", "type": "deploy", "state": "SUCCEEDED",
                                                "result": {"name": "det", "version": 4}}).encode())
    events: list[dict[str, Any]] = [{"event": "slo_breach", "model": "det", "active": True},
                                    {"event": "slo_breach", "model": "det", "active": False},
                                    {"event": "something_new"}]
    for seq, ev in enumerate(events, start=1):
        m.take("edge/d1/events", json.dumps({"seq": seq, **ev}).encode())
    s = scrape(m)
    assert value(s, "edge_fleet_jobs_total", model="det", version="unknown", state="FAILED",
                 code="validation_failed") == 1
    assert value(s, "edge_fleet_jobs_total", model="det", version="4", state="SUCCEEDED") == 1
    assert value(s, "edge_fleet_events_total", event="slo_breach", model="det") == 1
    assert value(s, "edge_fleet_events_total", event="other") == 1


@pytest.mark.parametrize("payload", [b"", b"not json", b"[]", b'{"models": 3}', b'{"models": {"m": 1}}',
                                     b'{"models": {"m": {"hist": {"scheme": "linear", "counts": {}}}}}',
                                     b'{"models": {"m": {"hist": {"scheme": "log2/8", "counts": {"x": 1}}}}}',
                                     b'{"models": {"m": {"hist": {"scheme": "log2/8", "counts": {"3": -1}}}}}',
                                     b'{"seq": "7", "models": {"m": {"version": [1], "hist": null}}}'])
def test_odd_device_data_is_counted_never_raised(payload: bytes) -> None:
    m = FleetMetrics()
    m.take("edge/d/telemetry", payload)
    m.take("edge/d/status", payload)
    m.take("edge/d/jobs/x", payload)
    s = scrape(m)
    assert value(s, "edge_fleet_messages_received_total", stream="telemetry") == 1
    assert value(s, "edge_fleet_messages_invalid_total", stream="telemetry") == 1
    assert "edge_fleet_inference_latency_seconds_count" not in s


# -- logs ------------------------------------------------------------------------------------------
def test_json_log_lines_carry_device_job_and_model() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logs.JsonFormatter({"device": "cam-7"}))
    lg = logging.getLogger("test.jsonlog")
    lg.addHandler(handler)
    lg.propagate = False
    try:
        lg.warning("job %s failed", "j1", extra={"job": "j1", "model": "det"})
        lg.warning("plain")
    finally:
        lg.removeHandler(handler)
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["message"] == "job j1 failed" and first["level"] == "warning" and first["logger"] == "test.jsonlog"
    assert (first["device"], first["job"], first["model"]) == ("cam-7", "j1", "det")
    assert first["time"].endswith("Z")
    assert second["device"] == "cam-7" and "job" not in second and "model" not in second


def test_log_format_config_key() -> None:
    assert from_dict({"log_format": "json"}).log_format == "json"
    assert from_dict({}).log_format == "text"
    with pytest.raises(ConfigError, match="log_format"):
        from_dict({"log_format": "xml"})


def test_deeply_nested_json_and_retained_status_again_after_a_reconnect() -> None:
    m = FleetMetrics()
    m.take("edge/d/telemetry", b"[" * 100_000 + b"]" * 100_000)
    status = json.dumps({"seq": 4, "online": True, "groups": ["cams"]}).encode()
    m.take("edge/d/status", status, retained=True)
    m.take("edge/d/status", status, retained=True)  # the broker's copy, delivered at each subscribe
    s = scrape(m)
    assert value(s, "edge_fleet_messages_invalid_total", stream="telemetry") == 1
    assert value(s, "edge_fleet_messages_duplicate_total", stream="status") == 0
    assert value(s, "edge_fleet_devices", group="cams", state="online") == 1
