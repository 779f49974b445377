"""Live view of a fleet: one readable line per status, job, heartbeat, telemetry or event message,
or (``--live``) a table redrawn every second: devices online/offline, versions, job progress, and
p50/p99 per model merged across devices from their latency histograms.

Invariants:
- ``format_message`` is a pure function of (topic, payload) and never raises: a field of an
  unexpected type is shown as it is, and a payload it cannot read falls back to compact JSON.
- Watching subscribes before reading, so retained status messages arrive first; it stops after a
  message count, a duration, or Ctrl-C, whichever comes first, and every wait is bounded.
- The live view keeps, per device, the status document that ``status_order`` puts last (docs/protocol.md,
  "Ordering status documents"): a late or redelivered older status never replaces a newer one.
"""

from __future__ import annotations

import json
import queue
import sys
import time
from typing import Any, TextIO

import paho.mqtt.client as mqtt

from agent.timeutil import now_rfc3339
from fleetctl import mqttc
from fleetctl.commands import check_name, check_prefix

KINDS = ("status", "heartbeat", "telemetry", "events")
POLL_S = 0.5  # how often a watch with neither count nor duration checks for Ctrl-C
MIB = 1024 * 1024
RESULT_MAX_CHARS = 300  # a job result longer than this is cut in the line view (--json shows it whole)


def watch_topics(prefix: str, device: str | None = None) -> list[str]:
    """The topic filters for every device (``+``) or one device."""
    check_prefix(prefix)
    dev = "+" if device is None else check_name(device, "device")
    return [*(f"{prefix}/{dev}/{k}" for k in KINDS), f"{prefix}/{dev}/jobs/+"]


def _kind(topic: str) -> tuple[str, str, str]:
    """(kind, device, job id) from a topic, parsed from its end so a prefix may hold slashes."""
    parts = topic.split("/")
    if len(parts) >= 4 and parts[-2] == "jobs":
        return "job", parts[-3], parts[-1]
    if len(parts) >= 3 and parts[-1] in KINDS:
        return parts[-1], parts[-2], ""
    return "other", parts[-2] if len(parts) >= 2 else "", ""


