"""KServe v2 inference API over real loopback HTTP, against real onnxruntime models."""

from __future__ import annotations

import http.client
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import requests
from conftest import make_linear_onnx

from agent.backends.base import LoadOptions
from agent.backends.onnxruntime import CPU, OnnxRuntimeBackend
from agent.bundles.manifest import TensorSpec
from agent.serving import handler, kserve
from agent.serving.kserve import KServeServer, ListenAddressError, parse_listen
from agent.serving.registry import Registry, ServingVersion

CLIENT_TIMEOUT_S = 10.0
SMALL_BODY_CAP = 2048  # bytes; the 413 tests send more than this
NAGLE_GUARD_S = 0.02  # a median above this means delayed ACKs are back (~44 ms each)


def make_mixed_onnx(path: Path) -> Path:
    """a int64 [-1, 3], m bool [-1, 3] → s = a + int64(m) (int64), h = float16(a) (float16)."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Cast", ["m"], ["mi"], to=TensorProto.INT64),
         helper.make_node("Add", ["a", "mi"], ["s"]),
         helper.make_node("Cast", ["a"], ["h"], to=TensorProto.FLOAT16)],
        "mixed",
        [helper.make_tensor_value_info("a", TensorProto.INT64, ["batch", 3]),
         helper.make_tensor_value_info("m", TensorProto.BOOL, ["batch", 3])],
        [helper.make_tensor_value_info("s", TensorProto.INT64, ["batch", 3]),
         helper.make_tensor_value_info("h", TensorProto.FLOAT16, ["batch", 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def make_words_onnx(path: Path) -> Path:
    """w string [-1, 2] → echo = w (string), code = LabelEncoder(w) (int64: cat 1, dog 2, else -1)."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["w"], ["echo"]),
         helper.make_node("LabelEncoder", ["w"], ["code"], domain="ai.onnx.ml", keys_strings=["cat", "dog"],
                          values_int64s=[1, 2], default_int64=-1)],
        "words",
        [helper.make_tensor_value_info("w", TensorProto.STRING, ["batch", 2])],
        [helper.make_tensor_value_info("echo", TensorProto.STRING, ["batch", 2]),
         helper.make_tensor_value_info("code", TensorProto.INT64, ["batch", 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 2)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


class FakeModel:
    """A LoadedModel that sleeps or fails, for the server's own behaviour."""

    backend_id = "fake:cpu"
    details: dict[str, Any] = {}  # LoadedModel: nothing to report
    known_shapes: list[Any] = []  # LoadedModel: a golden check assigns it

    def __init__(self, delay_s: float = 0.0, fail: bool = False) -> None:
        self.inputs: tuple[TensorSpec, ...] = (TensorSpec("x", "float32", (None, 4)),)
        self.outputs: tuple[TensorSpec, ...] = (TensorSpec("y", "float32", (None, 4)),)
        self.delay_s = delay_s
        self.fail = fail

    def infer(self, inputs: dict[str, Any]) -> dict[str, Any]:
        if self.fail:
            raise RuntimeError("kaboom")
        time.sleep(self.delay_s)
        return {"y": np.asarray(inputs["x"]) * 2}

    def close(self) -> None:
        pass


class Env:
    def __init__(self, tmp: Path) -> None:
        self.linear_path = make_linear_onnx(tmp / "linear.onnx")
        self.mixed_path = make_mixed_onnx(tmp / "mixed.onnx")
        backend = OnnxRuntimeBackend()
        self.registry = Registry()
        self.registry.activate(ServingVersion(
            "linear", 3, "onnx-fp32", backend.load(self.linear_path, CPU, LoadOptions())))
        self.registry.activate(ServingVersion(
            "mixed", 1, "onnx-fp32", backend.load(self.mixed_path, CPU, LoadOptions())))
        self.registry.activate(ServingVersion(
            "words", 1, "onnx-fp32", backend.load(make_words_onnx(tmp / "words.onnx"), CPU, LoadOptions())))
        self.registry.activate(ServingVersion("boom", 1, "fake", FakeModel(fail=True)))
        self.registry.activate(ServingVersion("slow", 1, "fake", FakeModel(delay_s=0.3)))
        self.ready = True
        self.server = KServeServer(self.registry, port=0, ready_fn=lambda: self.ready,
                                   metrics_fn=lambda: (b"# HELP x\nx 1\n", "text/plain; version=0.0.4"))
        self.server.start()
        self.url = self.server.url
        self.http = requests.Session()

    def ort_run(self, path: Path, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        sess = ort.InferenceSession(str(path), providers=[CPU])
        return list(sess.run(None, feed))


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    e = Env(tmp_path_factory.mktemp("kserve"))
    try:
        yield e
    finally:
        e.http.close()
        e.server.stop()
        e.registry.close()


def infer_json(env: Env, model: str, body: Any, path_extra: str = "") -> requests.Response:
    return env.http.post(f"{env.url}/v2/models/{model}{path_extra}/infer", json=body,
                         timeout=CLIENT_TIMEOUT_S)


def binary_request(host: str, port: int, path: str, header: dict[str, Any], blobs: list[bytes]
                   ) -> tuple[int, dict[str, str], bytes]:
    head = json.dumps(header).encode()
    body = head + b"".join(blobs)
    conn = http.client.HTTPConnection(host, port, timeout=CLIENT_TIMEOUT_S)
    try:
        conn.request("POST", path, body=body, headers={
            "Content-Type": "application/octet-stream",
            kserve.HEADER_LENGTH: str(len(head))})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def split_binary(headers: dict[str, str], body: bytes) -> tuple[dict[str, Any], bytes]:
    n = int(headers[kserve.HEADER_LENGTH.lower()])
    return json.loads(body[:n]), body[n:]


# --- health, metadata --------------------------------------------------------------------------


def test_health_and_server_metadata(env: Env) -> None:
    r = env.http.get(f"{env.url}/v2/health/live", timeout=CLIENT_TIMEOUT_S)
    assert r.status_code == 200 and r.json() == {"live": True}
    assert r.headers["Content-Type"] == "application/json"
    import email.utils

    date = r.headers["Date"]  # IMF-fixdate, as the stdlib would write it
    when = email.utils.parsedate_to_datetime(date).timestamp()
    assert abs(when - time.time()) < 5 and date == email.utils.formatdate(when, usegmt=True)
    assert env.http.get(f"{env.url}/v2/health/ready", timeout=CLIENT_TIMEOUT_S).status_code == 200
    env.ready = False
    try:
        r = env.http.get(f"{env.url}/v2/health/ready", timeout=CLIENT_TIMEOUT_S)
        assert r.status_code == 503 and r.json() == {"ready": False}
    finally:
        env.ready = True
    meta = env.http.get(f"{env.url}/v2", timeout=CLIENT_TIMEOUT_S).json()
    assert meta["name"] == "edge-agent"
    assert "binary_tensor_data" in meta["extensions"]
    assert isinstance(meta["version"], str)


def test_model_metadata_and_ready(env: Env) -> None:
    r = env.http.get(f"{env.url}/v2/models/linear", timeout=CLIENT_TIMEOUT_S)
    assert r.status_code == 200
    assert r.json() == {
        "name": "linear", "versions": ["3"], "platform": "onnxruntime:CPUExecutionProvider",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}]}
    assert env.http.get(f"{env.url}/v2/models/linear/versions/3",
                        timeout=CLIENT_TIMEOUT_S).json()["name"] == "linear"
    mixed = env.http.get(f"{env.url}/v2/models/mixed", timeout=CLIENT_TIMEOUT_S).json()
    assert [(t["name"], t["datatype"], t["shape"]) for t in mixed["inputs"]] == [
        ("a", "INT64", [-1, 3]), ("m", "BOOL", [-1, 3])]
    assert [(t["name"], t["datatype"]) for t in mixed["outputs"]] == [("s", "INT64"), ("h", "FP16")]

    r = env.http.get(f"{env.url}/v2/models/linear/ready", timeout=CLIENT_TIMEOUT_S)
    assert r.status_code == 200 and r.json() == {"name": "linear", "ready": True}
    assert env.http.get(f"{env.url}/v2/models/linear/versions/3/ready",
                        timeout=CLIENT_TIMEOUT_S).status_code == 200

    for path in ("/v2/models/nope", "/v2/models/nope/ready", "/v2/models/linear/versions/2",
                 "/v2/models/linear/versions/2/ready", "/v2/models/linear/versions/abc"):
        r = env.http.get(env.url + path, timeout=CLIENT_TIMEOUT_S)
        assert r.status_code == 404, path
        assert r.json()["code"] == "unknown_model" and r.json()["error"]


# --- inference ---------------------------------------------------------------------------------


def test_json_infer_matches_onnxruntime(env: Env) -> None:
    x = np.random.default_rng(1).standard_normal((5, 4)).astype(np.float32)
    (want,) = env.ort_run(env.linear_path, {"x": x})
    r = infer_json(env, "linear", {"id": "req-1", "inputs": [
        {"name": "x", "shape": [5, 4], "datatype": "FP32", "data": x.ravel().tolist()}]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_name"] == "linear" and body["model_version"] == "3" and body["id"] == "req-1"
    (out,) = body["outputs"]
    assert out["name"] == "y" and out["datatype"] == "FP32" and out["shape"] == [5, 3]
    np.testing.assert_allclose(np.asarray(out["data"], np.float32).reshape(5, 3), want, rtol=1e-6)

    # nested data and the version path give the same answer
    r = infer_json(env, "linear", {"inputs": [
        {"name": "x", "shape": [5, 4], "datatype": "FP32", "data": x.tolist()}]}, "/versions/3")
    assert r.status_code == 200, r.text
    assert "id" not in r.json()
    np.testing.assert_allclose(np.asarray(r.json()["outputs"][0]["data"], np.float32).reshape(5, 3),
                               want, rtol=1e-6)


def test_wrong_version_and_unknown_model_404(env: Env) -> None:
    body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0, 0, 0, 0]}]}
    r = infer_json(env, "linear", body, "/versions/2")
    assert r.status_code == 404 and r.json()["code"] == "unknown_model"
    assert "version 2" in r.json()["error"]
    r = infer_json(env, "nope", body)
    assert r.status_code == 404 and "'nope'" in r.json()["error"]


