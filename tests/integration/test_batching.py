"""Dynamic batching (agent/serving/batcher.py behind Registry.infer): concurrent requests run as
one onnxruntime call and each gets exactly its own rows; other shapes run apart; a request whose
deadline passes in the queue ends alone; models without a dynamic batch dimension never batch."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from conftest import make_linear_onnx

from agent import errors
from agent.backends.base import LoadOptions
from agent.backends.onnxruntime import CPU, OnnxRuntimeBackend
from agent.serving.admission import Limits
from agent.serving.batcher import Batcher
from agent.serving.registry import Registry, ServingVersion

CLIENTS = 8
JOIN_S = 10.0


def make_scale_onnx(path: Path, batch_dim: Any = "batch") -> Path:
    """y = 2·x on [batch, n]: the second dimension free, so requests may differ in it."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph([helper.make_node("Mul", ["x", "two"], ["y"])], "scale",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch_dim, "n"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch_dim, "n"])],
                              initializer=[numpy_helper.from_array(np.array(2.0, dtype=np.float32), "two")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _registry(path: Path, rows: int = 8, delay_us: int = 200_000, manifest: dict[str, Any] | None = None,
              name: str = "m") -> tuple[Registry, ServingVersion]:
    reg = Registry(limits=Limits(batch_rows=rows, batch_delay_us=delay_us, max_inflight=CLIENTS))
    sv = ServingVersion(name, 1, "onnx-fp32", OnnxRuntimeBackend().load(path, CPU, LoadOptions()),
                        manifest=manifest or {})
    reg.activate(sv)
    return reg, sv


def _concurrently(reg: Registry, feeds: list[dict[str, np.ndarray]]) -> list[Any]:
    out: list[Any] = [None] * len(feeds)
    start = threading.Barrier(len(feeds))

    def one(i: int) -> None:
        start.wait(JOIN_S)
        try:
            out[i] = reg.infer("m", feeds[i])[1]
        except Exception as e:
            out[i] = e
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(feeds))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_S)
    return out


def test_each_request_gets_exactly_its_own_rows(tmp_path: Path) -> None:
    path = make_linear_onnx(tmp_path / "linear.onnx", in_dim=4, out_dim=3, seed=5)
    reg, sv = _registry(path)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.standard_normal((1 + i % 2, 4)).astype(np.float32)} for i in range(CLIENTS)]
    got = _concurrently(reg, feeds)
    for f, g in zip(feeds, got, strict=True):
        assert isinstance(g, dict), g
        want = sess.run(None, f)[0]
        assert g["y"].shape == want.shape
        np.testing.assert_allclose(g["y"], want, rtol=1e-6, atol=1e-6)
    assert sv.batcher is not None and sv.batcher.batches >= 1  # some of them really shared a call


def test_other_shapes_run_apart(tmp_path: Path) -> None:
    reg, sv = _registry(make_scale_onnx(tmp_path / "scale.onnx"))
    rng = np.random.default_rng(2)
    feeds = [{"x": rng.standard_normal((1, 3 if i % 2 else 5)).astype(np.float32)} for i in range(CLIENTS)]
    got = _concurrently(reg, feeds)
    for f, g in zip(feeds, got, strict=True):
        assert isinstance(g, dict), g
        np.testing.assert_array_equal(g["y"], 2 * f["x"])
    assert sv.batcher is not None


def test_a_deadline_passed_in_the_queue_ends_only_its_request(tmp_path: Path) -> None:
    path = make_linear_onnx(tmp_path / "linear.onnx", in_dim=4, out_dim=3, seed=6)
    model = OnnxRuntimeBackend().load(path, CPU, LoadOptions())
    b = Batcher(model.infer, max_rows=8, delay_s=1.0, wait_s=10.0)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    a = {"x": np.full((1, 4), 1.5, dtype=np.float32)}
    out: dict[str, Any] = {}
    leader = threading.Thread(target=lambda: out.setdefault("a", b.infer(a)))
    leader.start()
    for _ in range(1000):  # the leader is queued, waiting up to its delay for company
        if b._pending:
            break
        time.sleep(0.001)
    with pytest.raises(errors.RejectError) as e:
        b.infer({"x": np.zeros((1, 4), dtype=np.float32)}, wait_s=0.05)
    assert e.value.code == errors.BUSY
    leader.join(JOIN_S)
    np.testing.assert_allclose(out["a"]["y"], sess.run(None, a)[0], rtol=1e-6, atol=1e-6)
    assert b.batches == 0  # the leader ran alone: the request that left is not in its call


def test_off_without_a_batch_dimension_or_when_disabled(tmp_path: Path) -> None:
    _, fixed = _registry(make_scale_onnx(tmp_path / "fixed.onnx", batch_dim=1))
    assert fixed.batcher is None
    linear = make_linear_onnx(tmp_path / "linear.onnx")
    _, off = _registry(linear, rows=1)
    assert off.batcher is None
    _, by_manifest_off = _registry(linear, rows=8, manifest={"serving": {"max_batch": 1}})
    assert by_manifest_off.batcher is None
    _, by_manifest_on = _registry(linear, rows=1, manifest={"serving": {"max_batch": 4, "max_queue_delay_us": 100}})
    assert by_manifest_on.batcher is not None and by_manifest_on.batcher.max_rows == 4
    assert by_manifest_on.batcher.delay_s == pytest.approx(1e-4)


def test_process_isolation_each_request_its_own_rows(tmp_path: Path) -> None:
    """With the model in a worker process (which answers the HTTP requests itself, with the
    batching settings the daemon hands it), concurrent clients each get their own rows."""
    import http.client
    import json

    from agent.backends.isolated import IsolatedModel
    from agent.serving.kserve import KServeServer

    path = make_linear_onnx(tmp_path / "linear.onnx", in_dim=4, out_dim=3, seed=9)
    reg = Registry(limits=Limits(batch_rows=8, batch_delay_us=20_000, max_inflight=CLIENTS))
    server = KServeServer(reg, "127.0.0.1", 0)
    server.start()
    model = IsolatedModel("onnxruntime", CPU, path, LoadOptions(threads=1), infer_timeout_s=JOIN_S)
    try:
        reg.activate(ServingVersion("m", 1, "onnx-fp32", model))
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(4)
        xs = [rng.standard_normal((1 + i % 3, 4)).astype(np.float32) for i in range(CLIENTS)]
        got: list[Any] = [None] * CLIENTS
        start = threading.Barrier(CLIENTS)

        def client(i: int) -> None:
            c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=JOIN_S)
            body = json.dumps({"inputs": [{"name": "x", "shape": list(xs[i].shape), "datatype": "FP32",
                                           "data": xs[i].ravel().tolist()}]}).encode()
            start.wait(JOIN_S)
            answers = []
            for _ in range(5):  # keep-alive: after the first, the worker answers
                c.request("POST", "/v2/models/m/infer", body=body, headers={"Content-Type": "application/json"})
                r = c.getresponse()
                answers.append((r.status, json.loads(r.read())))
            c.close()
            got[i] = answers
        threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(JOIN_S)
        for x, answers in zip(xs, got, strict=True):
            want = sess.run(None, {"x": x})[0]
            assert answers is not None and len(answers) == 5
            for status, doc in answers:
                assert status == 200, doc
                out = doc["outputs"][0]
                assert out["shape"] == list(want.shape)
                np.testing.assert_allclose(np.asarray(out["data"], np.float32).reshape(want.shape), want,
                                           rtol=1e-5, atol=1e-6)
    finally:
        server.stop(timeout_s=2)
        reg.close(timeout_s=2)
        model.close()
