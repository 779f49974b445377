"""TFLite backend: LiteRT (ai-edge-litert), falling back to tflite-runtime; XNNPACK, plain CPU
kernels, and external delegates such as the Coral Edge TPU's libedgetpu.

Invariants:
- The interpreter module is ai_edge_litert when it imports, else tflite_runtime (whose last
  release, 2.14, fails under numpy 2 with "_ARRAY_API not found": that failure is the reason
  reported, never a crash). ``targets()`` judges this from package metadata without importing
  the runtime; ``load`` imports it and reports an import failure as ``load_failed``.
- ``targets()`` never raises; the verdicts come from the pure function ``tflite_targets`` so
  tests can drive them. ``edgetpu`` is usable only when libedgetpu is found *and* a Coral is
  attached (USB 1a6e:089a / 18d1:9302, or /dev/apex_*): the delegate alone proves nothing.
- Threads are never left at the runtime's default of one (FIELD-NOTES: two threads were
  1.6–1.8× faster): ``LoadOptions.threads`` or ``auto_threads()``; the count is recorded.
- Quantized (int8/uint8) inputs and outputs are exposed as float32 and (de)quantized with the
  tensor's scale and zero point, so an int8 variant answers the same float API as the others;
  the details say so.
- An interpreter is not thread-safe: ``infer`` holds a per-model lock. Inputs whose shape
  differs from the allocated one (dynamic dimensions: ``shape_signature`` -1) are resized first.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import errors
from agent.backends.base import Availability, LoadOptions, Target, auto_threads, check_inputs
from agent.hardware.runtimes import find_edgetpu_library

if TYPE_CHECKING:
    import numpy as np

    from agent.bundles.manifest import TensorSpec

log = logging.getLogger(__name__)
RUNTIME = "tflite"
FORMATS = ("tflite",)
XNNPACK, CPU, EDGETPU = "xnnpack", "cpu", "edgetpu"
KNOWN_TARGETS = (EDGETPU, XNNPACK, CPU)
INTERPRETER_MODULES = (("ai_edge_litert.interpreter", "ai-edge-litert"), ("tflite_runtime.interpreter", "tflite-runtime"))
# External delegates: target -> (shared library, default options). One line adds another.
EXTERNAL_DELEGATES: dict[str, tuple[str, dict[str, str]]] = {EDGETPU: ("libedgetpu.so.1", {})}
CORAL_USB_IDS = ("1a6e:089a", "18d1:9302")
USB_DEVICES_GLOB = "/sys/bus/usb/devices/*"
APEX_GLOB = "/dev/apex_*"
QUANTIZED_DTYPES = ("int8", "uint8", "int16")


def unsupported_operators(operators: Iterable[str]) -> list[str]:
    """The operators of an ONNX model LiteRT has no kernels for: every ONNX-ML one (a tflite
    variant of such a model cannot be made; LiteRT reads only .tflite files)."""
    from agent.backends.base import onnx_ml_operators

    return onnx_ml_operators(operators)


def coral_attached() -> bool:
    """A Coral Edge TPU on USB (either id) or PCIe (/dev/apex_N) on this machine."""
    import glob  # here, not at the top: the daemon imports this module but lists no target

    if glob.glob(APEX_GLOB):
        return True
    for dev in glob.glob(USB_DEVICES_GLOB)[:1024]:
        try:
            with open(os.path.join(dev, "idVendor")) as v, open(os.path.join(dev, "idProduct")) as p:
                if f"{v.read().strip()}:{p.read().strip()}".lower() in CORAL_USB_IDS:
                    return True
        except OSError:
            continue
    return False


def tflite_targets(module: str | None, module_reason: str, edgetpu_library: str | None,
                   coral: bool) -> list[Target]:
    """Each target's verdict from the interpreter module found, the delegate library and the device."""
    if module is None:
        na = Availability(False, module_reason)
        return [Target(RUNTIME, t, FORMATS, na) for t in KNOWN_TARGETS]
    if edgetpu_library is None:
        tpu = Availability(False, "libedgetpu.so.1 not found (install libedgetpu1-std from Coral's apt repository)")
    elif not coral:
        tpu = Availability(False, f"libedgetpu found ({edgetpu_library}) but no Coral is attached (no USB 1a6e:089a/18d1:9302, no /dev/apex_*)")
    else:
        tpu = Availability(True, f"{module} with {edgetpu_library}")
    return [Target(RUNTIME, EDGETPU, FORMATS, tpu),
            Target(RUNTIME, XNNPACK, FORMATS, Availability(True, f"{module}: XNNPACK CPU kernels")),
            Target(RUNTIME, CPU, FORMATS, Availability(True, f"{module}: built-in CPU kernels without XNNPACK"))]


