"""OpenVINO backend: CPU, GPU and NPU devices (and MYRIAD where an old OpenVINO still has it).

Invariants:
- OpenVINO's telemetry is blocked before the first ``import openvino`` (``import openvino``
  otherwise forks a sender and writes under ``~/intel``); nothing here writes outside the
  agent's cache directory.
- ``targets()`` never raises: every known device is listed, usable when OpenVINO's
  ``Core().available_devices`` names it (``GPU.0`` counts as ``GPU``), otherwise with the reason.
  The verdict comes from the pure function ``openvino_targets`` so tests can drive it.
- The compute precision is always decided here and passed as ``INFERENCE_PRECISION_HINT``, never
  left to the plugin: the CPU plugin defaults to bf16 on CPUs that have it, which moves fp32
  outputs by up to ~2.5e-2 (FIELD-NOTES). fp32 and int8 variants compute in f32; fp16 variants in
  f16 on GPU/NPU (their native type) and on a CPU that advertises FP16, else f32. The choice is
  recorded in the loaded model's ``details``; ``extra["inference_precision"]`` overrides it.
- Performance hint LATENCY (one request at a time is the edge case), ``INFERENCE_NUM_THREADS``
  from the config, and a compile cache under ``cache_dir/openvino`` when a cache dir is given, for
  the devices whose compilation is slow (GPU, NPU, MYRIAD: seconds to minutes). Not for the CPU:
  its compilation is fast (0.12 s for a 200 MB model, whose ONNX read alone takes 0.45 s) while
  its cache entry is a second copy of the weights, written at the first load of every version
  (+0.5 s and 200 MB for that model); ``extra["config"]["CACHE_DIR"]`` still asks for one.
- IR (``.xml`` + ``.bin``) and ONNX files load alike; dynamic dimensions stay dynamic; tensor
  names are the model's own (taken before compilation, which merges names).
- ``infer`` is thread-safe: each call borrows an infer request from a bounded pool.
"""

from __future__ import annotations

import importlib.util
import logging
import queue
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import errors
from agent.backends.base import Availability, LoadOptions, Target, check_inputs
from agent.hardware.runtimes import block_openvino_telemetry

if TYPE_CHECKING:
    import numpy as np

    from agent.bundles.manifest import TensorSpec

log = logging.getLogger(__name__)
RUNTIME = "openvino"
FORMATS = ("openvino", "onnx")
CPU, GPU, NPU, MYRIAD = "CPU", "GPU", "NPU", "MYRIAD"
KNOWN_DEVICES = (NPU, GPU, CPU, MYRIAD)
MYRIAD_LAST_RELEASE = "2022.3"  # the MYRIAD plugin was removed in OpenVINO 2023.0
PERFORMANCE_HINT = "LATENCY"  # edge serving: one request at a time, lowest latency
MAX_INFER_REQUESTS = 4  # concurrent infer() calls served in parallel; more wait for a free one
REQUEST_WAIT_S = 30.0  # an infer() that finds every request busy this long fails (retryable)
CACHE_SUBDIR = "openvino"
NATIVE_FP16_DEVICES = (GPU, NPU, MYRIAD)
_WHY_MISSING = {
    NPU: "the intel_vpu driver (/dev/accel/accel*) and the NPU user-space driver are needed",
    GPU: "an Intel GPU (i915/xe) and the Intel compute runtime (OpenCL / Level Zero) are needed",
    CPU: "the CPU plugin is missing from this OpenVINO build",
    MYRIAD: f"the MYRIAD plugin shipped only up to OpenVINO {MYRIAD_LAST_RELEASE}",
}
_HINTS = {"fp32": "f32", "fp16": "f16", "bf16": "bf16"}
# The ONNX-ML operators OpenVINO's ONNX frontend converts (its src/frontends/onnx/frontend/src/op/
# ai.onnx.ml/ holds only Normalizer): tree ensembles, linear classifiers, scalers, encoders and
# ZipMap are "No conversion rule found" at load time.
ONNX_ML_CONVERTED = frozenset({"Normalizer"})


def unsupported_operators(operators: Iterable[str]) -> list[str]:
    """The operators of a model (domain-qualified, as a manifest lists them) OpenVINO cannot convert."""
    from agent.backends.base import onnx_ml_operators

    return [op for op in onnx_ml_operators(operators) if op.rsplit(".", 1)[-1] not in ONNX_ML_CONVERTED]

