"""Traffic does not decide what serves: bursts, oversized and hostile requests against a real daemon.

Each test runs the real daemon as a process (process isolation, real onnxruntime in a real worker)
with a small ``backends.infer_timeout_s`` so that the timeouts involved pass in seconds, and
drives it over the real KServe v2 HTTP API on loopback. Each asserts the refusal code or the
bound, and that the serving version (and, where it matters, the very worker process) is unchanged.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from agentproc import AgentProcess
from conftest import Mosquitto
from fleet import (
    Fleet,
    X,
    expected,
    fleet_fixture,  # noqa: F401 - the `fleet` fixture
    infer,
    models,
    pid_alive,
    wait_until,
)

INFER_TIMEOUT_S = 2.0  # the hung-worker deadline in these tests
PAUSE_S = INFER_TIMEOUT_S + 1.0  # a quiet spell longer than the deadline
BURSTS = 3
CLIENTS = 32  # concurrent clients per burst: half keep their connection, half open one per request
REQUESTS_PER_CLIENT = 15
HTTP_TIMEOUT_S = 20.0
JOB_TIMEOUT_S = 60.0


def _start(fleet: Fleet, mosquitto: Mosquitto, toml: str = "", version: int = 1) -> AgentProcess:
    """A daemon serving ``lin`` v``version`` (seed = version) in a worker process."""
    agent = fleet.agent("dev", mosquitto.url,
                        f"\n[backends]\nisolation = \"process\"\nautotune = false\n"
                        f"infer_timeout_s = {INFER_TIMEOUT_S}\n{toml}")
    agent.start()
    job = fleet.deploy("lin", fleet.bundle("lin", version, seed=version))
    done = fleet.end_of(job, timeout_s=JOB_TIMEOUT_S)
    assert done["state"] == "SUCCEEDED", (done, agent.log.read_text()[-3000:])
    return agent


def _body(x: np.ndarray = X) -> bytes:
    return json.dumps({"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.ravel().tolist()}]}).encode()


def _post(c: http.client.HTTPConnection, body: bytes, model: str = "lin",
          headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], dict[str, Any]]:
    c.request("POST", f"/v2/models/{model}/infer", body=body,
              headers={"Content-Type": "application/json", **(headers or {})})
    r = c.getresponse()
    raw = r.read()
    return r.status, {k.lower(): v for k, v in r.getheaders()}, (json.loads(raw) if raw else {})


def _conn(agent: AgentProcess) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", agent.api_port, timeout=HTTP_TIMEOUT_S)


def test_idle_then_burst_keeps_the_worker(fleet: Fleet, mosquitto: Mosquitto) -> None:
    """Bursts of keep-alive and fresh connections, with quiet spells longer than the hung-worker
    deadline between them: the same worker answers every request (no restart, no failure)."""
    agent = _start(fleet, mosquitto)
    try:
        pid = models(agent)["lin"]["worker_pid"]
        assert pid
        want = expected(1)
        keep = [_conn(agent) for _ in range(CLIENTS // 2)]  # kept across the quiet spells
        failures: list[str] = []

        def client(i: int) -> None:
            for _ in range(REQUESTS_PER_CLIENT):
                c = keep[i] if i < len(keep) else _conn(agent)
                try:
                    status, _, doc = _post(c, _body())
                    if status != 200 or doc.get("model_version") != "1":
                        failures.append(f"{status} {doc}")
                    elif not np.allclose(np.asarray(doc["outputs"][0]["data"]).reshape(want.shape), want, rtol=1e-5):
                        failures.append(f"wrong outputs {doc}")
                except (OSError, http.client.HTTPException) as e:
                    failures.append(repr(e))
                finally:
                    if i >= len(keep):
                        c.close()

        for burst in range(BURSTS):
            threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(HTTP_TIMEOUT_S * REQUESTS_PER_CLIENT)
            assert not failures, (burst, failures[:5], agent.log.read_text()[-3000:])
            time.sleep(PAUSE_S)  # quiet for longer than infer_timeout_s
        for c in keep:
            c.close()
        m = models(agent)["lin"]
        assert m["worker_pid"] == pid, agent.log.read_text()[-3000:]
        assert m["version"] == 1
        assert "hung" not in agent.log.read_text()
        assert fleet.events("worker_restarted") == []
        assert infer(agent)[0] == 1
    finally:
        agent.stop()


def _conv_model(path: Path, seed: int, out_channels: int = 1) -> Path:
    """x[batch, 1, h, w] → a 3×3 convolution without padding: any h, w ≥ 3 computes; h = w = 1
    is an allowed shape the runtime cannot compute."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = rng.standard_normal((out_channels, 1, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["y"], kernel_shape=[3, 3])], "conv3",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", out_channels, None, None])],
        initializer=[numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def _deploy_conv(fleet: Fleet, version: int, out_channels: int = 1, wait: bool = True) -> str:
    src = fleet.root / "src"
    samples = src / "conv-in.npz"
    src.mkdir(parents=True, exist_ok=True)
    np.savez(samples, x=np.random.default_rng(3).standard_normal((1, 1, 8, 8)).astype(np.float32))
    model = _conv_model(src / f"conv{version}.onnx", seed=version, out_channels=out_channels)
    job = fleet.deploy("conv", fleet.bundle("conv", version, seed=version, model_file=model, inputs=samples))
    if wait:
        done = fleet.end_of(job, timeout_s=JOB_TIMEOUT_S)
        assert done["state"] == "SUCCEEDED", done
    return job


def _binary(x: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """A KServe v2 binary-tensor request for input ``x``."""
    head = json.dumps({"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                                   "parameters": {"binary_data_size": x.nbytes}}]}).encode()
    return head + x.tobytes(), {"Inference-Header-Content-Length": str(len(head)),
                                "Content-Type": "application/octet-stream"}


def _concurrently(n: int, fn: Any) -> list[Any]:
    out: list[Any] = [None] * n

    def run(i: int) -> None:
        try:
            out[i] = fn(i)
        except Exception as e:  # recorded, asserted by the caller
            out[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(HTTP_TIMEOUT_S * 3)
    return out


LARGE_CLIENTS = 6
LARGE_BINARY_BYTES = 4 * 1024 * 1024  # each, over lin's bound (64 rows × 4 floats), under the discard limit
DECODE_SIDE = 800  # 800×800 JSON images: megabytes of numbers each, decoded for longer (together) than infer_timeout_s


def test_large_requests_neither_kill_the_worker_nor_move_the_version(fleet: Fleet, mosquitto: Mosquitto) -> None:
    """Concurrent oversized binary requests are refused 413 ``too_large`` by the model's bound
    (before the runtime); concurrent large JSON requests within the bound are decoded outside the
    hung-worker deadline and answered. No worker is killed, no version moves."""
    agent = _start(fleet, mosquitto, "max_batch = 64\nmax_inflight = 2\n")
    try:
        _deploy_conv(fleet, 1)
        pids = {m: models(agent)[m]["worker_pid"] for m in ("lin", "conv")}
        big = np.zeros((LARGE_BINARY_BYTES // 16, 4), np.float32)  # far more than 64 rows

        def oversized(_: int) -> tuple[int, dict[str, Any]]:
            body, headers = _binary(big)
            c = _conn(agent)
            try:
                status, _, doc = _post(c, body, "lin", headers)
                return status, doc
            finally:
                c.close()

        for got in _concurrently(LARGE_CLIENTS, oversized):
            assert not isinstance(got, Exception), got
            status, doc = got
            assert status == 413 and doc["code"] == "too_large", (status, doc)
        over_batch = np.zeros((65, 4), np.float32)  # within the body bound, one row over max_batch
        c = _conn(agent)
        try:
            status, _, doc = _post(c, _body(over_batch))
            assert status == 413 and doc["code"] == "too_large" and "65" in doc["error"], doc
            status, _, doc = _post(c, _body(np.zeros((64, 4), np.float32)))
            assert status == 200 and doc["model_version"] == "1", doc
        finally:
            c.close()

        image = np.random.default_rng(5).standard_normal((1, 1, DECODE_SIDE, DECODE_SIDE)).astype(np.float32)
        json_body = _body(image)

        def decode_heavy(_: int) -> tuple[int, dict[str, str], dict[str, Any]]:
            c = _conn(agent)
            try:
                return _post(c, json_body, "conv")
            finally:
                c.close()

        answered = 0
        for got in _concurrently(LARGE_CLIENTS, decode_heavy):
            assert not isinstance(got, Exception), got
            status, headers, doc = got
            if status == 503:  # beyond the model's in-flight and queue bounds: the caller's to retry
                assert doc["code"] == "busy" and headers.get("retry-after") == "1", (headers, doc)
                continue
            assert status == 200 and doc["outputs"][0]["shape"] == [1, 1, DECODE_SIDE - 2, DECODE_SIDE - 2], \
                (status, str(doc)[:300])
            answered += 1
        assert answered >= 1
        now = models(agent)
        assert {m: now[m]["worker_pid"] for m in pids} == pids, agent.log.read_text()[-3000:]
        assert (now["lin"]["version"], now["conv"]["version"]) == (1, 1)
        assert "hung" not in agent.log.read_text()
        assert fleet.events("worker_restarted") == [] and fleet.events("rollback") == []
        assert infer(agent)[0] == 1
    finally:
        agent.stop()


def test_runtime_failure_on_a_callers_shape_does_not_fail_probation(fleet: Fleet, mosquitto: Mosquitto) -> None:
    """During v2's probation, requests with an allowed shape the runtime cannot compute (1×1 under
    a 3×3 kernel, which v1 never answered either) are the caller's 400 ``invalid_input``: v2
    stays and its deploy SUCCEEDS."""
    agent = _start(fleet, mosquitto, "[deploy]\nprobation_s = 4\nprobation_max_errors = 5\n")
    try:
        _deploy_conv(fleet, 1)
        job = _deploy_conv(fleet, 2, wait=False)
        wait_until(lambda: models(agent)["conv"].get("version") == 2, JOB_TIMEOUT_S, "v2 serving")
        tiny = np.ones((1, 1, 1, 1), np.float32)
        c = _conn(agent)
        try:
            for _ in range(8):
                status, _, doc = _post(c, _body(tiny), "conv")
                assert status == 400 and doc["code"] == "invalid_input", (status, doc)
                assert "'x'" in doc["error"] or "x [1, 1, 1, 1]" in doc["error"], doc
        finally:
            c.close()
        end = fleet.end_of(job, timeout_s=JOB_TIMEOUT_S)
        assert end["state"] == "SUCCEEDED", end
        assert models(agent)["conv"]["version"] == 2
        assert fleet.events("rollback") == []
        c = _conn(agent)
        try:
            status, _, doc = _post(c, _body(np.ones((1, 1, 5, 5), np.float32)), "conv")
            assert status == 200 and doc["model_version"] == "2", doc
        finally:
            c.close()
    finally:
        agent.stop()


BUSY_SIDE = 1000  # a 1000×1000 JSON image: its decoding and answer hold the model's only slot a while
BUSY_ROUNDS = 3
HEAVY_TRIES = 50


def test_beyond_inflight_and_queue_bounds_callers_get_busy(fleet: Fleet, mosquitto: Mosquitto) -> None:
    """With one call in flight allowed and none queued, requests arriving while a heavy one holds
    the slot get 503 ``busy`` with Retry-After at once; afterwards the model answers again, on
    the same worker and version."""
    agent = _start(fleet, mosquitto, "max_inflight = 1\nmax_queue = 0\n")
    try:
        _deploy_conv(fleet, 1)
        pid = models(agent)["conv"]["worker_pid"]
        heavy = _body(np.random.default_rng(9).standard_normal((1, 1, BUSY_SIDE, BUSY_SIDE)).astype(np.float32))
        small = _body(np.ones((1, 1, 4, 4), np.float32))
        busy: list[dict[str, str]] = []
        other: list[tuple[int, dict[str, Any]]] = []
        for _ in range(BUSY_ROUNDS):
            done = threading.Event()
            results: list[int] = []

            def big(done: threading.Event, results: list[int]) -> None:
                c = _conn(agent)
                try:
                    for _ in range(HEAVY_TRIES):  # it too may find the slot taken (by a small one)
                        status, _, doc = _post(c, heavy, "conv")
                        if status != 503 or doc.get("code") != "busy":
                            break
                    results.append(status)
                finally:
                    c.close()
                    done.set()

            t = threading.Thread(target=big, args=(done, results))
            t.start()
            c = _conn(agent)
            try:
                while not done.is_set():
                    status, headers, doc = _post(c, small, "conv")
                    if status == 503 and doc.get("code") == "busy":
                        busy.append(headers)
                    elif status != 200:
                        other.append((status, doc))
            finally:
                c.close()
            t.join(HTTP_TIMEOUT_S)
            assert results == [200], results
            if busy:
                break
        assert busy, "no request was refused while the only slot was taken"
        assert all(h.get("retry-after") == "1" for h in busy), busy[:3]
        assert other == [], other[:3]
        c = _conn(agent)
        try:
            status, _, doc = _post(c, small, "conv")
            assert status == 200 and doc["model_version"] == "1", doc
        finally:
            c.close()
        m = models(agent)["conv"]
        assert (m["worker_pid"], m["version"]) == (pid, 1)
        assert fleet.events("worker_restarted") == [] and fleet.events("rollback") == []
    finally:
        agent.stop()


RECYCLE_TIMEOUT_S = 30.0
AFTER_RECYCLE_S = 1.0


def test_worker_over_its_memory_ceiling_is_replaced_without_failing_a_request(
        fleet: Fleet, mosquitto: Mosquitto) -> None:
    """A worker whose RSS stays above ``backends.worker_memory_max_mb`` (1 MB here: any worker) is
    replaced between requests: a fresh worker takes the traffic over and the old one ends, while
    clients on kept and new connections see no failure and the same version."""
    agent = _start(fleet, mosquitto, "worker_memory_max_mb = 1\n")
    try:
        stop = threading.Event()
        failures: list[str] = []
        answered = [0]

        def client(keep: bool) -> None:
            c = _conn(agent)
            try:
                while not stop.is_set():
                    if not keep:
                        c.close()
                        c = _conn(agent)
                    try:
                        status, _, doc = _post(c, _body())
                    except (OSError, http.client.HTTPException) as e:
                        failures.append(repr(e))
                        c.close()
                        c = _conn(agent)
                        continue
                    if status != 200 or doc.get("model_version") != "1":
                        failures.append(f"{status} {doc}")
                    answered[0] += 1
            finally:
                c.close()

        threads = [threading.Thread(target=client, args=(k,)) for k in (True, True, False)]
        for t in threads:
            t.start()
        try:
            ev = fleet.obs.wait(lambda t, d: t.endswith("/events") and d.get("event") == "worker_recycled",
                                timeout_s=RECYCLE_TIMEOUT_S, what="worker recycled")
            time.sleep(AFTER_RECYCLE_S)  # traffic goes on over the new worker
        finally:
            stop.set()
            for t in threads:
                t.join(HTTP_TIMEOUT_S)
        assert failures == [], failures[:5]
        assert answered[0] > 0
        assert ev["rss_mb"] > ev["limit_mb"] == 1 and ev["version"] == 1, ev
        m = models(agent)["lin"]
        assert m["worker_pid"] == ev["new_pid"] != ev["pid"] and m["version"] == 1, (m, ev)
        wait_until(lambda: not pid_alive(ev["pid"]), 10, "old worker ended")
        assert infer(agent)[0] == 1
    finally:
        agent.stop()


BUDGET_MB = 16  # api.max_body_inflight_mb in this test
BUDGET_MARGIN_MB = 32  # allocator slack and one request's decoded input and output beside the budget
BUDGET_CLIENTS = 24  # concurrent large requests: together ~8× the budget
BUDGET_SIDE = 1200  # 1200×1200 float32 images: ~5.8 MB binary bodies (dynamic h, w: only the global bound)
BUDGET_ROUNDS = 3


def _peak_rss_mb(pid: int) -> float:
    """The process's peak resident set (VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for {pid}")


def test_bodies_in_flight_are_bounded_per_process(fleet: Fleet, mosquitto: Mosquitto) -> None:
    """Many concurrent large binary requests to a model with dynamic h, w (no per-model body
    bound): bodies beyond ``api.max_body_inflight_mb`` are refused 503 ``busy`` with Retry-After
    before they are read; the rest are answered. The peak memory of the daemon and the worker
    grows by less than the budget plus a margin; no worker is killed, no version moves."""
    agent = fleet.agent("dev", mosquitto.url,  # the first line continues the [api] table
                        f"max_body_inflight_mb = {BUDGET_MB}\n\n[backends]\nisolation = \"process\"\n"
                        f"autotune = false\ninfer_timeout_s = {INFER_TIMEOUT_S}\nmax_inflight = 1\n")
    agent.start()
    try:
        _deploy_conv(fleet, 1)
        pid = models(agent)["conv"]["worker_pid"]
        x = np.random.default_rng(11).standard_normal((1, 1, BUDGET_SIDE, BUDGET_SIDE)).astype(np.float32)
        head = json.dumps({"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                                       "parameters": {"binary_data_size": x.nbytes}}],
                           "parameters": {"binary_data_output": True}}).encode()
        body = head + x.tobytes()
        headers = {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"}

        def one(_: int) -> tuple[int, dict[str, str], dict[str, Any] | int]:
            c = _conn(agent)
            try:
                c.request("POST", "/v2/models/conv/infer", body=body, headers=headers)
                r = c.getresponse()
                raw = r.read()
                hs = {k.lower(): v for k, v in r.getheaders()}
                return r.status, hs, (json.loads(raw) if r.status != 200 else len(raw))
            finally:
                c.close()

        for _ in range(2):  # the runtime's own buffers are in the baseline
            status, _, _ = one(0)
            assert status == 200
        base = {p: _peak_rss_mb(p) for p in (agent.proc.pid, pid)}
        answered = refused = 0
        for _ in range(BUDGET_ROUNDS):
            for got in _concurrently(BUDGET_CLIENTS, one):
                assert not isinstance(got, Exception), got
                status, hs, doc = got
                if status == 503:
                    assert isinstance(doc, dict) and doc["code"] == "busy" and hs.get("retry-after") == "1", (hs, doc)
                    refused += 1
                else:
                    assert status == 200 and doc == int(hs["inference-header-content-length"]) + \
                        4 * (BUDGET_SIDE - 2) ** 2, (status, hs, doc)
                    answered += 1
            if refused:
                break
        assert answered >= 1 and refused >= 1, (answered, refused)
        growth = {p: _peak_rss_mb(p) - base[p] for p in base}
        assert all(g < BUDGET_MB + BUDGET_MARGIN_MB for g in growth.values()), (growth, base)
        m = models(agent)["conv"]
        assert (m["worker_pid"], m["version"]) == (pid, 1)
        assert fleet.events("worker_restarted") == [] and fleet.events("rollback") == []
        status, _, _ = one(0)
        assert status == 200
    finally:
        agent.stop()
