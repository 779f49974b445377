"""Shared parts of the operations tests (agentctl, rollouts): keys, signed bundles served over real
HTTP, signed deploys over the real broker, and the CLIs run as processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
from conftest import REPO, make_linear_onnx

from agent.bundles.trust import load_private_key
from fleetctl import commands, mqttc
from fleetctl.bundle import build_bundle
from fleetctl.keys import generate_keypair
from fleetctl.serve import ArtifactServer

CLI_TIMEOUT_S = 120.0
DEPLOY_TIMEOUT_S = 60.0
READY_TIMEOUT_S = 30.0
PING_TIMEOUT_S = 2.0  # per attempt; an unanswered ping (sent before the subscription) is simply re-sent
PING_TTL_S = 30.0
MODEL = "lin"


@dataclass
class FleetKit:
    """A signing key, a trust folder holding its public half, and ``lin`` v1/v2 served over HTTP."""

    root: Path
    key: Path
    trust: Path
    bundles: Path
    server: ArtifactServer

    @classmethod
    def make(cls, root: Path, versions: tuple[int, ...] = (1, 2)) -> FleetKit:
        kp = generate_keypair(root / "keys", "fleet")
        trust = root / "trust"
        trust.mkdir(mode=0o755)
        (trust / "fleet.pem").write_bytes(kp.public_path.read_bytes())
        bundles = root / "bundles"
        for v in versions:
            model = make_linear_onnx(root / "src" / f"lin{v}.onnx", seed=v)
            build_bundle(model, bundles / MODEL / str(v), MODEL, v, [load_private_key(kp.private_path)], samples=3)
        server = ArtifactServer(bundles, "127.0.0.1", 0).start()
        return cls(root, kp.private_path, trust, bundles, server)

    def url(self, version: int) -> str:
        return f"{self.server.url}/{MODEL}/{version}/manifest.json"

    def close(self) -> None:
        self.server.stop()

    def wait_subscribed(self, client: mqtt.Client, devices: list[str], timeout_s: float = READY_TIMEOUT_S) -> None:
        """Ping until every device answers: a daemon is 'ready' (HTTP) before its MQTT subscription is."""
        left = list(devices)
        deadline = time.monotonic() + timeout_s
        while left:
            assert time.monotonic() < deadline, f"{left} never answered a ping"
            req = commands.CommandRequest("ping", {}, ttl_s=PING_TTL_S)
            out = commands.run_command(client, "edge", [commands.device_target(d) for d in left], req,
                                       [load_private_key(self.key)], wait=True, timeout_s=PING_TIMEOUT_S)
            assert out is not None
            left = [d for d, u in out.last.items() if not u or u.get("state") != "SUCCEEDED"]

    def deploy(self, broker_url: str, devices: list[str], version: int) -> commands.JobOutcome:
        """A signed deploy of ``lin`` v``version``, followed to the end (the library fleetctl uses)."""
        client = mqttc.connect(broker_url)
        try:
            self.wait_subscribed(client, devices)
            req = commands.CommandRequest("deploy", commands.deploy_params(MODEL, self.url(version)))
            out = commands.run_command(client, "edge", [commands.device_target(d) for d in devices], req,
                                       [load_private_key(self.key)], wait=True, timeout_s=DEPLOY_TIMEOUT_S)
        finally:
            mqttc.disconnect(client)
        assert out is not None and out.succeeded, out
        return out


def env() -> dict[str, str]:
    """The environment for CLI processes: the checkout importable (agent, fleetctl) whatever the cwd."""
    paths = [str(REPO), str(REPO / "tools")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join([*paths, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


def fleetctl(*args: str, timeout_s: float = CLI_TIMEOUT_S, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fleetctl.main", *args], capture_output=True, text=True,
                          timeout=timeout_s, cwd=cwd, env=env())


def agentctl(*args: str, timeout_s: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent.cli.agentctl", *args], capture_output=True, text=True,
                          timeout=timeout_s, env=env())