_core_lock = threading.Lock()
_core: Any = None


def _import_openvino() -> Any:
    block_openvino_telemetry()
    import openvino

    return openvino


def core() -> Any:
    """One ``openvino.Core`` per process (it holds the plugins; creating one per model is waste)."""
    global _core
    with _core_lock:
        if _core is None:
            ov = _import_openvino()
            _core = ov.Core()
        return _core


def openvino_targets(devices: Iterable[str], version: str) -> list[Target]:
    """Each known device's verdict from ``available_devices``; unknown extra devices are listed too."""
    listed = list(devices)
    bases = {d.split(".")[0] for d in listed}
    out = []
    for dev in (*KNOWN_DEVICES, *sorted(bases - set(KNOWN_DEVICES))):
        if dev in bases:
            av = Availability(True, f"openvino {version}: {', '.join(d for d in listed if d.split('.')[0] == dev)}")
        else:
            why = _WHY_MISSING.get(dev, "")
            av = Availability(False, f"{dev} not in openvino {version} available_devices ({', '.join(listed) or 'none'})"
                              + (f"; {why}" if why else ""))
        out.append(Target(RUNTIME, dev, FORMATS, av))
    return out


def compute_precision(device: str, precision: str, cpu_capabilities: Iterable[str] = ()) -> str:
    """The precision a variant computes in on ``device`` (see the module invariants)."""
    base = device.split(".")[0]
    if precision == "fp16":
        if base in NATIVE_FP16_DEVICES or (base == CPU and "FP16" in set(cpu_capabilities)):
            return "fp16"
        return "fp32"
    if base in (NPU, MYRIAD):
        return "fp16"  # no fp32 datapath: the plugin converts, and says so in the hint we record
    return "fp32"


class OpenVinoBackend:
    """OpenVINO Runtime with its device plugins."""

    runtime = RUNTIME

    def targets(self) -> list[Target]:
        if importlib.util.find_spec("openvino") is None:
            na = Availability(False, "openvino is not installed (pip install 'edge-agent[openvino]')")
            return [Target(RUNTIME, d, FORMATS, na) for d in KNOWN_DEVICES]
        try:
            ov = _import_openvino()
            version = str(getattr(ov, "__version__", "?")).split("-")[0]
            devices = [str(d) for d in core().available_devices]
        except Exception as e:  # a broken install or plugin must not take the daemon down
            na = Availability(False, f"openvino failed to load or enumerate devices: {e}")
            return [Target(RUNTIME, d, FORMATS, na) for d in KNOWN_DEVICES]
        return openvino_targets(devices, version)

    def load(self, model_path: Path, target: str, options: LoadOptions) -> OvModel:
        try:
            ov = _import_openvino()
            c = core()
        except Exception as e:
            raise errors.RejectError(errors.NO_COMPATIBLE_BACKEND, f"openvino is not usable: {e}") from e
        device = target
        caps: list[str] = []
        if device.split(".")[0] == CPU:
            try:
                caps = [str(x) for x in c.get_property(CPU, "OPTIMIZATION_CAPABILITIES")]
            except Exception:  # an old plugin without the property: assume no fp16
                caps = []
        computed = str(options.extra.get("inference_precision") or compute_precision(device, options.variant_precision, caps))
        config: dict[str, Any] = {"PERFORMANCE_HINT": PERFORMANCE_HINT,
                                  "INFERENCE_PRECISION_HINT": _HINTS.get(computed, computed)}
        if options.threads > 0 and device.split(".")[0] == CPU:
            config["INFERENCE_NUM_THREADS"] = options.threads
        if options.cache_path is not None and device.split(".")[0] != CPU:  # see the invariants: not for the CPU
            cache = options.cache_path / CACHE_SUBDIR
            cache.mkdir(parents=True, exist_ok=True)
            config["CACHE_DIR"] = str(cache)
        config.update(options.extra.get("config", {}))
        try:
            # Names come from the model as read: compiling merges tensor names (an ONNX output
            # behind an Identity gains its producer's name, and get_any_name() may pick that one).
            model = _read_model(c, model_path, options)
            names = ([p.get_any_name() for p in model.inputs], [p.get_any_name() for p in model.outputs])
            compiled = c.compile_model(model, device, config)
        except Exception as e:
            raise errors.RejectError(errors.LOAD_FAILED,
                                     f"{model_path.name}: openvino could not compile it for {device}: {e}") from e
        try:
            hint = compiled.get_property("INFERENCE_PRECISION_HINT")
            actual = hint.to_string() if hasattr(hint, "to_string") else str(hint)
        except Exception:  # a plugin without the property: record what was asked
            actual = str(config["INFERENCE_PRECISION_HINT"])
        details = {"runtime_version": str(getattr(ov, "__version__", "?")).split("-")[0],
                   "compute_precision": computed, "inference_precision_hint": actual,
                   "performance_hint": PERFORMANCE_HINT, "threads": options.threads or "runtime default",
                   "compile_cache": "cache_dir" if "CACHE_DIR" in config else "off"}
        return OvModel(compiled, device, details, names)