def test_mixed_dtypes_json(env: Env) -> None:
    a = np.array([[1, -2, 3], [4, 5, 2**40]], dtype=np.int64)
    m = np.array([[True, False, True], [False, False, True]])
    want_s, want_h = env.ort_run(env.mixed_path, {"a": a, "m": m})
    r = infer_json(env, "mixed", {"inputs": [
        {"name": "a", "shape": [2, 3], "datatype": "INT64", "data": a.ravel().tolist()},
        {"name": "m", "shape": [2, 3], "datatype": "BOOL", "data": m.ravel().tolist()}],
        "outputs": [{"name": "h"}, {"name": "s"}]})
    assert r.status_code == 200, r.text
    h, s = r.json()["outputs"]
    assert (h["name"], h["datatype"], s["name"], s["datatype"]) == ("h", "FP16", "s", "INT64")
    np.testing.assert_array_equal(np.asarray(s["data"], np.int64).reshape(2, 3), want_s)
    np.testing.assert_array_equal(np.asarray(h["data"], np.float16).reshape(2, 3), want_h)


def test_binary_round_trip(env: Env) -> None:
    x = np.random.default_rng(2).standard_normal((3, 4)).astype(np.float32)
    (want,) = env.ort_run(env.linear_path, {"x": x})
    blob = x.astype("<f4").tobytes()
    # an odd-length header puts the tensor at an unaligned offset inside the body
    header = {"id": "b" * 3, "inputs": [{"name": "x", "shape": [3, 4], "datatype": "FP32",
                                         "parameters": {"binary_data_size": len(blob)}}],
              "outputs": [{"name": "y", "parameters": {"binary_data": True}}]}
    host, port = env.server.address
    status, headers, body = binary_request(host, port, "/v2/models/linear/infer", header, [blob])
    assert status == 200, body
    assert headers["content-type"] == "application/octet-stream"
    assert int(headers["content-length"]) == len(body)
    meta, rest = split_binary(headers, body)
    (out,) = meta["outputs"]
    assert out["parameters"]["binary_data_size"] == len(rest) == 3 * 3 * 4 and "data" not in out
    np.testing.assert_allclose(np.frombuffer(rest, "<f4").reshape(out["shape"]), want, rtol=1e-6)

    # request-level binary_data_output, with a JSON input
    r = infer_json(env, "linear", {"parameters": {"binary_data_output": True}, "inputs": [
        {"name": "x", "shape": [3, 4], "datatype": "FP32", "data": x.ravel().tolist()}]})
    assert r.status_code == 200
    meta, rest = split_binary({k.lower(): v for k, v in r.headers.items()}, r.content)
    np.testing.assert_allclose(np.frombuffer(rest, "<f4").reshape(3, 3), want, rtol=1e-6)


