"""The three backends on real runtimes (onnxruntime, OpenVINO, LiteRT) with the same small model.

One dense model (Gemm → Relu → MatMul → Add → Softmax, dynamic batch) is built with onnx.helper;
the OpenVINO IR comes from OpenVINO's own converter, the .tflite from fleetctl's flatbuffer writer
(the same weights, TFLite builtin ops). Nothing is faked: every call goes through the runtime.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

from agent import errors
from agent.backends.base import LoadOptions, auto_threads
from agent.backends.onnxruntime import OnnxRuntimeBackend
from agent.backends.openvino import OpenVinoBackend
from agent.backends.tflite import TfliteBackend
from fleetctl.variants import convert_onnx_to_tflite, convert_openvino_ir

IN, HIDDEN, OUT = 16, 32, 5
SAME_ATOL = 2e-6  # fp32 on three runtimes: summation order differs, nothing else


def make_mlp(path: Path, seed: int = 3) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.3).astype(np.float32)

    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h1"], transB=1),
             helper.make_node("Relu", ["h1"], ["r1"]),
             helper.make_node("MatMul", ["r1", "w2"], ["h2"]),
             helper.make_node("Add", ["h2", "b2"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["probs"], axis=-1)]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", IN])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", OUT])],
        initializer=[numpy_helper.from_array(w(HIDDEN, IN), "w1"), numpy_helper.from_array(w(HIDDEN), "b1"),
                     numpy_helper.from_array(w(HIDDEN, OUT), "w2"), numpy_helper.from_array(w(OUT), "b2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("models")
    onnx_path = make_mlp(d / "mlp.onnx")
    convert_openvino_ir(onnx_path, d / "ir" / "mlp.xml", fp16=False)
    convert_onnx_to_tflite(onnx_path, d / "mlp.tflite")
    return {"onnx": onnx_path, "ir": d / "ir" / "mlp.xml", "tflite": d / "mlp.tflite"}


def reference(x: np.ndarray, onnx_path: Path) -> np.ndarray:
    """numpy's own evaluation of the graph (float64), independent of every runtime."""
    from onnx import load, numpy_helper

    w = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in load(str(onnx_path)).graph.initializer}
    h = np.maximum(x.astype(np.float64) @ w["w1"].T + w["b1"], 0) @ w["w2"] + w["b2"]
    e = np.exp(h - h.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


LOADS = [("onnxruntime", "CPUExecutionProvider", "onnx"), ("openvino", "CPU", "ir"), ("openvino", "CPU", "onnx"),
         ("tflite", "xnnpack", "tflite"), ("tflite", "cpu", "tflite")]
BACKENDS = {"onnxruntime": OnnxRuntimeBackend, "openvino": OpenVinoBackend, "tflite": TfliteBackend}


def load(models: dict[str, Path], runtime: str, target: str, kind: str, **kw: object) -> object:
    return BACKENDS[runtime]().load(models[kind], target, LoadOptions(precision="fp32", **kw))  # type: ignore[arg-type]


def test_same_model_same_outputs_on_all_three_runtimes(models: dict[str, Path]) -> None:
    rng = np.random.default_rng(11)
    for batch in (1, 4, 7):  # dynamic batch: every runtime resizes
        x = rng.standard_normal((batch, IN)).astype(np.float32)
        ref = reference(x, models["onnx"])
        outs = {}
        for runtime, target, kind in LOADS:
            m = load(models, runtime, target, kind)
            try:
                assert [(s.name, s.dtype, s.shape) for s in m.inputs] == [("x", "float32", (None, IN))]  # type: ignore[attr-defined]
                assert [(s.name, s.dtype, s.shape) for s in m.outputs] == [("probs", "float32", (None, OUT))]  # type: ignore[attr-defined]
                y = m.infer({"x": x})["probs"]  # type: ignore[attr-defined]
            finally:
                m.close()  # type: ignore[attr-defined]
            assert y.dtype == np.float32 and y.shape == (batch, OUT)
            outs[f"{runtime}:{target}:{kind}"] = y
            np.testing.assert_allclose(y, ref, atol=SAME_ATOL, rtol=0, err_msg=f"{runtime}:{target}:{kind}")
        first = next(iter(outs.values()))
        for k, y in outs.items():
            np.testing.assert_allclose(y, first, atol=SAME_ATOL, rtol=0, err_msg=k)


@pytest.mark.parametrize(("runtime", "target", "kind"), LOADS)
def test_named_inputs_dtype_and_shape_errors(models: dict[str, Path], runtime: str, target: str, kind: str) -> None:
    m = load(models, runtime, target, kind)
    good = np.zeros((2, IN), np.float32)
    cases = [({"x": good.astype(np.float64)}, "dtype float64, the model takes float32"),
             ({"x": np.zeros((2, IN + 1), np.float32)}, f"shape [2, {IN + 1}], the model takes [-1, {IN}]"),
             ({"x": np.zeros((IN,), np.float32)}, "shape [16]"),
             ({}, "missing input 'x'"),
             ({"x": good, "z": good}, "unknown input(s) ['z']")]
    try:
        for feed, msg in cases:
            with pytest.raises(errors.RejectError) as ei:
                m.infer(feed)  # type: ignore[attr-defined]
            assert ei.value.code == errors.INVALID_INPUT and msg in ei.value.message, ei.value.message
        assert m.infer({"x": good})["probs"].shape == (2, OUT)  # type: ignore[attr-defined]
    finally:
        m.close()  # type: ignore[attr-defined]
    with pytest.raises(errors.RetryableError):
        m.infer({"x": good})  # type: ignore[attr-defined]


def test_openvino_precision_is_explicit_and_cpu_compiles_without_cache(models: dict[str, Path], tmp_path: Path) -> None:
    import openvino as ov

    caps = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    x = np.random.default_rng(5).standard_normal((8, IN)).astype(np.float32)
    ref = reference(x, models["onnx"])
    m = OpenVinoBackend().load(models["ir"], "CPU", LoadOptions(precision="fp32", cache_dir=tmp_path))
    assert m.details["compute_precision"] == "fp32" and m.details["inference_precision_hint"] == "f32"
    np.testing.assert_allclose(m.infer({"x": x})["probs"], ref, atol=SAME_ATOL, rtol=0)
    m.close()
    # The CPU compiles fast and its cache entry would be a second copy of the weights per version.
    assert m.details["compile_cache"] == "off" and not (tmp_path / "openvino").exists()
    if "BF16" in caps:  # the runtime's default on this CPU: measurably different, hence never implicit
        b = OpenVinoBackend().load(models["ir"], "CPU", LoadOptions(extra={"inference_precision": "bf16"}))
        assert b.details["inference_precision_hint"] == "bf16"
        err = float(np.abs(b.infer({"x": x})["probs"] - ref).max())
        b.close()
        assert err > 10 * SAME_ATOL, err


def test_tflite_threads_are_never_the_default_one(models: dict[str, Path]) -> None:
    m = TfliteBackend().load(models["tflite"], "xnnpack", LoadOptions())
    assert m.details["threads"] == auto_threads() and auto_threads() >= min(2, os.cpu_count() or 1)
    m.close()
    m = TfliteBackend().load(models["tflite"], "xnnpack", LoadOptions(threads=3))
    assert m.details["threads"] == 3
    m.close()


@pytest.mark.parametrize(("runtime", "target", "kind"), [LOADS[0], LOADS[1], LOADS[3]])
def test_concurrent_infer_is_correct(models: dict[str, Path], runtime: str, target: str, kind: str) -> None:
    m = load(models, runtime, target, kind)
    xs = [np.random.default_rng(i).standard_normal((i % 3 + 1, IN)).astype(np.float32) for i in range(8)]
    refs = [reference(x, models["onnx"]) for x in xs]
    bad: list[str] = []

    def work(i: int) -> None:
        for _ in range(25):
            y = m.infer({"x": xs[i]})["probs"]  # type: ignore[attr-defined]
            if y.shape != refs[i].shape or not np.allclose(y, refs[i], atol=SAME_ATOL, rtol=0):
                bad.append(f"thread {i}")
                return

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    m.close()  # type: ignore[attr-defined]
    assert not bad


def test_tflite_quantized_io_is_float_in_float_out(tmp_path: Path) -> None:
    """An int8-in/int8-out model (QUANTIZE/DEQUANTIZE around an ADD), written with the schema."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as s

    def tensor(name: str, ttype: int, scale: float | None = None, zero: int = 0, buf: int = 0) -> s.TensorT:
        t = s.TensorT()
        t.name, t.shape, t.shapeSignature, t.type, t.buffer = name, [1, 4], [-1, 4], ttype, buf
        if scale is not None:
            q = s.QuantizationParametersT()
            q.scale, q.zeroPoint = [scale], [zero]
            t.quantization = q
        return t

    c = np.array([0.5, -1.0, 2.0, 0.0], np.float32)
    m = s.ModelT()
    b0, b1 = s.BufferT(), s.BufferT()
    b1.data = np.frombuffer(c.tobytes(), np.uint8)
    m.buffers = [b0, b1]
    sg = s.SubGraphT()
    sg.tensors = [tensor("x", s.TensorType.INT8, 0.05, 0), tensor("xf", s.TensorType.FLOAT32),
                  tensor("c", s.TensorType.FLOAT32, buf=1), tensor("yf", s.TensorType.FLOAT32),
                  tensor("y", s.TensorType.INT8, 0.1, -3)]
    sg.tensors[2].shape, sg.tensors[2].shapeSignature = [4], None
    sg.inputs, sg.outputs = [0], [4]
    codes = []
    for code in (s.BuiltinOperator.DEQUANTIZE, s.BuiltinOperator.ADD, s.BuiltinOperator.QUANTIZE):
        oc = s.OperatorCodeT()
        oc.builtinCode, oc.deprecatedBuiltinCode, oc.version = code, min(code, 127), 1
        codes.append(oc)
    ops = []
    for idx, (ins, outs) in enumerate((([0], [1]), ([1, 2], [3]), ([3], [4]))):
        o = s.OperatorT()
        o.opcodeIndex, o.inputs, o.outputs = idx, ins, outs
        ops.append(o)
    sg.operators = ops
    m.version, m.operatorCodes, m.subgraphs = 3, codes, [sg]
    fb = flatbuffers.Builder(256)
    fb.Finish(m.Pack(fb), file_identifier=b"TFL3")
    path = tmp_path / "q.tflite"
    path.write_bytes(bytes(fb.Output()))
    model = TfliteBackend().load(path, "xnnpack", LoadOptions(precision="int8"))
    assert [(t.name, t.dtype) for t in model.inputs] == [("x", "float32")]
    assert [(t.name, t.dtype) for t in model.outputs] == [("y", "float32")]
    assert "io_quantized" in model.details
    x = np.array([[0.1, 0.2, -0.3, 1.0], [0.0, 0.05, 0.5, -0.5]], np.float32)
    y = model.infer({"x": x})["y"]
    model.close()
    assert y.dtype == np.float32 and y.shape == (2, 4)
    np.testing.assert_allclose(y, x + c, atol=0.05 / 2 + 0.1 / 2 + 1e-6)  # one quantisation step each way


def test_backends_write_nothing_under_home(tmp_path: Path, models: dict[str, Path]) -> None:
    """Loading on OpenVINO and converting with it leave the home folder empty (telemetry blocked)."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORT_", "CI"))}
    env.update(HOME=str(home), PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tools"), env.get("PYTHONPATH", "")]))
    code = ("import sys, numpy as np\nfrom pathlib import Path\n"
            "from agent.backends.openvino import OpenVinoBackend\nfrom agent.backends.base import LoadOptions\n"
            "from fleetctl.variants import convert_openvino_ir\n"
            f"convert_openvino_ir(Path({str(models['onnx'])!r}), Path({str(tmp_path / 'ir2' / 'm.xml')!r}), fp16=True)\n"
            f"m = OpenVinoBackend().load(Path({str(models['ir'])!r}), 'CPU', LoadOptions())\n"
            f"m.infer({{'x': np.zeros((1, {IN}), np.float32)}})\n"
            "assert sys.modules.get('openvino_telemetry') is None\n")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120, cwd=tmp_path)
    assert list(home.rglob("*")) == []
