"""The fleet collector's metrics model: device messages in, bounded Prometheus families out.

``FleetMetrics.take(topic, payload)`` takes one MQTT message of a device stream (status,
heartbeat, telemetry, events, jobs, commands); ``collect()`` yields the Prometheus metric
families (prometheus_client's custom-collector protocol) at scrape time. Names, labels and
the cardinality bounds are documented in docs/fleet-observability.md.

Invariants:
- Never raises on device data: an unreadable message is counted in
  ``edge_fleet_messages_invalid_total{stream}`` and skipped.
- A duplicate (same device, stream and ``seq``) is counted once and otherwise ignored, so
  counters and histograms count every device message at most once per collector.
- Latency histograms are sums of the devices' own ``log2/8`` bucket counts: each exported
  bucket bound is a device bucket bound, so ``histogram_quantile`` over them is exact to the
  bucket (no re-estimation from percentiles).
- Bounded: at most ``Caps.devices`` devices, and each label (group, model, backend, job code)
  at most its cap of distinct values; a value past the cap is reported as ``OVERFLOW`` and
  counted in ``edge_fleet_label_overflow_total{label}``. Versions rotate instead (a fleet
  moves on to new ones): past the cap per model the least recently seen version's series are
  dropped, counted as ``label="version"``.
- Thread-safe: the MQTT thread calls ``take``, the HTTP thread ``collect``; one lock.

prometheus_client (the ``fleet`` extra) is imported only when rendering, so the rest of fleetctl
works without it.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from agent.telemetry.histogram import SCHEME, SUB_BUCKETS
from fleetctl.seqtrack import DEFAULT_GRACE_S, SeqTracker

if TYPE_CHECKING:
    from prometheus_client.core import Metric

OVERFLOW = "_other"  # the label value past a cap
UNKNOWN = "unknown"  # a label the message did not say (e.g. the model of a refused job)
UNGROUPED = "ungrouped"
STREAMS = ("status", "heartbeat", "telemetry", "events", "jobs")
GAP_STREAMS = ("heartbeat", "telemetry", "events", "jobs")  # contiguous seq (status has Will gaps)
# Exported latency bounds: device bucket bounds 2^(j/8) µs for j in [LAT_FIRST_J, LAT_LAST_J]
# (64 µs .. 16.8 s): everything faster lands in the first bucket, slower only in +Inf.
LAT_FIRST_J = 6 * SUB_BUCKETS
LAT_LAST_J = 24 * SUB_BUCKETS
DEFAULT_PER_OCTAVE = SUB_BUCKETS  # every device bucket bound (the devices' own resolution)
# Seconds since the last heartbeat, per group (a snapshot at scrape time).
AGE_BUCKETS_S = (15.0, 30.0, 60.0, 90.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 21600.0, 86400.0)
KNOWN_EVENTS = frozenset({"slo_breach", "error_rate", "backend_fallback", "rollback", "telemetry_thinned",
                          "disk_low", "memory_pressure", "outbox_recreated"})
TERMINAL = frozenset({"SUCCEEDED", "FAILED", "REJECTED", "CANCELED", "TIMED_OUT"})
JOBS_REMEMBERED = 10_000  # job id → (model, version) from the commands seen, oldest forgotten


@dataclass(frozen=True)
class Caps:
    """Distinct values kept per label (documented in docs/fleet-observability.md)."""

    devices: int = 200_000
    groups: int = 200
    models: int = 50
    versions: int = 8  # per model
    backends: int = 8
    codes: int = 64
    latency_series: int = 2_000  # (model, version, backend, group) histograms


class _Cap:
    """A label's admitted values: the first ``limit`` distinct ones, the rest ``OVERFLOW``."""

    def __init__(self, limit: int, on_overflow: Callable[[], None]) -> None:
        self.limit = limit
        self.known: set[str] = set()
        self._overflow = on_overflow

    def __call__(self, value: str) -> str:
        if value in self.known:
            return value
        if len(self.known) < self.limit:
            self.known.add(value)
            return value
        self._overflow()
        return OVERFLOW


@dataclass
class _Device:
    group: str
    online: bool | None = None  # from the last status; None: no status seen
    last_hb: float | None = None  # monotonic time of the last heartbeat
    thinned: bool = False
    models: dict[str, str] = field(default_factory=dict)  # model → version serving


