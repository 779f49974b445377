"""Model variants for a bundle: conversions from the ONNX model, prebuilt files, build-time checks.

``fleetctl bundle build --variants onnx-fp16,onnx-int8,openvino-fp32,openvino-fp16,tflite`` makes:

- ``onnx-fp16``: weights and compute in fp16 with fp32 inputs/outputs (onnxconverter-common);
- ``onnx-int8``: dynamic quantisation of the weights (onnxruntime.quantization.quantize_dynamic);
- ``openvino-fp32`` / ``openvino-fp16``: OpenVINO IR (xml + bin) through ``openvino.convert_model``,
  fp16 compressing the weights;
- ``tflite`` (id ``tflite-fp32``): a .tflite written by the built-in flatbuffer writer below,
  which maps dense float32 graphs (MatMul/Gemm, Add/Sub/Mul/Div, Relu/LeakyRelu/Sigmoid/Tanh/
  Softmax, Flatten/Reshape) onto TFLite builtin ops through the schema that ships with
  ai-edge-litert. Other graphs (convolutions: ONNX is NCHW, TFLite NHWC) need a real converter:
  convert with onnx2tf / the TensorFlow converter and pass the file with ``--tflite FILE``. A
  refusal names the operator (op type and node name).
Prebuilt files join as they are: ``--tflite FILE`` and ``--add-variant ID:FORMAT:PRECISION:PATH``
(an OpenVINO ``.xml`` brings the ``.bin`` beside it).

Invariants:
- Each variant succeeds or fails on its own: ``plan_variants`` lists what to try (and what is
  skipped, with the reason), ``make_variant`` makes and checks one and returns its ``Outcome``
  (built, or failed with the reason); a failed variant leaves none of its files behind. Only
  options that cannot work for any model (a missing file, an id or path used twice) stop the
  build before anything is made.
- Every variant is checked at build time against the golden outputs (computed with onnxruntime on
  the fp32 model) on this machine's CPU, through the agent's own backend for its format; one out
  of tolerance or that cannot run here fails with the reason; ``--no-check ID`` skips that for a
  variant this machine cannot run (an Edge-TPU-compiled model), and says so.
- A reduced-precision variant carries its own ``tolerance`` (rtol, atol) in the signed manifest:
  ``REDUCED_TOLERANCE`` scaled by the largest golden output, never looser than the bundle's;
  fp32 variants use the bundle's. Devices validate each variant with its tolerance.
- OpenVINO telemetry is blocked before OpenVINO is imported; conversions write only into the
  bundle folder.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent import errors
from agent.bundles.manifest import FORMATS, PRECISIONS, check_path

log = logging.getLogger(__name__)

CONVERTED = ("onnx-fp16", "onnx-int8", "openvino-fp32", "openvino-fp16", "tflite")
ALIASES = {"tflite-fp32": "tflite"}
PATHS = {"onnx-fp16": ("model_fp16.onnx",), "onnx-int8": ("model_int8.onnx",),
         "openvino-fp32": ("openvino/fp32/model.xml", "openvino/fp32/model.bin"),
         "openvino-fp16": ("openvino/fp16/model.xml", "openvino/fp16/model.bin"),
         "tflite": ("model.tflite",)}
FORMAT_PRECISION = {"onnx-fp16": ("onnx", "fp16"), "onnx-int8": ("onnx", "int8"),
                    "openvino-fp32": ("openvino", "fp32"), "openvino-fp16": ("openvino", "fp16"),
                    "tflite": ("tflite", "fp32")}
PREBUILT_DIR = "variants"
BUILT, FAILED, SKIPPED = "built", "failed", "skipped"  # a variant's outcome in a build
# (rtol, atol as a fraction of the largest |golden output|) for reduced precisions: fp16 keeps
# ~3 significant digits; dynamic int8 quantisation moves outputs by up to a few % of their range.
REDUCED_TOLERANCE = {"fp16": (1e-2, 1e-2), "int8": (5e-2, 5e-2)}
CHECK_TARGETS = {"onnx": ("onnxruntime", "CPUExecutionProvider"), "openvino": ("openvino", "CPU"),
                 "tflite": ("tflite", "xnnpack")}
INSTALL_HINTS = {"onnx": "pip install 'edge-agent[onnx]'", "openvino": "pip install 'edge-agent[openvino]'",
                 "tflite": "pip install 'edge-agent[tflite]'"}


class VariantError(ValueError):
    """A variant cannot be made or does not match the golden outputs; the message says why."""


@dataclass(frozen=True)
class Prebuilt:
    """A variant file made elsewhere: ``--add-variant ID:FORMAT:PRECISION:PATH``."""

    id: str
    format: str
    precision: str
    path: Path


@dataclass
class BuiltVariant:
    id: str
    format: str
    precision: str
    files: tuple[str, ...]  # bundle-relative paths, the loadable one first
    tolerance: tuple[float, float] | None = None
    check: dict[str, Any] = field(default_factory=dict)

    def document(self, entry: Any) -> dict[str, Any]:
        """The manifest's variant object; ``entry(rel)`` gives a file's {path, size, sha256}."""
        d: dict[str, Any] = {"id": self.id, "format": self.format, "precision": self.precision,
                             "files": [entry(rel) for rel in self.files]}
        if self.tolerance is not None:
            d["tolerance"] = {"rtol": self.tolerance[0], "atol": self.tolerance[1]}
        return d


def parse_variants(text: str | Sequence[str]) -> list[str]:
    """``onnx-fp16,openvino-fp32`` → canonical ids; unknown names raise with the known ones."""
    items = text.split(",") if isinstance(text, str) else [x for t in text for x in t.split(",")]
    out: list[str] = []
    for raw in (i.strip() for i in items):
        if not raw:
            continue
        name = ALIASES.get(raw, raw)
        if name not in CONVERTED:
            raise VariantError(f"--variants: unknown variant {raw!r}; known: {', '.join(CONVERTED)}")
        if name not in out:
            out.append(name)
    return out


def parse_prebuilt(text: str) -> Prebuilt:
    """``ID:FORMAT:PRECISION:PATH`` (the path may itself contain ':')."""
    parts = text.split(":", 3)
    if len(parts) != 4 or not all(parts):
        raise VariantError(f"--add-variant {text!r}: expected ID:FORMAT:PRECISION:PATH")
    vid, fmt, prec, path = parts
    if fmt not in FORMATS:
        raise VariantError(f"--add-variant {text!r}: format {fmt!r} not one of {', '.join(FORMATS)}")
    if prec not in PRECISIONS:
        raise VariantError(f"--add-variant {text!r}: precision {prec!r} not one of {', '.join(PRECISIONS)}")
    return Prebuilt(vid, fmt, prec, Path(path))


# ----------------------------------------------------------------------------- conversions


def convert_onnx_fp16(src: Path, dst: Path) -> None:
    try:
        import onnx
        from onnxconverter_common import float16
    except ImportError as e:
        raise VariantError("needs onnxconverter-common (pip install 'edge-agent[build]')") from e
    try:
        model = float16.convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    except Exception as e:  # the converter raises assorted errors for graphs it cannot handle
        raise VariantError(f"onnxconverter-common could not convert the model: {e}") from e
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))


def convert_onnx_int8(src: Path, dst: Path) -> None:
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as e:
        raise VariantError("needs onnxruntime's quantization tools (pip install 'edge-agent[build]')") from e
    dst.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_dynamic logs a pre-processing advert on the root logger
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    except Exception as e:  # onnxruntime's quantiser raises assorted errors for unsupported graphs
        raise VariantError(f"dynamic quantisation failed: {e}") from e
    finally:
        root.setLevel(level)


def convert_openvino_ir(src: Path, xml: Path, fp16: bool) -> None:
    from agent.hardware.runtimes import block_openvino_telemetry

    block_openvino_telemetry()
    try:
        import openvino as ov
    except ImportError as e:
        raise VariantError("needs openvino (pip install 'edge-agent[openvino]')") from e
    try:
        model = ov.convert_model(str(src))
        _stable_names(model, src)
        xml.parent.mkdir(parents=True, exist_ok=True)
        ov.save_model(model, str(xml), compress_to_fp16=fp16)
    except Exception as e:  # OpenVINO's conversion errors share no public base class
        raise VariantError(f"OpenVINO could not convert the model: {e}") from e


_GENERATED_NAME = re.compile(r"([A-Za-z][A-Za-z0-9]*)_\d+")


def _stable_names(model: Any, src: Path) -> None:
    """Renumber the names OpenVINO made up (``Constant_2360``: a counter global to the process)
    in graph order, so the same model converts to the same IR bytes whatever ran before it in
    this process (the agent's autotune cache matches bundles by file sizes). Names from the ONNX
    graph are kept."""
    import onnx

    g = onnx.load(str(src), load_external_data=False).graph
    given = {n for node in g.node for n in (node.name, *node.output)} | {i.name for i in (*g.initializer, *g.input)}
    k = 0
    for op in model.get_ordered_ops():
        name = op.get_friendly_name()
        m = _GENERATED_NAME.fullmatch(name)
        if m and name not in given and op.get_type_name() not in ("Parameter", "Result"):
            op.set_friendly_name(f"{m.group(1)}_fleetctl{k}")
            k += 1


# ---- ONNX → TFLite for dense graphs (see the module docstring for the subset)

_UNARY = {"Relu": "RELU", "Sigmoid": "LOGISTIC", "Tanh": "TANH"}
_BINARY = {"Add": ("ADD", "AddOptions"), "Sub": ("SUB", "SubOptions"), "Mul": ("MUL", "MulOptions"),
           "Div": ("DIV", "DivOptions")}


class _TfliteWriter:
    """Accumulates tensors, buffers and operators of one subgraph in the TFLite object API."""

    def __init__(self, schema: Any) -> None:
        self.s = schema
        self.tensors: list[Any] = []
        self.buffers: list[Any] = [schema.BufferT()]  # buffer 0: the empty sentinel
        self.opcodes: list[int] = []
        self.ops: list[Any] = []
        self.index: dict[str, int] = {}

    def tensor(self, name: str, shape: Sequence[int | None], data: np.ndarray | None = None,
               ttype: int | None = None) -> int:
        s = self.s
        t = s.TensorT()
        t.name = name
        t.shape = [1 if d is None else int(d) for d in shape]
        if any(d is None for d in shape):
            t.shapeSignature = [-1 if d is None else int(d) for d in shape]
        t.type = s.TensorType.FLOAT32 if ttype is None else ttype
        t.buffer = 0
        if data is not None:
            b = s.BufferT()
            b.data = np.frombuffer(np.ascontiguousarray(data).tobytes(), np.uint8)
            self.buffers.append(b)
            t.buffer = len(self.buffers) - 1
        self.tensors.append(t)
        self.index[name] = len(self.tensors) - 1
        return self.index[name]

    def op(self, code: str, inputs: Sequence[int], outputs: Sequence[int], options: str | None = None,
           **fields: Any) -> None:
        s = self.s
        builtin = getattr(s.BuiltinOperator, code)
        if builtin not in self.opcodes:
            self.opcodes.append(builtin)
        o = s.OperatorT()
        o.opcodeIndex = self.opcodes.index(builtin)
        o.inputs = list(inputs)
        o.outputs = list(outputs)
        if options is not None:
            opts = getattr(s, options + "T")()
            for k, v in fields.items():
                setattr(opts, k, v)
            o.builtinOptionsType = getattr(s.BuiltinOptions, options)
            o.builtinOptions = opts
        self.ops.append(o)

    def finish(self, inputs: Sequence[str], outputs: Sequence[str], description: str) -> bytes:
        import flatbuffers

        s = self.s
        codes = []
        for c in self.opcodes:
            oc = s.OperatorCodeT()
            oc.builtinCode = c
            oc.deprecatedBuiltinCode = min(c, 127)  # the int8 field saturates; readers use builtinCode
            oc.version = 1
            codes.append(oc)
        sg = s.SubGraphT()
        sg.tensors, sg.operators, sg.name = self.tensors, self.ops, "main"
        sg.inputs = [self.index[n] for n in inputs]
        sg.outputs = [self.index[n] for n in outputs]
        sig = s.SignatureDefT()
        sig.signatureKey, sig.subgraphIndex = "serving_default", 0
        sig.inputs = [self._map(n) for n in inputs]
        sig.outputs = [self._map(n) for n in outputs]
        m = s.ModelT()
        m.version, m.description = 3, description
        m.operatorCodes, m.subgraphs, m.buffers, m.signatureDefs = codes, [sg], self.buffers, [sig]
        b = flatbuffers.Builder(1024)
        b.Finish(m.Pack(b), file_identifier=b"TFL3")
        return bytes(b.Output())

    def _map(self, name: str) -> Any:
        tm = self.s.TensorMapT()
        tm.name, tm.tensorIndex = name, self.index[name]
        return tm


TFLITE_HINT = "pass --tflite FILE with a converted model (onnx2tf or the TensorFlow converter)"
_TFLITE_OPS = frozenset({"Constant", "Identity", "MatMul", "Gemm", *_BINARY, *_UNARY, "LeakyRelu", "Softmax",
                         "Flatten", "Reshape"})


class _NodeRefusal(Exception):
    """One node the writer cannot map; the caller names the operator."""


def _operator(node: Any) -> str:
    """``operator Resize (node 'upsample_1')``: how refusals name a node."""
    where = f"node {node.name!r}" if node.name else f"unnamed node, output {node.output[0]!r}"
    return f"operator {node.op_type} ({where})"


def _elem_name(elem_type: int) -> str:
    import onnx

    return str(onnx.TensorProto.DataType.Name(elem_type)).lower()


class _OnnxToTflite:
    """Maps the nodes of one dense float32 ONNX graph onto a ``_TfliteWriter``."""

    def __init__(self, model: Any, schema: Any) -> None:
        from onnx import numpy_helper

        g = model.graph
        self.schema = schema
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
        self.consts: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in g.initializer}
        self.shapes: dict[str, tuple[int | None, ...]] = {}
        self.types: dict[str, int] = {}
        for vi in [*g.input, *g.value_info, *g.output]:
            tt = vi.type.tensor_type
            self.types[vi.name] = tt.elem_type
            if tt.HasField("shape"):
                self.shapes[vi.name] = tuple(int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else None
                                             for d in tt.shape.dim)
        self.inputs = [i.name for i in g.input if i.name not in self.consts]
        self.outputs = [o.name for o in g.output]
        self.alias: dict[str, str] = {}
        self.w = _TfliteWriter(schema)

    def ref(self, name: str) -> int:
        name = self.alias.get(name, name)
        if name in self.w.index:
            return self.w.index[name]
        if name in self.consts:
            value = self.consts[name]
            if value.dtype == np.float64:
                value = value.astype(np.float32)
            if value.dtype != np.float32:
                raise _NodeRefusal(f"has a {value.dtype} constant input {name!r} (float32 only)")
            return self.w.tensor(name, value.shape, value)
        raise _NodeRefusal(f"reads {name!r}, which no supported operator produces")

    def out(self, node: Any) -> int:
        name = node.output[0]
        if name not in self.shapes:
            raise _NodeRefusal(f"has no inferred shape for its output {name!r}")
        return self.w.tensor(name, self.shapes[name])

    def node(self, node: Any) -> None:
        """Add one node; _NodeRefusal says what about it the writer cannot map."""
        import onnx
        from onnx import numpy_helper

        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        op, w = node.op_type, self.w
        if op == "Constant":
            self.consts[node.output[0]] = numpy_helper.to_array(attrs["value"])
            return
        for name in node.output:
            if self.types.get(name, onnx.TensorProto.FLOAT) != onnx.TensorProto.FLOAT:
                raise _NodeRefusal(f"produces a {_elem_name(self.types[name])} tensor {name!r} (float32 graphs only)")
        if op == "Identity":
            self._identity(node)
        elif op in ("MatMul", "Gemm"):
            self._dense(node, attrs)
        elif op in _BINARY:
            code, options = _BINARY[op]
            w.op(code, [self.ref(node.input[0]), self.ref(node.input[1])], [self.out(node)], options)
        elif op in _UNARY:
            w.op(_UNARY[op], [self.ref(node.input[0])], [self.out(node)])
        elif op == "LeakyRelu":
            w.op("LEAKY_RELU", [self.ref(node.input[0])], [self.out(node)], "LeakyReluOptions",
                 alpha=float(attrs.get("alpha", 0.01)))
        elif op == "Softmax":
            rank = len(self.shapes.get(node.input[0], ()))
            axis = int(attrs.get("axis", -1 if self.opset >= 13 else 1))
            if axis not in (-1, rank - 1):
                raise _NodeRefusal(f"works over axis {axis} of a rank-{rank} tensor (TFLite: the last axis only)")
            w.op("SOFTMAX", [self.ref(node.input[0])], [self.out(node)], "SoftmaxOptions", beta=1.0)
        elif op in ("Flatten", "Reshape"):
            target = self.shapes.get(node.output[0])
            if target is None or sum(d is None for d in target) > 1:
                raise _NodeRefusal("needs an output shape with at most one dynamic dimension")
            new_shape = np.array([-1 if d is None else d for d in target], dtype=np.int32)
            shape_t = w.tensor(node.output[0] + "/shape", (len(new_shape),), new_shape, self.schema.TensorType.INT32)
            w.op("RESHAPE", [self.ref(node.input[0]), shape_t], [self.out(node)], "ReshapeOptions",
                 newShape=new_shape.tolist())
        else:  # convert_onnx_to_tflite refuses these before any node is mapped
            raise _NodeRefusal("is not supported by the built-in flatbuffer writer")

    def _identity(self, node: Any) -> None:
        w = self.w
        src_name = self.alias.get(node.input[0], node.input[0])
        if node.output[0] in self.outputs and src_name in w.index and src_name not in self.inputs:
            idx = w.index.pop(src_name)  # the graph output keeps its ONNX name
            w.tensors[idx].name = node.output[0]
            w.index[node.output[0]] = idx
            self.alias[src_name] = node.output[0]
        else:
            self.alias[node.output[0]] = src_name

    def _dense(self, node: Any, attrs: dict[str, Any]) -> None:
        op = node.op_type
        if node.input[1] not in self.consts or attrs.get("transA", 0):
            raise _NodeRefusal("needs constant weights and no transA")
        b = self.consts[node.input[1]].astype(np.float32)
        if b.ndim != 2:
            raise _NodeRefusal(f"has {b.ndim}-D weights (2-D only)")
        weights = (b if attrs.get("transB", 0) else b.T) * np.float32(attrs.get("alpha", 1.0))
        ins = [self.ref(node.input[0]), self.w.tensor(node.input[1] + "/fc_weights", weights.shape,
                                                      np.ascontiguousarray(weights))]
        if op == "Gemm" and len(node.input) > 2 and node.input[2]:
            if node.input[2] not in self.consts:
                raise _NodeRefusal("needs a constant bias")
            bias = np.broadcast_to(self.consts[node.input[2]].astype(np.float32).reshape(-1), (weights.shape[0],))
            bias = np.ascontiguousarray(bias * np.float32(attrs.get("beta", 1.0)))
            ins.append(self.w.tensor(node.input[2] + "/fc_bias", bias.shape, bias))
        else:
            ins.append(-1)
        self.w.op("FULLY_CONNECTED", ins, [self.out(node)], "FullyConnectedOptions", keepNumDims=True)


def convert_onnx_to_tflite(src: Path, dst: Path) -> None:
    """Write ``dst`` from a dense float32 ONNX graph.

    A refusal names the operator (op type and node name), never only a tensor: the first operator
    the writer does not support, listing the other unsupported op types, or the first node whose
    tensors it cannot map.
    """
    try:
        from ai_edge_litert import schema_py_generated as schema
    except ImportError as e:
        raise VariantError("TFLite variant: the built-in flatbuffer writer needs ai-edge-litert "
                           f"(pip install 'edge-agent[tflite]'), or {TFLITE_HINT}") from e
    import onnx
    from onnx import shape_inference

    model = shape_inference.infer_shapes(onnx.load(str(src)))
    g = model.graph
    unsupported = [n for n in g.node if n.op_type not in _TFLITE_OPS]
    if unsupported:
        others = sorted({n.op_type for n in unsupported} - {unsupported[0].op_type})
        also = f" (nor are {', '.join(others)} in this graph)" if others else ""
        raise VariantError(f"TFLite variant: {_operator(unsupported[0])} is not supported by the built-in "
                           f"flatbuffer writer{also}; {TFLITE_HINT}")
    conv = _OnnxToTflite(model, schema)
    for name in conv.inputs:
        if conv.types.get(name) != onnx.TensorProto.FLOAT:
            raise VariantError(f"TFLite variant: graph input {name!r} is {_elem_name(conv.types.get(name, 0))}; "
                               f"the built-in flatbuffer writer handles float32 graphs only; {TFLITE_HINT}")
        conv.w.tensor(name, conv.shapes[name])
    for node in g.node:
        try:
            conv.node(node)
        except _NodeRefusal as e:
            raise VariantError(f"TFLite variant: {_operator(node)} {e}; {TFLITE_HINT}") from e
    if any(o not in conv.w.index for o in conv.outputs):
        raise VariantError("TFLite variant: a graph output is a constant, an input or an alias of one; "
                           "nothing to convert")
    data = conv.w.finish(conv.inputs, conv.outputs, f"converted from {src.name} by fleetctl")
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(data)


def tflite_precision(path: Path) -> str:
    """The precision a .tflite was made in, from its tensor types: int8 if any tensor is
    quantised to 8 bits, fp16 if weights are fp16, else fp32."""
    try:
        from ai_edge_litert import schema_py_generated as schema
    except ImportError:
        return "fp32"
    m = schema.ModelT.InitFromPackedBuf(path.read_bytes(), 0)
    types = {t.type for sg in (m.subgraphs or []) for t in (sg.tensors or [])}
    if types & {schema.TensorType.INT8, schema.TensorType.UINT8}:
        return "int8"
    if schema.TensorType.FLOAT16 in types:
        return "fp16"
    return "fp32"


# ----------------------------------------------------------------------------- build-time check


def tolerance_for(precision: str, expected: Mapping[str, np.ndarray], rtol: float, atol: float) -> tuple[float, float] | None:
    """The variant's own tolerance (None: the bundle's), per ``REDUCED_TOLERANCE``."""
    if precision not in REDUCED_TOLERANCE:
        return None
    r, frac = REDUCED_TOLERANCE[precision]
    scale = max((float(np.max(np.abs(v))) for v in expected.values() if v.size and v.dtype.kind == "f"), default=1.0)
    return max(rtol, r), max(atol, float(f"{frac * scale:.3g}"))


def check_variant(bundle: Path, v: BuiltVariant, feeds: Mapping[str, np.ndarray],
                  expected: Mapping[str, np.ndarray], rtol: float, atol: float) -> dict[str, Any]:
    """Run the variant on this machine's CPU through the agent's backend; VariantError when it
    cannot run or is out of tolerance. Returns the figures."""
    from agent.backends import available_backends
    from agent.backends.base import LoadOptions
    from agent.backends.golden import max_error

    runtime, target = CHECK_TARGETS[v.format]
    backend = next((b for b in available_backends() if b.runtime == runtime), None)
    tgt = next((t for t in backend.targets() if t.target == target), None) if backend else None
    if backend is None or tgt is None or not tgt.availability.usable:
        why = tgt.availability.reason if tgt else f"{runtime} backend unavailable"
        raise VariantError(f"cannot be checked on this machine ({why}; {INSTALL_HINTS[v.format]}), "
                           f"or add --no-check {v.id} to ship it unchecked")
    r, a = v.tolerance or (rtol, atol)
    try:
        model = backend.load(bundle / v.files[0], target, LoadOptions(precision=v.precision))
        try:
            err = max_error(model.infer(dict(feeds)), expected, r, a, model.backend_id)
            details = dict(model.details)
        finally:
            model.close()
    except errors.AgentError as e:
        raise VariantError(f"did not pass its build-time check on {runtime}:{target}: {e.message}") from e
    return {"backend": f"{runtime}:{target}", "max_abs_error": err, "rtol": r, "atol": a,
            "compute_precision": details.get("compute_precision", v.precision)}


# ----------------------------------------------------------------------------- entry point


@dataclass(frozen=True)
class Planned:
    """One variant the build will try: converted from the model (``convert``) or copied (``sources``)."""

    id: str
    format: str
    precision: str
    files: tuple[str, ...]
    convert: str | None = None  # a CONVERTED name
    sources: tuple[Path, ...] = ()


@dataclass(frozen=True)
class Outcome:
    """What became of one variant: ``built`` (with ``variant``), ``failed`` or ``skipped`` (with ``reason``)."""

    id: str
    format: str
    precision: str
    status: str
    reason: str = ""
    variant: BuiltVariant | None = None

    def line(self) -> str:
        """One line for the build's report."""
        head = f"variant {self.id} ({self.format}/{self.precision}): "
        if self.status != BUILT:
            return head + f"{self.status}: {self.reason}"
        c = self.variant.check if self.variant else {}
        if "backend" in c:
            return head + (f"built, checked on {c['backend']} computing in {c['compute_precision']}, "
                           f"max abs error {c['max_abs_error']:.3g} (rtol {c['rtol']:g}, atol {c['atol']:g})")
        return head + ("built, NOT checked (--no-check)" if c else f"built ({self.reason})")


