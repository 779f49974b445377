"""Inference backends: one module per runtime behind the ``Backend`` interface (base.py).

``available_backends()`` builds every backend the agent knows. Building one imports no runtime
(each imports its runtime lazily in ``targets()``/``load()``), and a backend module that fails to
import is logged and left out, never fatal: its targets then simply do not exist.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

from agent import errors

if TYPE_CHECKING:
    from agent.backends.base import Backend

log = logging.getLogger(__name__)

# (module, class) in the order their targets are listed; the ranking, not this order, decides.
BACKEND_CLASSES = (
    ("agent.backends.onnxruntime", "OnnxRuntimeBackend"),
    ("agent.backends.openvino", "OpenVinoBackend"),
    ("agent.backends.tflite", "TfliteBackend"),
)


# runtime → the module that implements it (worker processes look a backend up by runtime name).
RUNTIME_MODULES = {"onnxruntime": "agent.backends.onnxruntime", "openvino": "agent.backends.openvino",
                   "tflite": "agent.backends.tflite"}


def find_backend(runtime: str) -> Backend:
    """A fresh Backend for ``runtime`` (used in worker processes, which have no daemon).

    Here rather than in agent.deploy.runner so that a worker imports the runtime and nothing of
    the daemon's stack (cryptography, SQLite, requests): ~12 MB of RSS per worker.
    """
    modname = RUNTIME_MODULES.get(runtime)
    if modname is None:
        raise errors.RejectError(errors.NO_COMPATIBLE_BACKEND, f"unknown runtime {runtime!r}")
    try:
        mod = importlib.import_module(modname)
    except ImportError as e:
        raise errors.RejectError(errors.NO_COMPATIBLE_BACKEND, f"runtime {runtime!r} is not available: {e}") from e
    for obj in vars(mod).values():
        if isinstance(obj, type) and getattr(obj, "runtime", None) == runtime and hasattr(obj, "targets"):
            backend: Backend = obj()
            return backend
    raise errors.RejectError(errors.NO_COMPATIBLE_BACKEND, f"{modname} defines no backend for {runtime!r}")


def available_backends() -> list[Any]:
    """One instance of each backend whose module imports."""
    out = []
    for mod, cls in BACKEND_CLASSES:
        try:
            out.append(getattr(importlib.import_module(mod), cls)())
        except Exception:
            log.exception("backend %s.%s could not be set up; its targets are unavailable", mod, cls)
    return out
