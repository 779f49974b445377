"""7. Fleet collector: simulated devices (``fleetctl sim``) at the agent's default heartbeat and
telemetry periods (60 s), time-compressed (periods divided by ``collect_compress``), through one
Mosquitto into two ``fleetctl collect`` processes sharing one subscription. Messages per second
the collectors handled, their CPU and RSS per 1,000 devices (scaled back to the real periods),
messages lost and duplicated, and how many collectors 100,000 devices would need.

Loss is checked two ways: the collectors' own counters (heartbeat gaps, exact: every collector
receives every heartbeat), and against a reference subscriber that takes every telemetry message
(not shared) and notes each device's highest ``seq``: the collectors together must hold
exactly that many telemetry messages.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
import urllib.request
from typing import Any

from benchmarks import harness as h
from benchmarks.context import Context

DEFAULT_PERIOD_S = 60.0  # the agent's telemetry.heartbeat_s and telemetry.window_s
COLLECTORS = 2
SHARE = "bench"
READY_TIMEOUT_S = 600.0
SCRAPE_TIMEOUT_S = 30.0
LOSS_GRACE_S = 2.0
SETTLE_POLL_S = 0.5
DRAIN_TIMEOUT_S = 120.0
TARGET_CORE_SHARE = 0.7  # a collector is sized to use at most 70 % of one core (one Python thread)
SEQ_RE = re.compile(rb'"seq":(\d+)')


class _Reference:
    """Every heartbeat and telemetry message, not shared: the highest seq per (device, stream)."""

    def __init__(self, broker: h.Broker) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.high: dict[tuple[str, str], int] = {}
        self.count = 0
        self._lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-reference", protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.client.subscribe([(f"{h.PREFIX}/+/telemetry", 1), (f"{h.PREFIX}/+/heartbeat", 1)])

    def _on_message(self, c: Any, u: Any, msg: Any) -> None:
        m = SEQ_RE.search(msg.payload)
        if m is None:
            return
        parts = msg.topic.split("/")
        key = (parts[-2], parts[-1])
        seq = int(m.group(1))
        with self._lock:
            self.count += 1
            if seq > self.high.get(key, 0):
                self.high[key] = seq

    def published(self, stream: str) -> int:
        with self._lock:
            return sum(v for (_, s), v in self.high.items() if s == stream)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _collector(broker: h.Broker) -> tuple[subprocess.Popen[str], str]:
    p = subprocess.Popen([h.PYTHON, "-m", "fleetctl.main", "collect", "--broker", broker.url, "--listen", "127.0.0.1:0",
                          "--share", SHARE, "--loss-grace", str(LOSS_GRACE_S), "--log-format", "json"],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=h.env(), cwd=h.REPO)
    assert p.stdout is not None
    line = p.stdout.readline()
    if not line.startswith('{"listening"'):
        h.stop_process(p, 5)
        raise RuntimeError(f"collector did not start (exit {p.poll()}): {line!r}")
    return p, json.loads(line)["listening"]


def _scrape(addr: str) -> dict[tuple[str, str], float]:
    """{(sample name, stream or ''): value} for the collector's own counters."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=SCRAPE_TIMEOUT_S) as r:
        text = r.read().decode()
    out: dict[tuple[str, str], float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name.startswith(("edge_fleet_messages_", "edge_fleet_devices_tracked")):
                out[(s.name, s.labels.get("stream", ""))] = s.value
    return out


def _total(scrapes: list[dict[tuple[str, str], float]], name: str, stream: str | None = None) -> float:
    return sum(v for sc in scrapes for (n, s), v in sc.items() if n == name and (stream is None or s == stream))


def _sim(ctx: Context, broker: h.Broker, n: int, period_s: float) -> subprocess.Popen[str]:
    procs = max(1, min(ctx.scale.fleet_processes, n))
    return subprocess.Popen(
        [h.PYTHON, "-m", "fleetctl.main", "sim", "--broker", broker.url, "--devices", str(n), "--processes", str(procs),
         "--trust", str(ctx.fleet.trust_dir), "--group", "bench", "--heartbeat", repr(period_s),
         "--window", repr(period_s), "--model", "det:1", "--id-format", "dev-{:05d}"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=h.env(), cwd=h.REPO, start_new_session=True)


def run(ctx: Context) -> dict[str, Any]:
    n, k, window_s = ctx.scale.collect_devices, ctx.scale.collect_compress, ctx.scale.collect_s
    period = DEFAULT_PERIOD_S / k
    ctx.log(f"collect: {n} devices, periods {period:g} s ({k:g}× the 60 s defaults), {COLLECTORS} collectors")
    broker = h.Broker(ctx.work / "broker-collect").start()
    collectors: list[tuple[subprocess.Popen[str], str]] = []
    ref: _Reference | None = None
    sim: subprocess.Popen[str] | None = None
    try:
        collectors = [_collector(broker) for _ in range(COLLECTORS)]
        pids = [p.pid for p, _ in collectors]
        ref = _Reference(broker)
        time.sleep(1.0)
        rss0 = [h.tree_footprint(pid).rss_mb for pid in pids]
        t0 = time.monotonic()
        sim = _sim(ctx, broker, n, period)
        assert sim.stdout is not None
        line = sim.stdout.readline()  # "ready N devices ..." once all are connected and subscribed
        if not line.startswith("ready"):
            raise RuntimeError(f"simulator did not become ready (exit {sim.poll()}): {line!r}")
        connect_s = time.monotonic() - t0
        time.sleep(min(period, window_s / 2))  # every device past its first (staggered) heartbeat
        a = [_scrape(addr) for _, addr in collectors]
        c0, tw = h.tree_cpu_s(pids), time.monotonic()
        time.sleep(window_s)
        b = [_scrape(addr) for _, addr in collectors]
        dt = time.monotonic() - tw
        cpu = h.tree_cpu_s(pids) - c0
        rss = [h.tree_footprint(pid).rss_mb for pid in pids]
        handled = _total(b, "edge_fleet_messages_received_total") - _total(a, "edge_fleet_messages_received_total")
        per_stream = {s: (_total(b, "edge_fleet_messages_received_total", s)
                          - _total(a, "edge_fleet_messages_received_total", s)) / dt
                      for s in ("heartbeat", "telemetry")}
        h.stop_process(sim, 30, group=True)
        sim = None
        # settle: the broker's queues drain, then open gaps pass their grace
        want = ref.published("telemetry")
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        got = 0.0
        while time.monotonic() < deadline:
            time.sleep(SETTLE_POLL_S)
            want = ref.published("telemetry")
            end = [_scrape(addr) for _, addr in collectors]
            got = (_total(end, "edge_fleet_messages_received_total", "telemetry")
                   - _total(end, "edge_fleet_messages_duplicate_total", "telemetry"))
            if got >= want and _total(end, "edge_fleet_messages_received_total", "heartbeat") >= \
                    COLLECTORS * ref.published("heartbeat"):
                break
        time.sleep(LOSS_GRACE_S + 1)
        end = [_scrape(addr) for _, addr in collectors]
        cpu_frac = cpu / dt  # cores, both collectors together
        msgs_per_s = handled / dt
        # the compression the simulators achieved (on a busy machine they fall behind the asked one)
        achieved = per_stream["telemetry"] / (n / DEFAULT_PERIOD_S)
        per_collector_cost_s = cpu / handled if handled else None  # CPU seconds per message handled
        return {
            "devices": n, "compress": k, "period_s": period, "achieved_compress": achieved,
            "achieved_period_s": DEFAULT_PERIOD_S / achieved if achieved else None, "collectors": COLLECTORS, "connect_s": connect_s,
            "window_s": dt, "messages_per_s": msgs_per_s, "per_stream_per_s": per_stream,
            "cpu_cores": cpu_frac, "cpu_pct_per_1000_devices_at_defaults": 100 * cpu_frac / (n / 1000) / achieved if achieved else None,
            "cpu_us_per_message": 1e6 * per_collector_cost_s if per_collector_cost_s else None,
            "rss_mb_idle": rss0, "rss_mb_loaded": rss,
            "rss_mb_per_1000_devices": sum(r - r0 for r, r0 in zip(rss, rss0, strict=True)) / COLLECTORS / (n / 1000),
            "telemetry_published": want, "telemetry_held": got,
            "lost_counted": _total(end, "edge_fleet_messages_lost_total"),
            "duplicates_counted": _total(end, "edge_fleet_messages_duplicate_total"),
            "lost_vs_reference": max(0, want - got), "reference_messages": ref.count,
            "for_100k": collectors_for(100_000, per_collector_cost_s),
        }
    finally:
        if sim is not None:
            h.stop_process(sim, 30, group=True)
        if ref is not None:
            ref.close()
        for p, _ in collectors:
            h.stop_process(p, 10)
        broker.stop()


def collectors_for(devices: int, cost_s: float | None) -> dict[str, Any] | None:
    """Collectors needed at the default periods: each takes every heartbeat (replicated) and its
    share of telemetry, and stays under ``TARGET_CORE_SHARE`` of one core."""
    if not cost_s:
        return None
    hb = tel = devices / DEFAULT_PERIOD_S  # messages/s of each stream
    budget = TARGET_CORE_SHARE / cost_s  # messages/s one collector may take
    if hb >= budget:
        return {"collectors": None, "heartbeats_per_s": hb, "budget_per_s": budget,
                "note": "heartbeats alone exceed one collector: shard the state streams too"}
    need = 1
    while hb + tel / need > budget:
        need += 1
    return {"collectors": need, "heartbeats_per_s": hb, "telemetry_per_s": tel, "budget_per_s": budget,
            "load_each_per_s": hb + tel / need}
