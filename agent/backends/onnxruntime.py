"""onnxruntime backend: CPU, CUDA, TensorRT and OpenVINO execution providers.

Why the defaults: the intra-op thread pool busy-waits by default and burns a core at moderate
request rates (FIELD-NOTES: 102 % → 3.9 % of a core at 100 req/s), so spinning is off unless
asked. A provider asked for but not active after session creation (onnxruntime falls back to CPU
with only a stderr print, e.g. TensorRT without its libraries) is a load failure, never silence.
"""

from __future__ import annotations

import ctypes.util
import importlib.util
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import errors
from agent.backends.base import Availability, LoadOptions, Target, check_inputs
from agent.hardware.runtimes import disable_onnxruntime_telemetry

if TYPE_CHECKING:
    import numpy as np

    from agent.bundles.manifest import TensorSpec

log = logging.getLogger(__name__)
disable_onnxruntime_telemetry()  # before any import of onnxruntime: it writes a device id under ~
RUNTIME = "onnxruntime"
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
OPENVINO = "OpenVINOExecutionProvider"
KNOWN_PROVIDERS = (TENSORRT, CUDA, OPENVINO, CPU)
_ORT_TYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(int16)": "int16",
    "tensor(int32)": "int32", "tensor(int64)": "int64", "tensor(bool)": "bool",
}


def _nvidia_present() -> bool:
    return os.path.exists("/dev/nvidia0") or os.path.isdir("/proc/driver/nvidia/gpus")


class OnnxRuntimeBackend:
    """onnxruntime with its execution providers."""

    runtime = RUNTIME

    def targets(self) -> list[Target]:
        if importlib.util.find_spec("onnxruntime") is None:
            na = Availability(False, "onnxruntime is not installed (pip install 'edge-agent[onnx]')")
            return [Target(RUNTIME, p, ("onnx",), na) for p in KNOWN_PROVIDERS]
        try:
            import onnxruntime as ort

            available = set(ort.get_available_providers())
        except Exception as e:  # a broken install must not take the daemon down
            na = Availability(False, f"onnxruntime failed to import: {e}")
            return [Target(RUNTIME, p, ("onnx",), na) for p in KNOWN_PROVIDERS]
        out = []
        for p in KNOWN_PROVIDERS:
            if p not in available:
                av = Availability(False, f"{p} not in this onnxruntime build (available: {', '.join(sorted(available))})")
            elif p in (CUDA, TENSORRT) and not _nvidia_present():
                av = Availability(False, f"{p} is built in but no NVIDIA GPU is present (/dev/nvidia0 missing)")
            elif p == TENSORRT and ctypes.util.find_library("nvinfer") is None:
                av = Availability(False, "TensorRT provider listed but libnvinfer is not installed")
            else:
                av = Availability(True, f"onnxruntime {ort.__version__}")
            out.append(Target(RUNTIME, p, ("onnx",), av))
        return out

    def load(self, model_path: Path, target: str, options: LoadOptions) -> OrtModel:
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise errors.RejectError(errors.NO_COMPATIBLE_BACKEND, "onnxruntime is not installed") from e
        so = ort.SessionOptions()
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if options.allow_spinning else "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "1" if options.allow_spinning else "0")
        if options.threads > 0:
            so.intra_op_num_threads = options.threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        provider_options: dict[str, Any] = dict(options.extra.get("provider_options", {}))
        providers: list[Any] = [(target, provider_options)] if provider_options else [target]
        if target != CPU:
            providers.append(CPU)  # CPU takes the ops the accelerator lacks; checked below
        try:
            sess = ort.InferenceSession(str(model_path), sess_options=so, providers=providers)
        except Exception as e:
            raise errors.RejectError(errors.LOAD_FAILED, f"{model_path.name}: onnxruntime could not load it on {target}: {e}") from e
        active = sess.get_providers()
        if not active or active[0] != target:
            raise errors.RejectError(errors.LOAD_FAILED,
                                     f"{model_path.name}: asked for {target}, onnxruntime activated {active}")
        return OrtModel(sess, target)


def _specs(nodes: list[Any]) -> tuple[TensorSpec, ...]:
    from agent.bundles.manifest import TensorSpec

    out = []
    for n in nodes:
        dims = tuple(d if isinstance(d, int) and d >= 0 else None for d in n.shape)
        out.append(TensorSpec(n.name, _ORT_TYPES.get(n.type, n.type), dims))
    return tuple(out)


class OrtModel:
    """A loaded onnxruntime session."""

    def __init__(self, sess: Any, provider: str) -> None:
        self._sess = sess
        self.backend_id = f"{RUNTIME}:{provider}"
        self.inputs = _specs(sess.get_inputs())
        self.outputs = _specs(sess.get_outputs())
        self._out_names = [o.name for o in self.outputs]

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = check_inputs(self.inputs, inputs)
        try:
            res = self._sess.run(self._out_names, feed)
        except Exception as e:
            raise errors.RetryableError("inference_failed", f"onnxruntime run failed: {e}") from e
        return dict(zip(self._out_names, res, strict=True))

    def close(self) -> None:
        self._sess = None
