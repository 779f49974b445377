"""Prometheus metrics for ``GET /metrics`` on the local API, in the Prometheus text format.

Invariants:
- Nothing per inference here: calls are recorded once, by the latency windows
  (``LatencyWindows.observe``, the registry's observer), and their totals are read from the
  windows at scrape time (``LatencyWindows.totals``).
- Deploys, rollbacks and events are counted from what enters the outbox (one place sees every
  job update and event), so no part has to remember to report to metrics as well.
- Outbox, MQTT and budget figures are read at scrape time, never cached stale.
- Plain integers rendered when scraped, no client library: the output is what prometheus-client
  wrote for the same metrics (counters as ``*_total`` with ``*_created`` gauges, histograms with
  cumulative ``le`` buckets, ``_count`` and ``_sum``), names and labels unchanged.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from agent.telemetry.outbox import KIND_EVENT, KIND_JOB
from agent.telemetry.windows import PROM_BUCKETS_S, LatencyWindows

PREFIX = "edge_agent"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS_S = PROM_BUCKETS_S  # seconds: 0.25 ms .. 10 s, roughly ×2.5 apart
TERMINAL_STATES = ("SUCCEEDED", "FAILED", "REJECTED", "CANCELED", "TIMED_OUT")
MQTT_STATES = ("starting", "connecting", "connected", "disconnected", "refused")


def _num(value: float) -> str:
    """A sample value as Prometheus (Go) writes it: ``1.0``, ``1.048576e+06``, ``+Inf``."""
    d = float(value)
    if d == math.inf:
        return "+Inf"
    if d == -math.inf:
        return "-Inf"
    if math.isnan(d):
        return "NaN"
    s = repr(d)
    dot = s.find(".")
    if d > 0 and dot > 6:  # Go switches to exponents sooner than Python
        mantissa = f"{s[0]}.{s[1:dot]}{s[dot + 1:]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return s


def _escape(text: str, quote: bool = False) -> str:
    """Backslash and newline escaped (HELP text); the double quote too in a label value."""
    text = text.replace("\\", "\\\\").replace("\n", "\\n")
    return text.replace('"', '\\"') if quote else text


def _labels(pairs: Mapping[str, str]) -> str:
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v, True)}"' for k, v in sorted(pairs.items())) + "}"


class _Text:
    """The exposition being written."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, doc: str, kind: str) -> None:
        self.lines.append(f"# HELP {name} {_escape(doc)}\n")
        self.lines.append(f"# TYPE {name} {kind}\n")

    def sample(self, name: str, labels: Mapping[str, str], value: float) -> None:
        self.lines.append(f"{name}{_labels(labels)} {_num(value)}\n")

    def counter(self, name: str, doc: str, rows: list[tuple[dict[str, str], float, float | None]]) -> None:
        """A counter family: ``name_total`` samples, then ``name_created`` for rows that have one."""
        self.family(f"{name}_total", doc, "counter")
        for labels, value, _ in rows:
            self.sample(f"{name}_total", labels, value)
        created = [(labels, ts) for labels, _, ts in rows if ts is not None]
        if created:
            self.family(f"{name}_created", doc, "gauge")
            for labels, ts in created:
                self.sample(f"{name}_created", labels, ts)

    def gauge(self, name: str, doc: str, value: float) -> None:
        self.family(name, doc, "gauge")
        self.sample(name, {}, value)


class _Counter:
    """A labelled counter: label values → [count, created]; children in the order first counted."""

    def __init__(self, name: str, doc: str, label: str) -> None:
        self.name, self.doc, self.label = name, doc, label
        self.children: dict[str, list[float]] = {}

    def inc(self, value: str) -> None:
        child = self.children.get(value)
        if child is None:
            child = self.children[value] = [0, time.time()]
        child[0] += 1

    def rows(self) -> list[tuple[dict[str, str], float, float | None]]:
        return [({self.label: v}, n, created) for v, (n, created) in self.children.items()]