def _dict(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _num(v: Any, fmt: str = "{:.1f}") -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return "?" if v is None else str(v)
    return fmt.format(v)


def _duration(seconds: Any) -> str:
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        return "?"
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    if d:
        return f"{d}d{h:02d}h{m:02d}m"
    if h:
        return f"{h}h{m:02d}m{s:02d}s"
    return f"{m}m{s:02d}s" if m else f"{s}s"


def _bytes(n: Any) -> str:
    if isinstance(n, bool) or not isinstance(n, (int, float)):
        return "?"
    return f"{n / MIB:.1f} MiB" if n >= MIB else f"{int(n)} B"


def _int(v: Any) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else 0


def status_order(doc: dict[str, Any]) -> tuple[int, int, int]:
    """Where a status document stands in its device's history (docs/protocol.md): by the
    connection's ``session``; within one session an offline document (the Last Will, or the final
    status of a clean stop) after every online one, whatever its ``seq`` and ``ts`` (the Will is
    stamped when the connection opens); then by ``seq``."""
    return (_int(doc.get("session")), 1 if doc.get("online") is False else 0, _int(doc.get("seq")))


def supersedes(new: dict[str, Any], held: dict[str, Any] | None) -> bool:
    """True if status ``new`` replaces ``held`` (the one a consumer keeps); equal keys replace, so a
    redelivered document is idempotent. Without a ``session`` on both (an agent before that field)
    there is nothing to order by: the later arrival wins."""
    if held is None or "session" not in new or "session" not in held:
        return True
    return status_order(new) >= status_order(held)


def _status(p: dict[str, Any]) -> str:
    online = p.get("online")
    words = ["online" if online else "OFFLINE" if online is False else "online=?"]
    if p.get("agent"):
        words.append(f"agent {p['agent']}")
    if p.get("profile"):
        words.append(f"profile {p['profile']}")
    models = p.get("models")
    if isinstance(models, list) and models:
        descs = []
        for m in models:
            if not isinstance(m, dict):
                continue
            d = f"{m.get('name', '?')} v{m.get('version', '?')}"
            extra = [str(m[k]) for k in ("variant", "backend", "state") if m.get(k)]
            if m.get("previous") is not None:
                extra.append(f"prev v{m['previous']}")
            descs.append(d + (f" ({', '.join(extra)})" if extra else ""))
        words.append("models: " + "; ".join(descs))
    elif isinstance(models, list):
        words.append("no models")
    return " ".join(words)


def _job(p: dict[str, Any], job_id: str) -> str:
    words = [str(p.get("job") or job_id)]
    if p.get("type"):
        words.append(str(p["type"]))
    words.append(str(p.get("state", "?")))
    if p.get("step"):
        words.append(str(p["step"]))
    prog = p.get("progress")
    if isinstance(prog, dict) and "done" in prog:
        total = prog.get("total")
        if isinstance(total, (int, float)) and not isinstance(total, bool) and total > 0:
            pct = _num(100.0 * prog["done"] / total, "{:.0f}") if isinstance(prog["done"], (int, float)) else "?"
            words.append(f"{_bytes(prog['done'])}/{_bytes(total)} ({pct}%)")
        else:
            words.append(_bytes(prog["done"]))
    err = p.get("error")
    if isinstance(err, dict):
        words.append(f"error {err.get('code', '?')}: {err.get('message', '')}".rstrip(": "))
    elif err:
        words.append(f"error {err}")
    res = p.get("result")
    if isinstance(res, dict) and res:
        words.append(_result(res))
    return " ".join(words)


def _result(res: dict[str, Any]) -> str:
    """A deploy/rollback result as ``→ name vN (variant) on backend in S s``; others as short JSON (--json has all)."""
    if res.get("name") is not None and res.get("version") is not None:
        words = [f"→ {res['name']} v{res['version']}"]
        if res.get("variant"):
            words.append(f"({res['variant']})")
        if res.get("backend"):
            words.append(f"on {res['backend']}")
        total = _dict(res.get("figures")).get("total_s")
        if isinstance(total, (int, float)) and not isinstance(total, bool):
            words.append(f"in {total:.2f} s")
        if res.get("previous") is not None:
            words.append(f"(was v{res['previous']})")
        return " ".join(words)
    text = json.dumps(res, separators=(",", ":"), sort_keys=True, default=str)
    return "result " + (text if len(text) <= RESULT_MAX_CHARS else text[:RESULT_MAX_CHARS] + "…")


def _heartbeat(p: dict[str, Any]) -> str:
    sysd = _dict(p.get("system"))
    words = [f"up {_duration(p.get('uptime_s'))}",
             f"cpu {_num(sysd.get('cpu_pct'))}%", f"mem {_num(sysd.get('mem_used_pct'))}%"]
    if sysd.get("disk_free_mb") is not None:
        words.append(f"disk {_num(sysd['disk_free_mb'], '{:.0f}')} MB free")
    if sysd.get("temp_c") is not None:
        words.append(f"temp {_num(sysd['temp_c'])}C")
    if sysd.get("load1") is not None:
        words.append(f"load {_num(sysd['load1'], '{:.2f}')}")
    outbox = p.get("outbox")
    if isinstance(outbox, dict) and (outbox.get("depth") or outbox.get("dropped")):
        words.append(f"outbox {outbox.get('depth', 0)} queued, {outbox.get('dropped', 0)} dropped")
    mq = p.get("mqtt")
    if isinstance(mq, dict) and mq.get("reconnects"):
        words.append(f"reconnects {mq['reconnects']}")
    return " ".join(words)


def _telemetry(p: dict[str, Any]) -> str:
    models = p.get("models")
    head = f"window {_num(p.get('window_s'), '{:g}')}s"
    if not isinstance(models, dict) or not models:
        return head + " no models"
    parts = []
    for name, m in sorted(models.items()):
        if not isinstance(m, dict):
            parts.append(f"{name} ?")
            continue
        lat = _dict(m.get("latency_ms"))
        ver = f" v{m['version']}" if m.get("version") is not None else ""
        parts.append(f"{name}{ver} n={m.get('count', '?')} err={m.get('errors', '?')} "
                     f"p50={_num(lat.get('p50'), '{:.2f}')}ms p99={_num(lat.get('p99'), '{:.2f}')}ms")
    return head + " " + "; ".join(parts)


def _event(p: dict[str, Any]) -> str:
    words = []
    for k in ("level", "event", "type", "kind", "model"):
        if p.get(k):
            words.append(str(p[k]))
    if p.get("message"):
        words.append(str(p["message"]))
    shown = {"v", "device", "ts", "seq", "level", "event", "type", "kind", "model", "message"}
    rest = {k: v for k, v in p.items() if k not in shown}
    if rest:
        words.append(json.dumps(rest, separators=(",", ":"), sort_keys=True, default=str))
    return " ".join(words) or "event"


def format_message(topic: str, payload: dict[str, Any]) -> str:
    """One readable line: ``TS DEVICE KIND details``."""
    kind, device, job_id = _kind(topic)
    if not isinstance(payload, dict):
        return f"- {device or '?'} {kind} {json.dumps(payload, default=str)}"
    dev = str(payload.get("device") or device or "?")
    ts = str(payload.get("ts") or "-")
    try:
        if kind == "status":
            body = _status(payload)
        elif kind == "job":
            body = _job(payload, job_id)
        elif kind == "heartbeat":
            body = _heartbeat(payload)
        elif kind == "telemetry":
            body = _telemetry(payload)
        elif kind == "events":
            body = _event(payload)
            kind = "event"
        else:
            body = json.dumps(payload, separators=(",", ":"), sort_keys=True, default=str)
    except Exception:  # a display must never crash on odd device data
        body = json.dumps(payload, separators=(",", ":"), sort_keys=True, default=str)
    return f"{ts} {dev} {kind} {body}"


def format_raw(topic: str, payload: bytes) -> str:
    """The ``--json`` line: ``{"topic": ..., "payload": <parsed JSON or text>}``."""
    try:
        body: Any = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        body = payload.decode("utf-8", "replace")
    return json.dumps({"topic": topic, "payload": body}, separators=(",", ":"), default=str)


def watch(client: mqtt.Client, prefix: str, device: str | None = None, *, as_json: bool = False,
          count: int | None = None, duration_s: float | None = None,
          out: TextIO | None = None) -> int:
    """Print messages as they arrive; returns how many were printed."""
    stream = out or sys.stdout
    topics = watch_topics(prefix, device)
    q: queue.Queue[mqtt.MQTTMessage] = queue.Queue()

    def on_message(c: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        q.put(msg)

    for t in topics:
        client.message_callback_add(t, on_message)
    mqttc.subscribe(client, topics, qos=1)
    deadline = None if duration_s is None else time.monotonic() + duration_s
    printed = 0
    try:
        while count is None or printed < count:
            wait = POLL_S if deadline is None else deadline - time.monotonic()
            if wait <= 0:
                break
            try:
                msg = q.get(timeout=min(wait, POLL_S))
            except queue.Empty:
                continue
            stream.write(render(msg.topic, bytes(msg.payload), as_json) + "\n")
            stream.flush()
            printed += 1
    finally:
        for t in topics:
            client.message_callback_remove(t)
    return printed


def render(topic: str, payload: bytes, as_json: bool) -> str:
    """The line for one raw MQTT message."""
    if as_json:
        return format_raw(topic, payload)
    try:
        doc = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        kind, device, _ = _kind(topic)
        return f"- {device or '?'} {kind} <{len(payload)} bytes, not JSON>"
    return format_message(topic, doc)



# ---------------------------------------------------------------- live view

LIVE_INTERVAL_S = 1.0  # how often the live view redraws
LIVE_MAX_ROWS = 60  # device rows shown; the rest are counted
CLEAR_SCREEN = "\x1b[H\x1b[2J"


class DeviceView:
    """What the live view knows about one device, from its latest messages."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.online: bool | None = None
        self.status: dict[str, Any] | None = None  # the newest status document (status_order)
        self.agent = ""
        self.models: list[dict[str, Any]] = []
        self.job: dict[str, Any] | None = None
        self.latency: dict[str, dict[str, Any]] = {}  # model → latest window summary
        self.system: dict[str, Any] = {}
        self.seen = 0.0  # monotonic time of the last message


class FleetView:
    """A fleet's current state folded from status, job, heartbeat and telemetry messages (pure)."""

    def __init__(self) -> None:
        self.devices: dict[str, DeviceView] = {}
        self.messages = 0

    def apply(self, topic: str, payload: Any, now: float | None = None) -> None:
        kind, device, job_id = _kind(topic)
        if not device or not isinstance(payload, dict):
            return
        self.messages += 1
        d = self.devices.get(device)
        if d is None:
            d = self.devices[device] = DeviceView(device)
        d.seen = time.monotonic() if now is None else now
        if kind == "status":
            if not supersedes(payload, d.status):
                return
            d.status = payload
            d.online = payload.get("online") if isinstance(payload.get("online"), bool) else None
            d.agent = str(payload.get("agent") or "")
            models = payload.get("models")
            d.models = [m for m in models if isinstance(m, dict)] if isinstance(models, list) else []
        elif kind == "job":
            d.job = {**payload, "job": payload.get("job") or job_id}
        elif kind == "heartbeat":
            d.system = _dict(payload.get("system"))
        elif kind == "telemetry":
            for name, w in _dict(payload.get("models")).items():
                if isinstance(w, dict) and "@" not in name:
                    d.latency[name] = w

    def model_figures(self) -> list[dict[str, Any]]:
        """Per model and version: devices serving it, requests in the latest windows, fleet p50/p99 (merged histograms)."""
        from agent.telemetry.histogram import Histogram, merge_all

        serving: dict[tuple[str, Any], int] = {}
        for d in self.devices.values():
            for m in d.models:
                key = (str(m.get("name", "?")), m.get("version"))
                serving[key] = serving.get(key, 0) + 1
        hists: dict[tuple[str, Any], list[Histogram]] = {}
        counts: dict[tuple[str, Any], int] = {}
        for d in self.devices.values():
            for name, w in d.latency.items():
                key = (name, w.get("version"))
                counts[key] = counts.get(key, 0) + int(w.get("count") or 0)
                try:
                    hists.setdefault(key, []).append(Histogram.from_wire(_dict(w.get("hist"))))
                except (ValueError, TypeError):
                    continue
        out = []
        for key in sorted(set(serving) | set(hists), key=lambda k: (k[0], str(k[1]))):
            h = merge_all(hists.get(key, []))
            out.append({"model": key[0], "version": key[1], "devices": serving.get(key, 0), "requests": counts.get(key, 0),
                        "p50_ms": round(h.percentile_ms(50), 3) if h.total else None,
                        "p99_ms": round(h.percentile_ms(99), 3) if h.total else None})
        return out

    def snapshot(self) -> dict[str, Any]:
        online = sum(d.online is True for d in self.devices.values())
        offline = sum(d.online is False for d in self.devices.values())
        jobs: dict[str, int] = {}
        for d in self.devices.values():
            if d.job:
                st = str(d.job.get("state", "?"))
                jobs[st] = jobs.get(st, 0) + 1
        return {"ts": now_rfc3339(), "devices": len(self.devices), "online": online, "offline": offline, "jobs": jobs,
                "models": self.model_figures(),
                "per_device": {name: {"online": d.online, "agent": d.agent,
                                      "models": {str(m.get("name")): m.get("version") for m in d.models},
                                      "job": {k: d.job.get(k) for k in ("job", "type", "state", "step", "progress", "error")
                                              if d.job.get(k) is not None} if d.job else None,
                                      "latency_ms": {n: _dict(w.get("latency_ms")) for n, w in d.latency.items()}}
                               for name, d in sorted(self.devices.items())}}

    def render(self, now: float | None = None, max_rows: int = LIVE_MAX_ROWS) -> str:
        t = time.monotonic() if now is None else now
        snap = self.snapshot()
        jobs = ", ".join(f"{n} {s.lower()}" for s, n in sorted(snap["jobs"].items())) or "none"
        lines = [f"fleet {snap['ts']}: {snap['devices']} devices, {snap['online']} online, {snap['offline']} offline; "
                 f"jobs: {jobs}"]
        if snap["models"]:
            rows = [[m["model"], f"v{m['version']}", str(m["devices"]), str(m["requests"]),
                     _num(m["p50_ms"], "{:.2f}"), _num(m["p99_ms"], "{:.2f}")] for m in snap["models"]]
            lines += ["", _table(rows, ["MODEL", "VERSION", "DEVICES", "REQUESTS", "P50_MS", "P99_MS"])]
        rows = []
        for name, d in sorted(self.devices.items())[:max_rows]:
            models = " ".join(f"{m.get('name')} v{m.get('version')}" for m in d.models) or "-"
            job = "-"
            if d.job:
                j = d.job
                job = " ".join(str(x) for x in (j.get("type"), j.get("state"), j.get("step")) if x)
                prog = j.get("progress")
                if isinstance(prog, dict) and isinstance(prog.get("total"), (int, float)) and prog["total"]:
                    job += f" {100 * prog.get('done', 0) / prog['total']:.0f}%"
                err = j.get("error")
                if isinstance(err, dict) and err.get("code"):
                    job += f" ({err['code']})"
            lat = " ".join(f"{_num(_dict(w.get('latency_ms')).get('p50'), '{:.1f}')}/{_num(_dict(w.get('latency_ms')).get('p99'), '{:.1f}')}"
                           for w in d.latency.values()) or "-"
            rows.append([name, {True: "online", False: "OFFLINE"}.get(d.online, "?") if d.online is not None else "?",
                         d.agent or "-", models, job, lat, _num(d.system.get("cpu_pct"), "{:.0f}%"), f"{t - d.seen:.0f}s"])
        lines += ["", _table(rows, ["DEVICE", "STATE", "AGENT", "MODELS", "LAST JOB", "P50/P99_MS", "CPU", "SEEN"])]
        if len(self.devices) > max_rows:
            lines.append(f"… {len(self.devices) - max_rows} more devices")
        return "\n".join(lines)


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows])


