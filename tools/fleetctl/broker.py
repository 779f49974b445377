"""Embedded pure-Python MQTT broker for development and demos.

Use this when Mosquitto is not installed::

    python -m fleetctl.broker --port 1883

or from Python::

    with Broker(port=0) as broker:
        connect_clients_to("127.0.0.1", broker.port)

Supported:

* MQTT 3.1.1 (protocol level 4, also accepts MQTT 3.1 / level 3) and MQTT 5
  (level 5) on plain TCP. MQTT 5 properties are parsed everywhere they can
  appear; application properties on PUBLISH and Will messages (user
  properties, content type, response topic, correlation data, payload format,
  message expiry) are forwarded to MQTT 5 subscribers.
* CONNECT/CONNACK (session-present flag), PUBLISH QoS 0/1 and inbound QoS 2
  (PUBREC/PUBREL/PUBCOMP; outbound delivery is capped at QoS 1), PUBACK,
  SUBSCRIBE/SUBACK (granted QoS = min(requested, 1)), UNSUBSCRIBE/UNSUBACK,
  PINGREQ/PINGRESP and DISCONNECT (a normal DISCONNECT suppresses the will;
  MQTT 5 reason code 0x04 keeps it).
* Retained messages (an empty payload clears), delivered on subscribe, with
  MQTT 5 retain handling, retain-as-published and no-local options.
* ``+``/``#`` topic filters; ``$``-topics are not matched by a leading wildcard.
* Last Will, published when a client goes away without DISCONNECT (socket
  closed, error, malformed packet, keepalive expiry at 1.5 x keepalive or
  session takeover), honouring the will's retain flag and the MQTT 5 Will
  Delay Interval.
* Persistent sessions (clean session / clean start = 0; for MQTT 5 a Session
  Expiry Interval > 0): subscriptions are kept and QoS 1 messages are queued
  while the client is offline (at most ``MAX_QUEUED_MESSAGES`` per session,
  oldest dropped); unacknowledged QoS 1 messages are re-sent with DUP on
  reconnect. A new connection with a client id already connected takes the
  session over and the old connection is closed.

Not supported (development use only, never expose it to a network you do not
trust): authentication/authorisation (username and password are ignored),
TLS, WebSockets, MQTT 5 enhanced authentication (AUTH), shared subscriptions
(``$share/...``), subscription identifiers, outbound topic aliases, outbound
QoS 2, persistence to disk (all state is lost on stop), and ``$SYS`` topics.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import selectors
import signal
import socket
import struct
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import FrameType, TracebackType

log = logging.getLogger(__name__)

# --- Limits and timings ----------------------------------------------------

MAX_PACKET_BYTES = 16 * 1024 * 1024
"""Largest accepted MQTT packet (fixed header + remaining length), in bytes."""
MAX_QUEUED_MESSAGES = 10_000
"""QoS 1 messages queued per session beyond the in-flight window; oldest dropped."""
MAX_INFLIGHT_MESSAGES = 1_000
"""Unacknowledged outbound QoS 1 messages per session (capped by Receive Maximum)."""
MAX_OUTBOUND_QUEUE_BYTES = 64 * 1024 * 1024
"""Bytes buffered for one connection's writer before it is dropped as too slow."""
SEND_TIMEOUT_S = 10.0
"""Seconds a blocked send may take before the (slow) connection is dropped."""
CONNECT_TIMEOUT_S = 10.0
"""Seconds a new TCP connection has to send its CONNECT packet."""
KEEPALIVE_GRACE_FACTOR = 1.5
"""A client is dropped after this many keepalive periods without any packet."""
POLL_INTERVAL_S = 0.25
"""Seconds between checks of stop flags / session expiry in blocking loops."""
THREAD_JOIN_TIMEOUT_S = 2.0
"""Seconds stop() waits for each background thread."""
RECV_CHUNK_BYTES = 64 * 1024
"""Bytes requested per recv() call."""
LISTEN_BACKLOG = 128
"""Pending TCP connections the listening socket queues."""
SESSION_NEVER_EXPIRES = 0xFFFFFFFF
"""MQTT 5 Session Expiry Interval value meaning 'never', in seconds."""
DEFAULT_PORT = 1883
"""Standard MQTT TCP port used by main()."""

# --- Protocol constants ----------------------------------------------------

PROTOCOL_MQTT31 = 3
PROTOCOL_MQTT311 = 4
PROTOCOL_MQTT5 = 5

CONNECT = 1
CONNACK = 2
PUBLISH = 3
PUBACK = 4
PUBREC = 5
PUBREL = 6
PUBCOMP = 7
SUBSCRIBE = 8
SUBACK = 9
UNSUBSCRIBE = 10
UNSUBACK = 11
PINGREQ = 12
PINGRESP = 13
DISCONNECT = 14
AUTH = 15

# MQTT 3.1.1 CONNACK return codes.
CONNACK_V3_ACCEPTED = 0x00
CONNACK_V3_BAD_PROTOCOL = 0x01
CONNACK_V3_ID_REJECTED = 0x02

