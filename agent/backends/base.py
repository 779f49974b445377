"""The Backend interface: one file per runtime implements it.

A backend says for each of its targets (provider, device or delegate) whether it is usable or the
reason it is not; it never raises for a missing runtime, driver or device. ``load`` returns a
LoadedModel with named, typed inputs and outputs; ``infer`` takes and returns numpy arrays and
rejects wrong names, dtypes and shapes with ``invalid_input`` before the runtime sees them. A
loaded model also carries ``details`` (runtime version, the precision it computes in, threads,
delegate, caches; deploys record them, autotune and ``bench`` report them) and ``known_shapes``
(the input shapes its golden samples ran with). A model that runs in a worker process
(agent/backends/isolated.py) offers more: ``IsolatedCapable``. Callers ask with ``isinstance``
(both protocols are runtime-checkable), never by probing attributes.

numpy and the runtimes are imported lazily, only when a model needs them.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from agent import errors

if TYPE_CHECKING:
    import socket
    from array import array

    import numpy as np

    from agent.backends.wire import DeathReason
    from agent.bundles.manifest import TensorSpec


@dataclass(frozen=True)
class Availability:
    """A target's verdict: usable, or not and why."""

    usable: bool
    reason: str = ""


@dataclass(frozen=True)
class Target:
    """One way a backend can run a model: ``onnxruntime:CPUExecutionProvider``."""

    runtime: str
    target: str
    formats: tuple[str, ...]
    availability: Availability

    @property
    def id(self) -> str:
        return f"{self.runtime}:{self.target}"


@dataclass
class LoadOptions:
    """Knobs every runtime understands; runtime-specific ones live in ``extra``.

    ``precision`` is the variant's precision (``fp32``/``fp16``/``int8``, "" when unknown: treated
    as fp32). Backends derive their compute precision from it explicitly and never leave it to a
    runtime default (OpenVINO silently computes in bf16 on CPUs that have it).
    ``cache_dir`` is where a runtime may keep compiled artefacts (OpenVINO blobs, TensorRT
    engines); None disables such caches.
    """

    threads: int = 0  # 0: the runtime's choice (TFLite: AUTO_THREADS_MAX-bounded core count)
    allow_spinning: bool = False  # busy-wait thread pools burn a core at moderate load
    precision: str = ""
    cache_dir: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # Plaintext of encrypted bundle files by path (agent/bundles/sealed.py): a runtime loads these
    # bytes instead of reading the path, which holds ciphertext. Never pickled to a worker.
    contents: dict[str, bytes] = field(default_factory=dict, repr=False)

    def content(self, path: Path) -> bytes | None:
        """The decrypted bytes of ``path`` when it is an encrypted file, else None (read the path)."""
        return self.contents.get(str(path))

    # A worker process (backends.isolation = "process") rebuilds its options from threads,
    # allow_spinning and extra only, so load_model also carries these two in ``extra``.
    @property
    def variant_precision(self) -> str:
        return self.precision or str(self.extra.get("precision", "") or "")

    @property
    def cache_path(self) -> Path | None:
        if self.cache_dir is not None:
            return self.cache_dir
        c = self.extra.get("cache_dir")
        return Path(c) if c else None


AUTO_THREADS_MAX = 4  # beyond this, small edge models gain little and other work loses a core


def auto_threads() -> int:
    """Threads for a runtime whose own default is 1 (TFLite): the usable cores, at most AUTO_THREADS_MAX."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(AUTO_THREADS_MAX, n))


@runtime_checkable
class LoadedModel(Protocol):
    """A model loaded on one backend target, ready for ``infer``; ``close`` frees it."""

    backend_id: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    details: dict[str, Any]  # how it runs: runtime version, compute precision, threads, caches
    known_shapes: list[Any]  # input shapes its golden samples ran with (agent/serving/admission.py)

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


# Where a worker's own calls go: calls, errors, latencies of the answered and the failed ones
# (packed doubles), and input shapes newly seen to compute (agent/serving/registry.py).
Sink = Callable[[int, int, "array[float]", "array[float]", Any], None]


@runtime_checkable
class IsolatedCapable(LoadedModel, Protocol):
    """A LoadedModel in its own worker process (agent/backends/isolated.py): it can die apart from
    the daemon, runs golden checks where the model is, and answers HTTP connections itself."""

    pid: int
    death: str  # what ended the worker, for logs and events ("" while it lives)
    death_reason: DeathReason | None  # why: what cut-short calls and connections end with

    @property
    def alive(self) -> bool: ...

    def rss_bytes(self) -> int: ...

    def golden(self, inputs: Path, expected: Path, rtol: float, atol: float, plan: Any) -> dict[str, Any]: ...

    def bind(self, name: str, version: int, sink: Sink, serving: dict[str, Any] | None = None) -> None: ...

    def adopt(self, sock: socket.socket, prefix: bytes, host: Any) -> bool: ...

    def retire(self) -> None: ...


class Backend(Protocol):
    runtime: str

    def targets(self) -> list[Target]: ...

    def load(self, model_path: Path, target: str, options: LoadOptions) -> LoadedModel: ...


ONNX_ML_DOMAIN = "ai.onnx.ml"  # ONNX's classical-ML operators: TreeEnsemble*, LinearClassifier, Scaler, ...


def onnx_ml_operators(operators: Any) -> list[str]:
    """The ONNX-ML operators (``ai.onnx.ml.TreeEnsembleClassifier``) among a variant's ``operators``."""
    return [op for op in operators if op.startswith(ONNX_ML_DOMAIN + ".")]