def latency_bounds(per_octave: int = DEFAULT_PER_OCTAVE) -> list[int]:
    """Device bucket bound indices j (bound 2^(j/8) µs) exported as ``le``."""
    if per_octave not in (1, 2, 4, 8):
        raise ValueError(f"latency buckets per octave {per_octave}: must be 1, 2, 4 or 8")
    step = SUB_BUCKETS // per_octave
    return list(range(LAT_FIRST_J, LAT_LAST_J + 1, step))


def _le(j: int) -> str:
    return repr(2 ** (j / SUB_BUCKETS) / 1e6)


def _str(v: Any, default: str = UNKNOWN) -> str:
    if isinstance(v, bool) or v is None:
        return default
    if isinstance(v, (str, int)):
        s = str(v)
        return s[:64] if s else default
    return default


def _seq(doc: Mapping[str, Any]) -> int | None:
    v = doc.get("seq")
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


class FleetMetrics:
    """What one collector learned from the messages it received; rendered at each scrape."""

    def __init__(self, *, caps: Caps | None = None, per_device: bool = False,
                 per_octave: int = DEFAULT_PER_OCTAVE, group_rules: Sequence[tuple[str, str]] = (),
                 slo_ms: Mapping[str, float] | None = None, gap_streams: Sequence[str] = GAP_STREAMS,
                 grace_s: float = DEFAULT_GRACE_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.caps = caps or Caps()
        self.per_device = per_device
        self.group_rules = list(group_rules)  # (group, fnmatch pattern), first match wins
        self.slo_ms = dict(slo_ms or {})
        self._clock = clock
        self._lock = threading.Lock()
        self._bounds = latency_bounds(per_octave)
        self._les = [_le(j) for j in self._bounds]
        self._gap_streams = frozenset(gap_streams)
        self.seq_all = SeqTracker(grace_s=grace_s, count_gaps=True)
        self.seq_partial = SeqTracker(grace_s=grace_s, count_gaps=False)
        self.devices: dict[str, _Device] = {}
        self.received: dict[str, int] = {}
        self.invalid: dict[str, int] = {}
        self.overflow: dict[str, int] = {}
        self.devices_refused = 0
        self.jobs: dict[tuple[str, str, str, str, str], int] = {}
        self.events: dict[tuple[str, str, str], int] = {}
        self.latency: dict[tuple[str, str, str, str], list[float]] = {}  # counts per bucket, then sum_s
        self.calls: dict[tuple[str, str, str, str], list[int]] = {}  # [calls, errors]
        self._job_models: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self._cap_group = self._cap("group", self.caps.groups)
        self._cap_model = self._cap("model", self.caps.models)
        self._cap_backend = self._cap("backend", self.caps.backends)
        self._cap_code = self._cap("code", self.caps.codes)
        self._versions: dict[str, OrderedDict[str, None]] = {}  # per model, least recently seen first

    def _cap(self, label: str, limit: int) -> _Cap:
        return _Cap(limit, lambda: self._count(self.overflow, label))

    @staticmethod
    def _count(table: dict[str, int], key: str, n: int = 1) -> None:
        table[key] = table.get(key, 0) + n

    def _version(self, model: str, version: str) -> str:
        """Versions rotate: past ``caps.versions`` per model, the least recently seen one is evicted
        (its series dropped, counted in the overflow counter) to admit the new one."""
        seen = self._versions.get(model)
        if seen is None:
            seen = self._versions[model] = OrderedDict()
        if version in seen:
            seen.move_to_end(version)
            return version
        if len(seen) >= self.caps.versions:
            old, _ = seen.popitem(last=False)
            self._evict_version(model, old)
        seen[version] = None
        return version

    def _evict_version(self, model: str, version: str) -> None:
        self._count(self.overflow, "version")
        for table in (self.latency, self.calls):
            for key in [k for k in table if k[0] == model and k[1] == version]:
                del table[key]
        for jkey in [k for k in self.jobs if k[1] == model and k[2] == version]:
            del self.jobs[jkey]

    # -- taking messages ---------------------------------------------------------------------
    def take(self, topic: str, payload: bytes, retained: bool = False) -> None:
        """One message from the broker (any topic under the prefix). ``retained``: a status the
        broker kept, delivered at subscribe time (again after a reconnect): applied, but not a
        duplicate."""
        kind, device = _kind(topic)
        if kind == "other":
            return
        if kind == "cmd":
            with self._lock:
                self._take_command(payload)
            return
        try:
            doc = json.loads(payload)
        except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: absurdly deep nesting
            doc = None
        with self._lock:
            self._count(self.received, kind)
            if not isinstance(doc, dict):
                self._count(self.invalid, kind)
                return
            self._take(kind, device, doc, retained)

    def _take(self, kind: str, device: str, doc: dict[str, Any], retained: bool) -> None:
        now = self._clock()
        seq = _seq(doc)
        if seq is not None and not retained:
            tracker = self.seq_all if kind in self._gap_streams else self.seq_partial
            if not tracker.see(device, kind, seq, now):
                return
        dev = self._device(device)
        if dev is None:
            return
        if kind == "status":
            self._status(dev, doc)
        elif kind == "heartbeat":
            dev.last_hb = now
            budget = doc.get("budget")
            dev.thinned = isinstance(budget, dict) and budget.get("thinned") is True
        elif kind == "telemetry":
            self._telemetry(dev, doc)
        elif kind == "events":
            self._event(dev, doc)
        elif kind == "jobs":
            self._job(dev, doc)

    def _device(self, device: str) -> _Device | None:
        dev = self.devices.get(device)
        if dev is None:
            if len(self.devices) >= self.caps.devices:
                self.devices_refused += 1
                return None
            dev = self.devices[device] = _Device(self._group_of(device, None))
        return dev

    def _group_of(self, device: str, groups: Any) -> str:
        if isinstance(groups, list) and groups and isinstance(groups[0], str) and groups[0]:
            return self._cap_group(groups[0][:64])
        for group, pattern in self.group_rules:
            if fnmatch.fnmatchcase(device, pattern):
                return self._cap_group(group)
        return UNGROUPED

    def _status(self, dev: _Device, doc: dict[str, Any]) -> None:
        dev.online = doc.get("online") is True
        if "groups" in doc:
            dev.group = self._group_of("", doc.get("groups"))
        models = doc.get("models")
        if isinstance(models, list):
            dev.models = {}
            for m in models[: self.caps.models]:
                if isinstance(m, dict) and isinstance(m.get("name"), str):
                    name = self._cap_model(_str(m["name"]))
                    dev.models[name] = self._version(name, _str(m.get("version")))

    def _telemetry(self, dev: _Device, doc: dict[str, Any]) -> None:
        models = doc.get("models")
        if not isinstance(models, dict):
            self._count(self.invalid, "telemetry")
            return
        for key, w in models.items():
            if not isinstance(w, dict):
                self._count(self.invalid, "telemetry")
                continue
            counts = _hist_counts(w.get("hist"))
            if counts is None:
                self._count(self.invalid, "telemetry")
                continue
            name = self._cap_model(str(key).split("@", 1)[0][:64])
            lkey = (name, self._version(name, _str(w.get("version"))), self._cap_backend(_str(w.get("backend"))),
                    dev.group)
            if lkey not in self.latency and len(self.latency) >= self.caps.latency_series:
                self._count(self.overflow, "latency_series")
                lkey = (OVERFLOW, OVERFLOW, OVERFLOW, OVERFLOW)
            self._add_hist(lkey, counts, w)

    def _add_hist(self, lkey: tuple[str, str, str, str], counts: dict[int, int], w: dict[str, Any]) -> None:
        buckets = self.latency.get(lkey)
        if buckets is None:
            buckets = self.latency[lkey] = [0.0] * (len(self._bounds) + 2)
        bounds = self._bounds
        for i, n in counts.items():
            # device bucket i is [2^(i/8), 2^((i+1)/8)) µs: it belongs under the first bound ≥ i + 1
            k = _first_at_least(bounds, i + 1)
            buckets[k] += n
        calls = sum(counts.values())
        lat = w.get("latency_ms")
        mean = lat.get("mean") if isinstance(lat, dict) else None
        if isinstance(mean, (int, float)) and not isinstance(mean, bool):
            buckets[-1] += mean / 1000.0 * calls
        c = self.calls.setdefault(lkey, [0, 0])
        c[0] += calls
        errs = w.get("errors")
        if isinstance(errs, int) and not isinstance(errs, bool) and errs > 0:
            c[1] += errs

    def _event(self, dev: _Device, doc: dict[str, Any]) -> None:
        if doc.get("active") is False:  # the end of a threshold condition: its start was counted
            return
        name = _str(doc.get("event"))
        name = name if name in KNOWN_EVENTS else "other"
        model = doc.get("model")
        label = self._cap_model(_str(model)) if isinstance(model, str) else ""
        key = (name, label, dev.group)
        self.events[key] = self.events.get(key, 0) + 1

    def _job(self, dev: _Device, doc: dict[str, Any]) -> None:
        state = doc.get("state")
        if state not in TERMINAL:
            return
        job_id = _str(doc.get("job"), "")
        model, version = self._job_models.get(job_id, (UNKNOWN, UNKNOWN))
        result = doc.get("result")
        if isinstance(result, dict):
            if isinstance(result.get("name"), str):
                model = result["name"]
            if "version" in result:
                version = _str(result.get("version"))
        err = doc.get("error")
        code = self._cap_code(_str(err.get("code"))) if isinstance(err, dict) else ""
        name = self._cap_model(_str(model))
        key = (_str(doc.get("type"))[:32], name, self._version(name, version), str(state), code)
        self.jobs[key] = self.jobs.get(key, 0) + 1

    def _take_command(self, payload: bytes) -> None:
        """Remember a command's job id → (model, version), to label its job's outcome."""
        doc = _command_doc(payload)
        if doc is None:
            return
        params = doc.get("params")
        if not isinstance(params, dict) or not isinstance(doc.get("id"), str):
            return
        model = params.get("model")
        if isinstance(model, str):
            self._job_models[doc["id"]] = (model[:64], _str(params.get("version")))
            while len(self._job_models) > JOBS_REMEMBERED:
                self._job_models.popitem(last=False)

    # -- rendering ---------------------------------------------------------------------------
    def collect(self) -> Iterator[Metric]:
        """The metric families (prometheus_client custom collector)."""
        with self._lock:
            now = self._clock()
            self.seq_all.settle(now)
            families = [*self._fleet_families(now), *self._latency_families(), *self._own_families()]
        yield from families

    def _fleet_families(self, now: float) -> list[Metric]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeHistogramMetricFamily,
            GaugeMetricFamily,
        )

        online = GaugeMetricFamily("edge_fleet_devices", "Devices by group and last status (online, offline, "
                                   "unknown: no status seen yet)", labels=["group", "state"])
        per_state: dict[tuple[str, str], int] = {}
        ages: dict[str, list[float]] = {}
        thinned: dict[str, int] = {}
        versions: dict[tuple[str, str, str], int] = {}
        per_dev = GaugeMetricFamily("edge_fleet_device_heartbeat_age_seconds",
                                    "Seconds since each device's last heartbeat (--per-device)", labels=["device", "group"])
        for name, d in self.devices.items():
            state = "unknown" if d.online is None else "online" if d.online else "offline"
            per_state[(d.group, state)] = per_state.get((d.group, state), 0) + 1
            thinned[d.group] = thinned.get(d.group, 0) + (1 if d.thinned else 0)
            if d.online:
                for model, version in d.models.items():
                    versions[(model, version, d.group)] = versions.get((model, version, d.group), 0) + 1
            if d.last_hb is not None and d.online is not False:  # an offline device has its own count
                ages.setdefault(d.group, []).append(now - d.last_hb)
                if self.per_device:
                    per_dev.add_metric([name, d.group], round(now - d.last_hb, 3))
        for g in sorted({g for g, _ in per_state}):
            for state in ("online", "offline", "unknown"):  # every state of a known group: stable series
                online.add_metric([g, state], per_state.get((g, state), 0))
        age = GaugeHistogramMetricFamily("edge_fleet_heartbeat_age_seconds", "Devices not known offline, by seconds "
                                         "since their last heartbeat, per group", labels=["group"])
        for g, values in sorted(ages.items()):
            cum = [(repr(b), float(sum(1 for v in values if v <= b))) for b in AGE_BUCKETS_S]
            age.add_metric([g], [*cum, ("+Inf", float(len(values)))], gsum_value=sum(values))
        thin = GaugeMetricFamily("edge_fleet_devices_thinned", "Devices whose last heartbeat says the daily "
                                 "telemetry budget is thinning", labels=["group"])
        for g, n in sorted(thinned.items()):
            thin.add_metric([g], n)
        ver = GaugeMetricFamily("edge_fleet_model_devices", "Online devices serving each model version",
                                labels=["model", "version", "group"])
        for k, n in sorted(versions.items()):
            ver.add_metric(list(k), n)
        jobs = CounterMetricFamily("edge_fleet_jobs", "Finished jobs by type, model, version, final state and "
                                   "error code", labels=["type", "model", "version", "state", "code"])
        for jk, n in sorted(self.jobs.items()):
            jobs.add_metric(list(jk), n)
        events = CounterMetricFamily("edge_fleet_events", "Device events (threshold events counted when they "
                                     "start)", labels=["event", "model", "group"])
        for ek, n in sorted(self.events.items()):
            events.add_metric(list(ek), n)
        slo = GaugeMetricFamily("edge_fleet_model_slo_seconds", "p99 latency objective per model (--slo)",
                                labels=["model"])
        for model, ms in sorted(self.slo_ms.items()):
            slo.add_metric([model], ms / 1000.0)
        out: list[Metric] = [online, age, thin, ver, jobs, events, slo]
        if self.per_device:
            out.append(per_dev)
        return out

    def _latency_families(self) -> list[Metric]:
        from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

        hist = HistogramMetricFamily("edge_fleet_inference_latency_seconds", "Inference latency merged from the "
                                     "devices' log2/8 histograms", labels=["model", "version", "backend", "group"])
        calls = CounterMetricFamily("edge_fleet_inferences", "Inferences reported in telemetry windows",
                                    labels=["model", "version", "backend", "group", "outcome"])
        for key, b in sorted(self.latency.items()):
            cum, n = [], 0.0
            for le, count in zip(self._les, b, strict=False):
                n += count
                cum.append((le, n))
            cum.append(("+Inf", n + b[-2]))
            hist.add_metric(list(key), cum, sum_value=b[-1])
            total, errs = self.calls[key]
            calls.add_metric([*key, "ok"], total - errs)
            calls.add_metric([*key, "error"], errs)
        return [hist, calls]

    def _own_families(self) -> list[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        out: list[Metric] = []
        for name, doc, table in (
                ("edge_fleet_messages_received", "Messages received per stream", self.received),
                ("edge_fleet_messages_invalid", "Messages that could not be read, per stream", self.invalid),
                ("edge_fleet_messages_lost", "Sequence numbers that never arrived, per stream", self.seq_all.lost),
                ("edge_fleet_messages_duplicate", "Messages received again (same device, stream and seq)",
                 _sum_tables(self.seq_all.duplicates, self.seq_partial.duplicates)),
                ("edge_fleet_label_overflow", "Values reported as _other because a label reached its cap",
                 self.overflow)):
            label = "label" if table is self.overflow else "stream"
            fam = CounterMetricFamily(name, doc, labels=[label])
            keys = set(table) | (set() if table is self.overflow else set(STREAMS))
            for k in sorted(keys):
                fam.add_metric([k], table.get(k, 0))
            out.append(fam)
        out.append(CounterMetricFamily("edge_fleet_devices_refused", "Messages from devices past the device cap",
                                       value=self.devices_refused))
        out.append(GaugeMetricFamily("edge_fleet_devices_tracked", "Devices in this collector's table",
                                     value=len(self.devices)))
        out.append(GaugeMetricFamily("edge_fleet_seq_open_gaps", "Missing sequence numbers still awaited",
                                     value=self.seq_all.open_gaps))
        return out


def _sum_tables(a: Mapping[str, int], b: Mapping[str, int]) -> dict[str, int]:
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0) + v
    return out


