"""Test kit for the telemetry tests: a cuttable TCP proxy, a durable fleet observer, signed
commands, a deployed model and steady traffic. Everything real: Mosquitto, the daemon as a
process, HTTP inference, SQLite.
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import requests
from agentproc import AgentProcess
from conftest import make_linear_onnx
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

PROXY_BUF = 65536
POLL_S = 0.05
WAIT_S = 30.0  # default bound of every wait in these tests
PUBACK_TIMEOUT_S = 2.0
OBSERVER_SESSION_S = 600  # the observer's broker session outlives a broker restart


# -- a TCP proxy between the agent and the broker ----------------------------------------------
class TcpProxy:
    """Loopback TCP proxy that can refuse, sever, or black-hole the agent→broker direction."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._listener: socket.socket | None = None
        self.port = 0
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.blackhole = False  # drop what the agent sends (half-open link)
        self.bytes_up = 0
        self.bytes_down = 0
        self.bytes_dropped = 0
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> TcpProxy:
        self._listen()
        self._thread = threading.Thread(target=self._loop, name="proxy", daemon=True)
        self._thread.start()
        return self

    def _listen(self) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(16)
        self.port = s.getsockname()[1]
        with self._lock:
            self._listener = s

    def _loop(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                lst = self._listener
                socks: list[socket.socket] = [a for pair in self._pairs for a in pair]
            rl = ([lst] if lst is not None else []) + socks
            if not rl:
                time.sleep(POLL_S)
                continue
            try:
                ready, _, _ = select.select(rl, [], [], POLL_S)
            except (OSError, ValueError):
                continue  # a socket closed under us: rebuild the list
            for s in ready:
                if s is lst:
                    self._accept(s)
                else:
                    self._forward(s)

    def _accept(self, lst: socket.socket) -> None:
        try:
            client, _ = lst.accept()
        except OSError:
            return
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            client.close()
            return
        for s in (client, upstream):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self._pairs.append((client, upstream))

    def _forward(self, s: socket.socket) -> None:
        with self._lock:
            pair = next((p for p in self._pairs if s in p), None)
        if pair is None:
            return
        client, upstream = pair
        try:
            data = s.recv(PROXY_BUF)
        except OSError:
            data = b""
        if not data:
            self._close_pair(pair)
            return
        try:
            if s is client:
                if self.blackhole:
                    self.bytes_dropped += len(data)
                    return
                self.bytes_up += len(data)
                upstream.sendall(data)
            else:
                self.bytes_down += len(data)
                client.sendall(data)
        except OSError:
            self._close_pair(pair)

    def _close_pair(self, pair: tuple[socket.socket, socket.socket]) -> None:
        with self._lock:
            if pair in self._pairs:
                self._pairs.remove(pair)
        for s in pair:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def connections(self) -> int:
        with self._lock:
            return len(self._pairs)

    def sever(self) -> None:
        """Close every open connection (RST-like for both ends); keep accepting new ones."""
        with self._lock:
            pairs = list(self._pairs)
        for p in pairs:
            self._close_pair(p)

    def cut(self) -> None:
        """The link is gone: sever everything and refuse new connections."""
        with self._lock:
            lst, self._listener = self._listener, None
        if lst is not None:
            lst.close()
        self.sever()

    def restore(self) -> None:
        """Accept connections again on the same port."""
        self._listen()

    def close(self) -> None:
        self._stop.set()
        self.cut()
        if self._thread is not None:
            self._thread.join(5)


# -- the fleet side -------------------------------------------------------------------------------
@dataclass
class Received:
    topic: str
    doc: dict[str, Any]
    retain: bool
    t: float  # monotonic time of arrival
    size: int = 0  # payload bytes as sent


class DurableObserver:
    """A fleet subscriber with a persistent session: misses nothing across a broker restart."""

    def __init__(self, host: str, port: int, topics: tuple[str, ...] = ("edge/#",)) -> None:
        self.messages: list[Received] = []
        self._cv = threading.Condition()
        self._topics = topics
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"obs-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect
        self.client.reconnect_delay_set(0.1, 1.0)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = OBSERVER_SESSION_S
        self.client.connect(host, port, keepalive=5, clean_start=False, properties=props)
        self.client.loop_start()

    def _on_connect(self, c: mqtt.Client, u: Any, flags: Any, reason: Any, props: Any) -> None:
        for t in self._topics:
            c.subscribe(t, qos=1)

    def _on_message(self, c: Any, u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            doc = json.loads(msg.payload) if msg.payload else {}
        except ValueError:
            doc = {"_raw": msg.payload.decode(errors="replace")}
        with self._cv:
            self.messages.append(Received(msg.topic, doc, bool(msg.retain), time.monotonic(), len(msg.payload)))
            self._cv.notify_all()

    def find(self, pred: Callable[[str, dict[str, Any]], bool]) -> list[Received]:
        with self._cv:
            return [m for m in self.messages if pred(m.topic, m.doc)]

    def wait(self, pred: Callable[[str, dict[str, Any]], bool], timeout_s: float = WAIT_S,
             what: str = "message", after: int = 0) -> Received:
        """The first message (at index ≥ ``after``) matching ``pred``."""
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while True:
                for m in self.messages[after:]:
                    if pred(m.topic, m.doc):
                        return m
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = "\n".join(f"{m.topic} {json.dumps(m.doc)[:160]}" for m in self.messages[-15:])
                    raise TimeoutError(f"no {what} within {timeout_s} s; last messages:\n{seen}")
                self._cv.wait(left)

    def wait_until(self, cond: Callable[[], bool], timeout_s: float = WAIT_S, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while not cond():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{what} not reached within {timeout_s} s")
                self._cv.wait(min(left, 0.2))

    def __len__(self) -> int:
        with self._cv:
            return len(self.messages)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def seqs(obs: DurableObserver, device: str, stream: str) -> list[int]:
    """``seq`` of every message of one stream in arrival order (duplicates included)."""
    def match(t: str) -> bool:
        if stream == "jobs":
            return t.startswith(f"edge/{device}/jobs/")
        return t == f"edge/{device}/{stream}"
    return [int(m.doc["seq"]) for m in obs.find(lambda t, d: match(t) and "seq" in d)]


def outbox_seq_table(state_dir: Path) -> dict[str, int]:
    """The last ``seq`` the agent allocated per stream (read after it stopped)."""
    db = sqlite3.connect(f"file:{state_dir / 'outbox.db'}?mode=ro", uri=True)
    try:
        return dict(db.execute("SELECT stream, n FROM seq").fetchall())
    finally:
        db.close()


def outbox_rows(state_dir: Path) -> int:
    db = sqlite3.connect(f"file:{state_dir / 'outbox.db'}?mode=ro", uri=True)
    try:
        return int(db.execute("SELECT COUNT(*) FROM messages").fetchone()[0])
    finally:
        db.close()


@dataclass
class Fleet:
    """Signing key, a signed bundle served over HTTP, and a command sender."""

    root: Path
    host: str
    port: int
    keys: list[Any] = field(default_factory=list)
    pub_pem: bytes = b""
    manifest_url: str = ""
    _server: Any = None
    _client: mqtt.Client | None = None

    def __post_init__(self) -> None:
        from fleetctl.bundle import build_bundle
        from fleetctl.keys import generate_keypair, load_signing_key
        from fleetctl.serve import ArtifactServer

        kp = generate_keypair(self.root / "keys", "fleet")
        self.keys = [load_signing_key(kp.private_path)]
        self.pub_pem = kp.public_path.read_bytes()
        model = make_linear_onnx(self.root / "src" / "lin.onnx", in_dim=4, out_dim=3)
        build_bundle(model, self.root / "bundles" / "lin" / "1", "lin", 1, self.keys)
        self._server = ArtifactServer(self.root / "bundles", port=0).start()
        self.manifest_url = f"{self._server.url}lin/1/manifest.json"
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"fleet-{uuid.uuid4().hex[:8]}",
                                   protocol=mqtt.MQTTv5)
        self._client.reconnect_delay_set(0.1, 1.0)
        self._client.connect(self.host, self.port, keepalive=5)
        self._client.loop_start()

    def command(self, device: str, type_: str, params: dict[str, Any] | None = None,
                command_id: str | None = None) -> tuple[str, bool]:
        """Sign and publish a command; (id, whether the broker acknowledged it)."""
        from fleetctl.commands import make_command

        assert self._client is not None
        cid, env = make_command(type_, params or {}, {"device": device}, self.keys, command_id=command_id)
        info = self._client.publish(f"edge/{device}/cmd", env, qos=1)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            return cid, False
        try:
            info.wait_for_publish(PUBACK_TIMEOUT_S)
        except (RuntimeError, ValueError):
            return cid, False
        return cid, info.is_published()

    def deploy(self, obs: DurableObserver, device: str = "dev1", timeout_s: float = 60) -> None:
        cid, ok = self.command(device, "deploy", {"model": "lin", "manifest_url": self.manifest_url})
        assert ok, "the broker did not take the deploy command"
        done = obs.wait(lambda t, d: t == f"edge/{device}/jobs/{cid}" and d.get("state") not in ("QUEUED", "IN_PROGRESS"),
                        timeout_s=timeout_s, what="deploy outcome")
        assert done.doc["state"] == "SUCCEEDED", done.doc

    def close(self) -> None:
        if self._client is not None:
            self._client.loop_stop()
            self._client.disconnect()
        if self._server is not None:
            self._server.stop()


class Pinger:
    """Signed pings at a steady rate; remembers the ids the broker acknowledged."""

    def __init__(self, fleet: Fleet, device: str = "dev1", interval_s: float = 0.1) -> None:
        self.fleet = fleet
        self.device = device
        self.interval_s = interval_s
        self.acked: list[str] = []
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pinger", daemon=True)

    def start(self) -> Pinger:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            cid, ok = self.fleet.command(self.device, "ping")
            self.sent += 1
            if ok:
                self.acked.append(cid)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


class InferenceLoad:
    """Local inference requests at a steady rate; ``bad`` requests fail inside the model call."""

    GOOD = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    BAD = {"inputs": [{"name": "x", "shape": [1, 5], "datatype": "FP32", "data": [1, 2, 3, 4, 5]}]}

    def __init__(self, api: str, rate_per_s: float = 60.0, flip_s: float | None = None) -> None:
        self.url = f"{api}/v2/models/lin/infer"
        self.rate_per_s = rate_per_s
        self.flip_s = flip_s  # alternate good and bad phases of this length (error-rate events)
        self.bad = False  # without flip_s: the caller sets this to switch between good and bad calls
        self.sent = 0
        self.ok = 0
        self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="load", daemon=True)

    def start(self) -> InferenceLoad:
        self._thread.start()
        return self

    def _run(self) -> None:
        http = requests.Session()
        t0 = time.monotonic()
        gap = 1.0 / self.rate_per_s
        while not self._stop.wait(gap):
            bad = self.bad if self.flip_s is None else int((time.monotonic() - t0) / self.flip_s) % 2 == 1
            try:
                r = http.post(self.url, json=self.BAD if bad else self.GOOD, timeout=5)
            except requests.RequestException:
                continue
            self.sent += 1
            if r.status_code == 200:
                self.ok += 1
            else:
                self.failed += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def write_config(agent: AgentProcess, telemetry: dict[str, float], keepalive_s: int = 5) -> None:
    """An agent.toml like AgentProcess.write_config, with any ``[telemetry]`` keys."""
    from conftest import free_port

    agent.root.mkdir(parents=True, exist_ok=True)
    (agent.root / "trust").mkdir(exist_ok=True, mode=0o755)
    agent.api_port = agent.api_port or free_port()
    tele = "".join(f"{k} = {v}\n" for k, v in telemetry.items())
    agent.config.write_text(
        f'device_id = "{agent.device_id}"\ngroups = []\nstate_dir = "state"\n\n'
        f'[mqtt]\nurl = "{agent.broker_url}"\nkeepalive_s = {keepalive_s}\n\n[trust]\nkeys_dir = "trust"\n\n'
        f'[telemetry]\n{tele}\n'
        f'[api]\nlisten = "127.0.0.1:{agent.api_port}"\ncontrol_socket = "{agent.socket}"\ncontrol_group = ""\n'
        + agent.extra_toml)


def agent_status(agent: AgentProcess) -> dict[str, Any]:
    r = agent.agentctl("status", "--json", timeout_s=10)
    assert r.returncode == 0, r.stderr
    return dict(json.loads(r.stdout))


def wait_drained(agent: AgentProcess, timeout_s: float = WAIT_S) -> None:
    """Until the agent's outbox is empty and it is connected."""
    deadline = time.monotonic() + timeout_s
    st: dict[str, Any] = {}
    while time.monotonic() < deadline:
        st = agent_status(agent)
        if st["outbox"]["depth"] == 0 and st["mqtt"]["connected"]:
            return
        time.sleep(0.2)
    raise TimeoutError(f"outbox not drained within {timeout_s} s: {st.get('outbox')} {st.get('mqtt')}")


@contextlib.contextmanager
def running(agent: AgentProcess) -> Iterator[AgentProcess]:
    agent.start()
    try:
        yield agent
    finally:
        if agent.proc is not None and agent.proc.poll() is None:
            agent.stop()
