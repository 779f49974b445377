"""The runtimes installed, and a smoke inference of a tiny model built here (``y = x + x``, hand-
encoded as ONNX, and as TFLite where its schema is installed: no ``onnx`` package needed at run
time) on every usable target of the daemon's backends, each bounded by a timeout."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from agent import errors
from agent.cli.doctor.report import FAIL, PASS, WARN, Check

SMOKE_TIMEOUT_S = 60.0  # a smoke inference, model load included (a TensorRT engine build is slow)
SMOKE_INPUT = "x"
SMOKE_OUTPUT = "y"
SMOKE_SHAPE = (1, 4)


# -- a tiny ONNX model, hand-encoded (protobuf wire format) ----------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field_varint(num: int, value: int) -> bytes:
    return _varint(num << 3) + _varint(value)


def _field_bytes(num: int, value: bytes | str) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return _varint(num << 3 | 2) + _varint(len(raw)) + raw


def _value_info(name: str, shape: tuple[int, ...]) -> bytes:
    dims = b"".join(_field_bytes(1, _field_varint(1, d)) for d in shape)  # Dimension.dim_value
    tensor_type = _field_varint(1, 1) + _field_bytes(2, dims)  # elem_type FLOAT, shape
    return _field_bytes(1, name) + _field_bytes(2, _field_bytes(1, tensor_type))  # name, TypeProto.tensor_type


def smoke_model_bytes() -> bytes:
    """ONNX ModelProto for ``y = x + x`` (float32 [1, 4]), IR 8, opset 13."""
    node = _field_bytes(1, SMOKE_INPUT) + _field_bytes(1, SMOKE_INPUT) + _field_bytes(2, SMOKE_OUTPUT) \
        + _field_bytes(3, "add") + _field_bytes(4, "Add")
    graph = _field_bytes(1, node) + _field_bytes(2, "doctor-smoke") \
        + _field_bytes(11, _value_info(SMOKE_INPUT, SMOKE_SHAPE)) + _field_bytes(12, _value_info(SMOKE_OUTPUT, SMOKE_SHAPE))
    opset = _field_bytes(1, "") + _field_varint(2, 13)
    return _field_varint(1, 8) + _field_bytes(2, "edge-agent-doctor") + _field_bytes(7, graph) + _field_bytes(8, opset)


def smoke_tflite_bytes() -> bytes | None:
    """The same ``y = x + x`` as a TFLite flatbuffer (one ADD), written with the schema ai-edge-litert ships;
    None where that schema is not installed (tflite-runtime alone)."""
    try:
        import flatbuffers
        from ai_edge_litert import schema_py_generated as s
    except ImportError:
        return None
    tensors = []
    for name in (SMOKE_INPUT, SMOKE_OUTPUT):
        t = s.TensorT()
        t.name, t.shape, t.type, t.buffer = name, list(SMOKE_SHAPE), s.TensorType.FLOAT32, 0
        tensors.append(t)
    code = s.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = s.BuiltinOperator.ADD
    code.version = 1
    op = s.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = 0, [0, 0], [1]
    op.builtinOptionsType, op.builtinOptions = s.BuiltinOptions.AddOptions, s.AddOptionsT()
    sg = s.SubGraphT()
    sg.tensors, sg.operators, sg.inputs, sg.outputs, sg.name = tensors, [op], [0], [1], "main"
    sig = s.SignatureDefT()
    sig.signatureKey, sig.subgraphIndex = "serving_default", 0
    maps = []
    for i, name in enumerate((SMOKE_INPUT, SMOKE_OUTPUT)):
        tm = s.TensorMapT()
        tm.name, tm.tensorIndex = name, i
        maps.append(tm)
    sig.inputs, sig.outputs = [maps[0]], [maps[1]]
    m = s.ModelT()
    m.version, m.description = 3, "edge-agent-doctor"
    m.operatorCodes, m.subgraphs, m.buffers, m.signatureDefs = [code], [sg], [s.BufferT()], [sig]
    b = flatbuffers.Builder(256)
    b.Finish(m.Pack(b), file_identifier=b"TFL3")
    return bytes(b.Output())


# -- checks -----------------------------------------------------------------------------------


def check_runtimes() -> list[Check]:
    from agent.hardware.runtimes import probe_runtimes

    extras = {"onnxruntime": "onnx", "openvino": "openvino", "tflite": "tflite"}
    checks = []
    probed = probe_runtimes()
    for name, info in probed.items():
        if info.get("available"):
            checks.append(Check(f"runtime {name}", PASS, str(info.get("reason") or info.get("version"))))
        else:
            checks.append(Check(f"runtime {name}", WARN, str(info.get("reason", "not available")),
                                f"/opt/edge-agent/venv/bin/pip install 'edge-agent[{extras.get(name, name)}]' "
                                "if this device should use it"))
    if not any(i.get("available") for i in probed.values()):
        checks.append(Check("runtimes", FAIL, "no inference runtime is installed: no model can be served",
                            "/opt/edge-agent/venv/bin/pip install 'edge-agent[onnx]'"))
    return checks


def _with_timeout(fn: Callable[[], Any], timeout_s: float) -> Any:
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:
            box["error"] = e

    t = threading.Thread(target=run, name="doctor-smoke", daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        raise TimeoutError(f"did not finish within {timeout_s:g} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


@contextlib.contextmanager
def _runtime_stderr_to(path: Path) -> Iterator[None]:
    """Runtimes print from C++ straight to fd 2 (e.g. TFLite's "Created ... delegate"): keep that off the report."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(path, "wb") as sink:
            os.dup2(sink.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def check_smoke(timeout_s: float = SMOKE_TIMEOUT_S) -> list[Check]:
    """Load and run the tiny model on every usable target of the daemon's backends."""
    with tempfile.TemporaryDirectory(prefix="agentctl-doctor-") as tmp, _runtime_stderr_to(Path(tmp) / "runtime-stderr.txt"):
        return _smoke(timeout_s)


def _smoke(timeout_s: float) -> list[Check]:
    import numpy as np

    from agent.backends import available_backends
    from agent.backends.base import LoadOptions

    checks = []
    x = np.arange(1, 1 + SMOKE_SHAPE[0] * SMOKE_SHAPE[1], dtype=np.float32).reshape(SMOKE_SHAPE)
    with tempfile.TemporaryDirectory(prefix="agentctl-doctor-") as tmp:
        models: dict[str, Path] = {"onnx": Path(tmp) / "smoke.onnx"}
        models["onnx"].write_bytes(smoke_model_bytes())
        tfl = smoke_tflite_bytes()
        if tfl is not None:
            models["tflite"] = Path(tmp) / "smoke.tflite"
            models["tflite"].write_bytes(tfl)
        for backend in available_backends():  # the daemon's own backends
            for t in backend.targets():
                name = f"smoke {t.id}"
                if not t.availability.usable:
                    continue
                fmt = next((f for f in t.formats if f in models), None)
                if fmt is None:
                    checks.append(Check(name, WARN, f"no smoke model for formats {', '.join(t.formats)} here",
                                        "run `agentctl bench MODEL` on a deployed model instead"))
                    continue

                def run(backend: Any = backend, target: str = t.target, model_path: Path = models[fmt]) -> tuple[float, float, Any]:
                    t0 = time.perf_counter()
                    model = backend.load(model_path, target, LoadOptions())
                    t1 = time.perf_counter()
                    try:
                        out = model.infer({SMOKE_INPUT: x})
                    finally:
                        t2 = time.perf_counter()
                        model.close()
                    return (t1 - t0) * 1000, (t2 - t1) * 1000, out

                try:
                    load_ms, infer_ms, out = _with_timeout(run, timeout_s)
                except errors.AgentError as e:
                    checks.append(Check(name, FAIL, f"{e.code}: {e.message}",
                                        "`agentctl hw` explains this backend; check its drivers and runtime install"))
                    continue
                except Exception as e:
                    checks.append(Check(name, FAIL, f"{type(e).__name__}: {e}",
                                        "`agentctl hw` explains this backend; check its drivers and runtime install"))
                    continue
                y = out.get(SMOKE_OUTPUT)
                if y is None or not np.allclose(y, x + x):
                    checks.append(Check(name, FAIL, f"wrong answer: {y!r} for x + x",
                                        "this backend computes wrong results here: pin another one (backends.prefer)"))
                else:
                    checks.append(Check(name, PASS, f"y = x + x correct; load {load_ms:.1f} ms, inference {infer_ms:.3f} ms",
                                        data={"load_ms": round(load_ms, 3), "infer_ms": round(infer_ms, 3)}))
    if not checks:
        checks.append(Check("smoke", FAIL, "no usable backend to run a model on",
                            "`agentctl hw` lists every backend with the reason it is not usable"))
    return checks