def _first_at_least(bounds: list[int], j: int) -> int:
    """Index of the first bound ≥ j (len(bounds) for +Inf)."""
    lo, hi = 0, len(bounds)
    while lo < hi:
        mid = (lo + hi) // 2
        if bounds[mid] < j:
            lo = mid + 1
        else:
            hi = mid
    return lo


def _hist_counts(raw: Any) -> dict[int, int] | None:
    if not isinstance(raw, dict) or raw.get("scheme") != SCHEME or not isinstance(raw.get("counts"), dict):
        return None
    out: dict[int, int] = {}
    try:
        for k, v in raw["counts"].items():
            i, n = int(k), int(v)
            if i < 0 or n < 0:
                return None
            out[i] = n
    except (TypeError, ValueError):
        return None
    return out


def _command_doc(payload: bytes) -> dict[str, Any] | None:
    """The command inside a DSSE envelope, unverified (only used for labels, capped)."""
    try:
        env = json.loads(payload)
        inner = json.loads(base64.b64decode(env["payload"], validate=True)) if "payload" in env else env
    except (ValueError, TypeError, KeyError, binascii.Error, UnicodeDecodeError, RecursionError):
        return None
    return inner if isinstance(inner, dict) else None


def _kind(topic: str) -> tuple[str, str]:
    """(stream, device) of a topic, parsed from its end (a prefix may hold slashes)."""
    parts = topic.split("/")
    if len(parts) >= 3 and parts[-1] == "cmd":
        return "cmd", ""
    if len(parts) >= 4 and parts[-2] == "jobs":
        return "jobs", parts[-3]
    if len(parts) >= 3 and parts[-1] in STREAMS:
        return parts[-1], parts[-2]
    return "other", ""