def _read_model(c: Any, model_path: Path, options: LoadOptions) -> Any:
    """The model from its path, or from decrypted bytes (an encrypted bundle: the IR's .bin too)."""
    plain = options.content(model_path)
    if plain is None:
        return c.read_model(str(model_path))
    weights = b""
    if model_path.suffix == ".xml":
        bin_path = model_path.with_suffix(".bin")
        weights = options.content(bin_path) or (bin_path.read_bytes() if bin_path.is_file() else b"")
    return c.read_model(plain, weights)


def _spec(port: Any, name: str | None = None) -> TensorSpec:
    import numpy as np

    from agent.bundles.manifest import TensorSpec

    dims = tuple(None if d.is_dynamic else int(d.get_length()) for d in port.get_partial_shape())
    return TensorSpec(name or port.get_any_name(), np.dtype(port.get_element_type().to_dtype()).name, dims)


class OvModel:
    """A compiled OpenVINO model; ``infer`` borrows one of a bounded pool of infer requests."""

    def __init__(self, compiled: Any, device: str, details: dict[str, Any] | None = None,
                 names: tuple[list[str], list[str]] | None = None) -> None:
        self._compiled = compiled
        self.backend_id = f"{RUNTIME}:{device}"
        self.details = details or {}
        self.known_shapes: list[Any] = []  # set by its golden check (agent/deploy/golden.py)
        ins, outs = names or ([], [])
        self.inputs = tuple(_spec(p, ins[i] if i < len(ins) else None) for i, p in enumerate(compiled.inputs))
        self.outputs = tuple(_spec(p, outs[i] if i < len(outs) else None) for i, p in enumerate(compiled.outputs))
        self._tensor = _import_openvino().Tensor
        self._pool: queue.LifoQueue[Any] = queue.LifoQueue()
        self._created = 0
        self._lock = threading.Lock()

    def _borrow(self) -> Any:
        try:
            return self._pool.get_nowait()
        except queue.Empty:
            pass
        with self._lock:
            if self._compiled is None:
                raise errors.RetryableError(errors.INFERENCE_FAILED, f"{self.backend_id}: the model was closed")
            if self._created < MAX_INFER_REQUESTS:
                self._created += 1
                return self._compiled.create_infer_request()
        try:
            return self._pool.get(timeout=REQUEST_WAIT_S)
        except queue.Empty as e:
            raise errors.RetryableError(errors.INFERENCE_FAILED,
                                        f"{self.backend_id}: all {MAX_INFER_REQUESTS} infer requests busy for {REQUEST_WAIT_S:g} s") from e

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import numpy as np

        feed = check_inputs(self.inputs, inputs)
        req = self._borrow()
        try:
            # Tensors share the caller's memory for the call (no input copy); outputs are copied
            # out because the request reuses its buffers on the next call.
            for i, spec in enumerate(self.inputs):
                req.set_input_tensor(i, self._tensor(np.ascontiguousarray(feed[spec.name]), shared_memory=True))
            req.infer()
            out = {spec.name: req.get_output_tensor(i).data.copy() for i, spec in enumerate(self.outputs)}
        except Exception as e:
            raise errors.RetryableError(errors.INFERENCE_FAILED, f"openvino infer failed on {self.backend_id}: {e}") from e
        finally:
            self._pool.put(req)
        return out

    def close(self) -> None:
        with self._lock:
            self._compiled = None
        while True:
            try:
                self._pool.get_nowait()
            except queue.Empty:
                break


def preload() -> None:
    """Import the runtime now: a worker started ahead of its model (agent/backends/isolated.py)."""
    _import_openvino()