# MQTT 5 reason codes used here.
RC_SUCCESS = 0x00
RC_NO_SUBSCRIPTION_EXISTED = 0x11
RC_DISCONNECT_WITH_WILL = 0x04
RC_UNSPECIFIED_ERROR = 0x80
RC_MALFORMED_PACKET = 0x81
RC_PROTOCOL_ERROR = 0x82
RC_UNSUPPORTED_PROTOCOL_VERSION = 0x84
RC_CLIENT_ID_NOT_VALID = 0x85
RC_BAD_AUTH_METHOD = 0x8C
RC_KEEPALIVE_TIMEOUT = 0x8D
RC_SESSION_TAKEN_OVER = 0x8E
RC_TOPIC_FILTER_INVALID = 0x8F
RC_PACKET_TOO_LARGE = 0x95
RC_SHARED_SUBS_NOT_SUPPORTED = 0x9E
SUBACK_V3_FAILURE = 0x80

# MQTT 5 property identifiers.
PROP_PAYLOAD_FORMAT = 0x01
PROP_MESSAGE_EXPIRY = 0x02
PROP_CONTENT_TYPE = 0x03
PROP_RESPONSE_TOPIC = 0x08
PROP_CORRELATION_DATA = 0x09
PROP_SUBSCRIPTION_ID = 0x0B
PROP_SESSION_EXPIRY = 0x11
PROP_ASSIGNED_CLIENT_ID = 0x12
PROP_AUTH_METHOD = 0x15
PROP_WILL_DELAY = 0x18
PROP_REASON_STRING = 0x1F
PROP_RECEIVE_MAXIMUM = 0x21
PROP_TOPIC_ALIAS_MAXIMUM = 0x22
PROP_TOPIC_ALIAS = 0x23
PROP_USER_PROPERTY = 0x26
PROP_MAXIMUM_PACKET_SIZE = 0x27
PROP_SUB_ID_AVAILABLE = 0x29
PROP_SHARED_SUB_AVAILABLE = 0x2A

_PROP_BYTE = frozenset({0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A})
_PROP_U16 = frozenset({0x13, 0x21, 0x22, 0x23})
_PROP_U32 = frozenset({0x02, 0x11, 0x18, 0x27})
_PROP_VBI = frozenset({0x0B})
_PROP_STR = frozenset({0x03, 0x08, 0x12, 0x15, 0x1A, 0x1C, 0x1F})
_PROP_BIN = frozenset({0x09, 0x16})
_PROP_PAIR = frozenset({0x26})
# Properties of a PUBLISH / Will forwarded verbatim to MQTT 5 subscribers
# (message expiry is re-encoded with the remaining lifetime).
_FORWARDED_PROPS = frozenset(
    {PROP_PAYLOAD_FORMAT, PROP_CONTENT_TYPE, PROP_RESPONSE_TOPIC, PROP_CORRELATION_DATA, PROP_USER_PROPERTY}
)


class MalformedPacket(Exception):
    """A packet violates the MQTT wire format or protocol rules."""

    def __init__(self, message: str, reason_code: int = RC_MALFORMED_PACKET) -> None:
        super().__init__(message)
        self.reason_code = reason_code


# --- Wire encoding helpers -------------------------------------------------


def encode_varint(value: int) -> bytes:
    """Encode an MQTT Variable Byte Integer (0 .. 268435455)."""
    if not 0 <= value <= 268_435_455:
        raise ValueError(f"variable byte integer out of range: {value}")
    out = bytearray()
    while True:
        byte, value = value % 128, value // 128
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode_str(text: str) -> bytes:
    """Encode an MQTT UTF-8 string (2-byte length prefix)."""
    return encode_bin(text.encode("utf-8"))


def encode_bin(data: bytes) -> bytes:
    """Encode MQTT binary data (2-byte length prefix)."""
    if len(data) > 0xFFFF:
        raise ValueError("string/binary field longer than 65535 bytes")
    return struct.pack("!H", len(data)) + data


def encode_packet(first_byte: int, body: bytes) -> bytes:
    """Prefix ``body`` with the fixed header."""
    return bytes((first_byte,)) + encode_varint(len(body)) + body


def encode_props(raw: bytes) -> bytes:
    """Wrap raw encoded properties with their length prefix."""
    return encode_varint(len(raw)) + raw


class PacketReader:
    """Bounds-checked cursor over a packet body."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def _take(self, count: int) -> bytes:
        end = self.pos + count
        if end > len(self.data):
            raise MalformedPacket("packet truncated")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def remaining(self) -> int:
        return len(self.data) - self.pos

    def u8(self) -> int:
        return self._take(1)[0]

    def u16(self) -> int:
        value: int = struct.unpack("!H", self._take(2))[0]
        return value

    def u32(self) -> int:
        value: int = struct.unpack("!I", self._take(4))[0]
        return value

    def varint(self) -> int:
        value = 0
        for shift in range(0, 28, 7):
            byte = self.u8()
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
        raise MalformedPacket("variable byte integer longer than 4 bytes")

    def binary(self) -> bytes:
        return self._take(self.u16())

    def string(self) -> str:
        raw = self.binary()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MalformedPacket("invalid UTF-8 string") from exc
        if "\x00" in text:
            raise MalformedPacket("NUL character in string")
        return text

    def rest(self) -> bytes:
        return self._take(self.remaining())

    def properties(self) -> Properties:
        length = self.varint()
        return Properties.parse(self._take(length))


@dataclass
class Properties:
    """Parsed MQTT 5 properties: decoded values plus each property's raw bytes."""

    values: dict[int, int | str | bytes] = field(default_factory=dict)
    raw: list[tuple[int, bytes]] = field(default_factory=list)

    @classmethod
    def parse(cls, data: bytes) -> Properties:
        props = cls()
        reader = PacketReader(data)
        while reader.remaining():
            start = reader.pos
            ident = reader.varint()
            value: int | str | bytes
            if ident in _PROP_BYTE:
                value = reader.u8()
            elif ident in _PROP_U16:
                value = reader.u16()
            elif ident in _PROP_U32:
                value = reader.u32()
            elif ident in _PROP_VBI:
                value = reader.varint()
            elif ident in _PROP_STR:
                value = reader.string()
            elif ident in _PROP_BIN:
                value = reader.binary()
            elif ident in _PROP_PAIR:
                reader.string()
                value = reader.string()
            else:
                raise MalformedPacket(f"unknown property identifier 0x{ident:02x}")
            if ident in props.values and ident not in (PROP_USER_PROPERTY, PROP_SUBSCRIPTION_ID):
                raise MalformedPacket(f"duplicate property 0x{ident:02x}", RC_PROTOCOL_ERROR)
            props.values[ident] = value
            props.raw.append((ident, data[start : reader.pos]))
        return props

    def get_int(self, ident: int, default: int) -> int:
        value = self.values.get(ident, default)
        return value if isinstance(value, int) else default

    def forwardable(self) -> bytes:
        return b"".join(raw for ident, raw in self.raw if ident in _FORWARDED_PROPS)