STRING = "string"  # the manifest's dtype for string tensors (KServe BYTES): str, bytes or object arrays
_NP_DTYPES = {"float32", "float16", "float64", "int8", "uint8", "int16", "int32", "int64", "bool"}


_Plan = tuple[tuple[str, Any, int, tuple[tuple[int, int], ...], Any], ...]
_PLANS_MAX = 256  # distinct input signatures remembered (one per loaded model, least recently used out)


@functools.lru_cache(maxsize=_PLANS_MAX)
def _plan(specs: tuple[TensorSpec, ...]) -> _Plan | None:
    """Per input: name, numpy dtype, rank, the fixed dimensions and ndarray; None if a dtype is not numpy's."""
    import numpy as np

    out = []
    for s in specs:
        try:
            dt = np.dtype(s.dtype)
        except TypeError:
            return None
        out.append((s.name, dt, len(s.shape), tuple((i, d) for i, d in enumerate(s.shape) if d is not None),
                    np.ndarray))
    return tuple(out)


def check_inputs(specs: tuple[TensorSpec, ...], inputs: dict[str, Any]) -> dict[str, np.ndarray]:
    """Match ``inputs`` to ``specs`` by name, dtype and shape; ``invalid_input`` names the tensor.

    On every inference call: the common case (numpy arrays that fit) takes a precomputed plan,
    ~1 µs instead of ~5 µs (docs/benchmarks.md); anything else takes the checks below, which
    also word the refusals."""
    last = _last_plan
    plan = last[1] if last[0] is specs else _remember_plan(specs)
    if plan is not None and len(inputs) == len(plan) and type(inputs) is dict:
        for name, dt, rank, fixed, ndarray in plan:
            a: Any = inputs.get(name)
            if type(a) is not ndarray or (a.dtype is not dt and a.dtype != dt):  # (numpy's are singletons)
                break
            shape = a.shape
            if len(shape) != rank:
                break
            for i, d in fixed:
                if shape[i] != d:
                    break
            else:
                continue
            break
        else:  # every input present and fitting: what _check_inputs would return, key for key
            return inputs
    return _check_inputs(specs, inputs)


# The specs of the last call and their plan: held (not keyed by id()), so ``is`` cannot match
# another tuple; a model's calls find it without hashing every TensorSpec (lru_cache's key).
_last_plan: tuple[tuple[TensorSpec, ...] | None, _Plan | None] = (None, None)


def _remember_plan(specs: tuple[TensorSpec, ...]) -> _Plan | None:
    global _last_plan
    plan = _plan(specs)
    _last_plan = (specs, plan)
    return plan


def _check_inputs(specs: tuple[TensorSpec, ...], inputs: dict[str, Any]) -> dict[str, np.ndarray]:
    import numpy as np

    names = {s.name for s in specs}
    extra = set(inputs) - names
    if extra:
        raise errors.RejectError(errors.INVALID_INPUT, f"unknown input(s) {sorted(extra)}; the model takes {sorted(names)}")
    out: dict[str, np.ndarray] = {}
    for s in specs:
        if s.name not in inputs:
            raise errors.RejectError(errors.INVALID_INPUT, f"missing input {s.name!r}")
        a = np.asarray(inputs[s.name])
        if s.dtype == STRING and a.dtype.kind in "USO":
            if a.dtype.kind == "O" and not all(isinstance(v, str) for v in a.reshape(-1)):
                raise errors.RejectError(errors.INVALID_INPUT, f"input {s.name!r}: not all values are strings")
        elif str(a.dtype) != s.dtype:
            raise errors.RejectError(errors.INVALID_INPUT,
                                     f"input {s.name!r}: dtype {a.dtype}, the model takes {s.dtype}")
        if len(a.shape) != len(s.shape) or any(
                d is not None and d != x for d, x in zip(s.shape, a.shape, strict=False)):
            want = [-1 if d is None else d for d in s.shape]
            raise errors.RejectError(errors.INVALID_INPUT,
                                     f"input {s.name!r}: shape {list(a.shape)}, the model takes {want}")
        out[s.name] = a
    return out


class InflightGate:
    """Counts calls in progress so a model is closed only after the last one returns.

    One lock guards the count and the number of waiters; ``leave`` wakes ``wait_idle`` when the
    count reaches zero while someone waits (every wait has a timeout besides). ``lock``: the
    lock of the owner's own bookkeeping (the serving registry's), so that a call enters its
    version and its other counts in one critical section (``enter_held``/``leave_held``)."""

    def __init__(self, lock: threading.Lock | None = None) -> None:
        self._lock = lock or threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._calls = 0
        self._waiters = 0

    def enter(self) -> None:
        with self._lock:
            self._calls += 1

    def leave(self) -> None:
        with self._lock:
            self.leave_held()

    def enter_held(self) -> None:
        """``enter``, the caller holding the gate's lock."""
        self._calls += 1

    def leave_held(self) -> None:
        """``leave``, the caller holding the gate's lock."""
        self._calls -= 1
        if not self._calls and self._waiters:
            self._idle.notify_all()

    def wait_idle(self, timeout_s: float) -> bool:
        with self._lock:
            self._waiters += 1
            try:
                return self._idle.wait_for(lambda: not self._calls, timeout=timeout_s)
            finally:
                self._waiters -= 1

    @property
    def count(self) -> int:
        return self._calls
