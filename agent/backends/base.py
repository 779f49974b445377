"""The Backend interface: one file per runtime implements it.

A backend says for each of its targets (provider, device or delegate) whether it is usable or the
reason it is not; it never raises for a missing runtime, driver or device. ``load`` returns a
LoadedModel with named, typed inputs and outputs; ``infer`` takes and returns numpy arrays and
rejects wrong names, dtypes and shapes with ``invalid_input`` before the runtime sees them.

numpy and the runtimes are imported lazily, only when a model needs them.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from agent import errors

if TYPE_CHECKING:
    import numpy as np

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
    """Knobs every runtime understands; runtime-specific ones live in ``extra``."""

    threads: int = 0  # 0: the runtime's choice
    allow_spinning: bool = False  # busy-wait thread pools burn a core at moderate load
    extra: dict[str, Any] = field(default_factory=dict)


class LoadedModel(Protocol):
    backend_id: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


class Backend(Protocol):
    runtime: str

    def targets(self) -> list[Target]: ...

    def load(self, model_path: Path, target: str, options: LoadOptions) -> LoadedModel: ...


_NP_DTYPES = {"float32", "float16", "float64", "int8", "uint8", "int16", "int32", "int64", "bool"}


def check_inputs(specs: tuple[TensorSpec, ...], inputs: dict[str, Any]) -> dict[str, np.ndarray]:
    """Match ``inputs`` to ``specs`` by name, dtype and shape; ``invalid_input`` names the tensor."""
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
        if str(a.dtype) != s.dtype:
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
    """Counts calls in progress so a model is closed only after the last one returns."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._n = 0

    def enter(self) -> None:
        with self._cv:
            self._n += 1

    def leave(self) -> None:
        with self._cv:
            self._n -= 1
            if self._n == 0:
                self._cv.notify_all()

    def wait_idle(self, timeout_s: float) -> bool:
        with self._cv:
            return self._cv.wait_for(lambda: self._n == 0, timeout=timeout_s)

    @property
    def count(self) -> int:
        return self._n
