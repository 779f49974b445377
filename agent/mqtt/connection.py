"""The agent's MQTT connection: TLS, Last Will, persistent session, jittered reconnect.

Invariants:
- paho callbacks never block: incoming commands go to a bounded queue, acknowledgements to the
  outbox pump; nothing slow runs on the network thread.
- A command is acknowledged (PUBACK) only once the handler says it is recorded; MQTT 5's Receive
  Maximum (``RECEIVE_MAXIMUM``) keeps the broker from sending more unacknowledged commands than
  the queue has room for, so a flood cannot push a command out (over MQTT 3.1.1 the broker's
  own in-flight limit applies: Mosquitto's ``max_inflight_messages``, 20 by default). As not
  every broker honours it (Mosquitto 2.0.11 does not once acknowledgements flow), reading from
  the socket also pauses while the queue is nearly full (``READ_PAUSE_AT``): TCP holds the
  broker back, and nothing is dropped.
- Every (re)connect publishes the birth status and resubscribes (a broker may have lost the
  session). A refused login is surfaced (state ``refused``) and retried at the slowest rate.
- Reconnect back-off doubles from ``BACKOFF_MIN_S`` to ``BACKOFF_MAX_S`` with full jitter, so a
  fleet that lost its broker does not come back in lock-step.
- Each connection uses a fresh paho client; the durable outbox, not paho's in-memory session,
  decides what is re-sent, so nothing depends on paho's RAM queue.
- TCP_NODELAY is set on the socket: Nagle adds ~40-90 ms to every command round trip.
- The outbox pump publishes rows in id order, at most ``INFLIGHT_WINDOW`` unacknowledged, and
  paces a backlog with a token bucket (``drain_rate_per_s``, bursts of ``DRAIN_BURST``) so a
  drain after an outage cannot flood a cellular link; the live status bypasses the queue. A row
  leaves the outbox only on its PUBACK; a new connection re-sends every unacknowledged row.
- Every connect attempt waits at most ``CONNACK_TIMEOUT_S`` for its CONNACK. Under
  ``protocol = "auto"`` an MQTT 5 attempt that ends without any CONNACK (a 3.1.1-only broker may
  close or ignore an MQTT 5 CONNECT) or with "unsupported protocol version" switches to 3.1.1, logged
  once; the process keeps 3.1.1 for every later reconnect and only a restart tries MQTT 5 again.
- Each connect attempt takes a new ``session`` number (persisted, monotonic: the outbox's
  ``session`` sequence). Its Last Will and every status document published on that connection
  carry it, so a consumer can order status across connects (docs/protocol.md).
- A message on a topic outside the command subscriptions is dropped (some brokers deliver retained
  messages of other clients' subscriptions on connect).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import random
import socket
import sqlite3
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.config import MqttConfig
from agent.logs import RateLimit
from agent.mqtt.queue import MessageQueue, dumps, mqtt_publish_bytes

log = logging.getLogger(__name__)

BACKOFF_MIN_S = 0.5  # first retry soon: most outages are a broker restart
BACKOFF_MAX_S = 60.0  # cap: a fleet of thousands must not hammer a recovering broker
REFUSED_BACKOFF_S = 300.0  # bad credentials will not fix themselves quickly
CONNACK_TIMEOUT_S = 10.0  # CONNECT sent → CONNACK, else the attempt failed (and "auto" tries 3.1.1)
LOOP_TIMEOUT_S = 1.0
INFLIGHT_WINDOW = 32  # outbox rows published and not yet acknowledged
RESEND_AFTER_S = 30.0  # an unacknowledged row is published again after this long
DRAIN_RATE_PER_S = 50.0  # outbox rows per second after an outage (telemetry.drain_rate_per_s)
DRAIN_BURST = 16  # rows sent without pacing, so live messages never wait behind the rate limit
COMMAND_QUEUE_MAX = 256
# MQTT 5 Receive Maximum: the broker sends at most this many QoS 1 commands we have not yet
# acknowledged (we acknowledge only once recorded), so a flood can never overflow the queue and
# push a later command out; the rest of the queue is all QoS 0 messages may take.
RECEIVE_MAXIMUM = COMMAND_QUEUE_MAX // 2
QOS0_QUEUE_MAX = COMMAND_QUEUE_MAX - RECEIVE_MAXIMUM
# Reading pauses while the queue holds this many (one read may bring up to INFLIGHT_WINDOW + 8
# packets: paho reads as many as it has messages in flight).
READ_PAUSE_AT = COMMAND_QUEUE_MAX - 2 * (INFLIGHT_WINDOW + 8)
READ_PAUSE_POLL_S = 0.02
HELD_MAX = 64  # commands kept unacknowledged (not recorded for want of room) and tried again
HELD_RETRY_S = 2.0  # how often the oldest held command is tried again
QUEUE_FULL_LOG_S = 10.0  # the "command queue full" line: at most once per this
PUMP_RETRY_S = 1.0  # the outbox pump waits this long after the outbox failed (full disk), then resumes
ACK_PENDING_MAX = 10_000  # acknowledged rows kept for removal while the outbox cannot delete them
NOT_AUTHORIZED_CODES = {4, 5, 134, 135}  # v3 bad user/pass, not authorized; v5 0x86, 0x87
UNSUPPORTED_PROTOCOL_CODES = {1, 132}  # v3 unacceptable protocol version; v5 0x84


@dataclass
class MqttState:
    connected: bool = False
    state: str = "starting"
    reconnects: int = 0
    last_error: str = ""
    protocol: str = ""
    session: int = 0  # the current connection's session number (status ordering)
    connected_since: float = 0.0
    subscribed: bool = False  # the broker acknowledged every command subscription of this connection
    pending_subs: set[int] = field(default_factory=set)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"connected": self.connected, "subscribed": self.subscribed and self.connected,
                "state": self.state, "reconnects": self.reconnects,
                "last_error": self.last_error, "protocol": self.protocol, "session": self.session}


def backoff_delay(attempt: int, rng: random.Random | None = None) -> float:
    """Full-jitter exponential back-off for the ``attempt``-th consecutive failure."""
    r = rng or random
    cap = min(BACKOFF_MAX_S, BACKOFF_MIN_S * (2 ** min(attempt, 16)))
    return r.uniform(BACKOFF_MIN_S / 2, cap)


class Connection:
    """Owns the MQTT session and the outbox pump."""

    def __init__(self, cfg: MqttConfig, client_id: str, subscriptions: list[str],
                 status_topic: str, birth: Callable[[], dict[str, Any]],
                 will: Callable[[], dict[str, Any]], outbox: MessageQueue,
                 on_command: Callable[[str, bytes, bool], bool]) -> None:
        self.cfg = cfg
        self.client_id = client_id
        self.subscriptions = subscriptions
        self.status_topic = status_topic
        self._birth = birth
        self._will = will
        self.outbox = outbox
        self._on_command = on_command
        self.state = MqttState()
        self._stop = threading.Event()
        self._client: mqtt.Client | None = None
        self._generation = 0
        self._connected_gen = 0  # the last generation whose CONNACK was a success
        self._answered_gen = 0  # the last generation that received any CONNACK (success or refusal)
        self._inflight: dict[tuple[int, int], tuple[int, float]] = {}  # (gen, mid) -> (row id, sent)
        self._acks: queue.SimpleQueue[tuple[int, int]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._connected_cv = threading.Condition(self._lock)
        self._proto5 = cfg.protocol in ("auto", "5")
        u = urlsplit(cfg.url)
        self.tls = u.scheme == "mqtts"
        self.host = u.hostname or "127.0.0.1"
        self.port = u.port or (8883 if self.tls else 1883)
        self._threads: list[threading.Thread] = []
        # (topic, payload, dup, client, mid, qos): acknowledged only after the handler recorded it
        self._commands: queue.Queue[tuple[str, bytes, bool, mqtt.Client, int, int]] = queue.Queue(COMMAND_QUEUE_MAX)
        self._held: list[tuple[str, bytes, bool, mqtt.Client, int, int]] = []  # oldest first
        self._queue_full_log = RateLimit(QUEUE_FULL_LOG_S)
        self._pump_log = RateLimit(QUEUE_FULL_LOG_S)
        self._ack_pending: list[int] = []  # acknowledged rows the outbox could not delete yet
        self.drain_rate_per_s = DRAIN_RATE_PER_S
        self.on_sent: Callable[[str, int], None] | None = None  # (kind, MQTT bytes) per PUBLISH
        self.sent: dict[str, tuple[int, int]] = {}  # kind -> (messages, MQTT bytes) sent
        self._sent_lock = threading.Lock()  # pump, network thread and status publishers count

    def _note_sent(self, kind: str, topic: str, payload_len: int) -> None:
        """Count one PUBLISH (for the daily byte budget and /metrics)."""
        n = mqtt_publish_bytes(topic, payload_len, self._proto5)
        with self._sent_lock:
            msgs, nbytes = self.sent.get(kind, (0, 0))
            self.sent[kind] = (msgs + 1, nbytes + n)
        hook = self.on_sent
        if hook is not None:
            try:
                hook(kind, n)
            except Exception:  # accounting must never stop delivery
                log.exception("mqtt: on_sent hook failed")

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        for target, name in ((self._network_loop, "mqtt-net"), (self._pump_loop, "mqtt-outbox"),
                             (self._command_loop, "mqtt-commands")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, final_status: dict[str, Any] | None = None, timeout_s: float = 3.0) -> None:
        """Publish ``final_status`` (retained) if connected, disconnect cleanly, join threads."""
        client = self._client
        if client is not None and self.state.connected and final_status is not None:
            try:
                payload = dumps(self._stamped(final_status))
                info = client.publish(self.status_topic, payload, qos=1, retain=True)
                self._note_sent("status", self.status_topic, len(payload))
                info.wait_for_publish(timeout_s)
            except (RuntimeError, ValueError) as e:
                log.warning("mqtt: final status not published: %s", e)
        self._stop.set()
        if client is not None:
            try:
                client.disconnect()
            except Exception as e:
                log.debug("mqtt: disconnect: %s", e)
        with self._lock:
            self._connected_cv.notify_all()
        deadline = time.monotonic() + timeout_s
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self._drain_acks()  # PUBACKs that came in while stopping: do not re-send those rows

    def flush(self, timeout_s: float) -> bool:
        """Wait (bounded) for the outbox to empty while connected; True if it did.

        A clean stop calls this so the last window it queued goes out now, not at the next start.
        """
        deadline = time.monotonic() + timeout_s
        while self.state.connected and not self._stop.is_set():
            if self.outbox.depth() == 0:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self.outbox.wait_change(min(LOOP_TIMEOUT_S, left))
        return self.outbox.depth() == 0

    def wait_connected(self, timeout_s: float) -> bool:
        with self._connected_cv:
            return self._connected_cv.wait_for(lambda: self.state.connected, timeout=timeout_s)

    def set_subscriptions(self, topics: list[str]) -> None:
        """Change the command topics (a group change); applied now and on every reconnect."""
        old = set(self.subscriptions)
        self.subscriptions = list(topics)
        client = self._client
        if client is not None and self.state.connected:
            for t in old - set(topics):
                client.unsubscribe(t)
            for t in set(topics) - old:
                client.subscribe(t, qos=1)

    # -- publishing --------------------------------------------------------------------------
    def publish_status(self, doc: dict[str, Any]) -> bool:
        """Publish the retained status now if connected (it bypasses the outbox: only the
        latest status matters and it must not wait behind a backlog)."""
        client = self._client
        if client is None or not self.state.connected:
            return False
        payload = dumps(self._stamped(doc))
        client.publish(self.status_topic, payload, qos=1, retain=True)
        self._note_sent("status", self.status_topic, len(payload))
        return True

    def publish_now(self, topic: str, doc: dict[str, Any], kind: str = "job") -> bool:
        """Publish ``doc`` at QoS 1 now, outside the outbox, if connected; True if handed to the
        client. For a job update the outbox cannot store (a full disk): not re-sent after a
        reconnect, so it is a fallback, never the normal path."""
        client = self._client
        if client is None or not self.state.connected:
            return False
        payload = dumps(doc)
        if client.publish(topic, payload, qos=1).rc != mqtt.MQTT_ERR_SUCCESS:
            return False
        self._note_sent(kind, topic, len(payload))
        return True

    def _stamped(self, doc: dict[str, Any]) -> dict[str, Any]:
        """``doc`` with this connection's session number (every status document carries it)."""
        return {**doc, "session": self.state.session}

    # -- network thread ----------------------------------------------------------------------
    def _new_client(self, session: int) -> mqtt.Client:
        proto = mqtt.MQTTv5 if self._proto5 else mqtt.MQTTv311
        kwargs: dict[str, Any] = {"callback_api_version": CallbackAPIVersion.VERSION2,
                                  "client_id": self.client_id, "protocol": proto}
        if proto == mqtt.MQTTv311:
            kwargs["clean_session"] = False
        c = mqtt.Client(**kwargs)
        c.max_inflight_messages_set(INFLIGHT_WINDOW + 8)
        c.max_queued_messages_set(0)
        if self.tls:
            c.tls_set(ca_certs=self.cfg.ca_file or None, certfile=self.cfg.cert_file or None,
                      keyfile=self.cfg.key_file or None, cert_reqs=ssl.CERT_REQUIRED,
                      tls_version=ssl.PROTOCOL_TLS_CLIENT)
        if self.cfg.username:
            password = None
            if self.cfg.password_file:
                with open(self.cfg.password_file, encoding="utf-8") as f:
                    password = f.read().strip()
            c.username_pw_set(self.cfg.username, password)
        will = {**self._will(), "session": session}  # stamped now: ordered by session, not seq/ts
        c.will_set(self.status_topic, dumps(will), qos=1, retain=True)
        c.on_socket_open = self._on_socket_open
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.manual_ack_set(True)  # PUBACK a command only once it is recorded: a crash cannot lose it
        c.on_publish = self._on_publish
        c.on_subscribe = self._on_subscribe
        return c

    @staticmethod
    def _on_socket_open(client: mqtt.Client, userdata: Any, sock: Any) -> None:
        with contextlib.suppress(OSError, AttributeError):  # unix sockets: nothing to set
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _network_loop(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            session = self.outbox.next_seq("session")
            client = self._new_client(session)
            with self._lock:  # the pump reads (client, generation) as one pair
                self._generation += 1
                gen = self._generation
                self._client = client
                self.state.session = session
            try:
                self.state.state = "connecting"
                props = None
                if self._proto5:
                    props = Properties(PacketTypes.CONNECT)
                    props.SessionExpiryInterval = self.cfg.session_expiry_s
                    props.ReceiveMaximum = RECEIVE_MAXIMUM
                    client.connect(self.host, self.port, keepalive=self.cfg.keepalive_s,
                                   clean_start=False, properties=props)
                else:
                    client.connect(self.host, self.port, keepalive=self.cfg.keepalive_s)
            except (OSError, ssl.SSLError, ValueError) as e:
                self.state.state = "disconnected"
                self.state.last_error = f"connect to {self.host}:{self.port}: {e}"
                log.warning("mqtt: %s", self.state.last_error)
                attempt += 1
                self._stop.wait(backoff_delay(attempt))
                continue
            refused = False
            connack_deadline = time.monotonic() + CONNACK_TIMEOUT_S
            while not self._stop.is_set():
                rc = self._loop_once(client)
                if rc != mqtt.MQTT_ERR_SUCCESS:
                    break
                if self.state.extra.pop("refused", None):
                    refused = True
                    break
                if self._answered_gen != gen and time.monotonic() > connack_deadline:
                    self.state.last_error = f"no CONNACK from {self.host}:{self.port} within {CONNACK_TIMEOUT_S:.0f} s"
                    break
            if self._answered_gen != gen and not self._stop.is_set():
                self._fall_back_to_311(self.state.last_error or "connection closed")
            with self._lock:
                # Not state.connected: _on_disconnect has already cleared it by now, which left
                # the back-off growing across outages (a week-old link waited up to 60 s).
                was_connected = self._connected_gen == gen
                self.state.connected = False
                self._inflight = {k: v for k, v in self._inflight.items() if k[0] != gen}
                self._connected_cv.notify_all()
            with contextlib.suppress(Exception):  # best effort on a dead connection
                client.disconnect()
            if self._stop.is_set():
                break
            self.state.state = "refused" if refused else "disconnected"
            attempt = 0 if was_connected else attempt + 1
            delay = REFUSED_BACKOFF_S * random.uniform(0.5, 1.0) if refused else backoff_delay(attempt)
            log.info("mqtt: connection ended (%s); retrying in %.1f s", self.state.last_error or "closed", delay)
            self._stop.wait(delay)

    def _loop_once(self, client: mqtt.Client) -> int:
        """One turn of the network loop. While the command queue is nearly full, nothing is read
        (TCP holds the broker back; pings and writes go on), so no command is ever dropped for
        want of room: some brokers do not honour Receive Maximum once acknowledgements flow."""
        if self._commands.qsize() < READ_PAUSE_AT:
            return int(client.loop(timeout=LOOP_TIMEOUT_S))
        rc = client.loop_write()
        if rc == mqtt.MQTT_ERR_SUCCESS:
            rc = client.loop_misc()
        self._stop.wait(READ_PAUSE_POLL_S)
        return int(rc)

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:
        self._answered_gen = self._generation
        code = getattr(reason, "value", reason)
        if reason.is_failure if hasattr(reason, "is_failure") else code != 0:
            self.state.last_error = f"broker refused the connection: {reason}"
            if not (code in UNSUPPORTED_PROTOCOL_CODES and self._fall_back_to_311(self.state.last_error)):
                log.error("mqtt: %s", self.state.last_error)
                if code in NOT_AUTHORIZED_CODES:
                    self.state.extra["refused"] = True
            client.disconnect()
            return
        self.state.subscribed = False
        self.state.pending_subs = set()
        for topic in self.subscriptions:
            rc, mid = client.subscribe(topic, qos=1)
            if rc == mqtt.MQTT_ERR_SUCCESS and mid is not None:
                self.state.pending_subs.add(mid)
        self.state.subscribed = not self.state.pending_subs
        birth = dumps(self._stamped(self._birth()))
        client.publish(self.status_topic, birth, qos=1, retain=True)
        self._note_sent("status", self.status_topic, len(birth))
        with self._lock:
            if self.state.connected_since:
                self.state.reconnects += 1
            self.state.connected = True
            self._connected_gen = self._generation
            self.state.connected_since = time.time()
            self.state.state = "connected"
            self.state.last_error = ""
            self.state.protocol = "5" if self._proto5 else "3.1.1"
            self._connected_cv.notify_all()
        log.info("mqtt: connected to %s:%d (MQTT %s, session present: %s)", self.host, self.port,
                 self.state.protocol, getattr(flags, "session_present", "?"))

    def _fall_back_to_311(self, why: str) -> bool:
        """Under ``auto``, switch an MQTT 5 connection to 3.1.1 for the rest of the process (logged
        once: it happens once). True if it switched."""
        if self.cfg.protocol != "auto" or not self._proto5:
            return False
        self._proto5 = False
        log.warning("mqtt: %s:%d answered no MQTT 5 CONNECT (%s); mqtt.protocol = \"auto\" falls back "
                    "to MQTT 3.1.1 for every reconnect (a restart tries MQTT 5 again)", self.host, self.port, why)
        return True

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any,
                      properties: Any) -> None:
        refused = [r for r in reasons if getattr(r, "is_failure", False)]
        if refused:
            self.state.last_error = f"broker refused a command subscription: {refused[0]}"
            log.error("mqtt: %s", self.state.last_error)
            return
        self.state.pending_subs.discard(mid)
        if not self.state.pending_subs:
            self.state.subscribed = True

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                       properties: Any) -> None:
        if not self._stop.is_set():
            self.state.last_error = f"disconnected: {reason}"
        with self._lock:
            self.state.connected = False
            self._connected_cv.notify_all()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if not any(mqtt.topic_matches_sub(sub, msg.topic) for sub in self.subscriptions):
            # amqtt, for one, sends a connecting client the retained messages of every subscription
            # on the broker: not a command, and acknowledged so that it is not delivered again.
            log.debug("mqtt: ignored a message on %s (not a command topic)", msg.topic)
            if msg.qos > 0:
                client.ack(msg.mid, msg.qos)
            return
        if msg.qos == 0 and self._commands.qsize() >= QOS0_QUEUE_MAX:  # commands are QoS 1; room kept for them
            self._queue_full_log.log(log, logging.WARNING, "mqtt: QoS 0 message on %s dropped: %d already queued",
                                     msg.topic, QOS0_QUEUE_MAX)
            return
        try:
            self._commands.put_nowait((msg.topic, bytes(msg.payload), bool(msg.dup), client, msg.mid, msg.qos))
        except queue.Full:  # not acknowledged: the broker delivers it again after a reconnect
            self._queue_full_log.log(log, logging.ERROR, "mqtt: command queue full (%d); a message on %s waits for redelivery",
                                     COMMAND_QUEUE_MAX, msg.topic)

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any,
                    properties: Any) -> None:
        self._acks.put((self._generation, mid))
        self.outbox.notify()

    # -- command worker ----------------------------------------------------------------------
    def _command_loop(self) -> None:
        """Hand each command to the handler; acknowledge it only when the handler says it is
        recorded (True). One it could not record yet (False: no room on disk, no descriptors)
        stays unacknowledged, is held (up to ``HELD_MAX``) and tried again, oldest first and
        before newer ones, every ``HELD_RETRY_S``; past the bound it waits for the broker's
        redelivery after a reconnect."""
        next_retry = 0.0
        while not self._stop.is_set():
            if self._held and time.monotonic() >= next_retry:
                item = self._held.pop(0)
            else:
                wait = max(0.0, next_retry - time.monotonic()) if self._held else LOOP_TIMEOUT_S
                try:
                    item = self._commands.get(timeout=min(LOOP_TIMEOUT_S, wait) or 0.01)
                except queue.Empty:
                    continue
                if self._held:  # newer commands wait behind the held ones, in order
                    self._hold(item)
                    continue
            topic, payload, dup, client, mid, qos = item
            try:
                done = self._on_command(topic, payload, dup)
            except Exception:  # a bad command must never kill the worker
                log.exception("mqtt: command handler failed for a message on %s", topic)
                done = True
            if done is False:  # not recorded for want of room: held, tried again
                self._hold(item, first=True)
                next_retry = time.monotonic() + HELD_RETRY_S
                continue
            if qos > 0 and client is self._client and self.state.connected:
                client.ack(mid, qos)

    def _hold(self, item: tuple[str, bytes, bool, mqtt.Client, int, int], first: bool = False) -> None:
        if item[3] is not self._client:
            return  # from an older connection: the broker redelivers it on this one
        if len(self._held) >= HELD_MAX:
            self._queue_full_log.log(log, logging.WARNING, "mqtt: %d commands already wait for room; a message on %s "
                                     "waits for the broker's redelivery", HELD_MAX, item[0])
            return
        if first:
            self._held.insert(0, item)
        else:
            self._held.append(item)

    # -- outbox pump -------------------------------------------------------------------------
    def _drain_acks(self) -> None:
        """Delete the rows whose PUBACK arrived (the network thread queued their keys)."""
        acked: list[int] = []
        while True:
            try:
                key = self._acks.get_nowait()
            except queue.Empty:
                break
            with self._lock:
                entry = self._inflight.pop(key, None)
            if entry is not None:
                acked.append(entry[0])
        acked = self._ack_pending + acked
        if not acked:
            return
        try:
            self.outbox.ack(acked)
            self._ack_pending = []
        except (sqlite3.Error, OSError) as e:  # a full disk: forget them later (until then a re-send is harmless)
            self._ack_pending = acked[-ACK_PENDING_MAX:]
            self._pump_log.log(log, logging.WARNING, "mqtt: %d acknowledged rows not removed from the outbox yet: %s",
                               len(acked), e)

    def _pump_loop(self) -> None:
        """Run the pump; a failure of the outbox (a full disk, no descriptors) pauses it for
        ``PUMP_RETRY_S`` instead of ending it (it starts again from the oldest unacknowledged row)."""
        while not self._stop.is_set():
            try:
                self._pump_run()
            except (sqlite3.Error, OSError) as e:
                self._pump_log.log(log, logging.ERROR, "mqtt: outbox pump paused: %s", e)
                self._stop.wait(PUMP_RETRY_S)

    def _pump_run(self) -> None:
        last_id = 0
        gen_seen = 0
        tokens = float(DRAIN_BURST)
        refilled = time.monotonic()
        while not self._stop.is_set():
            self._drain_acks()
            with self._lock:
                client, gen = self._client, self._generation
            if client is None or not self.state.connected:
                self.outbox.wait_change(LOOP_TIMEOUT_S)
                continue
            now = time.monotonic()
            with self._lock:
                if gen_seen != gen:
                    # A new connection: nothing sent on an older one will be acknowledged now.
                    # Forget it all (including rows registered after the network thread's own
                    # cleanup) and re-send every unacknowledged row from the oldest, in order.
                    gen_seen = gen
                    last_id = 0
                    self._inflight = {k: v for k, v in self._inflight.items() if k[0] == gen}
                stale = [k for k, (_, sent) in self._inflight.items() if now - sent > RESEND_AFTER_S]
                for k in stale:
                    row_id = self._inflight.pop(k)[0]
                    last_id = min(last_id, row_id - 1)
                room = INFLIGHT_WINDOW - len(self._inflight)
                inflight_ids = {v[0] for v in self._inflight.values()}
            if room <= 0:
                self.outbox.wait_change(LOOP_TIMEOUT_S)
                continue
            rows = [r for r in self.outbox.peek(last_id, room) if r.id not in inflight_ids]
            if not rows:
                self.outbox.wait_change(LOOP_TIMEOUT_S)
                continue
            for r in rows:
                if self._stop.is_set() or not self.state.connected:
                    break
                # Token bucket: up to DRAIN_BURST rows at once, then drain_rate_per_s.
                rate = max(self.drain_rate_per_s, 0.1)
                now = time.monotonic()
                tokens = min(float(DRAIN_BURST), tokens + (now - refilled) * rate)
                refilled = now
                if tokens < 1.0:
                    if self._stop.wait((1.0 - tokens) / rate):
                        break
                    continue_at = time.monotonic()
                    tokens = min(float(DRAIN_BURST), tokens + (continue_at - refilled) * rate)
                    refilled = continue_at
                with self._lock:
                    if self._generation != gen_seen:
                        break  # reconnected meanwhile: start over from the oldest row
                    info = client.publish(r.topic, r.payload, qos=r.qos, retain=r.retain)
                    if info.rc != mqtt.MQTT_ERR_SUCCESS:
                        break
                    self._inflight[(gen_seen, info.mid)] = (r.id, time.monotonic())
                tokens -= 1.0
                self._note_sent(r.kind, r.topic, len(r.payload))
                last_id = r.id
