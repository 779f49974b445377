"""Prometheus metrics for ``GET /metrics`` on the local API (prometheus-client, own registry).

Invariants:
- Recording an inference is a dictionary look-up and two increments: it runs on every call.
- Deploys, rollbacks and events are counted from what enters the outbox (one place sees every
  job update and event), so no part has to remember to report to metrics as well.
- Outbox, MQTT and budget figures are read at scrape time, never cached stale.
- A private registry: nothing of the process-wide default registry (GC, platform) leaks in,
  and tests can build several agents in one process.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from agent.telemetry.outbox import KIND_EVENT, KIND_JOB

PREFIX = "edge_agent"
# Latency buckets in seconds: 0.25 ms .. 10 s, roughly ×2.5 apart (edge models span µs to s).
LATENCY_BUCKETS_S = (0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                     1.0, 2.5, 5.0, 10.0)
TERMINAL_STATES = ("SUCCEEDED", "FAILED", "REJECTED", "CANCELED", "TIMED_OUT")
MQTT_STATES = ("starting", "connecting", "connected", "disconnected", "refused")


class _LiveCollector(Collector):
    """Outbox, MQTT and budget figures, read when scraped."""

    def __init__(self, outbox_stats: Callable[[], Mapping[str, Any]],
                 mqtt_state: Callable[[], Mapping[str, Any]],
                 budget: Callable[[], Mapping[str, Any]] | None,
                 sent: Callable[[], Mapping[str, tuple[int, int]]] | None) -> None:
        self._outbox_stats = outbox_stats
        self._mqtt_state = mqtt_state
        self._budget = budget
        self._sent = sent

    def collect(self) -> Iterator[Any]:
        ob = self._outbox_stats()
        yield GaugeMetricFamily(f"{PREFIX}_outbox_depth", "Messages waiting for their PUBACK",
                                value=ob.get("depth", 0))
        yield GaugeMetricFamily(f"{PREFIX}_outbox_bytes", "Bytes of messages in the outbox",
                                value=ob.get("bytes", 0))
        yield GaugeMetricFamily(f"{PREFIX}_outbox_max_bytes", "Outbox soft bound in bytes",
                                value=ob.get("max_bytes", 0))
        yield GaugeMetricFamily(f"{PREFIX}_outbox_oldest_seconds", "Age of the oldest queued message",
                                value=ob.get("oldest_s", 0))
        dropped = CounterMetricFamily(f"{PREFIX}_outbox_dropped", "Messages evicted or lost, by kind",
                                      labels=["kind"])
        for kind, n in sorted(dict(ob.get("dropped_by_kind") or {}).items()):
            dropped.add_metric([kind], n)
        yield dropped
        st = self._mqtt_state()
        yield GaugeMetricFamily(f"{PREFIX}_mqtt_connected", "1 while connected to the broker",
                                value=1 if st.get("connected") else 0)
        yield CounterMetricFamily(f"{PREFIX}_mqtt_reconnects", "Connections after the first",
                                  value=st.get("reconnects", 0))
        state = GaugeMetricFamily(f"{PREFIX}_mqtt_state", "Connection state (1 for the current one)",
                                  labels=["state"])
        for s in MQTT_STATES:
            state.add_metric([s], 1 if st.get("state") == s else 0)
        yield state
        if self._sent is not None:
            msgs = CounterMetricFamily(f"{PREFIX}_mqtt_sent_messages", "PUBLISH packets sent, by kind",
                                       labels=["kind"])
            nbytes = CounterMetricFamily(f"{PREFIX}_mqtt_sent_bytes", "PUBLISH bytes sent, by kind",
                                         labels=["kind"])
            for kind, (count, size) in sorted(self._sent().items()):
                msgs.add_metric([kind], count)
                nbytes.add_metric([kind], size)
            yield msgs
            yield nbytes
        if self._budget is not None:
            bud = self._budget()
            yield GaugeMetricFamily(f"{PREFIX}_budget_used_bytes", "Bytes sent today (UTC)",
                                    value=bud.get("used", 0))
            yield GaugeMetricFamily(f"{PREFIX}_budget_limit_bytes", "Daily byte budget (0: none)",
                                    value=bud.get("limit", 0))
            yield GaugeMetricFamily(f"{PREFIX}_budget_thinned", "1 while telemetry is thinned",
                                    value=1 if bud.get("thinned") else 0)


class Metrics:
    """The agent's Prometheus registry and the hooks that feed it."""

    def __init__(self, outbox_stats: Callable[[], Mapping[str, Any]],
                 mqtt_state: Callable[[], Mapping[str, Any]],
                 budget: Callable[[], Mapping[str, Any]] | None = None,
                 sent: Callable[[], Mapping[str, tuple[int, int]]] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.inferences = Counter(f"{PREFIX}_inferences", "Inference calls, by model, backend and outcome",
                                  ["model", "backend", "outcome"], registry=self.registry)
        self.latency = Histogram(f"{PREFIX}_inference_latency_seconds", "Inference latency",
                                 ["model", "backend"], buckets=LATENCY_BUCKETS_S, registry=self.registry)
        self.deploys = Counter(f"{PREFIX}_deploys", "Deploy jobs by final state", ["state"],
                               registry=self.registry)
        self.rollbacks = Counter(f"{PREFIX}_rollbacks", "Rollbacks, by model", ["model"],
                                 registry=self.registry)
        self.events = Counter(f"{PREFIX}_events", "Events published, by name", ["event"],
                              registry=self.registry)
        self.registry.register(_LiveCollector(outbox_stats, mqtt_state, budget, sent))
        self._children: dict[tuple[str, str], tuple[Any, Any, Any]] = {}
        self._lock = threading.Lock()

    def observe_inference(self, model: str, version: int, backend: str, latency_s: float, ok: bool) -> None:
        """Registry observer: one call, its latency and outcome."""
        key = (model, backend)
        children = self._children.get(key)
        if children is None:
            with self._lock:
                children = self._children.get(key)
                if children is None:
                    children = (self.inferences.labels(model, backend, "ok"),
                                self.inferences.labels(model, backend, "error"),
                                self.latency.labels(model, backend))
                    self._children[key] = children
        (children[0] if ok else children[1]).inc()
        children[2].observe(latency_s)

    def on_outbox_add(self, kind: str, topic: str, doc: Mapping[str, Any]) -> None:
        """Outbox listener: count final deploy states, rollbacks and events."""
        if kind == KIND_JOB:
            state = doc.get("state")
            if doc.get("type") == "deploy" and state in TERMINAL_STATES:
                self.deploys.labels(state).inc()
        elif kind == KIND_EVENT:
            name = str(doc.get("event", "unknown"))
            self.events.labels(name).inc()
            if name == "rollback":
                self.rollbacks.labels(str(doc.get("model", "unknown"))).inc()

    def render(self) -> tuple[bytes, str]:
        """The text exposition for ``GET /metrics``: (body, content type)."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
