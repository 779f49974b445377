"""5. Telemetry: bytes per device per day at the default settings, and how fast the outbox drains
after an outage.

Bytes per day: the daemon runs with its periodic messages accelerated (heartbeat and latency window
every ``PERIOD_S`` instead of 60 s; daily budget off so nothing is thinned) first idle, then serving
the tiny model under light traffic. Every message the broker routes is captured and sized as an
MQTT 5 PUBLISH (fixed header, topic, packet id, properties, payload) plus its PUBACK; the per-day
figure scales each periodic stream to its default period, and adds the keep-alive pings.

Drain: heartbeats every 50 ms queue in the outbox while the broker is down for ``outage_s``; after
it is back, the rate at which the backlog (messages stamped during the outage) arrives, at the
default ``telemetry.drain_rate_per_s`` and at its maximum.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from typing import Any

import numpy as np

from benchmarks import harness as h
from benchmarks.context import Context

PERIOD_S = 1.0
DEFAULT_HEARTBEAT_S = 60.0  # agent/config.py defaults
DEFAULT_WINDOW_S = 60.0
DEFAULT_KEEPALIVE_S = 60.0
PUBACK_BYTES = 4
PING_BYTES = 2 + 2  # PINGREQ + PINGRESP
TRAFFIC_RPS = 20.0
DRAIN_HEARTBEAT_S = 0.05
MAX_DRAIN_RATE = 10000.0


def publish_bytes(topic: str, payload: int) -> int:
    """Size of a QoS 1 MQTT 5 PUBLISH carrying ``payload`` bytes on ``topic`` (no properties)."""
    rest = 2 + len(topic.encode()) + 2 + 1 + payload
    length_bytes = 1 if rest < 128 else 2 if rest < 16384 else 3
    return 1 + length_bytes + rest


def _kind(topic: str) -> str:
    parts = topic.split("/")
    return parts[2] if len(parts) > 2 else topic


def _traffic(port: int, stop: threading.Event) -> None:
    x = np.ones((1, 16), np.float32)
    req = h.infer_request("tiny", x, False, port)
    c = h.KeepAlive(port)
    while not stop.wait(1 / TRAFFIC_RPS):
        try:
            c.request(req)
        except OSError:
            c.close()
    c.close()


def bytes_per_day(ctx: Context) -> dict[str, Any]:
    half = max(1.0, ctx.scale.telemetry_s / 2)
    d = ctx.daemon("process", extra={"telemetry": {"heartbeat_s": PERIOD_S, "window_s": PERIOD_S,
                                                   "daily_budget_mb": 0}})
    obs = ctx.observer(topics=(f"{h.PREFIX}/{d.device_id}/#",))
    phases: dict[str, Any] = {}
    try:
        d.start(obs)
        for phase in ("idle", "serving"):
            stop = threading.Event()
            if phase == "serving":
                d.deploy(obs, ctx.fleet, "tiny", ctx.url(ctx.tiny_bundle()), backend="onnxruntime:CPUExecutionProvider")
                threading.Thread(target=_traffic, args=(d.api_port, stop), daemon=True).start()
                time.sleep(PERIOD_S)  # the window that saw the deploy is not steady state
            mark, t0 = obs.mark(), time.monotonic()
            time.sleep(half)
            msgs = obs.messages[mark:]
            dur = time.monotonic() - t0
            stop.set()
            sizes: dict[str, list[int]] = defaultdict(list)
            for m in msgs:
                sizes[_kind(m.topic)].append(publish_bytes(m.topic, m.size) + PUBACK_BYTES)
            per_day = 0.0
            kinds = {}
            for kind, default in (("heartbeat", DEFAULT_HEARTBEAT_S), ("telemetry", DEFAULT_WINDOW_S)):
                xs = sizes.get(kind, [])
                rate = len(xs) / dur  # messages per second at PERIOD_S (about 1/PERIOD_S when it is sent)
                # At the defaults: one message of the measured mean size per default period.
                day = 86400 / default * (sum(xs) / len(xs) if xs else 0)
                kinds[kind] = {"messages_per_period": rate * PERIOD_S, "bytes_each": (sum(xs) / len(xs)) if xs else 0,
                               "payload_each": (sum(m.size for m in msgs if _kind(m.topic) == kind) / len(xs)) if xs else 0,
                               "per_day": day}
                per_day += day
            pings = 86400 / DEFAULT_KEEPALIVE_S * PING_BYTES
            kinds["pings"] = {"per_day": pings}
            phases[phase] = {"kinds": kinds, "bytes_per_day": per_day + pings,
                             "other_messages": {k: len(v) for k, v in sizes.items() if k not in ("heartbeat", "telemetry")}}
        deploy_msgs = [m for m in obs.messages if _kind(m.topic) == "jobs"]
        phases["per_deploy_bytes"] = sum(publish_bytes(m.topic, m.size) + PUBACK_BYTES for m in deploy_msgs)
    finally:
        d.stop()
        obs.close()
    return phases


def drain(ctx: Context, rate: float) -> dict[str, Any]:
    from agent.timeutil import parse_rfc3339

    broker = h.Broker(ctx.work / f"broker-drain-{rate:g}").start()
    d = h.Daemon(ctx.work / f"drain-{rate:g}", broker, ctx.fleet.trust_dir,
                 extra={"telemetry": {"heartbeat_s": DRAIN_HEARTBEAT_S, "daily_budget_mb": 0,
                                      "drain_rate_per_s": rate}})
    topic = f"{h.PREFIX}/{d.device_id}/heartbeat"
    topics = (topic, f"{h.PREFIX}/{d.device_id}/status")
    obs = h.Observer(broker, topics=topics)
    try:
        d.start(obs)
        time.sleep(0.5)
        obs.close()
        broker.stop()
        t_down = time.time()
        time.sleep(ctx.scale.outage_s)
        t_up = time.time()
        broker.start()
        obs = h.Observer(broker, topics=topics)
        deadline = time.monotonic() + 60 + ctx.scale.outage_s / DRAIN_HEARTBEAT_S / max(rate, 1)
        backlog: list[float] = []
        while time.monotonic() < deadline:
            time.sleep(0.2)
            beats = [m for m in obs.messages if m.topic == topic]
            backlog = [m.t for m in beats if t_down <= parse_rfc3339(str(m.doc.get("ts"))) < t_up]
            live = [m for m in beats if parse_rfc3339(str(m.doc.get("ts"))) >= t_up + 1.0]
            if live and backlog and len(live) > 5:
                break
        n = len(backlog)
        span = (backlog[-1] - backlog[0]) if n > 1 else 0.0
        return {"rate_limit_per_s": rate, "backlog_messages": n, "drain_s": span,
                "messages_per_s": (n - 1) / span if span > 0 else None, "outage_s": t_up - t_down}
    finally:
        d.stop()
        obs.close()
        broker.stop()


def run(ctx: Context) -> dict[str, Any]:
    ctx.log("telemetry: bytes per day")
    out: dict[str, Any] = {"bytes_per_day": bytes_per_day(ctx), "drain": []}
    for rate in (50.0, MAX_DRAIN_RATE) if ctx.scale.name != "smoke" else (MAX_DRAIN_RATE,):
        ctx.log(f"telemetry: outbox drain at up to {rate:g}/s")
        out["drain"].append(drain(ctx, rate))
    return out