def inapplicable(name: str, operators: Sequence[str]) -> str | None:
    """Why conversion ``name`` cannot apply to a model with these (domain-qualified, non-standard)
    operators, or None. ONNX-ML operators (tree ensembles, linear classifiers, scalers, encoders)
    have no reduced-precision form and no OpenVINO or TFLite equivalent (agent/backends/)."""
    from agent.backends import openvino, tflite
    from agent.backends.base import onnx_ml_operators

    ml = onnx_ml_operators(operators)
    if not ml:
        return None
    if name in ("onnx-fp16", "onnx-int8"):
        precision = FORMAT_PRECISION[name][1]
        return (f"{precision} does not apply: the model's ONNX-ML operators ({', '.join(ml)}) compute in "
                "their own types; onnxruntime runs the fp32 model")
    if name.startswith("openvino"):
        bad = openvino.unsupported_operators(operators)
        return f"OpenVINO cannot convert operators {', '.join(bad)}; onnxruntime runs them" if bad else None
    if name == "tflite":
        return f"LiteRT has no kernels for operators {', '.join(tflite.unsupported_operators(operators))}"
    return None


def plan_variants(*, variants: Sequence[str] = (), tflite: Path | None = None, prebuilt: Sequence[Prebuilt] = (),
                  unchecked: Sequence[str] = (), taken: Sequence[str] = (),
                  operators: Sequence[str] = ()) -> tuple[list[Planned], list[Outcome]]:
    """The variants to try, and those skipped with their reason (one that cannot apply to a model
    with these ``operators``); VariantError for options that cannot work whatever the model (a
    missing file, an id or a path used twice, a stray --no-check)."""
    plan: list[Planned] = []
    skipped: list[Outcome] = []
    used = set(taken)

    def claim(p: Planned) -> None:
        if p.id in {q.id for q in plan} or p.id == "onnx-fp32":
            raise VariantError(f"variant id {p.id!r} is used twice")
        for rel in p.files:
            try:
                check_path(rel, f"variant {p.id}")
            except errors.RejectError as e:
                raise VariantError(e.message) from e
            if rel in used:
                raise VariantError(f"variant {p.id}: path {rel!r} is already used in the bundle")
            used.add(rel)
        plan.append(p)

    for name in variants:
        fmt, prec = FORMAT_PRECISION[name]
        vid = "tflite-fp32" if name == "tflite" else name
        if name == "tflite" and tflite is not None:
            skipped.append(Outcome(vid, fmt, prec, SKIPPED, f"--tflite {tflite} is the TFLite variant of this build"))
            continue
        why = inapplicable(name, operators)
        if why is not None:
            skipped.append(Outcome(vid, fmt, prec, SKIPPED, why))
            continue
        claim(Planned(vid, fmt, prec, PATHS[name], convert=name))
    extra = list(prebuilt)
    if tflite is not None:
        tflite = Path(tflite)
        if not tflite.is_file():
            raise VariantError(f"--tflite {tflite}: no such file")
        prec = tflite_precision(tflite)
        extra.insert(0, Prebuilt(f"tflite-{prec}", "tflite", prec, tflite))
    for p in extra:
        src = Path(p.path)
        suffix = {"onnx": ".onnx", "tflite": ".tflite", "openvino": ".xml"}[p.format]
        if not src.is_file() or src.suffix != suffix:
            raise VariantError(f"variant {p.id}: {src} is not a {suffix} file")
        srcs = (src, *([src.with_suffix(".bin")] if p.format == "openvino" else []))
        if not all(s.is_file() for s in srcs):
            raise VariantError(f"variant {p.id}: {srcs[-1]} (the IR weights) is missing")
        claim(Planned(p.id, p.format, p.precision, tuple(f"{PREBUILT_DIR}/{p.id}/{s.name}" for s in srcs),
                      sources=srcs))
    unknown = set(unchecked) - {p.id for p in plan}
    if unknown:
        raise VariantError(f"--no-check names no variant of this build: {sorted(unknown)}")
    return plan, skipped


