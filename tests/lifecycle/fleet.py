"""Fleet-side helpers for lifecycle tests: signed bundles of distinct linear models, signed
commands over the real broker, and waiting for a job's end."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from agentproc import AgentProcess, Observer
from conftest import Mosquitto, make_linear_onnx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.bundles.trust import public_pem
from fleetctl import bundle, commands
from fleetctl.serve import ArtifactServer

TERMINAL = ("SUCCEEDED", "FAILED", "REJECTED", "CANCELED", "TIMED_OUT")
X = np.arange(8, dtype=np.float32).reshape(2, 4) / 7.0  # the request every test sends


def linear_weights(seed: int, in_dim: int = 4, out_dim: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """The weights make_linear_onnx uses for ``seed`` (same generator, same order)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((in_dim, out_dim)).astype(np.float32)
    b = rng.standard_normal((out_dim,)).astype(np.float32)
    return w, b


def expected(seed: int, x: np.ndarray = X) -> np.ndarray:
    w, b = linear_weights(seed)
    return (x @ w + b).astype(np.float32)


@dataclass
class Fleet:
    """A signing key, an artifact server and an observer on one broker."""

    root: Path
    obs: Observer
    key: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    server: ArtifactServer | None = None
    prefix: str = "edge"

    def __post_init__(self) -> None:
        (self.root / "bundles").mkdir(parents=True, exist_ok=True)
        self.server = ArtifactServer(self.root / "bundles", "127.0.0.1", 0).start()

    @property
    def pub_pem(self) -> bytes:
        return public_pem(self.key.public_key())

    def agent(self, name: str, broker_url: str, extra_toml: str = "", device: str = "dev1") -> AgentProcess:
        a = AgentProcess(self.root / name, broker_url, device_id=device, extra_toml=extra_toml)
        a.write_config()
        a.trust_key(self.pub_pem)
        return a

    def bundle(self, name: str, version: int, seed: int, model_file: Path | None = None,
               **kw: Any) -> str:
        """Build and sign ``name`` v``version`` (weights from ``seed``); returns its manifest URL."""
        src = model_file or make_linear_onnx(self.root / "src" / f"{name}-{version}.onnx", seed=seed)
        out = self.root / "bundles" / name / str(version)
        bundle.build_bundle(src, out, name, version, [self.key], overwrite=True, **kw)
        assert self.server is not None
        return f"{self.server.url.rstrip('/')}/{name}/{version}/manifest.json"

    def send(self, ctype: str, params: dict[str, Any], device: str = "dev1", cid: str | None = None,
             ttl_s: float = 600) -> str:
        cid, env = commands.make_command(ctype, params, {"device": device}, [self.key], ttl_s=ttl_s, command_id=cid)
        self.obs.publish(f"{self.prefix}/{device}/cmd", env)
        return cid

    def deploy(self, model: str, url: str, device: str = "dev1", **params: Any) -> str:
        return self.send("deploy", {"model": model, "manifest_url": url, **params}, device)

    def end_of(self, job: str, device: str = "dev1", timeout_s: float = 60) -> dict[str, Any]:
        return self.obs.wait(lambda t, d: t == f"{self.prefix}/{device}/jobs/{job}" and d.get("state") in TERMINAL,
                             timeout_s=timeout_s, what=f"end of job {job}")

    def updates(self, job: str, device: str = "dev1") -> list[dict[str, Any]]:
        return self.obs.find(lambda t, d: t == f"{self.prefix}/{device}/jobs/{job}")

    def events(self, kind: str, device: str = "dev1") -> list[dict[str, Any]]:
        return self.obs.find(lambda t, d: t == f"{self.prefix}/{device}/events" and d.get("event") == kind)

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()


@pytest.fixture(name="fleet")
def fleet_fixture(tmp_path: Path, mosquitto: Mosquitto) -> Iterator[Fleet]:
    """A Fleet with its observer on the test's broker, closed afterwards."""
    obs = Observer(mosquitto.host, mosquitto.port)
    f = Fleet(tmp_path, obs)
    try:
        yield f
    finally:
        f.close()
        obs.close()


def infer(agent: AgentProcess, model: str = "lin", x: np.ndarray = X) -> tuple[int, np.ndarray]:
    """(serving version, outputs) through KServe v2 over HTTP."""
    import requests

    body = {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.reshape(-1).tolist()}]}
    r = requests.post(f"{agent.api}/v2/models/{model}/infer", json=body, timeout=30)
    assert r.status_code == 200, r.text
    doc = r.json()
    out = doc["outputs"][0]
    return int(doc["model_version"]), np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


def reshape_model(path: Path) -> Path:
    """x[-1,4] → Reshape to [3,-1]: valid for a batch of 3 (the golden samples), a runtime
    error inside onnxruntime for a batch of 2 (the requests)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])], "reshaper",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, None])],
        initializer=[numpy_helper.from_array(np.array([3, -1], dtype=np.int64), "shape")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def models(agent: AgentProcess) -> dict[str, dict[str, Any]]:
    r = agent.agentctl("models", "--json")
    assert r.returncode == 0, r.stderr
    return {m["name"]: m for m in json.loads(r.stdout)}


def wait_until(pred: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.05) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(poll_s)
    raise TimeoutError(f"{what} not reached within {timeout_s} s")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def run_agent_in_child(config_path: str, log_path: str) -> None:
    """Target of a forkserver child: run one agent until killed (fault-injection tests)."""
    import threading

    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 2)
    os.dup2(fd, 1)
    from agent import config, logs
    from agent.daemon import Agent

    logs.setup("info")
    agent = Agent(config.load(config_path))
    agent.start()
    threading.Event().wait()
