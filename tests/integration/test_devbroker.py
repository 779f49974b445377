"""Integration tests for the embedded development MQTT broker (fleetctl.broker).

Real paho-mqtt clients (MQTT 3.1.1 and 5) and a few raw sockets talk to a
Broker bound to 127.0.0.1 on a free port. Every wait is bounded by a timeout.
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fleetctl.broker import (
    MAX_PACKET_BYTES,
    MAX_QUEUED_MESSAGES,
    Broker,
    Delivery,
    Message,
    Session,
    encode_packet,
    encode_str,
    encode_varint,
    topic_matches,
    valid_topic_filter,
)

HOST = "127.0.0.1"
WAIT_S = 5.0
"""Upper bound for any expected event."""
QUIET_S = 0.3
"""How long to wait when asserting that nothing arrives."""


class PahoClient:
    """A paho client with its callbacks wired to Events and a message queue."""

    def __init__(
        self,
        port: int,
        client_id: str,
        *,
        protocol: mqtt.MQTTProtocolVersion = mqtt.MQTTv311,
        clean: bool = True,
        session_expiry_s: int | None = None,
        will: tuple[str, bytes, int, bool] | None = None,
        reconnect: bool = True,
    ) -> None:
        kwargs: dict[str, Any] = {}
        if protocol != mqtt.MQTTv5:
            kwargs["clean_session"] = clean
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=protocol,
            reconnect_on_failure=reconnect,
            **kwargs,
        )
        self.protocol = protocol
        self.port = port
        self.clean = clean
        self.session_expiry_s = session_expiry_s
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.subscribed = threading.Event()
        self.unsubscribed = threading.Event()
        self.session_present: bool | None = None
        self.disconnect_reason: mqtt.ReasonCode | None = None
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.on_unsubscribe = self._on_unsubscribe
        if will is not None:
            topic, payload, qos, retain = will
            self.client.will_set(topic, payload, qos=qos, retain=retain)

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self.session_present = bool(flags.session_present)
        self.connected.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self.disconnect_reason = reason
        self.disconnected.set()

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        self.subscribed.set()

    def _on_unsubscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        self.unsubscribed.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self.messages.put(message)

    def connect(self) -> PahoClient:
        if self.protocol == mqtt.MQTTv5:
            props = Properties(PacketTypes.CONNECT)
            if self.session_expiry_s is not None:
                props.SessionExpiryInterval = self.session_expiry_s
            self.client.connect(HOST, self.port, keepalive=60, clean_start=self.clean, properties=props)
        else:
            self.client.connect(HOST, self.port, keepalive=60)
        self.client.loop_start()
        assert self.connected.wait(WAIT_S), "no CONNACK"
        return self

    def subscribe(self, topic: str, qos: int = 1) -> None:
        self.subscribed.clear()
        result, _ = self.client.subscribe(topic, qos)
        assert result == mqtt.MQTT_ERR_SUCCESS
        assert self.subscribed.wait(WAIT_S), "no SUBACK"

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, **kw: Any) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain, **kw)
        info.wait_for_publish(timeout=WAIT_S)
        assert info.is_published(), "publish not acknowledged"

    def get(self, timeout: float = WAIT_S) -> mqtt.MQTTMessage:
        return self.messages.get(timeout=timeout)

    def assert_quiet(self, timeout: float = QUIET_S) -> None:
        with pytest.raises(queue.Empty):
            msg = self.messages.get(timeout=timeout)
            pytest.fail(f"unexpected message on {msg.topic}: {msg.payload!r}")

    def disconnect(self) -> None:
        self.client.disconnect()
        assert self.disconnected.wait(WAIT_S), "no disconnect callback"
        self.client.loop_stop()

    def abort(self) -> None:
        """Drop the TCP connection without sending DISCONNECT (needs reconnect=False)."""
        sock = self.client.socket()
        assert isinstance(sock, socket.socket)
        sock.shutdown(socket.SHUT_RDWR)
        assert self.disconnected.wait(WAIT_S), "paho did not notice the closed socket"
        self.client.loop_stop()


@pytest.fixture
def broker() -> Iterator[Broker]:
    with Broker(HOST, 0) as running:
        yield running


@pytest.fixture
def clients(broker: Broker) -> Iterator[list[PahoClient]]:
    made: list[PahoClient] = []
    yield made
    for c in made:
        c.client.disconnect()  # also wakes the network thread, so loop_stop() returns quickly
    for c in made:
        c.client.loop_stop()


@pytest.fixture
def make(broker: Broker, clients: list[PahoClient]) -> Any:
    def factory(client_id: str, connect: bool = True, **kwargs: Any) -> PahoClient:
        c = PahoClient(broker.port, client_id, **kwargs)
        clients.append(c)
        return c.connect() if connect else c

    return factory


# --- raw-socket helpers (for things paho does not let us control) ------------


def raw_connect(
    port: int,
    client_id: str,
    *,
    clean: bool = True,
    keepalive_s: int = 60,
    will: tuple[str, bytes] | None = None,
) -> tuple[socket.socket, bool]:
    """MQTT 3.1.1 CONNECT over a raw socket; returns (socket, session_present)."""
    flags = (0x02 if clean else 0) | (0x04 if will else 0)
    body = encode_str("MQTT") + bytes((4, flags)) + struct.pack("!H", keepalive_s) + encode_str(client_id)
    if will:
        body += encode_str(will[0]) + struct.pack("!H", len(will[1])) + will[1]
    sock = socket.create_connection((HOST, port), timeout=WAIT_S)
    sock.sendall(encode_packet(0x10, body))
    first, ack = read_packet(sock)
    assert first == 0x20 and ack[1] == 0, f"CONNACK refused: {ack!r}"
    return sock, bool(ack[0] & 0x01)


def recv_exact(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ConnectionError("connection closed")
        data += chunk
    return data


def read_packet(sock: socket.socket) -> tuple[int, bytes]:
    first = recv_exact(sock, 1)[0]
    length, shift = 0, 0
    while True:
        byte = recv_exact(sock, 1)[0]
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    return first, recv_exact(sock, length)


def assert_closed_by_peer(sock: socket.socket) -> None:
    sock.settimeout(WAIT_S)
    try:
        data = sock.recv(1024)
    except ConnectionResetError:
        return
    assert data == b"", f"expected the broker to close the connection, got {data!r}"


# --- tests ----------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [mqtt.MQTTv311, mqtt.MQTTv5], ids=["v311", "v5"])
def test_pubsub_roundtrip_qos1(make: Any, protocol: mqtt.MQTTProtocolVersion) -> None:
    sub = make("sub", protocol=protocol)
    pub = make("pub", protocol=protocol)
    sub.subscribe("fleet/dev1/telemetry", qos=1)
    pub.publish("fleet/dev1/telemetry", b"hello", qos=1)
    msg = sub.get()
    assert (msg.topic, msg.payload, msg.qos, msg.retain) == ("fleet/dev1/telemetry", b"hello", 1, False)


def test_mixed_protocols_and_v5_properties_forwarded(make: Any) -> None:
    sub5 = make("sub5", protocol=mqtt.MQTTv5)
    sub3 = make("sub3", protocol=mqtt.MQTTv311)
    pub5 = make("pub5", protocol=mqtt.MQTTv5)
    sub5.subscribe("rpc/req")
    sub3.subscribe("rpc/req")
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = "rpc/resp/42"
    props.CorrelationData = b"\x01\x02"
    props.UserProperty = ("trace", "abc")
    pub5.publish("rpc/req", b"{}", qos=1, properties=props)
    got5 = sub5.get()
    assert got5.payload == b"{}"
    assert got5.properties.ResponseTopic == "rpc/resp/42"
    assert got5.properties.CorrelationData == b"\x01\x02"
    assert got5.properties.UserProperty == [("trace", "abc")]
    assert sub3.get().payload == b"{}"


@pytest.mark.parametrize("protocol", [mqtt.MQTTv311, mqtt.MQTTv5], ids=["v311", "v5"])
def test_unsubscribe(make: Any, protocol: mqtt.MQTTProtocolVersion) -> None:
    sub = make("sub", protocol=protocol)
    pub = make("pub")
    sub.subscribe("u/a")
    result, _ = sub.client.unsubscribe("u/a")
    assert result == mqtt.MQTT_ERR_SUCCESS
    assert sub.unsubscribed.wait(WAIT_S), "no UNSUBACK"
    sub.subscribe("u/marker")
    pub.publish("u/a", b"gone")
    pub.publish("u/marker", b"")
    assert sub.get().topic == "u/marker"


def test_pingreq(broker: Broker) -> None:
    sock, _ = raw_connect(broker.port, "pinger")
    try:
        sock.sendall(b"\xc0\x00")
        assert read_packet(sock) == (0xD0, b"")
    finally:
        sock.close()


def test_offline_queue_is_bounded_oldest_dropped() -> None:
    broker = Broker()  # not started: exercise the session queue directly
    session = Session(client_id="offline", expiry_s=3600)
    for i in range(MAX_QUEUED_MESSAGES + 5):
        message = Message(topic="t", payload=str(i).encode(), qos=1, retain=False)
        broker._deliver(session, Delivery(message, qos=1, retain=False))
    assert len(session.pending) == MAX_QUEUED_MESSAGES
    assert session.pending[0].message.payload == b"5"
    assert session.dropped == 5


def test_qos2_publish_is_acknowledged_and_downgraded(make: Any) -> None:
    sub = make("sub", protocol=mqtt.MQTTv5)
    pub = make("pub", protocol=mqtt.MQTTv5)
    sub.subscribe("q2/#", qos=2)
    pub.publish("q2/x", b"once", qos=2)
    msg = sub.get()
    assert (msg.payload, msg.qos) == (b"once", 1)
    pub.publish("q2/marker", b"", qos=1)
    assert sub.get().topic == "q2/marker"  # delivered exactly once


def test_retained_delivered_to_late_subscriber_and_cleared(make: Any) -> None:
    pub = make("pub")
    pub.publish("dev/1/state", b"online", qos=1, retain=True)
    late = make("late", protocol=mqtt.MQTTv5)
    late.subscribe("dev/+/state")
    msg = late.get()
    assert (msg.topic, msg.payload, msg.retain) == ("dev/1/state", b"online", True)

    # A live subscriber gets the normal (non-retained) copy of the clearing message.
    pub.publish("dev/1/state", b"", qos=1, retain=True)
    assert late.get().payload == b""
    later = make("later")
    later.subscribe("dev/+/state")
    pub.publish("dev/2/state", b"marker", qos=1)
    assert later.get().payload == b"marker"  # nothing retained came first


def test_wildcard_matching(make: Any) -> None:
    sub = make("sub")
    pub = make("pub")
    sub.subscribe("a/+/c")
    sub.subscribe("x/#")
    # Non-matching topics go first: had any been delivered, it would arrive first.
    for topic in ("a/b/d", "a/b/c/d", "y/x", "a", "xx/y", "a/b/c", "x", "x/y/z"):
        pub.publish(topic, topic.encode())
    assert [sub.get().topic for _ in range(3)] == ["a/b/c", "x", "x/y/z"]


def test_sys_topics_not_matched_by_leading_wildcard(make: Any) -> None:
    sub = make("sub")
    pub = make("pub")
    sub.subscribe("#")
    sub.subscribe("+/info")
    pub.publish("$SYS/info", b"x")
    pub.publish("plain/info", b"y")
    assert sub.get().topic == "plain/info"


@pytest.mark.parametrize(
    ("topic_filter", "topic", "expected"),
    [
        ("sport/#", "sport", True),
        ("sport/#", "sport/tennis/player1", True),
        ("sport/+", "sport", False),
        ("sport/+", "sport/", True),
        ("+/+", "/finance", True),
        ("/+", "/finance", True),
        ("+", "/finance", False),
        ("#", "$SYS/x", False),
        ("$SYS/#", "$SYS/x", True),
        ("+/monitor", "$SYS/monitor", False),
    ],
)
def test_topic_matches(topic_filter: str, topic: str, expected: bool) -> None:
    assert topic_matches(topic_filter, topic) is expected


@pytest.mark.parametrize("topic_filter", ["", "a/#/b", "a#", "a/b+", "+a"])
def test_invalid_filters(topic_filter: str) -> None:
    assert not valid_topic_filter(topic_filter)


def test_will_on_abrupt_close_not_on_clean_disconnect(make: Any) -> None:
    watcher = make("watcher", protocol=mqtt.MQTTv5)
    watcher.subscribe("dev/+/status")

    polite = make("polite", will=("dev/polite/status", b"offline", 1, False))
    polite.disconnect()
    watcher.assert_quiet()

    crashy = make(
        "crashy", protocol=mqtt.MQTTv5, will=("dev/crashy/status", b"offline", 1, True), reconnect=False
    )
    crashy.abort()
    msg = watcher.get()
    assert (msg.topic, msg.payload) == ("dev/crashy/status", b"offline")

    # The will was retained.
    late = make("late")
    late.subscribe("dev/crashy/status")
    retained = late.get()
    assert (retained.payload, retained.retain) == (b"offline", True)


def test_will_on_keepalive_expiry(broker: Broker, make: Any) -> None:
    watcher = make("watcher")
    watcher.subscribe("ka/status")
    sock, _ = raw_connect(broker.port, "silent", keepalive_s=1, will=("ka/status", b"gone"))
    try:
        started = time.monotonic()
        msg = watcher.get(timeout=WAIT_S)
        assert msg.payload == b"gone"
        assert time.monotonic() - started >= 1.0  # not before 1.5 x keepalive
        assert_closed_by_peer(sock)
    finally:
        sock.close()


def test_persistent_session_v5_queues_while_offline(make: Any) -> None:
    kwargs: dict[str, Any] = {"protocol": mqtt.MQTTv5, "clean": False, "session_expiry_s": 3600}
    sub = make("agent-1", **kwargs)
    assert sub.session_present is False
    sub.subscribe("fleet/agent-1/cmd", qos=1)
    sub.disconnect()

    pub = make("pub")
    for i in range(3):
        pub.publish("fleet/agent-1/cmd", f"cmd{i}".encode(), qos=1)

    again = make("agent-1", **kwargs)
    assert again.session_present is True
    assert [again.get().payload for _ in range(3)] == [b"cmd0", b"cmd1", b"cmd2"]
    # The subscription survived without re-subscribing.
    pub.publish("fleet/agent-1/cmd", b"live", qos=1)
    assert again.get().payload == b"live"


def test_v5_session_without_expiry_is_not_kept(make: Any) -> None:
    sub = make("ephemeral", protocol=mqtt.MQTTv5, clean=False, session_expiry_s=0)
    sub.subscribe("t")
    sub.disconnect()
    pub = make("pub")
    pub.publish("t", b"lost", qos=1)
    again = make("ephemeral", protocol=mqtt.MQTTv5, clean=False, session_expiry_s=0)
    assert again.session_present is False
    again.subscribe("t")
    pub.publish("t", b"marker", qos=1)
    assert again.get().payload == b"marker"  # nothing was queued for the old session


def test_unacked_qos1_resent_with_dup_on_reconnect(broker: Broker, make: Any) -> None:
    sock, present = raw_connect(broker.port, "raw-sub", clean=False)
    assert present is False
    try:
        sock.sendall(encode_packet(0x82, struct.pack("!H", 1) + encode_str("r/t") + b"\x01"))
        assert read_packet(sock) == (0x90, b"\x00\x01\x01")
        make("pub").publish("r/t", b"payload", qos=1)
        first, body = read_packet(sock)
        assert first == 0x32  # PUBLISH, QoS 1, no DUP
        packet_id = body[5:7]
    finally:
        sock.close()  # no PUBACK

    sock, present = raw_connect(broker.port, "raw-sub", clean=False)
    try:
        assert present is True
        first, body = read_packet(sock)
        assert first == 0x3A  # PUBLISH, QoS 1, DUP
        assert body == encode_str("r/t") + packet_id + b"payload"
        sock.sendall(encode_packet(0x40, packet_id))
        sock.sendall(encode_packet(0xE0, b""))
    finally:
        sock.close()


def test_session_takeover(make: Any) -> None:
    first = make("same-id", protocol=mqtt.MQTTv5, reconnect=False)
    second = make("same-id", protocol=mqtt.MQTTv5, reconnect=False)
    assert first.disconnected.wait(WAIT_S), "old connection was not closed"
    assert first.disconnect_reason is not None and first.disconnect_reason.value == 0x8E
    second.subscribe("still/works")
    make("pub").publish("still/works", b"yes")
    assert second.get().payload == b"yes"
    assert not second.disconnected.is_set()


def test_malformed_packets_close_only_that_connection(broker: Broker, make: Any) -> None:
    sub = make("sub")
    sub.subscribe("ok")
    bad_length = socket.create_connection((HOST, broker.port), timeout=WAIT_S)
    too_big = socket.create_connection((HOST, broker.port), timeout=WAIT_S)
    not_connect = socket.create_connection((HOST, broker.port), timeout=WAIT_S)
    try:
        bad_length.sendall(b"\x10\xff\xff\xff\xff\x01")
        too_big.sendall(b"\x10" + encode_varint(MAX_PACKET_BYTES + 1))
        not_connect.sendall(encode_packet(0x30, encode_str("ok") + b"sneaky"))
        for sock in (bad_length, too_big, not_connect):
            assert_closed_by_peer(sock)
    finally:
        for sock in (bad_length, too_big, not_connect):
            sock.close()
    make("pub").publish("ok", b"fine")
    assert sub.get().payload == b"fine"


def test_accepted_sockets_use_tcp_nodelay(broker: Broker, make: Any) -> None:
    make("c1")
    conns = list(broker._connections)
    assert conns
    for conn in conns:
        assert conn.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


@pytest.mark.skipif(os.name == "nt", reason="uses SIGTERM")
def test_main_runs_as_module() -> None:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "tools")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fleetctl.broker", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + WAIT_S
        while True:
            try:
                sock, _ = raw_connect(port, "probe")
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.05)
        sock.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=WAIT_S) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=WAIT_S)
        assert proc.stderr is not None
        proc.stderr.close()
