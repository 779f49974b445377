"""Fleet observability end to end, every part real: simulated devices (``fleetctl sim``, two
groups, two models) publish through a real Mosquitto into TWO ``fleetctl collect`` processes
sharing one MQTT 5 subscription (``$share/obs/…``); a real Prometheus scrapes both every second.

- The fleet p99 (and p50) that ``histogram_quantile`` computes over the buckets summed across
  both collectors is within one bucket of the p99 of every raw latency the devices generated
  (the simulator logs them), and the merged count equals the number of raw latencies: each
  telemetry message was counted exactly once, by one of the two collectors, and both took some.
- Every query of the shipped Grafana dashboard (deploy/grafana/edge-fleet.json) runs against that
  Prometheus and returns data; so do its variable queries. The alert rules load.
- No message is counted lost or duplicated; JSON log lines from the collector.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, Mosquitto
from opskit import fleetctl
from promkit import Prometheus, start_prometheus
from test_rollout import Proc

from agent.telemetry.histogram import bucket_of
from fleetctl.keys import generate_keypair

SIM_READY_TIMEOUT_S = 60.0
SETTLE_TIMEOUT_S = 20.0
JOB = "edge-fleet-collector"
DEVICES_PER_GROUP = 6
DASHBOARD = REPO / "deploy" / "grafana" / "edge-fleet.json"
RULES = REPO / "deploy" / "prometheus" / "alerts.yml"


def collector(broker: str, *extra: str) -> tuple[Proc, str]:
    p = Proc(["collect", "--broker", broker, "--listen", "127.0.0.1:0", "--share", "obs", "--slo", "det=50",
              "--log-format", "json", *extra])
    line = p.wait_line(lambda s: s.startswith('{"listening"'), SIM_READY_TIMEOUT_S)
    return p, json.loads(line)["listening"]


def sim(broker: str, trust: Path, samples: Path, group: str, first: int, latency_ms: str, *extra: str) -> Proc:
    p = Proc(["sim", "--broker", broker, "--trust", str(trust), "--devices", str(DEVICES_PER_GROUP),
              "--first", str(first), "--group", group, "--model", "det:3", "--latency-ms", latency_ms,
              "--heartbeat", "0.3", "--window", "0.3", "--no-fetch", "--samples-log", str(samples), *extra])
    p.wait_line(lambda s: s.startswith(f"ready {DEVICES_PER_GROUP} devices"), SIM_READY_TIMEOUT_S)
    return p


def wait_for(prom: Prometheus, expr: str, want: float, timeout_s: float = SETTLE_TIMEOUT_S) -> float:
    deadline = time.monotonic() + timeout_s
    got = math.nan
    while time.monotonic() < deadline:
        res = prom.query(expr)
        got = float(res[0]["value"][1]) if res else math.nan
        if got == want:
            return got
        time.sleep(0.3)
    raise AssertionError(f"{expr} = {got}, expected {want} within {timeout_s} s")


def raw_latencies(samples: Path, model: str) -> list[float]:
    out: list[float] = []
    for line in samples.read_text().splitlines():
        out.extend(json.loads(line)["latency_s"].get(model, []))
    return sorted(out)


def nearest_rank(values: list[float], q: float) -> float:
    return values[max(0, math.ceil(q * len(values)) - 1)]


def dashboard_queries() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 15
    return [e.replace("$__rate_interval", "5s").replace("$group", ".*").replace("$model", ".*") for e in exprs]


@pytest.fixture
def trust(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    kp = generate_keypair(tmp_path / "keys", "fleet")
    folder = tmp_path / "trust"
    folder.mkdir(mode=0o755)
    (folder / "fleet.pem").write_bytes(kp.public_path.read_bytes())
    yield folder, kp.private_path


def test_two_shared_collectors_give_prometheus_the_exact_fleet_p99_and_every_dashboard_query_data(
        tmp_path: Path, mosquitto: Mosquitto, trust: tuple[Path, Path]) -> None:
    trust_dir, key = trust
    samples = tmp_path / "samples.jsonl"
    procs: list[Proc] = []
    prom: Prometheus | None = None
    try:
        c1, addr1 = collector(mosquitto.url)
        c2, addr2 = collector(mosquitto.url)
        procs += [c1, c2]
        prom = start_prometheus(tmp_path / "prom", [addr1, addr2], JOB, [RULES])
        procs.append(sim(mosquitto.url, trust_dir, samples, "cams", 0, "4", "--fail", "sim-000"))
        procs.append(sim(mosquitto.url, trust_dir, samples, "doors", DEVICES_PER_GROUP, "12"))
        # a deploy (one device fails validation) and a rollback: job outcomes and rollback events
        deploy = fleetctl("deploy", "--group", "cams", "--model", "det", "--manifest-url", "http://127.0.0.1:9/x",
                          "--key", str(key), "--broker", mosquitto.url)
        assert deploy.returncode == 0, deploy.stderr
        wait_for(prom, 'sum(edge_fleet_jobs_total{type="deploy"})', DEVICES_PER_GROUP)
        rollback = fleetctl("rollback", "--group", "cams", "--model", "det", "--key", str(key), "--broker", mosquitto.url)
        assert rollback.returncode == 0, rollback.stderr
        wait_for(prom, 'sum(edge_fleet_events_total{event="rollback"})', DEVICES_PER_GROUP - 1)
        time.sleep(2.0)  # a few more windows and scrapes with everything running

        # every dashboard query, and its variables, return data while the fleet runs
        for expr in dashboard_queries():
            assert prom.query(expr), f"no data for dashboard query {expr}"
        assert set(prom.label_values("group", "edge_fleet_devices")) == {"cams", "doors"}
        assert prom.label_values("model", "edge_fleet_inference_latency_seconds_count") == ["det"]
        jobs = {(r["metric"]["state"], r["metric"].get("code", "")): float(r["value"][1])
                for r in prom.query('sum by (state, code) (edge_fleet_jobs_total{type="deploy", model="det"})')}
        assert jobs == {("SUCCEEDED", ""): DEVICES_PER_GROUP - 1, ("FAILED", "validation_failed"): 1}
        online = prom.query('sum(max by (group) (edge_fleet_devices{state="online"}))')
        assert float(online[0]["value"][1]) == 2 * DEVICES_PER_GROUP

        for p in procs[2:]:
            p.stop()  # the simulators: their last messages are in the samples log
        lat = raw_latencies(samples, "det")
        windows = len(samples.read_text().splitlines())
        try:
            wait_for(prom, 'sum(edge_fleet_inference_latency_seconds_count{model="det"})', len(lat))
        except AssertionError as e:  # say whether windows went missing or were dropped as duplicates
            seen = prom.query('sum by (instance) (edge_fleet_messages_received_total{stream="telemetry"} '
                              '- edge_fleet_messages_duplicate_total{stream="telemetry"})')
            raise AssertionError(f"{e}; {windows} windows logged, unique per collector: {seen}") from e
        per_collector = [float(r["value"][1]) for r in
                         prom.query('edge_fleet_messages_received_total{stream="telemetry"}')]
        assert sum(per_collector) == windows and len(per_collector) == 2 and min(per_collector) > 0, per_collector

        for q in (0.5, 0.99):
            for sel, values in (("", lat), ('group="doors"', raw_latencies_group(samples, "det", DEVICES_PER_GROUP))):
                res = prom.query(f"histogram_quantile({q}, sum by (le) "
                                 f"(edge_fleet_inference_latency_seconds_bucket{{model=\"det\"{',' if sel else ''}{sel}}}))")
                fleet = float(res[0]["value"][1])
                raw = nearest_rank(values, q)
                assert abs(bucket_of(fleet) - bucket_of(raw)) <= 1, (q, sel, fleet, raw)
        lost = prom.query("sum(edge_fleet_messages_lost_total) + sum(edge_fleet_messages_duplicate_total)")
        assert float(lost[0]["value"][1]) == 0
    finally:
        for p in procs:
            p.stop()
        if prom is not None:
            prom.stop()
    logs = [json.loads(line) for line in c1.p.stderr.read().splitlines() if line.startswith("{")] if c1.p.stderr else []
    assert any(re.match(r"collecting .*\$share/obs/edge/\+/telemetry", d["message"]) for d in logs), logs
    assert all({"time", "level", "logger", "message"} <= set(d) for d in logs)


def raw_latencies_group(samples: Path, model: str, first: int) -> list[float]:
    """The raw latencies of devices sim-{first:03d} onwards (the second group)."""
    out: list[float] = []
    for line in samples.read_text().splitlines():
        d: dict[str, Any] = json.loads(line)
        if int(d["device"].split("-")[1]) >= first:
            out.extend(d["latency_s"].get(model, []))
    return sorted(out)
