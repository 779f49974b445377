"""``fleetctl collect``: device streams from the broker → Prometheus metrics at ``/metrics``.

Subscribes (MQTT 5, QoS 1) to every device's status, heartbeat, telemetry, events and job
topics, and to the command topics (to label a job's outcome with its model); serves what it
learned (``fleetmetrics.FleetMetrics``) over HTTP with prometheus_client.

Scaling out (``--share GROUP``): the additive streams — telemetry, events, jobs: counters and
histograms that Prometheus sums across collectors — are taken through the MQTT 5 shared
subscription ``$share/GROUP/…``, so each message reaches one collector of the group. The
device-state streams — status and heartbeat, one small message per device per minute — reach
every collector, so each holds the whole fleet's state (queries take ``max`` across collectors,
and losing one collector loses no state). docs/fleet-observability.md explains what this means
for counting lost messages.

Invariants:
- Every wait is bounded (connect, SUBACK, the stop of the HTTP server).
- After a reconnect the subscriptions are made again (clean sessions); messages missed
  meanwhile show up in ``edge_fleet_messages_lost_total``.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import paho.mqtt.client as mqtt

from agent import logs
from fleetctl.commands import check_name
from fleetctl.fleetmetrics import DEFAULT_PER_OCTAVE, GAP_STREAMS, Caps, FleetMetrics
from fleetctl.seqtrack import DEFAULT_GRACE_S

log = logging.getLogger(__name__)

SHARED_KINDS = ("telemetry", "events", "jobs/+")
REPLICATED_KINDS = ("status", "heartbeat")
DEFAULT_LISTEN = "127.0.0.1:9478"
STOP_POLL_S = 0.5


def topics(prefix: str, share: str | None) -> list[str]:
    """The subscription filters: shared kinds under ``$share/GROUP/`` when sharing."""
    shared = [f"{prefix}/+/{k}" for k in SHARED_KINDS]
    if share:
        shared = [f"$share/{share}/{t}" for t in shared]
    return [*(f"{prefix}/+/{k}" for k in REPLICATED_KINDS), *shared, f"{prefix}/+/cmd", f"{prefix}/groups/+/cmd"]


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--listen {text!r}: expected HOST:PORT, e.g. {DEFAULT_LISTEN}")
    return host.strip("[]") or "0.0.0.0", int(port)


class Collector:
    """One MQTT subscription feeding one ``FleetMetrics``, served over HTTP."""

    def __init__(self, client: mqtt.Client, metrics: FleetMetrics, prefix: str, share: str | None,
                 subscribe: Callable[[mqtt.Client, Sequence[str]], None]) -> None:
        self.client = client
        self.metrics = metrics
        self.topics = topics(prefix, share)
        self._subscribe = subscribe
        self._first_connect: Any = client.on_connect
        client.on_message = self._on_message
        client.on_connect = self._on_connect

    def start(self) -> None:
        self._subscribe(self.client, self.topics)
        log.info("collecting %s", ", ".join(self.topics))

    def _on_message(self, c: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            self.metrics.take(msg.topic, bytes(msg.payload), retained=bool(msg.retain))
        except Exception:  # a bug on one message must not stop paho's network thread
            log.exception("message on %s not taken", msg.topic)

    def _on_connect(self, c: mqtt.Client, u: Any, flags: Any, reason: Any, props: Any) -> None:
        if self._first_connect is not None:
            self._first_connect(c, u, flags, reason, props)
        if not reason.is_failure and flags.session_present is False:
            # paho reconnected on its own: a clean session has no subscriptions
            c.subscribe([(t, 1) for t in self.topics])
            log.warning("reconnected to the broker; subscribed again")


def add_arguments(p: argparse.ArgumentParser, duration: Callable[[str], float]) -> None:
    p.add_argument("--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT",
                   help="serve /metrics here (default %(default)s)")
    p.add_argument("--share", type=lambda t: check_name(t, "share group"), metavar="GROUP",
                   help="take telemetry, events and jobs through the MQTT 5 shared subscription $share/GROUP/…")
    p.add_argument("--affine", action="store_true",
                   help="with --share: the broker sends each device topic to one collector (sticky or hashed "
                        "shared subscriptions), so gaps in every stream count as lost")
    p.add_argument("--per-device", action="store_true", help="also one heartbeat-age series per device")
    p.add_argument("--group-rule", action="append", default=[], metavar="GROUP=PATTERN",
                   help="devices whose status names no group: fnmatch pattern on the device id; repeatable")
    p.add_argument("--slo", action="append", default=[], metavar="MODEL=MS",
                   help="p99 objective of a model, exported for the alert rules; repeatable")
    p.add_argument("--latency-buckets-per-octave", type=int, default=DEFAULT_PER_OCTAVE, choices=(1, 2, 4, 8),
                   help="exported latency buckets per doubling (8: every device bucket; default %(default)s)")
    p.add_argument("--loss-grace", type=duration, default=DEFAULT_GRACE_S, metavar="DURATION",
                   help="a missing sequence number counts as lost after this long (default %(default)gs)")
    p.add_argument("--max-devices", type=int, default=Caps.devices, metavar="N",
                   help="devices kept in the table; messages from more are counted, not taken (default %(default)s)")
    p.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="json: one object per line (time, level, logger, message) for log shippers")
    p.add_argument("--duration", type=duration, metavar="DURATION", help="stop after this long (default: until stopped)")


def _pairs(items: Sequence[str], flag: str) -> list[tuple[str, str]]:
    out = []
    for item in items:
        k, sep, v = item.partition("=")
        if not sep or not k or not v:
            raise ValueError(f"{flag} {item!r}: expected NAME=VALUE")
        out.append((k, v))
    return out


def metrics_from(a: argparse.Namespace) -> FleetMetrics:
    slo: dict[str, float] = {}
    for model, ms in _pairs(a.slo, "--slo"):
        try:
            slo[model] = float(ms)
        except ValueError as e:
            raise ValueError(f"--slo {model}={ms}: the objective is milliseconds, e.g. {model}=25") from e
    if a.max_devices < 1:
        raise ValueError(f"--max-devices {a.max_devices}: must be at least 1")
    gap_streams = GAP_STREAMS if not a.share or a.affine else ("heartbeat",)
    return FleetMetrics(caps=Caps(devices=a.max_devices), per_device=a.per_device,
                        per_octave=a.latency_buckets_per_octave, group_rules=_pairs(a.group_rule, "--group-rule"),
                        slo_ms=slo, gap_streams=gap_streams, grace_s=a.loss_grace)


def run_cli(a: argparse.Namespace, connect: Callable[[argparse.Namespace], mqtt.Client],
            subscribe: Callable[[mqtt.Client, Sequence[str]], None], disconnect: Callable[[mqtt.Client], None]) -> int:
    """Serve until SIGTERM/SIGINT (or ``--duration``); prints ``listening HOST:PORT`` once ready."""
    try:
        from prometheus_client import CollectorRegistry, start_http_server
    except ImportError as e:
        raise ValueError("fleetctl collect needs prometheus-client: pip install 'edge-agent[fleet]'") from e
    if a.log_format == "json":
        logs.setup("info", "json")
    host, port = parse_listen(a.listen)
    metrics = metrics_from(a)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics)  # a custom collector: collect() only
    server, thread = start_http_server(port, host, registry)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    client = connect(a)
    try:
        Collector(client, metrics, a.prefix, a.share, subscribe).start()
        bound_host, bound_port = server.server_address[:2]
        where = f"{bound_host!s}:{bound_port}"
        print(json.dumps({"listening": where}) if a.log_format == "json" else f"listening {where}", flush=True)
        end = None if a.duration is None else time.monotonic() + a.duration
        while not stop.wait(STOP_POLL_S):
            if end is not None and time.monotonic() >= end:
                break
    finally:
        disconnect(client)
        server.shutdown()
        server.server_close()
        thread.join(STOP_POLL_S * 4)
    print("stopped", file=sys.stderr, flush=True)
    return 0