def test_binary_mixed_inputs_and_outputs(env: Env) -> None:
    a = np.array([[7, 8, 9]], dtype=np.int64)
    m = np.array([[True, True, False]])
    want_s, want_h = env.ort_run(env.mixed_path, {"a": a, "m": m})
    ab, mb = a.astype("<i8").tobytes(), m.tobytes()
    header = {"inputs": [
        {"name": "a", "shape": [1, 3], "datatype": "INT64", "parameters": {"binary_data_size": len(ab)}},
        {"name": "m", "shape": [1, 3], "datatype": "BOOL", "parameters": {"binary_data_size": len(mb)}}],
        "outputs": [{"name": "s", "parameters": {"binary_data": False}},
                    {"name": "h", "parameters": {"binary_data": True}}]}
    host, port = env.server.address
    status, headers, body = binary_request(host, port, "/v2/models/mixed/infer", header, [ab, mb])
    assert status == 200, body
    meta, rest = split_binary(headers, body)
    s, h = meta["outputs"]
    assert h["parameters"]["binary_data_size"] == len(rest) == 3 * 2
    np.testing.assert_array_equal(np.asarray(s["data"]).reshape(1, 3), want_s)
    np.testing.assert_array_equal(np.frombuffer(rest, "<f2").reshape(1, 3), want_h)


