"""Run the real edge-agent daemon as a process, and a fleet-side MQTT observer, for tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from conftest import free_port
from paho.mqtt.enums import CallbackAPIVersion

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


@dataclass
class AgentProcess:
    """One daemon: its folder, config, process and log."""

    root: Path
    broker_url: str
    device_id: str = "dev1"
    groups: tuple[str, ...] = ("cams",)
    extra_toml: str = ""
    env: dict[str, str] = field(default_factory=dict)
    wrap: tuple[str, ...] = ()  # a launcher before the interpreter, e.g. ("prlimit", "--nofile=1024", "--")
    proc: subprocess.Popen[bytes] | None = None
    api_port: int = 0

    @property
    def socket(self) -> Path:
        return self.root / "control.sock"

    @property
    def config(self) -> Path:
        return self.root / "agent.toml"

    @property
    def log(self) -> Path:
        return self.root / "agent.log"

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def write_config(self, heartbeat_s: float = 0.5, window_s: float = 0.5) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "trust").mkdir(exist_ok=True, mode=0o755)
        self.api_port = self.api_port or free_port()
        groups = ", ".join(f'"{g}"' for g in self.groups)
        self.config.write_text(
            f'device_id = "{self.device_id}"\ngroups = [{groups}]\nstate_dir = "state"\n\n'
            f'[mqtt]\nurl = "{self.broker_url}"\nkeepalive_s = 5\n\n[trust]\nkeys_dir = "trust"\n\n'
            f'[telemetry]\nheartbeat_s = {heartbeat_s}\nwindow_s = {window_s}\n\n'
            f'[api]\nlisten = "127.0.0.1:{self.api_port}"\ncontrol_socket = "{self.socket}"\ncontrol_group = ""\n'
            + self.extra_toml)

    def trust_key(self, pem: bytes, name: str = "fleet") -> None:
        (self.root / "trust").mkdir(parents=True, exist_ok=True, mode=0o755)
        (self.root / "trust" / f"{name}.pem").write_bytes(pem)

    def start(self, wait: bool = True) -> None:
        if not self.config.exists():
            self.write_config()
        env = {**os.environ, **self.env}
        self._logf = open(self.log, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([*self.wrap, sys.executable, "-m", "agent", "run", "--config", str(self.config)],
                                     stdout=self._logf, stderr=subprocess.STDOUT, env=env)
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        import requests

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited with {self.proc.returncode}:\n{self.log.read_text()[-4000:]}")
            if self.socket.exists():
                try:
                    if (requests.get(f"{self.api}/v2/health/ready", timeout=1).status_code == 200
                            and self.subscribed()):
                        return
                except (requests.RequestException, OSError):
                    pass
            time.sleep(0.05)
        raise TimeoutError(f"agent not ready after {timeout_s} s:\n{self.log.read_text()[-4000:]}")

    def subscribed(self) -> bool:
        """The broker acknowledged the agent's command subscriptions: commands sent now arrive."""
        from agent.serving.control import ControlClient

        status = ControlClient(str(self.socket), timeout_s=2).call("status")
        return bool(status.get("mqtt", {}).get("subscribed"))

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT_S)
        self._logf.close()
        return int(self.proc.returncode)

    def agentctl(self, *args: str, timeout_s: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "agent.cli.agentctl", *args, "--socket", str(self.socket)],
                              capture_output=True, text=True, timeout=timeout_s)


class Observer:
    """A fleet-side MQTT client recording every message under a prefix."""

    def __init__(self, broker_host: str, broker_port: int, topics: tuple[str, ...] = ("edge/#",),
                 protocol: mqtt.MQTTProtocolVersion = mqtt.MQTTv5) -> None:
        self.messages: list[tuple[str, dict[str, Any], bool]] = []
        self._cv = threading.Condition()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"observer-{os.getpid()}-{id(self)}",
                                  protocol=protocol)
        self.client.on_message = self._on_message
        self.client.connect(broker_host, broker_port)
        self.client.loop_start()
        for t in topics:
            self.client.subscribe(t, qos=1)

    def _on_message(self, c: Any, u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            doc = json.loads(msg.payload) if msg.payload else {}
        except ValueError:
            doc = {"_raw": msg.payload.decode(errors="replace")}
        with self._cv:
            self.messages.append((msg.topic, doc, bool(msg.retain)))
            self._cv.notify_all()

    def find(self, pred: Callable[[str, dict[str, Any]], bool]) -> list[dict[str, Any]]:
        with self._cv:
            return [d for t, d, _ in self.messages if pred(t, d)]

    def wait(self, pred: Callable[[str, dict[str, Any]], bool], timeout_s: float = 20.0, what: str = "message") -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while True:
                for t, d, _ in self.messages:
                    if pred(t, d):
                        return d
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = "\n".join(f"{t} {json.dumps(d)[:200]}" for t, d, _ in self.messages[-20:])
                    raise TimeoutError(f"no {what} within {timeout_s} s; last messages:\n{seen}")
                self._cv.wait(left)

    def publish(self, topic: str, payload: bytes | str, qos: int = 1) -> None:
        self.client.publish(topic, payload, qos=qos).wait_for_publish(10)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
