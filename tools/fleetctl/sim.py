"""Simulated devices: real MQTT clients that speak the device side of PROTOCOL.md.

For fleet tests and benchmarks (staged rollouts over a real broker to tens or thousands of
devices) without running a daemon per device. Each simulated device:
- connects with its own MQTT 5 client (persistent session, retained birth status, Last Will);
- verifies every command with the agent's own ``CommandVerifier`` (signatures, threshold,
  target, expiry) and remembers ids, answering a replay with ``replayed`` and the recorded
  outcome, exactly like the agent — so a resent command is never executed twice;
- answers job updates like the agent: QUEUED → IN_PROGRESS (deploy steps in order, download
  progress) → SUCCEEDED / FAILED / REJECTED, with the agent's error codes;
- fetches and verifies the signed manifest (cached per URL) for deploys, so a bad URL, a bad
  signature or an older version fail as they would on a device;
- publishes heartbeats and latency telemetry windows (the agent's own ``Window`` summaries).

Chosen devices fail deploys on purpose (``--fail PATTERN``, fnmatch on the device id).

Efficiency: all devices of one process share one thread — an event loop over every client
socket with ``selectors`` (epoll: no 1024-descriptor limit of select(), FIELD-NOTES) driving
paho's external-loop API. Blocking work (manifest fetches) runs on a small pool and posts
results back to the loop. ``--processes K`` spreads devices over K processes.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import heapq
import itertools
import json
import logging
import os
import queue
import random
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent import errors
from agent.bundles.manifest import Manifest, verify_manifest
from agent.bundles.trust import TrustStore
from agent.commands.verify import CommandVerifier, peek_id
from agent.telemetry.windows import Window
from agent.timeutil import now_rfc3339
from fleetctl import mqttc

log = logging.getLogger(__name__)

AGENT_VERSION = "sim"
DEPLOY_STEPS = ("fetching_manifest", "verifying", "selecting_backend", "downloading", "installing",
                "loading", "validating", "activating")
TERMINAL = frozenset({"SUCCEEDED", "FAILED", "REJECTED", "CANCELED", "TIMED_OUT"})
SESSION_EXPIRY_S = 3600  # the broker keeps a simulated device's session (and queued commands) this long
KEEPALIVE_S = 30
LOOP_TICK_S = 0.2  # the event loop wakes at least this often (keepalive pings, timers)
MISC_EVERY_S = 1.0  # paho housekeeping (PINGREQ, retries) per client
RECONNECT_MIN_S = 0.5
RECONNECT_MAX_S = 10.0
FETCH_TIMEOUT_S = 10.0
FETCH_WORKERS = 4
MAX_MANIFEST_BYTES = 1024 * 1024
CONNECT_TIMEOUT_S = 30.0  # all devices of a process connected and subscribed
DEFAULT_STEP_S = 0.02  # simulated duration of one deploy step
DEFAULT_HEARTBEAT_S = 10.0
DEFAULT_WINDOW_S = 10.0
DEFAULT_LATENCY_MS = 4.0
SAMPLES_PER_WINDOW = 64  # synthetic inferences per model per telemetry window
SIM_BACKEND = "sim:cpu"
SIM_VARIANT = "onnx-fp32"
FAKE_DOWNLOAD_BYTES = 4 * 1024 * 1024
CHILD_READY_TIMEOUT_S = 60.0
CHILD_STOP_TIMEOUT_S = 10.0
STOP_POLL_S = 0.05  # at a stop: how often the loop checks every device's messages went out


@dataclass
class SimOptions:
    broker: str
    trust_dir: Path
    prefix: str = "edge"
    threshold: int = 1
    groups: tuple[str, ...] = ()
    fail: tuple[str, ...] = ()  # fnmatch patterns of devices whose deploys fail
    fail_code: str = errors.VALIDATION_FAILED
    fail_step: str = "validating"
    models: dict[str, int] = field(default_factory=dict)  # initially serving: name → version
    step_s: float = DEFAULT_STEP_S
    heartbeat_s: float = DEFAULT_HEARTBEAT_S
    window_s: float = DEFAULT_WINDOW_S
    latency_ms: float = DEFAULT_LATENCY_MS
    fetch: bool = True
    log_path: Path | None = None
    samples_path: Path | None = None  # every simulated latency, one JSON line per telemetry message
    max_clock_skew_s: float = 300.0


class _Loop:
    """A single-threaded event loop: sockets (selectors), timers (a heap), and calls from other threads."""

    def __init__(self) -> None:
        self.sel = selectors.DefaultSelector()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._calls: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, None)
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None

    def call_later(self, delay_s: float, fn: Callable[[], None]) -> None:
        """Loop thread only."""
        heapq.heappush(self._timers, (time.monotonic() + max(0.0, delay_s), next(self._seq), fn))

    def call_soon_threadsafe(self, fn: Callable[[], None]) -> None:
        self._calls.put(fn)
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"\0")

    def run(self, tick: Callable[[], None]) -> None:
        while not self.stopped.is_set():
            now = time.monotonic()
            wait = LOOP_TICK_S if not self._timers else min(LOOP_TICK_S, max(0.0, self._timers[0][0] - now))
            for key, events in self.sel.select(wait):
                if key.data is None:
                    with contextlib.suppress(BlockingIOError, OSError):
                        self._wake_r.recv(4096)
                    continue
                key.data(events)
            while True:
                try:
                    fn = self._calls.get_nowait()
                except queue.Empty:
                    break
                self._safe(fn)
            now = time.monotonic()
            while self._timers and self._timers[0][0] <= now:
                _, _, fn = heapq.heappop(self._timers)
                self._safe(fn)
            tick()

    @staticmethod
    def _safe(fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:  # one device's bug must not stop the others
            log.exception("sim: callback failed")

    def close(self) -> None:
        self.sel.close()
        self._wake_r.close()
        self._wake_w.close()


class _ManifestCache:
    """Fetch + verify each manifest URL once per process, off the loop thread."""

    def __init__(self, loop: _Loop, trust: TrustStore, threshold: int) -> None:
        self.loop = loop
        self.trust = trust
        self.threshold = threshold
        self._pool = ThreadPoolExecutor(FETCH_WORKERS, thread_name_prefix="sim-fetch")
        self._futures: dict[str, Future[Manifest]] = {}
        self._lock = threading.Lock()

    def _fetch(self, url: str) -> Manifest:
        import requests

        if url.startswith("file://"):
            raw = Path(url[len("file://"):]).read_bytes()
        else:
            try:
                r = requests.get(url, timeout=FETCH_TIMEOUT_S)
            except requests.RequestException as e:
                raise errors.RetryableError(errors.DOWNLOAD_FAILED, f"manifest {url}: {e}") from e
            if r.status_code != 200:
                raise errors.RetryableError(errors.DOWNLOAD_FAILED, f"manifest {url}: HTTP {r.status_code}")
            raw = r.content
        if len(raw) > MAX_MANIFEST_BYTES:
            raise errors.RejectError(errors.SIZE_EXCEEDED, f"manifest {url}: {len(raw)} bytes")
        return verify_manifest(raw, self.trust, self.threshold)

    def get(self, url: str, done: Callable[[Manifest | None, errors.AgentError | None], None]) -> None:
        with self._lock:
            fut = self._futures.get(url)
            if fut is None or (fut.done() and fut.exception() is not None):
                fut = self._futures[url] = self._pool.submit(self._fetch, url)

        def finished(f: Future[Manifest]) -> None:
            exc = f.exception()
            if exc is None:
                self.loop.call_soon_threadsafe(lambda: done(f.result(), None))
            else:
                err = exc if isinstance(exc, errors.AgentError) else errors.AgentError(errors.INTERNAL, str(exc))
                self.loop.call_soon_threadsafe(lambda: done(None, err))

        fut.add_done_callback(finished)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class SimDevice:
    """One simulated device: its MQTT client, models, job records and sequence numbers."""

    def __init__(self, sim: Simulator, device_id: str) -> None:
        self.sim = sim
        self.id = device_id
        o = sim.opts
        self.groups = list(o.groups)
        self.verifier = CommandVerifier(sim.trust, o.threshold, device_id, self.groups, o.max_clock_skew_s)
        self.fails = any(fnmatch.fnmatchcase(device_id, p) for p in o.fail)
        self.models: dict[str, dict[str, Any]] = {
            name: {"name": name, "version": v, "variant": SIM_VARIANT, "backend": SIM_BACKEND, "state": "serving",
                   "previous": None} for name, v in o.models.items()}
        self.high_water: dict[str, int] = dict(o.models)
        self.jobs: dict[str, dict[str, Any]] = {}
        self.seq: dict[str, int] = {}
        self.started = time.time()
        self.boot_id = os.urandom(8).hex()
        self.connected = False
        self.subscribed = False
        self.reconnects = 0
        self.latency_ms = o.latency_ms * random.uniform(0.8, 1.25)
        self._backoff = RECONNECT_MIN_S
        self._misc_at = 0.0
        self.session = 0  # status ordering (docs/protocol.md): a new number per connect
        self.client = self._make_client()

    @property
    def topic(self) -> str:
        return f"{self.sim.opts.prefix}/{self.id}"

    def _make_client(self) -> mqtt.Client:
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.id, protocol=mqtt.MQTTv5)
        c.on_socket_open = self._on_socket_open
        c.on_socket_close = self._on_socket_close
        c.on_socket_register_write = self._on_register_write
        c.on_socket_unregister_write = self._on_unregister_write
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_subscribe = self._on_subscribe
        c.on_message = self._on_message
        self._new_session(c)
        addr = mqttc.parse_broker_url(self.sim.opts.broker)
        if addr.tls:
            c.tls_set()
        if addr.username:
            c.username_pw_set(addr.username, addr.password)
        return c

    def _new_session(self, c: mqtt.Client) -> None:
        """A new status ``session`` for the next connect, and the Will that carries it. Simulated
        devices keep no state: milliseconds of the wall clock keep it increasing across restarts."""
        self.session = max(self.session + 1, time.time_ns() // 1_000_000)
        c.will_set(f"{self.topic}/status", json.dumps(self.status_doc(False, "connection lost")), qos=1, retain=True)

    # -- paho external loop ------------------------------------------------------------------
    def _on_socket_open(self, c: mqtt.Client, u: Any, sock: Any) -> None:
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sim.loop.sel.register(sock, selectors.EVENT_READ, self._io)

    def _on_socket_close(self, c: mqtt.Client, u: Any, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.sim.loop.sel.unregister(sock)

    def _on_register_write(self, c: mqtt.Client, u: Any, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.sim.loop.sel.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, self._io)

    def _on_unregister_write(self, c: mqtt.Client, u: Any, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.sim.loop.sel.modify(sock, selectors.EVENT_READ, self._io)

    def _io(self, events: int) -> None:
        if events & selectors.EVENT_READ:
            self.client.loop_read(max_packets=16)
        if events & selectors.EVENT_WRITE and self.client.socket() is not None:
            self.client.loop_write()

    def misc(self, now: float) -> None:
        if now >= self._misc_at:
            self._misc_at = now + MISC_EVERY_S
            if self.client.socket() is not None:
                self.client.loop_misc()

    def connect(self) -> None:
        addr = mqttc.parse_broker_url(self.sim.opts.broker)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = SESSION_EXPIRY_S
        try:
            self.client.connect(addr.host, addr.port, keepalive=KEEPALIVE_S, clean_start=False, properties=props)
        except OSError as e:
            log.warning("%s: connect failed: %s", self.id, e)
            self._schedule_reconnect()

    def _schedule_reconnect(self) -> None:
        delay = random.uniform(0, self._backoff)
        self._backoff = min(RECONNECT_MAX_S, self._backoff * 2)
        self.sim.loop.call_later(delay, self._reconnect)

    def _reconnect(self) -> None:
        if self.sim.loop.stopped.is_set() or self.sim.stopping:
            return
        self.reconnects += 1
        try:
            self._new_session(self.client)
            self.client.reconnect()
        except OSError as e:
            log.debug("%s: reconnect failed: %s", self.id, e)
            self._schedule_reconnect()

    def _on_connect(self, c: mqtt.Client, u: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            log.warning("%s: broker refused: %s", self.id, reason)
            return
        self.connected = True
        self._backoff = RECONNECT_MIN_S
        topics = [(f"{self.topic}/cmd", 1)] + [(f"{self.sim.opts.prefix}/groups/{g}/cmd", 1) for g in self.groups]
        c.subscribe(topics)
        self.publish_status()

    def _on_subscribe(self, c: mqtt.Client, u: Any, mid: int, reasons: Any, props: Any) -> None:
        if not self.subscribed:
            self.subscribed = True
            self.sim.device_ready()

    def _on_disconnect(self, c: mqtt.Client, u: Any, flags: Any, reason: Any, props: Any) -> None:
        self.connected = False
        if not self.sim.stopping:
            self._schedule_reconnect()

    # -- publishing --------------------------------------------------------------------------
    def _next_seq(self, stream: str) -> int:
        self.seq[stream] = self.seq.get(stream, 0) + 1
        return self.seq[stream]

    def publish(self, kind: str, doc: dict[str, Any], *, stream: str | None = None, retain: bool = False) -> None:
        doc.setdefault("v", 1)
        doc.setdefault("device", self.id)
        doc.setdefault("ts", now_rfc3339())
        doc["seq"] = self._next_seq(stream or kind.split("/")[0])
        self.client.publish(f"{self.topic}/{kind}", json.dumps(doc, separators=(",", ":")), qos=1, retain=retain)

    def status_doc(self, online: bool, reason: str = "") -> dict[str, Any]:
        doc: dict[str, Any] = {"v": 1, "device": self.id, "online": online, "ts": now_rfc3339(), "agent": AGENT_VERSION,
                               "boot_id": self.boot_id, "profile": "simulated", "session": self.session,
                               "groups": list(self.groups),
                               "models": [dict(m) for m in self.models.values()]}
        if reason:
            doc["reason"] = reason
        return doc

    def publish_status(self, online: bool = True, reason: str = "") -> None:
        self.publish("status", self.status_doc(online, reason), retain=True)

    def job(self, job_id: str, type_: str, state: str, *, step: str | None = None, error: errors.AgentError | None = None,
            result: dict[str, Any] | None = None, progress: dict[str, int] | None = None,
            extra: dict[str, Any] | None = None, record: bool = True) -> None:
        doc: dict[str, Any] = {"job": job_id, "type": type_, "state": state}
        if step:
            doc["step"] = step
        if progress:
            doc["progress"] = progress
        if error is not None:
            doc["error"] = error.to_dict()
        if result is not None:
            doc["result"] = result
        if extra:
            doc.update(extra)
        if record and job_id in self.jobs:
            rec = self.jobs[job_id]
            rec.update(state=state, error=doc.get("error"), result=result)
            if state in TERMINAL:
                self.sim.record({"device": self.id, "job": job_id, "type": type_, "state": state,
                                 "error": (doc.get("error") or {}).get("code")})
        self.publish(f"jobs/{job_id}", doc, stream="jobs")

    # -- commands ----------------------------------------------------------------------------
    def _on_message(self, c: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
        raw = bytes(msg.payload)
        try:
            cmd = self.verifier.verify(raw)
        except errors.AgentError as e:
            cid = peek_id(raw)
            if cid is not None and cid not in self.jobs:
                self.job(cid, "unknown", "REJECTED", error=e, record=False)
            return
        prior = self.jobs.get(cmd.id)
        if prior is not None:
            err = errors.RejectError(errors.REPLAYED, f"command {cmd.id} was already received (state {prior['state']}); not executed again")
            self.job(cmd.id, cmd.type, "REJECTED", error=err, record=False,
                     extra={"recorded": {"state": prior["state"], "error": prior.get("error"), "result": prior.get("result")}})
            self.sim.record({"device": self.id, "job": cmd.id, "type": cmd.type, "replay": True})
            return
        self.jobs[cmd.id] = {"type": cmd.type, "state": "QUEUED"}
        self.sim.record({"device": self.id, "job": cmd.id, "type": cmd.type, "executed": True,
                         "model": cmd.params.get("model")})
        self.job(cmd.id, cmd.type, "QUEUED")
        try:
            self._route(cmd.id, cmd.type, cmd.params)
        except errors.AgentError as e:
            self.job(cmd.id, cmd.type, "REJECTED" if isinstance(e, errors.RejectError) else "FAILED", error=e)

    def _route(self, cid: str, ctype: str, p: dict[str, Any]) -> None:
        if ctype == "deploy":
            self._deploy(cid, p)
        elif ctype == "rollback":
            self._rollback(cid, p)
        elif ctype == "remove":
            self._model(p)
            del self.models[p["model"]]
            self.job(cid, ctype, "SUCCEEDED", result={"name": p["model"], "freed_bytes": FAKE_DOWNLOAD_BYTES})
            self.publish_status()
        elif ctype == "status":
            self.job(cid, ctype, "SUCCEEDED", result={**self.status_doc(True), "uptime_s": round(time.time() - self.started, 1),
                                                      "groups": self.groups})
        elif ctype == "ping":
            self.job(cid, ctype, "SUCCEEDED", result={"pong": now_rfc3339()})
        elif ctype == "config":
            changes = p.get("set")
            if not isinstance(changes, dict) or not changes:
                raise errors.RejectError(errors.INVALID_COMMAND, 'params.set must be an object {"dotted.key": value}')
            if "groups" in changes and isinstance(changes["groups"], list):
                self.groups[:] = [str(g) for g in changes["groups"]]
            self.job(cid, ctype, "SUCCEEDED", result=dict(changes))
        elif ctype == "bench":
            m = self._model(p)
            lat = self.latency_ms
            self.job(cid, ctype, "IN_PROGRESS")
            self.sim.loop.call_later(self.sim.opts.step_s, lambda: self.job(cid, ctype, "SUCCEEDED", result={
                "model": m["name"], "version": m["version"], "iterations": p.get("iterations", 100),
                "backends": {SIM_BACKEND: {"usable": True, "p50_ms": round(lat, 3), "p99_ms": round(lat * 1.8, 3)}}}))
        elif ctype == "cancel":
            raise errors.RejectError(errors.INVALID_COMMAND, f"job {p.get('job')} is not running or queued")
        else:
            raise errors.RejectError(errors.INVALID_COMMAND, f"the simulator does not implement {ctype}")

    def _model(self, p: dict[str, Any]) -> dict[str, Any]:
        name = p.get("model")
        if not isinstance(name, str) or name not in self.models:
            raise errors.RejectError(errors.UNKNOWN_MODEL, f"model {name!r} is not deployed here")
        return self.models[name]

    def _rollback(self, cid: str, p: dict[str, Any]) -> None:
        m = self._model(p)
        to = p.get("to_version", m["previous"])
        if not isinstance(to, int) or to == m["version"]:
            raise errors.RejectError(errors.ROLLBACK_REFUSED, f"{m['name']}: no previous version to roll back to")
        frm = m["version"]
        m.update(version=to, previous=frm)
        self.job(cid, "rollback", "IN_PROGRESS")
        self.sim.loop.call_later(self.sim.opts.step_s, lambda: self._rolled_back(cid, m, frm))

    def _rolled_back(self, cid: str, m: dict[str, Any], frm: int) -> None:
        self.publish("events", {"event": "rollback", "model": m["name"], "frm": frm, "to": m["version"],
                                "reason": "rollback command"})  # as the agent reports it
        self.job(cid, "rollback", "SUCCEEDED", result={"name": m["name"], "version": m["version"], "backend": SIM_BACKEND,
                                                       "previous": frm})
        self.publish_status()

    def _deploy(self, cid: str, p: dict[str, Any]) -> None:
        name, url = p.get("model"), p.get("manifest_url")
        if not isinstance(name, str) or not isinstance(url, str):
            raise errors.RejectError(errors.INVALID_COMMAND, "deploy needs params.model and params.manifest_url (strings)")
        self.job(cid, "deploy", "IN_PROGRESS", step="fetching_manifest")
        if not self.sim.opts.fetch:
            pinned = p.get("version")
            version: int = pinned if isinstance(pinned, int) else self.high_water.get(name, 0) + 1
            self.sim.loop.call_later(self.sim.opts.step_s, lambda: self._deploy_steps(cid, name, version, 1))
            return

        def fetched(m: Manifest | None, err: errors.AgentError | None) -> None:
            if err is not None:
                self.job(cid, "deploy", "FAILED" if isinstance(err, errors.RetryableError) else "REJECTED",
                         step="fetching_manifest", error=err)
                return
            assert m is not None
            if m.name != name:
                self.job(cid, "deploy", "REJECTED", step="verifying",
                         error=errors.RejectError(errors.INVALID_MANIFEST, f"manifest is for {m.name!r}, not {name!r}"))
                return
            if m.version <= self.high_water.get(name, 0):
                self.job(cid, "deploy", "REJECTED", step="verifying", error=errors.RejectError(
                    errors.ROLLBACK_REFUSED, f"{name} v{m.version} is not newer than v{self.high_water[name]} installed before"))
                return
            self.sim.loop.call_later(self.sim.opts.step_s, lambda: self._deploy_steps(cid, name, m.version, 1))

        self.sim.manifests.get(url, fetched)

    def _deploy_steps(self, cid: str, name: str, version: int, i: int) -> None:
        step = DEPLOY_STEPS[i]
        if self.fails and step == self.sim.opts.fail_step:
            self.job(cid, "deploy", "FAILED", step=step, error=errors.RejectError(
                self.sim.opts.fail_code, f"{name} v{version}: simulated failure on {self.id} (--fail)"))
            return
        self.job(cid, "deploy", "IN_PROGRESS", step=step)
        if step == "downloading":
            self.job(cid, "deploy", "IN_PROGRESS", step=step, record=False,
                     progress={"done": FAKE_DOWNLOAD_BYTES, "total": FAKE_DOWNLOAD_BYTES})
        if i + 1 < len(DEPLOY_STEPS):
            self.sim.loop.call_later(self.sim.opts.step_s, lambda: self._deploy_steps(cid, name, version, i + 1))
            return
        prev = self.models.get(name, {}).get("version")
        self.models[name] = {"name": name, "version": version, "variant": SIM_VARIANT, "backend": SIM_BACKEND,
                             "state": "serving", "previous": prev}
        self.high_water[name] = version
        self.sim.loop.call_later(self.sim.opts.step_s, lambda: self._deployed(cid, name, version))

    def _deployed(self, cid: str, name: str, version: int) -> None:
        self.job(cid, "deploy", "SUCCEEDED", result={
            "name": name, "version": version, "variant": SIM_VARIANT, "backend": SIM_BACKEND,
            "figures": {"total_s": round(len(DEPLOY_STEPS) * self.sim.opts.step_s, 3), "bytes_downloaded": FAKE_DOWNLOAD_BYTES}})
        self.publish_status()

    # -- telemetry ---------------------------------------------------------------------------
    def heartbeat(self) -> None:
        if self.connected and not self.sim.stopping:
            self.publish("heartbeat", {"uptime_s": round(time.time() - self.started, 1),
                                       "system": {"cpu_pct": round(random.uniform(5, 40), 1),
                                                  "mem_used_pct": round(random.uniform(30, 60), 1),
                                                  "disk_free_mb": 20480, "load1": round(random.uniform(0.1, 1.5), 2),
                                                  "temp_c": round(random.uniform(40, 65), 1)},
                                       "outbox": {"depth": 0, "oldest_s": 0, "dropped": 0},
                                       "mqtt": {"reconnects": self.reconnects}})
        self.sim.loop.call_later(self.sim.opts.heartbeat_s, self.heartbeat)

    def telemetry(self) -> None:
        if self.connected and self.models and not self.sim.stopping:  # nothing after the goodbye
            models, raw = {}, {}
            for name, m in self.models.items():
                w = Window(m["version"], SIM_BACKEND)
                raw[name] = [random.lognormvariate(0, 0.25) * self.latency_ms / 1000.0 for _ in range(SAMPLES_PER_WINDOW)]
                for latency_s in raw[name]:
                    w.add(latency_s, True)
                models[name] = w.summary()
            self.publish("telemetry", {"window_s": self.sim.opts.window_s, "models": models})
            self.sim.record_samples({"device": self.id, "seq": self.seq["telemetry"], "latency_s": raw})
        self.sim.loop.call_later(self.sim.opts.window_s, self.telemetry)


def load_trust(folder: Path) -> TrustStore:
    """The simulated devices' trust folder; ValueError naming the path and the fix when it is
    missing or holds no key (one clean line from fleetctl, before any process starts)."""
    if not folder.is_dir():
        what = "does not exist" if not folder.exists() else "is not a folder"
        raise ValueError(f"--trust {folder}: {what} (resolved: {folder.resolve()}); give the folder holding the "
                         "fleet's public key(s) (.pub.pem), e.g. the --out folder of `fleetctl keygen`")
    trust = TrustStore.load(folder)
    if not len(trust):
        raise ValueError(f"--trust {folder}: {trust.no_keys_message()}")
    return trust


class Simulator:
    """Many devices in this process, on one event-loop thread."""

    def __init__(self, opts: SimOptions, device_ids: Sequence[str]) -> None:
        self.opts = opts
        self.trust = load_trust(opts.trust_dir)
        self.loop = _Loop()
        self.manifests = _ManifestCache(self.loop, self.trust, opts.threshold)
        self.stopping = False
        self._ready = 0
        self._ready_cv = threading.Condition()
        self._log_lock = threading.Lock()
        self._log = open(opts.log_path, "a", encoding="utf-8") if opts.log_path else None  # noqa: SIM115 - closed in stop()
        self._samples = open(opts.samples_path, "a", encoding="utf-8") if opts.samples_path else None  # noqa: SIM115 - closed in stop()
        self.devices = [SimDevice(self, d) for d in device_ids]

    def record(self, entry: dict[str, Any]) -> None:
        """One line in the execution log (JSONL): what each device executed, and replays it refused."""
        if self._log is None:
            return
        line = json.dumps({"ts": time.time(), **entry}, separators=(",", ":")) + "\n"
        with self._log_lock:
            self._log.write(line)
            self._log.flush()

    def record_samples(self, entry: dict[str, Any]) -> None:
        """One line in the samples log (JSONL): the raw latencies behind one telemetry message."""
        if self._samples is not None:
            self._samples.write(json.dumps(entry, separators=(",", ":")) + "\n")
            self._samples.flush()  # one write per line: lines from several processes never interleave

    def device_ready(self) -> None:
        with self._ready_cv:
            self._ready += 1
            self._ready_cv.notify_all()

    def _tick(self) -> None:
        now = time.monotonic()
        for d in self.devices:
            d.misc(now)

    def start(self, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        """Connect every device and wait until each subscribed to its command topics."""
        def boot() -> None:
            for d in self.devices:
                d.connect()
                # Stagger periodic messages so N devices do not all publish in the same instant.
                self.loop.call_later(random.uniform(0, self.opts.heartbeat_s), d.heartbeat)
                self.loop.call_later(random.uniform(0, self.opts.window_s), d.telemetry)

        self.loop.call_soon_threadsafe(boot)
        self.loop.thread = threading.Thread(target=self.loop.run, args=(self._tick,), name="sim-loop", daemon=True)
        self.loop.thread.start()
        deadline = time.monotonic() + timeout_s
        with self._ready_cv:
            while self._ready < len(self.devices):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"only {self._ready} of {len(self.devices)} simulated devices connected within {timeout_s:g} s")
                self._ready_cv.wait(left)

    def stop(self, timeout_s: float = CHILD_STOP_TIMEOUT_S) -> None:
        """Publish offline status and disconnect every device (bounded)."""
        done = threading.Event()

        deadline = time.monotonic() + timeout_s

        def flushed() -> None:
            # paho closes a socket once its DISCONNECT is written, i.e. after every queued message
            if all(d.client.socket() is None for d in self.devices) or time.monotonic() >= deadline:
                done.set()
            else:
                self.loop.call_later(STOP_POLL_S, flushed)

        def bye() -> None:
            self.stopping = True
            for d in self.devices:
                if d.connected:
                    d.publish_status(False, "shutdown")
                    d.client.disconnect()
            self.loop.call_later(STOP_POLL_S, flushed)

        if self.loop.thread is not None and self.loop.thread.is_alive():
            self.loop.call_soon_threadsafe(bye)
            done.wait(timeout_s)
            self.loop.stopped.set()
            self.loop.thread.join(timeout_s)
        self.manifests.close()
        self.loop.close()
        if self._log is not None:
            self._log.close()
        if self._samples is not None:
            self._samples.close()


def device_ids(count: int, fmt: str = "sim-{:03d}", first: int = 0) -> list[str]:
    return [fmt.format(i) for i in range(first, first + count)]


def shard(ids: Sequence[str], index: int, total: int) -> list[str]:
    """Contiguous share ``index`` of ``total`` (0-based)."""
    n = len(ids)
    lo, hi = n * index // total, n * (index + 1) // total
    return list(ids[lo:hi])


PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent dies


def _die_with_parent(parent: int) -> Callable[[], None]:
    """preexec_fn for a child: SIGTERM when ``parent`` dies, even by SIGKILL (Linux), so no simulator outlives it."""
    def set_up() -> None:
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)
    return set_up


def run_children(argv: list[str], processes: int, out: Callable[[str], None],
                 duration_s: float | None) -> int:
    """Run ``processes`` copies of ``fleetctl sim ... --shard i/K`` and supervise them.

    SIGTERM/SIGINT stop the children (and so does this process dying: PR_SET_PDEATHSIG)."""
    children: list[subprocess.Popen[str]] = []
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        for i in range(processes):
            children.append(subprocess.Popen([sys.executable, "-m", "fleetctl.main", *argv, "--shard", f"{i}/{processes}"],
                                             stdout=subprocess.PIPE, text=True, preexec_fn=_die_with_parent(os.getpid())))
        lines: queue.SimpleQueue[tuple[int, str]] = queue.SimpleQueue()

        def pump(i: int, c: subprocess.Popen[str]) -> None:
            assert c.stdout is not None
            for line in c.stdout:
                lines.put((i, line))
            lines.put((i, ""))

        for i, c in enumerate(children):
            threading.Thread(target=pump, args=(i, c), name=f"sim-child-{i}", daemon=True).start()
        total, ready = 0, set[int]()
        deadline = time.monotonic() + CHILD_READY_TIMEOUT_S
        while len(ready) < len(children) and not stop.is_set():
            try:
                i, line = lines.get(timeout=max(0.0, min(LOOP_TICK_S, deadline - time.monotonic())))
            except queue.Empty:
                if time.monotonic() >= deadline:
                    raise ChildProcessError(f"simulator processes not ready within {CHILD_READY_TIMEOUT_S:g} s") from None
                continue
            if not line:
                raise ChildProcessError(f"simulator process {children[i].pid} ended before it was ready "
                                        f"(exit {children[i].wait()}; its error is printed above)")
            if line.startswith("ready "):
                ready.add(i)
                total += int(line.split()[1])
        out(f"ready {total} devices in {processes} processes")
        end = None if duration_s is None else time.monotonic() + duration_s
        while all(c.poll() is None for c in children) and not stop.is_set():
            if end is not None and time.monotonic() >= end:
                break
            stop.wait(LOOP_TICK_S)
        return max((c.poll() or 0) for c in children)
    finally:
        for c in children:
            if c.poll() is None:
                c.send_signal(signal.SIGTERM)
        for c in children:
            try:
                c.wait(CHILD_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                c.kill()
                c.wait(CHILD_STOP_TIMEOUT_S)


def run_here(opts: SimOptions, ids: Sequence[str], out: Callable[[str], None], duration_s: float | None) -> int:
    """Run ``ids`` in this process until SIGTERM/SIGINT or ``duration_s``."""
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    sim = Simulator(opts, ids)
    try:
        sim.start()
        out(f"ready {len(ids)} devices ({ids[0]}..{ids[-1]}) on {opts.broker}" if ids else "ready 0 devices")
        stop.wait(duration_s)
    finally:
        sim.stop()
    return 0


def add_arguments(p: argparse.ArgumentParser, duration: Callable[[str], float]) -> None:
    p.add_argument("--devices", type=int, default=10, metavar="N", help="how many devices (default %(default)s)")
    p.add_argument("--id-format", default="sim-{:03d}", help="device id from its index (default %(default)s)")
    p.add_argument("--first", type=int, default=0, metavar="I", help="index of the first device (default 0)")
    p.add_argument("--group", action="append", default=[], metavar="G", help="every device is in this group; repeatable")
    p.add_argument("--trust", required=True, metavar="DIR", help="folder of trusted public keys (*.pem), like a device's")
    p.add_argument("--threshold", type=int, default=1, help="signatures required (default 1)")
    p.add_argument("--fail", action="append", default=[], metavar="PATTERN",
                   help="deploys on devices matching this fnmatch pattern fail on purpose; repeatable")
    p.add_argument("--fail-code", default=errors.VALIDATION_FAILED, help="error code of those failures (default %(default)s)")
    p.add_argument("--fail-step", default="validating", choices=DEPLOY_STEPS, help="step they fail at (default %(default)s)")
    p.add_argument("--model", action="append", default=[], metavar="NAME:VERSION", help="initially serving; repeatable")
    p.add_argument("--step-time", type=duration, default=DEFAULT_STEP_S, metavar="DURATION",
                   help="time per deploy step (default %(default)gs)")
    p.add_argument("--heartbeat", type=duration, default=DEFAULT_HEARTBEAT_S, metavar="DURATION")
    p.add_argument("--window", type=duration, default=DEFAULT_WINDOW_S, metavar="DURATION", help="telemetry window")
    p.add_argument("--latency-ms", type=float, default=DEFAULT_LATENCY_MS, help="typical simulated inference latency")
    p.add_argument("--no-fetch", action="store_true", help="do not fetch manifests (the version is the next one)")
    p.add_argument("--log", metavar="FILE", help="append one JSON line per executed command, result and refused replay")
    p.add_argument("--samples-log", metavar="FILE",
                   help="append the raw latencies behind each telemetry message (JSON lines; for checking fleet percentiles)")
    p.add_argument("--processes", type=int, default=1, metavar="K", help="spread the devices over K processes")
    p.add_argument("--duration", type=duration, metavar="DURATION", help="stop after this long (default: until Ctrl-C)")
    p.add_argument("--shard", help=argparse.SUPPRESS)  # I/K: this process runs share I of K (run_children)


def options_from(a: argparse.Namespace) -> SimOptions:
    models: dict[str, int] = {}
    for spec in a.model:
        name, sep, ver = spec.partition(":")
        if not sep or not ver.isdigit():
            raise ValueError(f"--model {spec!r}: expected NAME:VERSION")
        models[name] = int(ver)
    return SimOptions(broker=a.broker, trust_dir=Path(a.trust), prefix=a.prefix, threshold=a.threshold,
                      groups=tuple(a.group), fail=tuple(a.fail), fail_code=a.fail_code, fail_step=a.fail_step,
                      models=models, step_s=a.step_time, heartbeat_s=a.heartbeat, window_s=a.window,
                      latency_ms=a.latency_ms, fetch=not a.no_fetch, log_path=Path(a.log) if a.log else None,
                      samples_path=Path(a.samples_log) if a.samples_log else None)


def run_cli(a: argparse.Namespace) -> int:
    """``fleetctl sim``: prints ``ready N devices …`` once all are connected, then serves until stopped."""
    def out(line: str) -> None:
        print(line, flush=True)

    if a.devices < 1:
        raise ValueError("--devices must be at least 1")
    ids = device_ids(a.devices, a.id_format, a.first)
    if len(set(ids)) != len(ids):
        raise ValueError(f"--id-format {a.id_format!r} gives duplicate ids")
    opts = options_from(a)
    load_trust(opts.trust_dir)  # a bad folder is one line here, not an error in each child process
    if a.shard:
        index, _, total = a.shard.partition("/")
        return run_here(opts, shard(ids, int(index), int(total)), out, a.duration)
    if a.processes > 1:
        return run_children(_child_argv(a), min(a.processes, len(ids)), out, a.duration)
    return run_here(opts, ids, out, a.duration)


def _child_argv(a: argparse.Namespace) -> list[str]:
    """The ``fleetctl sim`` arguments of one child process (everything but --processes and --duration)."""
    argv = ["sim", "--devices", str(a.devices), "--id-format", a.id_format, "--first", str(a.first),
            "--trust", a.trust, "--threshold", str(a.threshold), "--fail-code", a.fail_code, "--fail-step", a.fail_step,
            "--step-time", repr(a.step_time), "--heartbeat", repr(a.heartbeat), "--window", repr(a.window),
            "--latency-ms", repr(a.latency_ms), "--broker", a.broker, "--prefix", a.prefix]
    for flag, values in (("--group", a.group), ("--fail", a.fail), ("--model", a.model)):
        for v in values:
            argv += [flag, v]
    if a.no_fetch:
        argv.append("--no-fetch")
    if a.log:
        argv += ["--log", a.log]
    if a.samples_log:
        argv += ["--samples-log", a.samples_log]
    for flag, value in (("--ca-file", a.ca_file), ("--cert-file", a.cert_file), ("--cert-key-file", a.cert_key_file),
                        ("--username", a.username), ("--password-file", a.password_file)):
        if value:
            argv += [flag, value]
    return argv
