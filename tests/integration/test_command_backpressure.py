"""The command queue under a flood: nothing dropped, nothing acknowledged before it is handled.

A real Mosquitto and the agent's real ``Connection``; the command handler is slower than the
flood (a stand-in for a busy device), so without back-pressure the bounded queue would overflow
and drop commands until the next reconnect (Mosquitto 2.0.11 does not hold back QoS 1 messages
by Receive Maximum once acknowledgements flow).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from conftest import Mosquitto
from paho.mqtt.enums import CallbackAPIVersion

from agent.config import MqttConfig
from agent.mqtt.connection import COMMAND_QUEUE_MAX, Connection
from agent.telemetry.outbox import Outbox

FLOOD_N = 3 * COMMAND_QUEUE_MAX + 100  # well past the queue
HANDLE_S = 0.002  # the handler's time per command: slower than the flood arrives
DONE_S = 60.0
PUBACK_S = 60.0


def test_a_flood_slower_to_handle_than_to_arrive_loses_nothing(tmp_path: Path, mosquitto: Mosquitto) -> None:
    seen: list[bytes] = []
    lock = threading.Lock()

    def handle(topic: str, payload: bytes, dup: bool) -> bool:
        time.sleep(HANDLE_S)
        with lock:
            seen.append(payload)
        return True

    outbox = Outbox(tmp_path / "outbox.db", 2**20)
    cfg = MqttConfig(url=mosquitto.url, keepalive_s=5)
    conn = Connection(cfg, "bp-dev", ["edge/bp-dev/cmd"], "edge/bp-dev/status", birth=lambda: {"online": True},
                      will=lambda: {"online": False}, outbox=outbox, on_command=handle)
    conn.start()
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bp-flooder", protocol=mqtt.MQTTv5)
    try:
        assert conn.wait_connected(10)
        deadline = time.monotonic() + 10
        while not conn.state.subscribed and time.monotonic() < deadline:
            time.sleep(0.05)
        assert conn.state.subscribed
        pub.max_inflight_messages_set(500)
        pub.connect(mosquitto.host, mosquitto.port)
        pub.loop_start()
        infos = [pub.publish("edge/bp-dev/cmd", f"m{i}".encode(), qos=1) for i in range(FLOOD_N)]
        for info in infos:
            info.wait_for_publish(PUBACK_S)
        deadline = time.monotonic() + DONE_S
        while time.monotonic() < deadline:
            with lock:
                if len(seen) >= FLOOD_N:
                    break
            time.sleep(0.1)
        with lock:
            got = list(seen)
        assert len(got) == FLOOD_N and set(got) == {f"m{i}".encode() for i in range(FLOOD_N)}, len(got)
        assert conn.state.reconnects == 0  # handled on the same connection, not after a redelivery
    finally:
        pub.loop_stop()
        pub.disconnect()
        conn.stop(timeout_s=3)
        outbox.close()
