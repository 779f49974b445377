"""The demo's fallback broker (amqtt, MQTT 3.1.1 only, via fleetctl.devbroker) and the agent on it.

Real parts only: amqtt in its child process on a free loopback port, real paho clients, the real
``edge-agent`` daemon with ``mqtt.protocol = "auto"``, and ``fleetctl demo`` run as a process with
the fallback broker chosen. Every wait is bounded.
"""

from __future__ import annotations

import json
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from agentproc import AgentProcess, Observer
from opskit import FleetKit, env
from paho.mqtt.enums import CallbackAPIVersion

from agent.mqtt.connection import CONNACK_TIMEOUT_S
from fleetctl import mqttc
from fleetctl.devbroker import DevBroker

HOST = "127.0.0.1"
WAIT_S = 5.0  # upper bound for any expected event
V5_ANSWER_S = 3.0  # how long a v5 CONNECT is given to be accepted (it must not be)
AGENT_FALLBACK_S = 45.0  # the agent's v5 attempt ends at its CONNACK deadline or keepalive (5 s here)
DEMO_TIMEOUT_S = 240.0
FALLBACK_LOG = 'mqtt.protocol = "auto" falls back to MQTT 3.1.1'
LONG_KEEPALIVE_S = 60  # longer than the agent's CONNACK deadline


class Client:
    """A paho MQTT 3.1.1 client with its callbacks wired to events and a message queue."""

    def __init__(self, port: int, client_id: str, *, clean: bool = True,
                 will: tuple[str, bytes] | None = None) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311,
                                  clean_session=clean, reconnect_on_failure=False)
        self.port = port
        self.connected = threading.Event()
        self.session_present = False
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.client.on_connect = self._on_connect
        self.client.on_message = lambda c, u, m: self.messages.put(m)
        if will is not None:
            self.client.will_set(will[0], will[1], qos=1, retain=True)

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self.session_present = bool(flags.session_present)
        if not reason.is_failure:
            self.connected.set()

    def connect(self) -> Client:
        self.client.connect(HOST, self.port, keepalive=60)
        self.client.loop_start()
        assert self.connected.wait(WAIT_S), "no CONNACK"
        return self

    def subscribe(self, topic: str) -> None:
        info = threading.Event()
        self.client.on_subscribe = lambda *a: info.set()
        self.client.subscribe(topic, qos=1)
        assert info.wait(WAIT_S), "no SUBACK"

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(timeout=WAIT_S)
        assert info.is_published(), "no PUBACK"

    def get(self, topic: str) -> mqtt.MQTTMessage:
        """The next message on ``topic`` (amqtt also hands a new client retained messages of other
        clients' subscriptions; those are skipped)."""
        deadline = time.monotonic() + WAIT_S
        while True:
            msg = self.messages.get(timeout=max(0.01, deadline - time.monotonic()))
            if msg.topic == topic:
                return msg

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def abort(self) -> None:
        """Drop the TCP connection without DISCONNECT: the broker must publish the Will."""
        self.client.loop_stop()
        sock = self.client.socket()
        assert isinstance(sock, socket.socket)
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()


@pytest.fixture
def amqtt_broker(tmp_path: Path) -> Iterator[DevBroker]:
    broker = DevBroker(log_path=tmp_path / "amqtt.log").start()
    try:
        yield broker
    finally:
        broker.stop()


def test_devbroker_carries_what_the_agent_uses(amqtt_broker: DevBroker) -> None:
    """QoS 1 both ways, retained status, Last Will (retained) and a persistent session that keeps
    QoS 1 commands while its client is offline — the MQTT 3.1.1 features the agent relies on."""
    port = amqtt_broker.port
    fleet = Client(port, "fleet").connect()
    device = Client(port, "device", clean=False, will=("edge/d1/status", b'{"online": false}')).connect()
    device.subscribe("edge/d1/cmd")
    device.publish("edge/d1/status", b'{"online": true}', retain=True)
    fleet.publish("edge/d1/cmd", b"ping")
    msg = device.get("edge/d1/cmd")
    assert (msg.payload, msg.qos) == (b"ping", 1)

    late = Client(port, "late").connect()
    late.subscribe("edge/d1/status")
    msg = late.get("edge/d1/status")
    assert (msg.payload, msg.retain) == (b'{"online": true}', True)

    device.abort()
    assert late.get("edge/d1/status").payload == b'{"online": false}'  # the Will, live
    later = Client(port, "later").connect()
    later.subscribe("edge/d1/status")
    msg = later.get("edge/d1/status")
    assert (msg.payload, msg.retain) == (b'{"online": false}', True)  # and retained

    fleet.publish("edge/d1/cmd", b"while-offline")
    back = Client(port, "device", clean=False).connect()
    assert back.session_present
    msg = back.get("edge/d1/cmd")
    assert (msg.payload, msg.qos) == (b"while-offline", 1)
    for c in (fleet, late, later, back):
        c.close()


def test_devbroker_speaks_only_mqtt_311(amqtt_broker: DevBroker) -> None:
    """An MQTT 5 CONNECT is never accepted (amqtt refuses or ignores it): why the agent's "auto"
    must fall back."""
    accepted = threading.Event()
    answered = threading.Event()
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="v5", protocol=mqtt.MQTTv5, reconnect_on_failure=False)
    c.on_connect = lambda cl, u, f, reason, p: (answered.set(), None if reason.is_failure else accepted.set())
    c.connect(HOST, amqtt_broker.port)
    c.loop_start()
    try:
        answered.wait(V5_ANSWER_S)
        assert not accepted.is_set()
    finally:
        c.loop_stop()
        c.disconnect()


