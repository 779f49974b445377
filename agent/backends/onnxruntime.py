"""onnxruntime backend: CPU, CUDA, TensorRT and OpenVINO execution providers.

Invariants:
- ``targets()`` never raises and lists every known provider, usable or with the reason it is not
  (not in this build, no NVIDIA GPU, no TensorRT libraries). The verdict is computed by the pure
  function ``ort_targets`` from the provider list and hardware evidence, so tests can drive it.
- The intra-op thread pool does not busy-wait unless asked (FIELD-NOTES: 102 % → 3.9 % of a core
  at 100 req/s).
- A provider asked for but not active after session creation is a load failure, never silence:
  onnxruntime falls back to CPU with only a stderr print (TensorRT without its libraries).
- Precision is explicit: TensorRT builds fp16 kernels only for fp16 variants and int8 kernels only
  for int8 (QDQ) variants; the OpenVINO provider gets ``precision`` FP32 unless the variant is
  fp16 on a GPU/NPU. The decision is recorded in the model's ``details``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Iterable
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
FORMATS = ("onnx",)
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
OPENVINO = "OpenVINOExecutionProvider"
KNOWN_PROVIDERS = (TENSORRT, CUDA, OPENVINO, CPU)
GPU_PROVIDERS = (TENSORRT, CUDA)
TENSORRT_LIBRARY = "nvinfer"
CACHE_SUBDIR = "onnxruntime"  # under LoadOptions.cache_dir: TensorRT engines, OpenVINO EP blobs
_ORT_TYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(int16)": "int16",
    "tensor(int32)": "int32", "tensor(int64)": "int64", "tensor(bool)": "bool", "tensor(string)": "string",
}


def nvidia_present() -> bool:
    """An NVIDIA GPU with its kernel driver: the device node or the driver's /proc entry."""
    return os.path.exists("/dev/nvidia0") or os.path.isdir("/proc/driver/nvidia/gpus")


def ort_targets(available: Iterable[str], version: str, nvidia_gpu: bool, tensorrt_libs: bool) -> list[Target]:
    """Each known provider's verdict from the build's provider list and the hardware evidence."""
    have = set(available)
    out = []
    for p in KNOWN_PROVIDERS:
        if p not in have:
            av = Availability(False, f"{p} not in this onnxruntime {version} build (available: {', '.join(sorted(have))})")
        elif p in GPU_PROVIDERS and not nvidia_gpu:
            av = Availability(False, f"{p} is built in but no NVIDIA GPU is present (/dev/nvidia0 missing)")
        elif p == TENSORRT and not tensorrt_libs:
            av = Availability(False, "TensorRT provider listed but libnvinfer is not installed")
        else:
            av = Availability(True, f"onnxruntime {version}")
        out.append(Target(RUNTIME, p, FORMATS, av))
    return out


def provider_options(target: str, precision: str, cache_dir: Path | None,
                     extra: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """(options for ``target``, the compute precision they select). ``extra`` wins over defaults."""
    opts: dict[str, Any] = {}
    computed = precision or "fp32"  # CPU/CUDA run the graph's own types (CPU casts where it lacks fp16 kernels)
    if target == TENSORRT:
        opts = {"device_id": 0, "trt_fp16_enable": precision == "fp16", "trt_int8_enable": precision == "int8"}
        if cache_dir is not None:
            opts.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(cache_dir / "tensorrt"),
                        trt_timing_cache_enable=True, trt_timing_cache_path=str(cache_dir / "tensorrt"))
    elif target == CUDA:
        opts = {"device_id": 0}
    elif target == OPENVINO:
        device = str(extra.get("device_type", "CPU"))
        computed = "fp16" if precision == "fp16" and device.split(".")[0] in ("GPU", "NPU") else "fp32"
        opts = {"device_type": device, "precision": computed.upper()}
        if cache_dir is not None:
            opts["cache_dir"] = str(cache_dir / "openvino-ep")
    opts.update(extra)
    return opts, computed