@pytest.mark.parametrize(("inp", "needle"), [
    ({"name": "x", "shape": [1, 4], "datatype": "INT64", "data": [1, 2, 3, 4]}, "'x'"),  # dtype
    ({"name": "x", "shape": [2, 5], "datatype": "FP32", "data": [0.0] * 10}, "'x'"),  # shape
    ({"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1.0, 2.0]}, "'x'"),  # size
    ({"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [[1.0], [2.0, 3.0]]}, "'x'"),  # ragged
    ({"name": "x", "shape": [1, 4], "datatype": "FP32", "data": ["a", "b", "c", "d"]}, "'x'"),
    ({"name": "x", "shape": [1, 4], "datatype": "BYTES", "data": ["a", "b", "c", "d"]}, "'x'"),  # a float input
    ({"name": "x", "shape": [1, 4], "datatype": "FP128", "data": [1, 2, 3, 4]}, "FP128"),
    ({"name": "x", "shape": [1, -4], "datatype": "FP32", "data": [1, 2, 3, 4]}, "'x'"),
    ({"name": "x", "shape": [1, 4], "datatype": "FP32"}, "'x'"),  # no data
    ({"name": "z", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}, "'z'"),  # unknown
])
def test_bad_inputs_400(env: Env, inp: dict[str, Any], needle: str) -> None:
    r = infer_json(env, "linear", {"inputs": [inp]})
    assert r.status_code == 400, r.text
    assert r.json()["code"] == "invalid_input"
    assert needle in r.json()["error"], r.json()


WORDS = [["cat", "dog"], ["ému", ""]]  # non-ASCII and empty strings travel too


def bytes_blob(values: list[str]) -> bytes:
    """KServe v2 binary BYTES: per element a uint32 little-endian length, then its UTF-8 bytes."""
    return b"".join(len(v.encode()).to_bytes(4, "little") + v.encode() for v in values)


def test_bytes_tensors_in_json(env: Env) -> None:
    r = infer_json(env, "words", {"inputs": [{"name": "w", "shape": [2, 2], "datatype": "BYTES", "data": WORDS}]})
    assert r.status_code == 200, r.text
    out = {o["name"]: o for o in r.json()["outputs"]}
    assert out["echo"]["datatype"] == "BYTES" and out["echo"]["shape"] == [2, 2]
    assert out["echo"]["data"] == ["cat", "dog", "ému", ""]
    assert out["code"]["datatype"] == "INT64" and out["code"]["data"] == [1, 2, -1, -1]
    meta = env.http.get(f"{env.url}/v2/models/words", timeout=CLIENT_TIMEOUT_S).json()
    assert meta["inputs"][0]["datatype"] == "BYTES" and meta["outputs"][0]["datatype"] == "BYTES"


def test_bytes_tensors_in_binary(env: Env) -> None:
    flat = [w for row in WORDS for w in row]
    blob = bytes_blob(flat)
    header = {"inputs": [{"name": "w", "shape": [2, 2], "datatype": "BYTES",
                          "parameters": {"binary_data_size": len(blob)}}],
              "outputs": [{"name": "echo", "parameters": {"binary_data": True}}]}
    host, port = env.server.address
    status, headers, body = binary_request(host, port, "/v2/models/words/infer", header, [blob])
    assert status == 200, body
    meta, rest = split_binary(headers, body)
    (echo,) = meta["outputs"]
    assert echo["datatype"] == "BYTES" and echo["parameters"]["binary_data_size"] == len(rest)
    assert rest == blob  # the same strings, in the same framing


@pytest.mark.parametrize(("data", "needle"), [
    ([["cat", 1], ["dog", "emu"]], "not strings"),
    (["cat", "dog", "emu"], "4 element(s), data has 3"),
    ([["cat", "dog"], "emu", "gnu"], "mixes lists and strings"),
])
def test_bad_bytes_json_400(env: Env, data: Any, needle: str) -> None:
    r = infer_json(env, "words", {"inputs": [{"name": "w", "shape": [2, 2], "datatype": "BYTES", "data": data}]})
    assert r.status_code == 400 and r.json()["code"] == "invalid_input", r.text
    assert needle in r.json()["error"] and "'w'" in r.json()["error"], r.json()


@pytest.mark.parametrize(("blob", "needle"), [
    (bytes_blob(["cat", "dog", "emu"]), "ends before element 3"),
    (bytes_blob(["cat", "dog", "emu", "gnu"]) + b"x", "after its 4 element(s)"),
    (bytes_blob(["cat", "dog", "emu"]) + (1 << 31).to_bytes(4, "little") + b"gnu", "claims 2147483648 byte(s)"),
    (bytes_blob(["cat", "dog", "emu"]) + b"\x02\0\0\0\xff\xfe", "not UTF-8"),
])
def test_bad_bytes_binary_400(env: Env, blob: bytes, needle: str) -> None:
    header = {"inputs": [{"name": "w", "shape": [2, 2], "datatype": "BYTES",
                          "parameters": {"binary_data_size": len(blob)}}]}
    host, port = env.server.address
    status, _, body = binary_request(host, port, "/v2/models/words/infer", header, [blob])
    err = json.loads(body)
    assert status == 400 and err["code"] == "invalid_input" and needle in err["error"], err


def test_long_strings_fit_the_models_body_bound(env: Env) -> None:
    """A full batch of 550-character strings: more body than a model of numbers with that shape
    may send, within the bound of a model of strings (each element allowed
    admission.STRING_ELEMENT_BYTES, not the 32 bytes of a number written in JSON)."""
    from agent.serving.admission import BODY_SLACK_BYTES, DEFAULT_MAX_BATCH, STRING_ELEMENT_BYTES

    rows = [["c" * 550, "d" * 550] for _ in range(DEFAULT_MAX_BATCH)]
    n = 2 * DEFAULT_MAX_BATCH
    body = json.dumps({"inputs": [{"name": "w", "shape": [DEFAULT_MAX_BATCH, 2], "datatype": "BYTES", "data": rows}]})
    assert BODY_SLACK_BYTES + n * 32 < len(body) < BODY_SLACK_BYTES + n * STRING_ELEMENT_BYTES
    r = env.http.post(f"{env.url}/v2/models/words/infer", data=body, timeout=CLIENT_TIMEOUT_S,
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["data"][0] == rows[0][0]


def test_bytes_element_count_is_bounded(env: Env) -> None:
    from agent.serving.tensors import MAX_BYTES_ELEMENTS

    r = infer_json(env, "words", {"inputs": [{"name": "w", "shape": [MAX_BYTES_ELEMENTS // 2 + 1, 2],
                                              "datatype": "BYTES", "data": []}]})
    assert r.status_code == 400 and f"at most {MAX_BYTES_ELEMENTS}" in r.json()["error"], r.text
    assert infer_json(env, "words", {"inputs": [{"name": "w", "shape": [2, 2], "datatype": "BYTES",
                                                 "data": WORDS}]}).status_code == 200  # still serving


def test_int_input_validation(env: Env) -> None:
    base = {"name": "m", "shape": [1, 3], "datatype": "BOOL", "data": [True, False, True]}
    for a_data, needle in (([1.5, 2, 3], "non-integer"), ([2**63, 0, 0], "range")):
        r = infer_json(env, "mixed", {"inputs": [
            {"name": "a", "shape": [1, 3], "datatype": "INT64", "data": a_data}, base]})
        assert r.status_code == 400 and needle in r.json()["error"] and "'a'" in r.json()["error"], r.text
    # missing input is named
    r = infer_json(env, "mixed", {"inputs": [base]})
    assert r.status_code == 400 and "missing input 'a'" in r.json()["error"]


def test_malformed_requests_400(env: Env) -> None:
    url = f"{env.url}/v2/models/linear/infer"
    for body in (b"{not json", b"[1, 2]", b'{"inputs": []}', b""):
        r = env.http.post(url, data=body, headers={"Content-Type": "application/json"},
                          timeout=CLIENT_TIMEOUT_S)
        assert r.status_code == 400, body
        assert r.json()["code"] == "invalid_input"
    # binary data nobody claims, and a header length past the body
    head = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                   "data": [1, 2, 3, 4]}]}).encode()
    r = env.http.post(url, data=head + b"\0" * 8, timeout=CLIENT_TIMEOUT_S,
                      headers={kserve.HEADER_LENGTH: str(len(head))})
    assert r.status_code == 400 and "not claimed" in r.json()["error"]
    r = env.http.post(url, data=head, timeout=CLIENT_TIMEOUT_S,
                      headers={kserve.HEADER_LENGTH: str(len(head) + 1)})
    assert r.status_code == 400
    # unknown requested output
    r = infer_json(env, "linear", {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                               "data": [1, 2, 3, 4]}], "outputs": [{"name": "q"}]})
    assert r.status_code == 400 and "'q'" in r.json()["error"]