def test_devbroker_stops_cleanly(tmp_path: Path) -> None:
    broker = DevBroker(log_path=tmp_path / "amqtt.log").start()
    assert broker.stop() == 0
    with pytest.raises(OSError):
        socket.create_connection((HOST, broker.port), timeout=1).close()


def test_agent_auto_protocol_falls_back_to_311_on_amqtt(tmp_path: Path, amqtt_broker: DevBroker) -> None:
    """The real daemon, ``protocol = "auto"``, on a 3.1.1-only broker that does not answer its MQTT 5
    CONNECT: it falls back (logged once, naming both protocols), publishes its online status, answers
    a signed ping, and reconnects after a broker restart on 3.1.1 straight away."""
    (tmp_path / "fleet" / "bundles").mkdir(parents=True)  # the kit's artifact server: no bundle needed
    kit = FleetKit.make(tmp_path / "fleet", versions=())
    agent = AgentProcess(tmp_path / "device", amqtt_broker.url)
    agent.write_config()
    assert 'protocol = "5"' not in agent.config.read_text() and 'protocol = "3.1.1"' not in agent.config.read_text()
    agent.trust_key((kit.trust / "fleet.pem").read_bytes())
    obs = Observer(HOST, amqtt_broker.port, topics=("edge/dev1/status", "edge/other/status"), protocol=mqtt.MQTTv311)
    other = Client(amqtt_broker.port, "other").connect()
    other.publish("edge/other/status", b'{"online": true}', retain=True)
    obs.wait(lambda t, d: t == "edge/other/status", what="another device's status")
    other.close()
    client = None
    second = None
    try:
        agent.start(wait=False)
        agent.wait_ready(AGENT_FALLBACK_S)
        status = json.loads(agent.agentctl("status", "--json").stdout)
        assert status["mqtt"]["protocol"] == "3.1.1"
        online = obs.wait(lambda t, d: t == "edge/dev1/status" and d.get("online") is True, what="online status")
        assert online["device"] == "dev1" and online["session"] >= 2  # the v5 attempt took session 1

        client = mqttc.connect(amqtt_broker.url)
        kit.wait_subscribed(client, ["dev1"])  # signed ping → SUCCEEDED over amqtt
        mqttc.disconnect(client)
        client = None

        amqtt_broker.stop()
        second = DevBroker(amqtt_broker.port, log_path=tmp_path / "amqtt2.log").start()
        obs.close()
        obs = Observer(HOST, amqtt_broker.port, topics=("edge/dev1/status",), protocol=mqtt.MQTTv311)
        obs.wait(lambda t, d: t == "edge/dev1/status" and d.get("online") is True and d.get("session", 0) > online["session"],
                 timeout_s=AGENT_FALLBACK_S, what="online status after the broker restart")
        log = agent.log.read_text()
        assert log.count(FALLBACK_LOG) == 1, log[-3000:]  # remembered: no second MQTT 5 attempt
        assert log.count("(MQTT 3.1.1, session present") == 2, log[-3000:]
        # amqtt hands a connecting client the retained messages of every subscription (here the
        # observer's edge/other/status): not a command topic, dropped before the command handler
        assert "command on edge/other/status" not in log, log[-3000:]
    finally:
        if client is not None:
            mqttc.disconnect(client)
        obs.close()
        agent.stop()
        kit.close()
        if second is not None:
            second.stop()


def test_agent_connack_deadline_ends_an_unanswered_mqtt5_connect(tmp_path: Path, amqtt_broker: DevBroker) -> None:
    """With a keepalive longer than the CONNACK deadline, the deadline (not the keepalive) ends the
    unanswered MQTT 5 attempt, and the agent connects on 3.1.1."""
    agent = AgentProcess(tmp_path / "device", amqtt_broker.url)
    agent.write_config()
    agent.config.write_text(agent.config.read_text().replace("keepalive_s = 5", f"keepalive_s = {LONG_KEEPALIVE_S}"))
    try:
        agent.start(wait=False)
        agent.wait_ready(AGENT_FALLBACK_S)
        log = agent.log.read_text()
        assert f"no CONNACK from 127.0.0.1:{amqtt_broker.port} within {CONNACK_TIMEOUT_S:.0f} s" in log, log[-3000:]
        assert log.count(FALLBACK_LOG) == 1, log[-3000:]
    finally:
        agent.stop()


def test_demo_runs_end_to_end_on_amqtt(tmp_path: Path) -> None:
    """``fleetctl demo`` with its fallback broker (what a machine without Mosquitto gets)."""
    r = subprocess.run([sys.executable, "-m", "fleetctl.main", "demo", "--workdir", str(tmp_path / "demo")],
                       capture_output=True, text=True, timeout=DEMO_TIMEOUT_S,
                       env={**env(), "FLEETCTL_DEMO_BROKER": "amqtt"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "amqtt, MQTT 3.1.1" in r.stdout
    assert "Demo OK" in r.stdout
    assert FALLBACK_LOG in (tmp_path / "demo" / "device" / "agent.log").read_text()