class Metrics:
    """The agent's metrics and the hooks that feed them.

    ``windows``: the latency windows the registry's observer feeds (the daemon's own); without
    one, ``observe_inference`` records into a private one.
    """

    def __init__(self, outbox_stats: Callable[[], Mapping[str, Any]],
                 mqtt_state: Callable[[], Mapping[str, Any]],
                 budget: Callable[[], Mapping[str, Any]] | None = None,
                 sent: Callable[[], Mapping[str, tuple[int, int]]] | None = None,
                 windows: LatencyWindows | None = None,
                 refused: Callable[[], Mapping[str, int]] | None = None) -> None:
        self._outbox_stats = outbox_stats
        self._refused = refused
        self._mqtt_state = mqtt_state
        self._budget = budget
        self._sent = sent
        self.windows = windows if windows is not None else LatencyWindows()
        self.deploys = _Counter(f"{PREFIX}_deploys", "Deploy jobs by final state", "state")
        self.rollbacks = _Counter(f"{PREFIX}_rollbacks", "Rollbacks, by model", "model")
        self.events = _Counter(f"{PREFIX}_events", "Events published, by name", "event")
        self._lock = threading.Lock()

    def observe_inference(self, model: str, version: int, backend: str, latency_s: float, ok: bool) -> None:
        """One call, its latency and outcome, into ``self.windows`` (where the daemon's registry
        records it directly: do not call both)."""
        self.windows.observe(model, version, backend, latency_s, ok)

    def on_outbox_add(self, kind: str, topic: str, doc: Mapping[str, Any]) -> None:
        """Outbox listener: count final deploy states, rollbacks and events."""
        with self._lock:
            if kind == KIND_JOB:
                state = doc.get("state")
                if doc.get("type") == "deploy" and state in TERMINAL_STATES:
                    self.deploys.inc(str(state))
            elif kind == KIND_EVENT:
                name = str(doc.get("event", "unknown"))
                self.events.inc(name)
                if name == "rollback":
                    self.rollbacks.inc(str(doc.get("model", "unknown")))

    def render(self) -> tuple[bytes, str]:
        """The text exposition for ``GET /metrics``: (body, content type)."""
        t = _Text()
        self._inferences(t)
        with self._lock:
            for c in (self.deploys, self.rollbacks, self.events):
                t.counter(c.name, c.doc, c.rows())
        self._live(t)
        return "".join(t.lines).encode("utf-8"), CONTENT_TYPE

    def _inferences(self, t: _Text) -> None:
        totals = self.windows.totals()
        rows: list[tuple[dict[str, str], float, float | None]] = []
        for model, backend, tot in totals:
            rows.append(({"model": model, "backend": backend, "outcome": "ok"}, tot.count - tot.errors, tot.created))
            rows.append(({"model": model, "backend": backend, "outcome": "error"}, tot.errors, tot.created))
        t.counter(f"{PREFIX}_inferences", "Inference calls, by model, backend and outcome", rows)
        name, doc = f"{PREFIX}_inference_latency_seconds", "Inference latency"
        t.family(name, doc, "histogram")
        for model, backend, tot in totals:
            labels = {"model": model, "backend": backend}
            for bound, n in zip((*LATENCY_BUCKETS_S, math.inf), tot.buckets(), strict=True):
                t.sample(f"{name}_bucket", {**labels, "le": _num(bound)}, n)
            t.sample(f"{name}_count", labels, tot.count)
            t.sample(f"{name}_sum", labels, tot.total_s)
        if totals:
            t.family(f"{name}_created", doc, "gauge")
            for model, backend, tot in totals:
                t.sample(f"{name}_created", {"model": model, "backend": backend}, tot.created)

    def _live(self, t: _Text) -> None:
        """Outbox, MQTT and budget figures, read now."""
        ob = self._outbox_stats()
        t.gauge(f"{PREFIX}_outbox_depth", "Messages waiting for their PUBACK", ob.get("depth", 0))
        t.gauge(f"{PREFIX}_outbox_bytes", "Bytes of messages in the outbox", ob.get("bytes", 0))
        t.gauge(f"{PREFIX}_outbox_max_bytes", "Outbox soft bound in bytes", ob.get("max_bytes", 0))
        t.gauge(f"{PREFIX}_outbox_oldest_seconds", "Age of the oldest queued message", ob.get("oldest_s", 0))
        t.counter(f"{PREFIX}_outbox_dropped", "Messages evicted or lost, by kind",
                  [({"kind": kind}, n, None) for kind, n in sorted(dict(ob.get("dropped_by_kind") or {}).items())])
        st = self._mqtt_state()
        t.gauge(f"{PREFIX}_mqtt_connected", "1 while connected to the broker", 1 if st.get("connected") else 0)
        t.counter(f"{PREFIX}_mqtt_reconnects", "Connections after the first", [({}, st.get("reconnects", 0), None)])
        t.family(f"{PREFIX}_mqtt_state", "Connection state (1 for the current one)", "gauge")
        for s in MQTT_STATES:
            t.sample(f"{PREFIX}_mqtt_state", {"state": s}, 1 if st.get("state") == s else 0)
        if self._sent is not None:
            sent = sorted(self._sent().items())
            t.counter(f"{PREFIX}_mqtt_sent_messages", "PUBLISH packets sent, by kind",
                      [({"kind": kind}, count, None) for kind, (count, _) in sent])
            t.counter(f"{PREFIX}_mqtt_sent_bytes", "PUBLISH bytes sent, by kind",
                      [({"kind": kind}, size, None) for kind, (_, size) in sent])
        if self._refused is not None:
            t.counter(f"{PREFIX}_commands_refused_unauthenticated",
                      "MQTT messages refused before their signatures checked (no job update), by code",
                      [({"code": code}, n, None) for code, n in sorted(self._refused().items())])
        if self._budget is not None:
            bud = self._budget()
            t.gauge(f"{PREFIX}_budget_used_bytes", "Bytes sent today (UTC)", bud.get("used", 0))
            t.gauge(f"{PREFIX}_budget_limit_bytes", "Daily byte budget (0: none)", bud.get("limit", 0))
            t.gauge(f"{PREFIX}_budget_thinned", "1 while telemetry is thinned", 1 if bud.get("thinned") else 0)