def test_internal_failure_500_then_still_serving(env: Env) -> None:
    body: dict[str, Any] = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    r = infer_json(env, "boom", body)
    assert r.status_code == 500 and "kaboom" in r.json()["error"]
    assert r.json()["code"] == "internal"
    assert infer_json(env, "linear", body).status_code == 200


def test_routes_404_405_metrics(env: Env) -> None:
    r = env.http.get(f"{env.url}/nope", timeout=CLIENT_TIMEOUT_S)
    assert r.status_code == 404 and r.json()["code"] == "not_found"
    r = env.http.get(f"{env.url}/v2/models/linear/infer", timeout=CLIENT_TIMEOUT_S)
    assert r.status_code == 405 and r.headers["Allow"] == "POST"
    r = env.http.post(f"{env.url}/v2/health/live", data=b"{}", timeout=CLIENT_TIMEOUT_S)
    assert r.status_code == 405
    r = env.http.delete(f"{env.url}/v2/models/linear", timeout=CLIENT_TIMEOUT_S)
    assert r.status_code == 405
    r = env.http.get(f"{env.url}/metrics", timeout=CLIENT_TIMEOUT_S)
    assert r.status_code == 200 and r.content == b"# HELP x\nx 1\n"
    assert r.headers["Content-Type"].startswith("text/plain")
    r = env.http.head(f"{env.url}/v2/health/live", timeout=CLIENT_TIMEOUT_S)
    assert r.status_code == 200 and r.content == b""
    # the keep-alive connection is still in sync after HEAD
    assert env.http.get(f"{env.url}/v2/health/live", timeout=CLIENT_TIMEOUT_S).json() == {"live": True}