# --- Topics ------------------------------------------------------------------


def valid_topic_name(topic: str) -> bool:
    """True when ``topic`` may be used in a PUBLISH (non-empty, no wildcards)."""
    return bool(topic) and "+" not in topic and "#" not in topic


def valid_topic_filter(topic_filter: str) -> bool:
    """True when ``topic_filter`` is a well-formed subscription filter."""
    if not topic_filter:
        return False
    levels = topic_filter.split("/")
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
    return True


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT topic filter matching (``+`` one level, ``#`` this level and below)."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    filter_levels = topic_filter.split("/")
    topic_levels = topic.split("/")
    for index, level in enumerate(filter_levels):
        if level == "#":
            return True
        if index >= len(topic_levels):
            return False
        if level != "+" and level != topic_levels[index]:
            return False
    return len(filter_levels) == len(topic_levels)


# --- Broker state --------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    """An application message as routed by the broker."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    props: bytes = b""
    """Forwardable raw MQTT 5 properties (without message expiry)."""
    expires_at: float | None = None
    """time.monotonic() deadline from the Message Expiry Interval, if any."""
    origin: str = ""
    """Client id of the publisher (for the MQTT 5 no-local option)."""

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at


@dataclass(frozen=True)
class Delivery:
    """A message on its way to one session, with the QoS/retain it is sent with."""

    message: Message
    qos: int
    retain: bool


@dataclass
class Subscription:
    qos: int
    no_local: bool = False
    retain_as_published: bool = False
    retain_handling: int = 0


@dataclass
class Will:
    message: Message
    delay_s: int = 0
    """MQTT 5 Will Delay Interval, in seconds."""
    expiry_s: int | None = None
    """MQTT 5 Message Expiry Interval of the will, counted from when it is published."""

    def message_now(self) -> Message:
        """The will as published now (starts its message-expiry clock)."""
        if self.expiry_s is None:
            return self.message
        return dataclasses.replace(self.message, expires_at=time.monotonic() + self.expiry_s)


@dataclass
class Session:
    client_id: str
    expiry_s: int = 0
    subscriptions: dict[str, Subscription] = field(default_factory=dict)
    inflight: dict[int, Delivery] = field(default_factory=dict)
    """Outbound QoS 1 messages sent (or to re-send) and not yet acknowledged."""
    pending: deque[Delivery] = field(default_factory=deque)
    """Outbound QoS 1 messages waiting for an in-flight slot or a connection."""
    awaiting_pubrel: set[int] = field(default_factory=set)
    """Inbound QoS 2 packet ids already routed, waiting for PUBREL."""
    connection: Connection | None = None
    expires_at: float | None = None
    delayed_will: Will | None = None
    will_due_at: float = 0.0
    dropped: int = 0
    next_packet_id: int = 1

    def allocate_packet_id(self) -> int:
        for _ in range(0xFFFF):
            packet_id = self.next_packet_id
            self.next_packet_id = packet_id % 0xFFFF + 1
            if packet_id not in self.inflight:
                return packet_id
        raise RuntimeError("no free packet identifier")


class Connection:
    """One client TCP connection: a reader thread and a writer thread."""

    def __init__(self, broker: Broker, sock: socket.socket, peer: str) -> None:
        self.broker = broker
        self.sock = sock
        self.peer = peer
        self.client_id = ""
        self.protocol = PROTOCOL_MQTT311
        self.keepalive_s = 0
        self.connected = False
        self.session: Session | None = None
        self.will: Will | None = None
        self.max_inflight = MAX_INFLIGHT_MESSAGES
        self.max_packet_bytes = MAX_PACKET_BYTES
        self.topic_aliases: dict[int, str] = {}
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._outbox: deque[bytes] = deque()
        self._outbox_bytes = 0
        self._closing = False
        self._closed = False
        self.reader = threading.Thread(target=self._read_loop, name=f"mqtt-read-{peer}", daemon=True)
        self.writer = threading.Thread(target=self._write_loop, name=f"mqtt-write-{peer}", daemon=True)

    @property
    def v5(self) -> bool:
        return self.protocol == PROTOCOL_MQTT5

    @property
    def closed(self) -> bool:
        return self._closed

    def start(self) -> None:
        self.writer.start()
        self.reader.start()

    # -- output ------------------------------------------------------------

    def send(self, packet: bytes) -> None:
        """Queue ``packet`` for the writer thread (never blocks on the socket)."""
        with self._lock:
            if self._closed or self._closing:
                return
            self._outbox.append(packet)
            self._outbox_bytes += len(packet)
            too_slow = self._outbox_bytes > MAX_OUTBOUND_QUEUE_BYTES
            self._wakeup.notify()
        if too_slow:
            log.warning("client %r (%s) is not reading; dropping connection", self.client_id, self.peer)
            self.close()

    def close(self, flush: bool = False) -> None:
        """Close the connection; with ``flush`` the queued output is sent first."""
        with self._lock:
            if self._closed:
                return
            if flush:
                self._closing = True
                self._wakeup.notify()
                return
            self._closed = True
            self._wakeup.notify()
        self._shutdown_socket()

    def _shutdown_socket(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def _write_loop(self) -> None:
        while True:
            with self._lock:
                while not self._outbox and not self._closed and not self._closing:
                    self._wakeup.wait()
                if self._closed:
                    return
                if not self._outbox:  # closing and fully flushed
                    self._closed = True
                    break
                data = b"".join(self._outbox)
                self._outbox.clear()
                self._outbox_bytes = 0
            try:
                self.sock.sendall(data)
            except OSError as exc:  # includes TimeoutError after SEND_TIMEOUT_S
                log.info("send to %r (%s) failed: %s", self.client_id, self.peer, exc)
                self.close()
                return
        self._shutdown_socket()

    # -- input -------------------------------------------------------------

    def _read_loop(self) -> None:
        graceful = False
        try:
            graceful = self._read_packets()
        except MalformedPacket as exc:
            log.warning("closing %r (%s): %s", self.client_id, self.peer, exc)
            if self.connected and self.v5:
                self.send(encode_packet(DISCONNECT << 4, bytes((exc.reason_code, 0))))
        except OSError as exc:
            log.debug("connection %r (%s) error: %s", self.client_id, self.peer, exc)
        except Exception:
            log.exception("unexpected error on connection %r (%s)", self.client_id, self.peer)
        finally:
            self.close(flush=True)
            self.broker._connection_lost(self, graceful)
            self.writer.join(SEND_TIMEOUT_S + THREAD_JOIN_TIMEOUT_S)
            self.close()
            with contextlib.suppress(OSError):
                self.sock.close()
            log.debug("connection %r (%s) finished", self.client_id, self.peer)

    def _read_packets(self) -> bool:
        """Read and dispatch packets; True when the client sent DISCONNECT."""
        buf = bytearray()
        last_rx = time.monotonic()
        with selectors.DefaultSelector() as selector:
            selector.register(self.sock, selectors.EVENT_READ)
            while not self._closed and not self._closing:
                now = time.monotonic()
                if not self.connected:
                    deadline: float | None = last_rx + CONNECT_TIMEOUT_S
                elif self.keepalive_s:
                    deadline = last_rx + self.keepalive_s * KEEPALIVE_GRACE_FACTOR
                else:
                    deadline = None
                if deadline is not None and now >= deadline:
                    log.info("client %r (%s) timed out", self.client_id, self.peer)
                    if self.connected and self.v5:
                        self.send(encode_packet(DISCONNECT << 4, bytes((RC_KEEPALIVE_TIMEOUT, 0))))
                    return False
                wait = POLL_INTERVAL_S if deadline is None else min(POLL_INTERVAL_S, deadline - now)
                if not selector.select(wait):
                    continue
                chunk = self.sock.recv(RECV_CHUNK_BYTES)
                if not chunk:
                    return False
                last_rx = time.monotonic()
                buf += chunk
                while True:
                    packet = _split_packet(buf)
                    if packet is None:
                        break
                    first_byte, body = packet
                    if self.broker._handle_packet(self, first_byte, body):
                        return True
        return False


def _split_packet(buf: bytearray) -> tuple[int, bytes] | None:
    """Remove and return one complete packet from ``buf`` (None if incomplete)."""
    if len(buf) < 2:
        return None
    length = 0
    for index in range(1, 5):
        if index >= len(buf):
            return None
        byte = buf[index]
        length |= (byte & 0x7F) << (7 * (index - 1))
        if not byte & 0x80:
            header = index + 1
            break
    else:
        raise MalformedPacket("remaining length longer than 4 bytes")
    if header + length > MAX_PACKET_BYTES:
        raise MalformedPacket(f"packet of {header + length} bytes exceeds {MAX_PACKET_BYTES}", RC_PACKET_TOO_LARGE)
    if len(buf) < header + length:
        return None
    first_byte = buf[0]
    body = bytes(buf[header : header + length])
    del buf[: header + length]
    return first_byte, body


# --- Broker ----------------------------------------------------------------------


class Broker:
    """A small threaded MQTT 3.1.1 / 5 broker (development use only)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self._requested_port = port
        self._lock = threading.RLock()
        self._sessions: dict[str, Session] = {}
        self._retained: dict[str, Message] = {}
        self._connections: set[Connection] = set()
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._stopping = threading.Event()
        self._port: int | None = None

    # -- lifecycle -------------------------------------------------------

    @property
    def port(self) -> int:
        """The TCP port actually bound (valid after start())."""
        if self._port is None:
            raise RuntimeError("broker is not started")
        return self._port

    def start(self) -> None:
        """Bind, listen and serve in background threads; returns once listening."""
        if self._listener is not None:
            raise RuntimeError("broker already started")
        listener = socket.create_server((self.host, self._requested_port), backlog=LISTEN_BACKLOG)
        listener.setblocking(False)
        self._listener = listener
        self._wake_r, self._wake_w = socket.socketpair()
        self._port = listener.getsockname()[1]
        self._stopping.clear()
        self._accept_thread = threading.Thread(target=self._accept_loop, name="mqtt-accept", daemon=True)
        self._accept_thread.start()
        log.info("dev MQTT broker listening on %s:%d (no auth, no TLS)", self.host, self._port)

    def stop(self) -> None:
        """Close the listener and every connection; join threads with timeouts."""
        if self._listener is None:
            return
        self._stopping.set()
        if self._wake_w is not None:
            with contextlib.suppress(OSError):
                self._wake_w.send(b"x")
        if self._accept_thread is not None:
            self._accept_thread.join(THREAD_JOIN_TIMEOUT_S)
        for sock in (self._listener, self._wake_r, self._wake_w):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            conn.close()
        for conn in connections:
            conn.reader.join(THREAD_JOIN_TIMEOUT_S)
            conn.writer.join(THREAD_JOIN_TIMEOUT_S)
        with self._lock:
            self._sessions.clear()
            self._retained.clear()
            self._connections.clear()
        self._listener = self._wake_r = self._wake_w = None
        self._accept_thread = None
        log.info("dev MQTT broker on port %s stopped", self._port)

    def __enter__(self) -> Broker:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _accept_loop(self) -> None:
        listener, wake = self._listener, self._wake_r
        assert listener is not None and wake is not None
        with selectors.DefaultSelector() as selector:
            selector.register(listener, selectors.EVENT_READ)
            selector.register(wake, selectors.EVENT_READ)
            while not self._stopping.is_set():
                self._expire_sessions()
                if not any(key.fileobj is listener for key, _ in selector.select(POLL_INTERVAL_S)):
                    continue
                try:
                    sock, addr = listener.accept()
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as exc:
                    if not self._stopping.is_set():
                        log.error("accept failed: %s", exc)
                        time.sleep(POLL_INTERVAL_S)
                    continue
                self._add_connection(sock, f"{addr[0]}:{addr[1]}")

    def _add_connection(self, sock: socket.socket, peer: str) -> None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(SEND_TIMEOUT_S)  # bounds sendall(); reads use a selector
        except OSError as exc:
            log.info("dropping connection from %s: %s", peer, exc)
            sock.close()
            return
        conn = Connection(self, sock, peer)
        with self._lock:
            if self._stopping.is_set():
                sock.close()
                return
            self._connections.add(conn)
        log.debug("accepted connection from %s", peer)
        conn.start()

    def _expire_sessions(self) -> None:
        now = time.monotonic()
        with self._lock:
            for session in list(self._sessions.values()):
                if session.connection is not None:
                    continue
                if session.delayed_will is not None and now >= session.will_due_at:
                    will, session.delayed_will = session.delayed_will, None
                    self._publish(will.message_now())
                if session.expires_at is not None and now >= session.expires_at:
                    log.debug("session %r expired", session.client_id)
                    self._end_session(session)

    def _end_session(self, session: Session) -> None:
        if session.delayed_will is not None:
            will, session.delayed_will = session.delayed_will, None
            self._publish(will.message_now())
        if self._sessions.get(session.client_id) is session:
            del self._sessions[session.client_id]

    # -- connection events ----------------------------------------------

    def _connection_lost(self, conn: Connection, graceful: bool) -> None:
        with self._lock:
            self._connections.discard(conn)
            session = conn.session
            if session is None or session.connection is not conn:
                return  # never connected, or the session was taken over
            session.connection = None
            will, conn.will = conn.will, None
            if self._stopping.is_set():
                return
            log.info(
                "client %r (%s) disconnected%s",
                conn.client_id,
                conn.peer,
                "" if graceful else " unexpectedly",
            )
            now = time.monotonic()
            if will is not None:
                delay = min(will.delay_s, session.expiry_s)
                if delay > 0:
                    session.delayed_will = will
                    session.will_due_at = now + delay
                else:
                    self._publish(will.message_now())
            if session.expiry_s == 0:
                self._end_session(session)
            elif session.expiry_s != SESSION_NEVER_EXPIRES:
                session.expires_at = now + session.expiry_s

    def _handle_packet(self, conn: Connection, first_byte: int, body: bytes) -> bool:
        """Dispatch one packet; returns True on a client DISCONNECT."""
        packet_type = first_byte >> 4
        flags = first_byte & 0x0F
        with self._lock:
            if not conn.connected:
                if packet_type != CONNECT:
                    raise MalformedPacket("first packet is not CONNECT", RC_PROTOCOL_ERROR)
                self._on_connect(conn, body)
                return False
            if conn.session is None or conn.session.connection is not conn or conn.closed:
                return False  # taken over: ignore whatever the old client still sends
            session = conn.session
            reader = PacketReader(body)
            if packet_type == PUBLISH:
                self._on_publish(conn, session, flags, reader)
            elif packet_type == PUBACK:
                session.inflight.pop(reader.u16(), None)
                self._pump(session)
            elif packet_type == PUBREL:
                if flags != 0x02:
                    raise MalformedPacket("bad PUBREL flags")
                packet_id = reader.u16()
                session.awaiting_pubrel.discard(packet_id)
                conn.send(encode_packet(PUBCOMP << 4, struct.pack("!H", packet_id)))
            elif packet_type in (PUBREC, PUBCOMP):
                # We never send QoS 2, so there is nothing to continue; ignore.
                log.debug("ignoring unexpected packet type %d from %r", packet_type, conn.client_id)
            elif packet_type == SUBSCRIBE:
                if flags != 0x02:
                    raise MalformedPacket("bad SUBSCRIBE flags")
                self._on_subscribe(conn, session, reader)
            elif packet_type == UNSUBSCRIBE:
                if flags != 0x02:
                    raise MalformedPacket("bad UNSUBSCRIBE flags")
                self._on_unsubscribe(conn, session, reader)
            elif packet_type == PINGREQ:
                conn.send(encode_packet(PINGRESP << 4, b""))
            elif packet_type == DISCONNECT:
                self._on_disconnect(conn, session, reader)
                return True
            elif packet_type == CONNECT:
                raise MalformedPacket("second CONNECT", RC_PROTOCOL_ERROR)
            else:
                raise MalformedPacket(f"unsupported packet type {packet_type}", RC_PROTOCOL_ERROR)
        return False

    def _on_connect(self, conn: Connection, body: bytes) -> None:
        reader = PacketReader(body)
        protocol_name = reader.string()
        level = reader.u8()
        if (protocol_name, level) not in (("MQTT", PROTOCOL_MQTT311), ("MQTT", PROTOCOL_MQTT5), ("MQIsdp", PROTOCOL_MQTT31)):
            log.warning("rejecting %s: unsupported protocol %r level %d", conn.peer, protocol_name, level)
            if level == PROTOCOL_MQTT5:
                conn.send(encode_packet(CONNACK << 4, bytes((0, RC_UNSUPPORTED_PROTOCOL_VERSION, 0))))
            else:
                conn.send(encode_packet(CONNACK << 4, bytes((0, CONNACK_V3_BAD_PROTOCOL))))
            conn.close(flush=True)
            return
        conn.protocol = level
        flags = reader.u8()
        if flags & 0x01:
            raise MalformedPacket("reserved CONNECT flag set")
        clean_start = bool(flags & 0x02)
        will_flag = bool(flags & 0x04)
        will_qos = (flags >> 3) & 0x03
        will_retain = bool(flags & 0x20)
        if will_qos > 2 or (not will_flag and (will_qos or will_retain)):
            raise MalformedPacket("invalid will flags")
        conn.keepalive_s = reader.u16()
        props = reader.properties() if conn.v5 else Properties()
        client_id = reader.string()
        will: Will | None = None
        if will_flag:
            will_props = reader.properties() if conn.v5 else Properties()
            will_topic = reader.string()
            will_payload = reader.binary()
            if not valid_topic_name(will_topic):
                raise MalformedPacket(f"invalid will topic {will_topic!r}")
            will_expiry = will_props.values.get(PROP_MESSAGE_EXPIRY)
            will_props.values.pop(PROP_MESSAGE_EXPIRY, None)
            will = Will(
                message=_make_message(will_topic, will_payload, will_qos, will_retain, will_props, client_id),
                delay_s=will_props.get_int(PROP_WILL_DELAY, 0),
                expiry_s=will_expiry if isinstance(will_expiry, int) else None,
            )
        if flags & 0x80:
            reader.binary()  # username: ignored (no auth)
        if flags & 0x40:
            reader.binary()  # password: ignored (no auth)

        if PROP_AUTH_METHOD in props.values:
            conn.send(encode_packet(CONNACK << 4, bytes((0, RC_BAD_AUTH_METHOD, 0))))
            conn.close(flush=True)
            return

        assigned_id = ""
        if not client_id:
            if not conn.v5 and not clean_start:
                conn.send(encode_packet(CONNACK << 4, bytes((0, CONNACK_V3_ID_REJECTED))))
                conn.close(flush=True)
                return
            client_id = assigned_id = f"devbroker-{uuid.uuid4().hex[:16]}"
            if will is not None:
                will = dataclasses.replace(will, message=dataclasses.replace(will.message, origin=client_id))

        if conn.v5:
            expiry_s = props.get_int(PROP_SESSION_EXPIRY, 0)
            receive_max = props.get_int(PROP_RECEIVE_MAXIMUM, 0xFFFF)
            if receive_max == 0:
                raise MalformedPacket("Receive Maximum of 0", RC_PROTOCOL_ERROR)
            conn.max_inflight = min(receive_max, MAX_INFLIGHT_MESSAGES)
            conn.max_packet_bytes = min(props.get_int(PROP_MAXIMUM_PACKET_SIZE, MAX_PACKET_BYTES), MAX_PACKET_BYTES)
        else:
            expiry_s = 0 if clean_start else SESSION_NEVER_EXPIRES

        conn.client_id = client_id
        conn.will = will
        now = time.monotonic()

        session = self._sessions.get(client_id)
        if session is not None and session.connection is not None:
            old = session.connection
            log.info("client %r: session taken over by %s (was %s)", client_id, conn.peer, old.peer)
            session.connection = None
            old_will, old.will = old.will, None
            if old_will is not None and old_will.delay_s == 0:
                self._publish(old_will.message_now())
            if old.v5:
                old.send(encode_packet(DISCONNECT << 4, bytes((RC_SESSION_TAKEN_OVER, 0))))
            old.close(flush=True)
        if session is not None and session.expires_at is not None and now >= session.expires_at:
            self._end_session(session)
            session = None
        if session is not None and clean_start:
            self._end_session(session)
            session = None

        session_present = session is not None
        if session is None:
            session = Session(client_id=client_id)
            self._sessions[client_id] = session
        session.delayed_will = None  # reconnecting cancels a delayed will
        session.expiry_s = expiry_s
        session.expires_at = None
        session.connection = conn
        conn.session = session
        conn.connected = True

        if conn.v5:
            connack_props = bytearray()
            if assigned_id:
                connack_props += bytes((PROP_ASSIGNED_CLIENT_ID,)) + encode_str(assigned_id)
            connack_props += bytes((PROP_SUB_ID_AVAILABLE, 0, PROP_SHARED_SUB_AVAILABLE, 0))
            body_out = bytes((int(session_present), RC_SUCCESS)) + encode_props(bytes(connack_props))
        else:
            body_out = bytes((int(session_present), CONNACK_V3_ACCEPTED))
        conn.send(encode_packet(CONNACK << 4, body_out))
        log.info(
            "client %r connected from %s (MQTT level %d, clean=%s, session present=%s, keepalive=%ds)",
            client_id,
            conn.peer,
            level,
            clean_start,
            session_present,
            conn.keepalive_s,
        )

        # Resume the session: re-send unacknowledged QoS 1 messages, then the queue.
        for packet_id, delivery in list(session.inflight.items()):
            if delivery.message.expired(now):
                del session.inflight[packet_id]
                continue
            self._send_publish(conn, delivery, packet_id, dup=True)
        self._pump(session)

    def _on_publish(self, conn: Connection, session: Session, flags: int, reader: PacketReader) -> None:
        qos = (flags >> 1) & 0x03
        retain = bool(flags & 0x01)
        if qos == 3:
            raise MalformedPacket("PUBLISH with QoS 3")
        topic = reader.string()
        packet_id = reader.u16() if qos else 0
        if qos and packet_id == 0:
            raise MalformedPacket("PUBLISH with packet id 0")
        props = reader.properties() if conn.v5 else Properties()
        payload = reader.rest()
        alias = props.get_int(PROP_TOPIC_ALIAS, 0)
        if alias:
            if topic:
                conn.topic_aliases[alias] = topic
            elif alias in conn.topic_aliases:
                topic = conn.topic_aliases[alias]
            else:
                raise MalformedPacket(f"unknown topic alias {alias}", RC_PROTOCOL_ERROR)
        if not valid_topic_name(topic):
            raise MalformedPacket(f"invalid topic name {topic!r}", RC_PROTOCOL_ERROR)
        message = _make_message(topic, payload, qos, retain, props, conn.client_id)
        if qos == 2:
            if packet_id not in session.awaiting_pubrel:
                session.awaiting_pubrel.add(packet_id)
                self._publish(message)
            conn.send(encode_packet(PUBREC << 4, struct.pack("!H", packet_id)))
            return
        self._publish(message)
        if qos == 1:
            conn.send(encode_packet(PUBACK << 4, struct.pack("!H", packet_id)))

    def _on_subscribe(self, conn: Connection, session: Session, reader: PacketReader) -> None:
        packet_id = reader.u16()
        if conn.v5:
            reader.properties()  # subscription identifiers / user properties: ignored
        requests: list[tuple[str, int]] = []
        while reader.remaining():
            requests.append((reader.string(), reader.u8()))
        if not requests:
            raise MalformedPacket("SUBSCRIBE without topic filters", RC_PROTOCOL_ERROR)
        codes = bytearray()
        retained_out: list[tuple[str, Subscription]] = []
        for topic_filter, options in requests:
            if options & (0xC0 if conn.v5 else 0xFC) or (options & 0x03) == 3:
                raise MalformedPacket("invalid subscription options")
            if conn.v5 and topic_filter.startswith("$share/"):
                codes.append(RC_SHARED_SUBS_NOT_SUPPORTED)
                continue
            if not valid_topic_filter(topic_filter):
                codes.append(RC_TOPIC_FILTER_INVALID if conn.v5 else SUBACK_V3_FAILURE)
                continue
            granted = min(options & 0x03, 1)
            sub = Subscription(
                qos=granted,
                no_local=conn.v5 and bool(options & 0x04),
                retain_as_published=conn.v5 and bool(options & 0x08),
                retain_handling=(options >> 4) & 0x03 if conn.v5 else 0,
            )
            existed = topic_filter in session.subscriptions
            session.subscriptions[topic_filter] = sub
            codes.append(granted)
            if sub.retain_handling == 0 or (sub.retain_handling == 1 and not existed):
                retained_out.append((topic_filter, sub))
            log.debug("client %r subscribed to %r (QoS %d)", conn.client_id, topic_filter, granted)
        ack = struct.pack("!H", packet_id) + (encode_props(b"") if conn.v5 else b"") + bytes(codes)
        conn.send(encode_packet(SUBACK << 4, ack))
        now = time.monotonic()
        for topic_filter, sub in retained_out:
            for message in list(self._retained.values()):
                if message.expired(now) or not topic_matches(topic_filter, message.topic):
                    continue
                self._deliver(session, Delivery(message, min(message.qos, sub.qos), True))

    def _on_unsubscribe(self, conn: Connection, session: Session, reader: PacketReader) -> None:
        packet_id = reader.u16()
        if conn.v5:
            reader.properties()
        codes = bytearray()
        filters = []
        while reader.remaining():
            filters.append(reader.string())
        if not filters:
            raise MalformedPacket("UNSUBSCRIBE without topic filters", RC_PROTOCOL_ERROR)
        for topic_filter in filters:
            existed = session.subscriptions.pop(topic_filter, None) is not None
            codes.append(RC_SUCCESS if existed else RC_NO_SUBSCRIPTION_EXISTED)
        if conn.v5:
            ack = struct.pack("!H", packet_id) + encode_props(b"") + bytes(codes)
        else:
            ack = struct.pack("!H", packet_id)
        conn.send(encode_packet(UNSUBACK << 4, ack))

    def _on_disconnect(self, conn: Connection, session: Session, reader: PacketReader) -> None:
        reason = RC_SUCCESS
        if conn.v5 and reader.remaining():
            reason = reader.u8()
            if reader.remaining():
                props = reader.properties()
                if PROP_SESSION_EXPIRY in props.values and session.expiry_s != 0:
                    session.expiry_s = props.get_int(PROP_SESSION_EXPIRY, session.expiry_s)
        if reason != RC_DISCONNECT_WITH_WILL:
            conn.will = None
        log.debug("client %r sent DISCONNECT (reason 0x%02x)", conn.client_id, reason)

    # -- routing ------------------------------------------------------------

    def _publish(self, message: Message) -> None:
        """Store (if retained) and route ``message`` to every matching session."""
        if message.retain:
            if message.payload:
                self._retained[message.topic] = message
            else:
                self._retained.pop(message.topic, None)
        for session in self._sessions.values():
            best: Subscription | None = None
            retain = False
            for topic_filter, sub in session.subscriptions.items():
                if not topic_matches(topic_filter, message.topic):
                    continue
                if sub.no_local and message.origin == session.client_id:
                    continue
                if best is None or sub.qos > best.qos:
                    best = sub
                retain = retain or (sub.retain_as_published and message.retain)
            if best is not None:
                self._deliver(session, Delivery(message, min(message.qos, best.qos), retain))

    def _deliver(self, session: Session, delivery: Delivery) -> None:
        conn = session.connection
        if delivery.qos == 0:
            if conn is not None:
                self._send_publish(conn, delivery, 0, dup=False)
            return
        if conn is not None and not session.pending and len(session.inflight) < conn.max_inflight:
            packet_id = session.allocate_packet_id()
            if self._send_publish(conn, delivery, packet_id, dup=False):
                session.inflight[packet_id] = delivery
            return
        if len(session.pending) >= MAX_QUEUED_MESSAGES:
            session.pending.popleft()
            session.dropped += 1
            if session.dropped == 1 or session.dropped % 1000 == 0:
                log.warning(
                    "session %r queue full (%d messages); dropped %d oldest so far",
                    session.client_id,
                    MAX_QUEUED_MESSAGES,
                    session.dropped,
                )
        session.pending.append(delivery)

    def _pump(self, session: Session) -> None:
        """Move queued QoS 1 messages into free in-flight slots."""
        conn = session.connection
        if conn is None:
            return
        now = time.monotonic()
        while session.pending and len(session.inflight) < conn.max_inflight:
            delivery = session.pending.popleft()
            if delivery.message.expired(now):
                continue
            packet_id = session.allocate_packet_id()
            if self._send_publish(conn, delivery, packet_id, dup=False):
                session.inflight[packet_id] = delivery

    def _send_publish(self, conn: Connection, delivery: Delivery, packet_id: int, dup: bool) -> bool:
        """Encode and queue a PUBLISH; False if it was discarded (expired / too large)."""
        message = delivery.message
        body = bytearray(encode_str(message.topic))
        if delivery.qos:
            body += struct.pack("!H", packet_id)
        if conn.v5:
            props = bytearray(message.props)
            if message.expires_at is not None:
                remaining = message.expires_at - time.monotonic()
                if remaining <= 0:
                    return False
                props += bytes((PROP_MESSAGE_EXPIRY,)) + struct.pack("!I", max(1, round(remaining)))
            body += encode_props(bytes(props))
        body += message.payload
        first_byte = (PUBLISH << 4) | (0x08 if dup else 0) | (delivery.qos << 1) | int(delivery.retain)
        packet = encode_packet(first_byte, bytes(body))
        if len(packet) > conn.max_packet_bytes:
            log.warning("dropping %d-byte message on %r for %r: exceeds its maximum packet size", len(packet), message.topic, conn.client_id)
            return False
        conn.send(packet)
        return True


def _make_message(
    topic: str, payload: bytes, qos: int, retain: bool, props: Properties, origin: str
) -> Message:
    expiry = props.values.get(PROP_MESSAGE_EXPIRY)
    return Message(
        topic=topic,
        payload=payload,
        qos=qos,
        retain=retain,
        props=props.forwardable(),
        expires_at=time.monotonic() + expiry if isinstance(expiry, int) else None,
        origin=origin,
    )


# --- CLI ----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the development broker in the foreground until SIGINT/SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="python -m fleetctl.broker",
        description="Embedded development MQTT broker (MQTT 3.1.1 and 5; no auth, no TLS).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="TCP port, 0 = any free port (default: %(default)s)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    broker = Broker(args.host, args.port)
    try:
        broker.start()
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", args.host, args.port, exc)
        return 1
    if args.host not in ("127.0.0.1", "::1", "localhost"):
        log.warning("listening on %s without authentication or TLS: development use only", args.host)
    try:
        while not stop.wait(POLL_INTERVAL_S):
            pass
    finally:
        broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