def _dist_version(dist: str) -> str:
    """The installed distribution's version, "?" when its metadata is missing."""
    # here, not at the top: the daemon imports this module, and metadata costs ~0.5 MB (zipfile, csv)
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "?"


def find_interpreter() -> tuple[Any, str | None, str]:
    """(interpreter module, "name version", reason) — the module is None when none imports."""
    reasons = []
    for mod, dist in INTERPRETER_MODULES:
        if importlib.util.find_spec(mod.split(".")[0]) is None:
            reasons.append(f"{dist} not installed")
            continue
        try:
            m = importlib.import_module(mod)
        except Exception as e:  # tflite-runtime 2.14 under numpy 2: "_ARRAY_API not found"
            reasons.append(f"{dist} failed to import: {e}")
            continue
        return m, f"{dist} {_dist_version(dist)}", ""
    return None, None, "no TFLite runtime: " + "; ".join(reasons) + " (pip install 'edge-agent[tflite]')"


TFLITE_RUNTIME_NUMPY2_FIXED = (2, 15)  # tflite-runtime releases below this fail under numpy 2 (2.14 is the last)


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for p in text.split(".")[:3]:
        digits = "".join(ch for ch in p if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def interpreter_available() -> tuple[str | None, str]:
    """("dist version", "") of the interpreter ``load`` will use, judged without importing it (a
    daemon start or a selection must not pay for a runtime import); else (None, reason)."""
    reasons = []
    for mod, dist in INTERPRETER_MODULES:
        if importlib.util.find_spec(mod.split(".")[0]) is None:
            reasons.append(f"{dist} not installed")
            continue
        version = _dist_version(dist)
        if dist == "tflite-runtime":
            numpy_version = _dist_version("numpy")  # "?" reads as no version: not numpy 2
            if _version_tuple(numpy_version) >= (2,) and _version_tuple(version) < TFLITE_RUNTIME_NUMPY2_FIXED:
                reasons.append(f"tflite-runtime {version} fails under numpy {numpy_version} (\"_ARRAY_API not found\"); "
                               "install ai-edge-litert")
                continue
        return f"{dist} {version}", ""
    return None, "no TFLite runtime: " + "; ".join(reasons) + " (pip install 'edge-agent[tflite]')"


class TfliteBackend:
    """LiteRT / tflite-runtime interpreters."""

    runtime = RUNTIME

    def targets(self) -> list[Target]:
        try:
            name, reason = interpreter_available()
            lib = find_edgetpu_library()
            return tflite_targets(name, reason, lib, coral_attached() if lib else False)
        except Exception as e:  # belt and braces: probes must not take the daemon down
            na = Availability(False, f"TFLite probe failed: {e}")
            return [Target(RUNTIME, t, FORMATS, na) for t in KNOWN_TARGETS]

    def load(self, model_path: Path, target: str, options: LoadOptions) -> TfliteModel:
        if target not in KNOWN_TARGETS:
            raise errors.RejectError(errors.NO_COMPATIBLE_BACKEND, f"tflite has no target {target!r}")
        mod, name, reason = find_interpreter()
        if mod is None:
            raise errors.RejectError(errors.LOAD_FAILED, reason)
        threads = options.threads if options.threads > 0 else auto_threads()
        plain = options.content(model_path)  # an encrypted bundle: decrypted bytes, never a file
        kwargs: dict[str, Any] = {"num_threads": threads, **(
            {"model_content": plain} if plain is not None else {"model_path": str(model_path)})}
        if target == CPU:
            kwargs["experimental_op_resolver_type"] = mod.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        delegate_desc = "XNNPACK (default delegate)" if target == XNNPACK else "none"
        if target in EXTERNAL_DELEGATES:
            library, defaults = EXTERNAL_DELEGATES[target]
            dopts = {**defaults, **{str(k): str(v) for k, v in options.extra.get("delegate_options", {}).items()}}
            try:
                delegate = mod.load_delegate(options.extra.get("delegate_library", library), dopts or None)
            except (ValueError, OSError) as e:
                raise errors.RejectError(errors.LOAD_FAILED, f"{target} delegate {library} failed to load: {e}") from e
            kwargs["experimental_delegates"] = [delegate]
            delegate_desc = f"{library} {dopts or ''}".strip()
        try:
            interp = mod.Interpreter(**kwargs)
            interp.allocate_tensors()
        except Exception as e:  # ValueError / RuntimeError with the runtime's message
            raise errors.RejectError(errors.LOAD_FAILED, f"{model_path.name}: {name} could not load it on {target}: {e}") from e
        details = {"runtime_version": name, "threads": threads, "delegate": delegate_desc,
                   "compute_precision": options.variant_precision or "fp32"}
        return TfliteModel(interp, target, details)


def _quant(detail: dict[str, Any]) -> tuple[float, int] | None:
    scale, zero = detail.get("quantization", (0.0, 0))
    import numpy as np

    if np.dtype(detail["dtype"]).name in QUANTIZED_DTYPES and scale:
        return float(scale), int(zero)
    return None


def _spec(detail: dict[str, Any]) -> TensorSpec:
    import numpy as np

    from agent.bundles.manifest import TensorSpec

    sig = detail.get("shape_signature")
    shape: Iterable[int] = sig if sig is not None and len(sig) == len(detail["shape"]) else detail["shape"]
    dtype = "float32" if _quant(detail) else np.dtype(detail["dtype"]).name
    return TensorSpec(detail["name"], dtype, tuple(None if int(d) < 0 else int(d) for d in shape))


class TfliteModel:
    """One interpreter; calls are serialised (interpreters are not thread-safe)."""

    def __init__(self, interp: Any, target: str, details: dict[str, Any] | None = None) -> None:
        self._interp = interp
        self._lock = threading.Lock()
        self.backend_id = f"{RUNTIME}:{target}"
        self._in = interp.get_input_details()
        self._out = interp.get_output_details()
        self.inputs = tuple(_spec(d) for d in self._in)
        self.outputs = tuple(_spec(d) for d in self._out)
        self._in_q = [_quant(d) for d in self._in]
        self._out_q = [_quant(d) for d in self._out]
        self.details = dict(details or {})
        self.known_shapes: list[Any] = []  # set by its golden check (agent/deploy/golden.py)
        if any(self._in_q) or any(self._out_q):
            self.details["io_quantized"] = "float32 in and out, (de)quantized with each tensor's scale/zero point"

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import numpy as np

        feed = check_inputs(self.inputs, inputs)
        with self._lock:
            interp = self._interp
            if interp is None:
                raise errors.RetryableError(errors.INFERENCE_FAILED, f"{self.backend_id}: the model was closed")
            try:
                resized = False
                for d in self._in:
                    want = feed[d["name"]].shape
                    if tuple(int(x) for x in d["shape"]) != want:
                        interp.resize_tensor_input(d["index"], list(want), strict=True)
                        d["shape"] = np.array(want, dtype=np.int32)
                        resized = True
                if resized:
                    interp.allocate_tensors()
                for d, q in zip(self._in, self._in_q, strict=True):
                    a = feed[d["name"]]
                    if q is not None:
                        info = np.iinfo(d["dtype"])
                        a = np.clip(np.round(a / q[0]) + q[1], info.min, info.max).astype(d["dtype"])
                    interp.set_tensor(d["index"], a)
                interp.invoke()
                out: dict[str, np.ndarray] = {}
                for d, q in zip(self._out, self._out_q, strict=True):
                    r = interp.get_tensor(d["index"])
                    out[d["name"]] = ((r.astype(np.float32) - q[1]) * np.float32(q[0])) if q is not None else r
            except errors.AgentError:
                raise
            except Exception as e:
                raise errors.RetryableError(errors.INFERENCE_FAILED, f"tflite invoke failed on {self.backend_id}: {e}") from e
        return out

    def close(self) -> None:
        with self._lock:
            self._interp = None


def preload() -> None:
    """Import the runtime now: a worker started ahead of its model (agent/backends/isolated.py)."""
    find_interpreter()