def _produce(bundle: Path, model: Path, p: Planned) -> None:
    """Write ``p``'s files into ``bundle``."""
    dst = bundle / p.files[0]
    if p.convert == "onnx-fp16":
        convert_onnx_fp16(model, dst)
    elif p.convert == "onnx-int8":
        convert_onnx_int8(model, dst)
    elif p.convert in ("openvino-fp32", "openvino-fp16"):
        convert_openvino_ir(model, dst, fp16=p.convert.endswith("fp16"))
    elif p.convert == "tflite":
        convert_onnx_to_tflite(model, dst)
    else:
        for s, rel in zip(p.sources, p.files, strict=True):
            (bundle / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(s, bundle / rel)


def _discard(bundle: Path, rels: Sequence[str]) -> None:
    """Remove a failed variant's files and the folders they leave empty."""
    for rel in rels:
        (bundle / rel).unlink(missing_ok=True)
        parent = (bundle / rel).parent
        while parent != bundle and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent


def make_variant(bundle: Path, model: Path, p: Planned, feeds: Mapping[str, np.ndarray],
                 expected: Mapping[str, np.ndarray], *, check: bool, rtol: float, atol: float) -> Outcome:
    """Make and check one variant; a failure is an Outcome with its reason and leaves none of its files."""
    v = BuiltVariant(p.id, p.format, p.precision, p.files, tolerance_for(p.precision, expected, rtol, atol))
    try:
        _produce(bundle, model, p)
        if check:
            v.check = check_variant(bundle, v, feeds, expected, rtol, atol)
        else:
            v.check = {"skipped": "--no-check"}
            log.warning("variant %s added without a build-time check (--no-check)", v.id)
    except VariantError as e:
        reason = str(e)
    except Exception as e:  # converters and runtimes raise assorted errors: one variant's failure, not the build's
        log.debug("variant %s failed", p.id, exc_info=True)
        reason = f"{type(e).__name__}: {e}"
    else:
        return Outcome(p.id, p.format, p.precision, BUILT, variant=v)
    _discard(bundle, p.files)
    return Outcome(p.id, p.format, p.precision, FAILED, reason)