def test_chunked_request_body(env: Env) -> None:
    x = [0.5, 1.0, -1.0, 2.0]
    body = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": x}]})
    r = env.http.post(f"{env.url}/v2/models/linear/infer", timeout=CLIENT_TIMEOUT_S,
                      data=(body[i:i + 10].encode() for i in range(0, len(body), 10)))
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["shape"] == [1, 3]


def test_concurrent_clients(env: Env) -> None:
    threads, per_thread = 8, 25
    x = np.random.default_rng(3).standard_normal((2, 4)).astype(np.float32)
    (want,) = env.ort_run(env.linear_path, {"x": x})
    body: dict[str, Any] = {"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": x.ravel().tolist()}]}
    failures: list[str] = []

    def worker() -> None:
        with requests.Session() as s:
            for _ in range(per_thread):
                r = s.post(f"{env.url}/v2/models/linear/infer", json=body, timeout=CLIENT_TIMEOUT_S)
                if r.status_code != 200:
                    failures.append(r.text)
                    continue
                got = np.asarray(r.json()["outputs"][0]["data"], np.float32).reshape(2, 3)
                if not np.allclose(got, want, rtol=1e-6):
                    failures.append(f"wrong output {got}")

    ts = [threading.Thread(target=worker) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    assert not any(t.is_alive() for t in ts)
    assert failures == []


def test_keepalive_latency_has_no_nagle_stall(env: Env) -> None:
    body: dict[str, Any] = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    url = f"{env.url}/v2/models/linear/infer"
    with requests.Session() as s:
        s.post(url, json=body, timeout=CLIENT_TIMEOUT_S)
        times = []
        for _ in range(50):
            t0 = time.perf_counter()
            assert s.post(url, json=body, timeout=CLIENT_TIMEOUT_S).status_code == 200
            times.append(time.perf_counter() - t0)
    assert statistics.median(times) < NAGLE_GUARD_S, times


# --- limits, lifecycle -------------------------------------------------------------------------


@pytest.fixture
def small_cap_server(env: Env) -> Iterator[KServeServer]:
    srv = KServeServer(env.registry, port=0, max_body_bytes=SMALL_BODY_CAP)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def test_oversized_body_413_keeps_connection(small_cap_server: KServeServer) -> None:
    url = small_cap_server.url
    big: dict[str, Any] = {"inputs": [{"name": "x", "shape": [1000, 4], "datatype": "FP32", "data": [0.0] * 4000}]}
    with requests.Session() as s:
        r = s.post(f"{url}/v2/models/linear/infer", json=big, timeout=CLIENT_TIMEOUT_S)
        assert r.status_code == 413 and r.json()["code"] == "too_large"
        assert str(SMALL_BODY_CAP) in r.json()["error"]
        small: dict[str, Any] = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
        assert s.post(f"{url}/v2/models/linear/infer", json=small,
                      timeout=CLIENT_TIMEOUT_S).status_code == 200


def test_oversized_body_413_closes_past_discard_limit(small_cap_server: KServeServer,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(handler, "DISCARD_MAX_BYTES", 0)
    host, port = small_cap_server.address
    conn = http.client.HTTPConnection(host, port, timeout=CLIENT_TIMEOUT_S)
    try:
        conn.request("POST", "/v2/models/linear/infer", body=b"x" * (256 * 1024),
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status == 413
        assert r.getheader("Connection") == "close"
        assert json.loads(r.read())["code"] == "too_large"
    finally:
        conn.close()


def test_stop_lets_in_flight_request_finish(env: Env) -> None:
    srv = KServeServer(env.registry, port=0)
    srv.start()
    url = srv.url
    result: dict[str, Any] = {}

    def call() -> None:
        body: dict[str, Any] = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
        r = requests.post(f"{url}/v2/models/slow/infer", json=body, timeout=CLIENT_TIMEOUT_S)
        result["status"], result["body"] = r.status_code, r.json()

    idle = requests.Session()  # an idle keep-alive connection must not hold stop() up
    assert idle.get(f"{url}/v2/health/live", timeout=CLIENT_TIMEOUT_S).status_code == 200
    t = threading.Thread(target=call)
    t.start()
    time.sleep(0.1)
    t0 = time.monotonic()
    srv.stop(timeout_s=5.0)
    elapsed = time.monotonic() - t0
    t.join(5)
    idle.close()
    assert result["status"] == 200 and result["body"]["outputs"][0]["data"] == [2, 4, 6, 8]
    assert elapsed < 2.0
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/v2/health/live", timeout=CLIENT_TIMEOUT_S)
    srv.stop()  # idempotent


def _has_ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback on this machine")
def test_ipv6_listen(env: Env) -> None:
    host, port = parse_listen("[::1]:0")
    srv = KServeServer(env.registry, host=host, port=port)
    srv.start()
    try:
        assert srv.url.startswith("http://[::1]:") and srv.port > 0
        r = requests.post(f"{srv.url}/v2/models/linear/infer", timeout=CLIENT_TIMEOUT_S, json={
            "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]})
        assert r.status_code == 200
    finally:
        srv.stop()


def test_listen_in_use_is_a_clear_error(env: Env) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        srv = KServeServer(env.registry, port=s.getsockname()[1])
        with pytest.raises(Exception, match=r"cannot listen on 127\.0\.0\.1"):
            srv.start()


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:8470") == ("127.0.0.1", 8470)
    assert parse_listen("[::1]:8470") == ("::1", 8470)
    assert parse_listen("localhost:0") == ("localhost", 0)
    for bad in ("8470", "::1:8470", ":8470", "host:", "host:70000", "[::1]8470", "host:-1"):
        with pytest.raises(ListenAddressError):
            parse_listen(bad)
    with pytest.raises(ValueError):
        parse_listen("nope")


def test_import_does_not_load_numpy() -> None:
    code = ("import sys, agent.serving.kserve, agent.serving.registry; "
            "sys.exit(1 if 'numpy' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], timeout=30).returncode == 0


def test_raw_http_edge_cases(env: Env) -> None:
    """Hand-written requests: odd targets, a bad version, HTTP/1.0 keep-alive, repeated lengths."""
    host, port = env.server.address

    def exchange(raw: bytes) -> bytes:
        with socket.create_connection((host, port), timeout=CLIENT_TIMEOUT_S) as s:
            s.sendall(raw)
            s.shutdown(socket.SHUT_WR)
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
            return b"".join(chunks)

    assert exchange(b"OPTIONS * HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").startswith(b"HTTP/1.1 404 ")
    assert exchange(b"GET /v2 HTTP/3.0\r\n\r\n").startswith(b"HTTP/1.1 505 ")
    assert exchange(b"GET /v2\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert exchange(b"POST /v2/models/linear/infer HTTP/1.1\r\nContent-Length: 2\r\n"
                    b"Content-Length: 40\r\n\r\n{}").startswith(b"HTTP/1.1 400 ")
    out = exchange(b"GET /v2/health/live HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
                   b"GET /v2/health/live HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert out.count(b"HTTP/1.1 200 OK") == 2 and b"Connection: keep-alive" in out
    assert b"Connection: close" in out
