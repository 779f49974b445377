"""Process isolation's direct path: the daemon hands an infer connection to the model's worker,
which answers it in one process (agent/serving/adopted.py, agent/backends/isolated.py).

Real parts only: a real KServe server on loopback, real worker processes running onnxruntime on
models built here, real signals (SIGSEGV, SIGSTOP) for the crash and hang cases.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from conftest import make_linear_onnx

from agent.backends.base import LoadOptions
from agent.backends.isolated import IDLE, IsolatedModel
from agent.backends.onnxruntime import CPU
from agent.backends.wire import DeathReason
from agent.serving.guard import ApiPolicy
from agent.serving.kserve import KServeServer
from agent.serving.registry import Registry, ServingVersion

TIMEOUT_S = 10.0
X = np.arange(8, dtype=np.float32).reshape(2, 4) / 8


def _body(x: np.ndarray = X) -> bytes:
    return json.dumps({"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.ravel().tolist()}]}).encode()


def _expected(path: Path) -> np.ndarray:
    out: np.ndarray = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": X})[0]
    return out


def _post(c: http.client.HTTPConnection, path: str = "/v2/models/lin/infer", body: bytes | None = None
          ) -> tuple[int, dict[str, Any]]:
    c.request("POST", path, body=_body() if body is None else body, headers={"Content-Type": "application/json"})
    r = c.getresponse()
    return r.status, json.loads(r.read())


def _wait(cond: Any, what: str, timeout_s: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _proc_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


class Env:
    def __init__(self, root: Path, policy: ApiPolicy | None = None) -> None:
        self.root = root
        self.seen: list[tuple[str, int, bool]] = []
        self.registry = Registry(observer=lambda n, v, b, s, ok: self.seen.append((n, v, ok)))
        self.server = KServeServer(self.registry, "127.0.0.1", 0, policy=policy)
        self.server.start()
        self.models: list[IsolatedModel] = []

    def serve(self, name: str, version: int, seed: int, infer_timeout_s: float = 5.0) -> tuple[IsolatedModel, Path]:
        path = make_linear_onnx(self.root / f"{name}{version}.onnx", seed=seed)
        m = IsolatedModel("onnxruntime", CPU, path, LoadOptions(threads=1), infer_timeout_s=infer_timeout_s)
        self.models.append(m)
        self.registry.activate(ServingVersion(name, version, "onnx-fp32", m))
        return m, path

    def conn(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=TIMEOUT_S)

    def close(self) -> None:
        self.server.stop(timeout_s=2)
        self.registry.close(timeout_s=2)
        for m in self.models:
            m.close()


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    try:
        yield e
    finally:
        e.close()


def test_worker_answers_infer_and_daemon_the_rest_on_one_connection(env: Env) -> None:
    m, path = env.serve("lin", 1, seed=1)
    c = env.conn()
    status, doc = _post(c)
    assert status == 200 and doc["model_version"] == "1"
    assert np.allclose(np.asarray(doc["outputs"][0]["data"], np.float32).reshape(2, 3), _expected(path), rtol=1e-5)
    assert len(m._held) == 1, "the keep-alive connection now lives in the worker"
    # the same connection asks the daemon's endpoints: the worker gives it back, unparsed
    c.request("GET", "/v2/models/lin")
    r = c.getresponse()
    meta = json.loads(r.read())
    assert r.status == 200 and meta["name"] == "lin" and meta["versions"] == ["1"]
    _wait(lambda: not m._held, "the connection back in the daemon")
    for _ in range(20):
        status, doc = _post(c)
        assert status == 200
    # calls the worker answered reach probation's counters and the telemetry observer
    _wait(lambda: env.registry.get("lin").calls >= 21, "worker statistics")  # type: ignore[union-attr]
    assert sum(1 for n, v, ok in env.seen if (n, v, ok) == ("lin", 1, True)) == 21
    c.close()


def test_bad_request_in_the_worker_is_a_400_and_not_a_model_error(env: Env) -> None:
    env.serve("lin", 1, seed=1)
    c = env.conn()
    status, doc = _post(c, body=_body(np.ones((2, 5), np.float32)))
    assert status == 400 and doc["code"] == "invalid_input" and "'x'" in doc["error"]
    status, _ = _post(c)
    assert status == 200, "the connection stays usable"
    _wait(lambda: env.registry.get("lin").calls >= 2, "worker statistics")  # type: ignore[union-attr]
    sv = env.registry.get("lin")
    assert sv is not None and sv.errors == 0, "a client's mistake is not the model's failure"
    assert ("lin", 1, False) in env.seen


def test_pipelined_requests_cross_between_worker_and_daemon_in_order(env: Env) -> None:
    env.serve("lin", 1, seed=1)
    body = _body()
    infer = (b"POST /v2/models/lin/infer HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
             b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    meta = b"GET /v2/models/lin HTTP/1.1\r\nHost: localhost\r\n\r\n"
    with socket.create_connection(("127.0.0.1", env.server.port), timeout=TIMEOUT_S) as s:
        s.sendall(infer + meta + infer + meta)  # four requests in one write
        f = s.makefile("rb")
        answers = []
        for _ in range(4):
            line = f.readline()
            assert line.startswith(b"HTTP/1.1 200"), line
            length = 0
            while (h := f.readline()) not in (b"\r\n", b""):
                if h.lower().startswith(b"content-length:"):
                    length = int(h.split(b":")[1])
            answers.append(json.loads(f.read(length)))
    assert [("model_version" in a, "versions" in a) for a in answers] == [(True, False), (False, True)] * 2


def test_swap_moves_open_connections_to_the_new_version_without_errors(env: Env) -> None:
    old, _ = env.serve("lin", 1, seed=1)
    c = env.conn()
    assert _post(c)[1]["model_version"] == "1"
    new, path2 = env.serve("lin", 2, seed=2)  # activate: the old worker gives its connections back
    status, doc = _post(c)  # same connection, no reconnect
    assert status == 200 and doc["model_version"] == "2"
    assert np.allclose(np.asarray(doc["outputs"][0]["data"], np.float32).reshape(2, 3), _expected(path2), rtol=1e-5)
    _wait(lambda: old._proc.poll() is not None, "the old worker to exit")
    assert old._proc.returncode == 0 and not old._held
    assert len(new._held) == 1


def test_idle_connection_survives_a_worker_crash(env: Env) -> None:
    m, _ = env.serve("lin", 1, seed=1)
    c = env.conn()
    assert _post(c)[0] == 200
    _wait(lambda: m._slots.get(next(iter(m._held)))[0] == IDLE, "the worker back to waiting")
    os.kill(m.pid, signal.SIGSEGV)  # a native crash while the connection waits for its next request
    _wait(lambda: not m.alive and not m._held, "the crash noticed and the connection taken over")
    assert m.death_reason is DeathReason.CRASHED and "crashed" in m.death
    status, doc = _post(c)  # the daemon now holds the connection; the model is dead
    assert status == 500 and doc["code"] == "worker_crashed"
    env.serve("lin", 2, seed=2)  # what the supervisor does: a replacement
    status, doc = _post(c)
    assert status == 200 and doc["model_version"] == "2", "the same connection reaches the new worker"


def test_hung_worker_answers_the_waiting_request_with_worker_hung(env: Env) -> None:
    m, _ = env.serve("lin", 1, seed=1, infer_timeout_s=0.5)
    c = env.conn()
    assert _post(c)[0] == 200
    _wait(lambda: m._slots.get(next(iter(m._held)))[0] == IDLE, "the worker back to waiting")
    os.kill(m.pid, signal.SIGSTOP)  # the runtime stops answering
    try:
        _wait(lambda: _proc_state(m.pid) == "T", "the worker stopped")  # kill() returns before it is
        t0 = time.monotonic()
        status, doc = _post(c)
        assert status == 500 and doc["code"] == "worker_hung", doc
        assert time.monotonic() - t0 < 3.0, "cut off by infer_timeout_s"
        assert not m.alive and m.death_reason is DeathReason.HUNG
    finally:
        if m._proc.poll() is None:
            os.kill(m.pid, signal.SIGCONT)


def test_other_models_on_the_same_connection_go_to_their_own_worker(env: Env) -> None:
    a, _ = env.serve("a", 1, seed=1)
    b, _ = env.serve("b", 1, seed=2)
    c = env.conn()
    for name in ("a", "b", "a", "b"):
        status, doc = _post(c, f"/v2/models/{name}/infer")
        assert status == 200 and doc["model_name"] == name
    assert len(b._held) == 1 and not a._held, "the connection moved from a's worker to b's"
    status, doc = _post(c, "/v2/models/nope/infer")
    assert status == 404 and doc["code"] == "unknown_model"
    status, doc = _post(c, "/v2/models/a/versions/7/infer")
    assert status == 404 and doc["code"] == "unknown_model"


def test_a_worker_started_ahead_is_claimed_once_and_a_mismatched_one_ends(tmp_path: Path) -> None:
    from agent.backends.isolated import prestart

    path = make_linear_onnx(tmp_path / "m.onnx", seed=1)
    sp = prestart("onnxruntime")
    assert sp is not None and sp.claim() and not sp.claim(), "one load per worker"
    m = IsolatedModel("onnxruntime", CPU, path, LoadOptions(threads=1), spare=sp)
    try:
        assert m.pid == sp.proc.pid
        assert np.allclose(m.infer({"x": X})["y"], _expected(path), rtol=1e-5)
    finally:
        m.close()
    wrong = prestart("tflite")
    assert wrong is not None
    m = IsolatedModel("onnxruntime", CPU, path, LoadOptions(threads=1), spare=wrong)
    try:
        assert m.pid != wrong.proc.pid
        assert wrong.proc.wait(5) is not None, "a worker started for another runtime ends"
    finally:
        m.close()


def test_worker_death_is_noticed_on_kernels_without_pidfd(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """Kernels before 5.3 have no pidfd_open (faked here by removing it): the monitor polls."""
    monkeypatch.delattr(os, "pidfd_open")
    m, _ = env.serve("lin", 1, seed=1)
    c = env.conn()
    assert _post(c)[0] == 200
    _wait(lambda: m._slots.get(next(iter(m._held)))[0] == IDLE, "the worker back to waiting")
    os.kill(m.pid, signal.SIGKILL)
    _wait(lambda: m.death_reason is DeathReason.CRASHED and not m._held, "the death noticed and the connection taken over")
    status, doc = _post(c)
    assert status == 500 and doc["code"] == "worker_crashed"


def test_a_worker_model_declares_its_capabilities_and_why_it_died(env: Env, tmp_path: Path) -> None:
    """What a caller may ask of a model is what the protocols declare (agent/backends/base.py):
    a model in a worker is IsolatedCapable, an in-process one only a LoadedModel, and why a
    worker died is its DeathReason, whatever its message says."""
    from agent import errors
    from agent.backends.base import IsolatedCapable, LoadedModel
    from agent.backends.onnxruntime import OnnxRuntimeBackend

    m, path = env.serve("lin", 1, seed=3)
    sv = env.registry.get("lin")
    assert sv is not None and sv.worker is m and isinstance(m, IsolatedCapable)
    assert m.details.get("compute_precision") == "fp32", "the worker's model details reach the daemon"
    local = OnnxRuntimeBackend().load(path, CPU, LoadOptions(threads=1))
    try:
        assert isinstance(local, LoadedModel) and not isinstance(local, IsolatedCapable)
        in_process = ServingVersion("loc", 1, "onnx-fp32", local)
        assert in_process.worker is None and in_process.alive
    finally:
        local.close()
    assert m.death_reason is None and sv.alive
    os.kill(m.pid, signal.SIGKILL)
    _wait(lambda: m.death_reason is not None, "the worker's death noticed")
    assert m.death_reason is DeathReason.CRASHED and not sv.alive
    with pytest.raises(errors.RetryableError) as ei:
        m.infer({"x": X})
    assert ei.value.code == errors.WORKER_CRASHED