def watch_live(client: mqtt.Client, prefix: str, device: str | None = None, *, as_json: bool = False,
               interval_s: float = LIVE_INTERVAL_S, duration_s: float | None = None, out: TextIO | None = None,
               tty: bool | None = None) -> FleetView:
    """Redraw the fleet table every ``interval_s`` (a terminal is cleared first; a pipe gets frames one after
    another); ``as_json`` writes one snapshot object per interval. Ends after ``duration_s`` or Ctrl-C."""
    stream = out or sys.stdout
    is_tty = bool(getattr(stream, "isatty", lambda: False)()) if tty is None else tty
    topics = watch_topics(prefix, device)
    q: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
    view = FleetView()

    def on_message(c: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        q.put(msg)

    def draw() -> None:
        if as_json:
            stream.write(json.dumps(view.snapshot(), separators=(",", ":"), default=str) + "\n")
        else:
            stream.write((CLEAR_SCREEN if is_tty else "") + view.render() + "\n" + ("" if is_tty else "\n"))
        stream.flush()

    for t in topics:
        client.message_callback_add(t, on_message)
    mqttc.subscribe(client, topics, qos=1)
    end = None if duration_s is None else time.monotonic() + duration_s
    next_draw = time.monotonic() + interval_s
    try:
        while True:
            now = time.monotonic()
            if end is not None and now >= end:
                break
            if now >= next_draw:
                draw()
                next_draw = now + interval_s
            wait = min(next_draw, end if end is not None else next_draw) - time.monotonic()
            try:
                msg = q.get(timeout=max(0.0, min(wait, POLL_S)))
            except queue.Empty:
                continue
            try:
                doc = json.loads(msg.payload)
            except (ValueError, UnicodeDecodeError):
                continue
            view.apply(msg.topic, doc)
    except KeyboardInterrupt:
        pass
    finally:
        for t in topics:
            client.message_callback_remove(t)
    draw()
    return view
