"""``fleetctl collect`` as a process against a real Mosquitto, fed by a plain MQTT client playing
devices: lost and duplicated messages counted from ``seq`` (every stream without ``--share``,
only the heartbeats every member receives with it), ``--per-device`` and ``--group-rule``
series, resubscribing after the broker restarts, and a clear error for a port in use."""

from __future__ import annotations

import json
import socket
import time
import urllib.request
from collections.abc import Iterator

import paho.mqtt.client as mqtt
import pytest
from conftest import Mosquitto
from opskit import fleetctl
from prometheus_client.parser import text_string_to_metric_families
from test_rollout import Proc

from fleetctl import mqttc

READY_TIMEOUT_S = 30.0
SETTLE_TIMEOUT_S = 20.0
LOSS_GRACE_S = 0.5


def collector(broker: str, *extra: str) -> tuple[Proc, str]:
    p = Proc(["collect", "--broker", broker, "--listen", "127.0.0.1:0", "--loss-grace", str(LOSS_GRACE_S), *extra])
    line = p.wait_line(lambda s: s.startswith("listening "), READY_TIMEOUT_S)
    return p, line.split()[1]


def samples(addr: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def get(addr: str, name: str, **labels: str) -> float:
    return samples(addr).get((name, tuple(sorted(labels.items()))), float("nan"))


def eventually(addr: str, name: str, want: float, **labels: str) -> None:
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while (got := get(addr, name, **labels)) != want:
        assert time.monotonic() < deadline, f"{name}{labels} = {got}, expected {want}"
        time.sleep(0.1)


@pytest.fixture
def device(mosquitto: Mosquitto) -> Iterator[mqtt.Client]:
    c = mqttc.connect(mosquitto.url)
    try:
        yield c
    finally:
        mqttc.disconnect(c)


def send(c: mqtt.Client, topic: str, **doc: object) -> None:
    mqttc.publish(c, topic, json.dumps(doc))


def test_lost_and_duplicates_with_and_without_a_shared_subscription(mosquitto: Mosquitto, device: mqtt.Client) -> None:
    whole, a = collector(mosquitto.url, "--per-device", "--group-rule", "cams=cam-*")
    shared, b = collector(mosquitto.url, "--share", "obs")
    try:
        for seq in (1, 2, 4, 2):  # 3 never comes; 2 comes twice (a re-send)
            send(device, "edge/cam-1/heartbeat", seq=seq)
        for seq in (1, 3):  # 2 never comes
            send(device, "edge/cam-1/telemetry", seq=seq, models={})
        for addr in (a, b):
            eventually(addr, "edge_fleet_messages_lost_total", 1, stream="heartbeat")
            eventually(addr, "edge_fleet_messages_duplicate_total", 1, stream="heartbeat")
        eventually(a, "edge_fleet_messages_lost_total", 1, stream="telemetry")
        # the shared member may see only part of a device's telemetry: it counts no gap there
        eventually(b, "edge_fleet_messages_received_total", 2, stream="telemetry")
        assert get(b, "edge_fleet_messages_lost_total", stream="telemetry") == 0
        assert get(a, "edge_fleet_device_heartbeat_age_seconds", device="cam-1", group="cams") >= 0
        assert get(a, "edge_fleet_devices", group="cams", state="unknown") == 1
        assert not [k for k in samples(b) if k[0] == "edge_fleet_device_heartbeat_age_seconds"]
    finally:
        whole.stop()
        shared.stop()


def test_subscribes_again_after_the_broker_restarts(mosquitto: Mosquitto) -> None:
    p, addr = collector(mosquitto.url)
    try:
        c = mqttc.connect(mosquitto.url)
        send(c, "edge/d1/heartbeat", seq=1)
        mqttc.disconnect(c)
        eventually(addr, "edge_fleet_messages_received_total", 1, stream="heartbeat")
        mosquitto.stop()
        mosquitto.start()
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        seq = 2
        while get(addr, "edge_fleet_messages_received_total", stream="heartbeat") < 2:
            assert time.monotonic() < deadline, "the collector did not subscribe again after the broker restart"
            c = mqttc.connect(mosquitto.url)  # until the collector is back, these go nowhere: counted lost
            send(c, "edge/d1/heartbeat", seq=seq)
            mqttc.disconnect(c)
            seq += 1
            time.sleep(0.3)
        # every heartbeat from the first that reached it onwards arrives: the ones before are lost
        last = seq - 1
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while True:
            got = samples(addr)
            received = got[("edge_fleet_messages_received_total", (("stream", "heartbeat"),))]
            lost = got[("edge_fleet_messages_lost_total", (("stream", "heartbeat"),))]
            if lost == last - received:
                break
            assert time.monotonic() < deadline, f"lost {lost}, expected {last} - {received}"
            time.sleep(0.1)
    finally:
        p.stop()
    assert p.p.stderr is not None and "subscribed again" in p.p.stderr.read()


def test_a_port_in_use_is_one_clear_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = fleetctl("collect", "--broker", "mqtt://127.0.0.1:9", "--listen", f"127.0.0.1:{port}")
    assert r.returncode == 1
    assert r.stderr.startswith("fleetctl: error:") and "Traceback" not in r.stderr, r.stderr