class OnnxRuntimeBackend:
    """onnxruntime with its execution providers."""

    runtime = RUNTIME

    def targets(self) -> list[Target]:
        if importlib.util.find_spec("onnxruntime") is None:
            na = Availability(False, "onnxruntime is not installed (pip install 'edge-agent[onnx]')")
            return [Target(RUNTIME, p, FORMATS, na) for p in KNOWN_PROVIDERS]
        try:
            import ctypes.util  # here, not at the top: the daemon imports this module but lists no target

            import onnxruntime as ort

            available = ort.get_available_providers()
            version = str(ort.__version__)
        except Exception as e:  # a broken install must not take the daemon down
            na = Availability(False, f"onnxruntime failed to import: {e}")
            return [Target(RUNTIME, p, FORMATS, na) for p in KNOWN_PROVIDERS]
        trt_libs = TENSORRT in available and ctypes.util.find_library(TENSORRT_LIBRARY) is not None
        return ort_targets(available, version, nvidia_present(), trt_libs)

    def load(self, model_path: Path, target: str, options: LoadOptions) -> OrtModel:
        if target not in KNOWN_PROVIDERS:
            raise errors.RejectError(errors.NO_COMPATIBLE_BACKEND, f"onnxruntime has no provider {target!r}")
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
        cache = options.cache_path / CACHE_SUBDIR if options.cache_path is not None else None
        extra = dict(options.extra.get("provider_options", {}))
        popts, computed = provider_options(target, options.variant_precision, cache, extra)
        if cache is not None and target in (TENSORRT, OPENVINO):
            (cache / ("tensorrt" if target == TENSORRT else "openvino-ep")).mkdir(parents=True, exist_ok=True)
        providers: list[Any] = [(target, popts)] if popts else [target]
        if target == TENSORRT and CUDA in ort.get_available_providers():
            providers.append(CUDA)  # subgraphs TensorRT rejects run on CUDA, not the CPU
        if target != CPU:
            providers.append(CPU)  # CPU takes the ops the accelerator lacks; checked below
        try:
            plain = options.content(model_path)  # an encrypted bundle: decrypted bytes, never a file
            sess = ort.InferenceSession(plain if plain is not None else str(model_path), sess_options=so,
                                        providers=providers)
        except Exception as e:
            raise errors.RejectError(errors.LOAD_FAILED, f"{model_path.name}: onnxruntime could not load it on {target}: {e}") from e
        active = sess.get_providers()
        if not active or active[0] != target:
            raise errors.RejectError(errors.LOAD_FAILED,
                                     f"{model_path.name}: asked for {target}, onnxruntime activated {active}")
        details = {"runtime_version": str(ort.__version__), "providers": active, "compute_precision": computed,
                   "threads": options.threads or "runtime default",
                   "provider_options": {k: v for k, v in popts.items() if "path" not in k and k != "cache_dir"}}
        return OrtModel(sess, target, details)


def _specs(nodes: list[Any]) -> tuple[TensorSpec, ...]:
    from agent.bundles.manifest import TensorSpec

    out = []
    for n in nodes:
        dims = tuple(d if isinstance(d, int) and d >= 0 else None for d in n.shape)
        out.append(TensorSpec(n.name, _ORT_TYPES.get(n.type, n.type), dims))
    return tuple(out)


class OrtModel:
    """A loaded onnxruntime session (``run`` is thread-safe)."""

    def __init__(self, sess: Any, provider: str, details: dict[str, Any] | None = None) -> None:
        self._sess = sess
        self.backend_id = f"{RUNTIME}:{provider}"
        self.details = details or {}
        self.known_shapes: list[Any] = []  # set by its golden check (agent/deploy/golden.py)
        self.inputs = _specs(sess.get_inputs())
        self.outputs = _specs(sess.get_outputs())
        self._out_names = [o.name for o in self.outputs]

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = check_inputs(self.inputs, inputs)
        sess = self._sess
        if sess is None:
            raise errors.RetryableError(errors.INFERENCE_FAILED, f"{self.backend_id}: the model was closed")
        try:
            res = sess.run(self._out_names, feed)
        except Exception as e:
            raise errors.RetryableError(errors.INFERENCE_FAILED, f"onnxruntime run failed: {e}") from e
        return dict(zip(self._out_names, res, strict=True))

    def close(self) -> None:
        self._sess = None


def preload() -> None:
    """Import the runtime now: a worker started ahead of its model (agent/backends/isolated.py)."""
    import onnxruntime  # noqa: F401
