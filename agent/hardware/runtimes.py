"""Probes of the inference runtimes installed in this Python environment.

`probe_runtimes()` reports, for ONNX Runtime, OpenVINO and TFLite (ai_edge_litert / tflite_runtime):
whether the runtime is importable, its version, and what it can target (ONNX Runtime execution
providers, OpenVINO devices, TFLite delegates).

Invariants:

* Never raises: a runtime that is missing or fails to load is reported with ``available: False`` and a
  ``reason`` string.
* Lazy: importing this module imports no runtime.  Presence is checked with
  ``importlib.util.find_spec`` and versions with ``importlib.metadata`` before anything heavy is loaded;
  ONNX Runtime and OpenVINO are imported only inside the probe functions, TFLite is never imported.
* OpenVINO telemetry is kept off and nothing is written under the user's home directory.  There is no
  environment variable that disables it: the `openvino_telemetry` package (2025.x) only checks a consent
  file under ``~/intel`` and CI variables, and ``import openvino`` itself initialises telemetry (the
  ``openvino.tools.ovc`` import sends an "import" event and creates ``~/intel/openvino_ga_cid`` and
  ``~/intel/stats`` unless a consent file says no).  Writing that consent file would itself create files
  under ``~``, so instead `block_openvino_telemetry()` makes ``import openvino_telemetry`` fail in this
  process (a ``None`` entry in ``sys.modules``), and OpenVINO falls back to its built-in no-op telemetry
  stub.  Call it before any ``import openvino`` in the agent.
* ONNX Runtime telemetry is kept off the same way: official POSIX builds (1.32 checked) create
  ``~/.cache/Microsoft/DeveloperTools/.onnxruntime/{deviceid,onnxruntime.db}`` on ``import onnxruntime``
  unless the ``ORT_DISABLE_TELEMETRY`` environment variable is set (the name the 1.32.0 library reads;
  upstream PR microsoft/onnxruntime#29843 spells it ``ORT_TELEMETRY_DISABLED``, so both are set).
  `disable_onnxruntime_telemetry()` sets them with ``os.environ.setdefault`` (an operator's explicit
  value wins) before the import.
* ``onnxruntime.get_available_providers()`` lists the providers compiled into the installed build; a
  listed CUDA/TensorRT provider can still fail at session creation if the driver or libraries are
  missing, so callers combine it with hardware evidence.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
from typing import Any

log = logging.getLogger(__name__)

OPENVINO_TELEMETRY_MODULE = "openvino_telemetry"
ORT_TELEMETRY_ENV_VARS = ("ORT_DISABLE_TELEMETRY", "ORT_TELEMETRY_DISABLED")
TFLITE_MODULES = (("ai_edge_litert", "ai-edge-litert"), ("tflite_runtime", "tflite-runtime"))
EDGETPU_LIBRARY_NAME = "edgetpu"
EDGETPU_LIBRARY_PATHS = (
    "/usr/lib/x86_64-linux-gnu/libedgetpu.so.1",
    "/usr/lib/aarch64-linux-gnu/libedgetpu.so.1",
    "/usr/lib/arm-linux-gnueabihf/libedgetpu.so.1",
    "/usr/lib/libedgetpu.so.1",
    "/usr/local/lib/libedgetpu.so.1",
)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _dist_version(dist: str) -> str | None:
    import importlib.metadata  # here, not at the top: ~0.5 MB (zipfile, csv, ...) an idle daemon never needs

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None
    except Exception:  # a broken dist-info must not break the probe
        return None


def block_openvino_telemetry() -> tuple[bool, str]:
    """Stop OpenVINO from loading its telemetry package in this process.

    Returns (blocked, note).  Must run before the first ``import openvino``; if the telemetry package
    was already imported by someone else, it cannot be undone and the note says so.
    """
    current = sys.modules.get(OPENVINO_TELEMETRY_MODULE, "absent")
    if current is None:
        return True, "openvino_telemetry blocked for this process (OpenVINO uses its no-op stub)"
    if current != "absent":
        log.warning("openvino_telemetry was already imported before the agent could block it")
        return False, "openvino_telemetry was already imported in this process; it could not be blocked"
    # A None entry makes `import openvino_telemetry` raise ImportError.
    sys.modules[OPENVINO_TELEMETRY_MODULE] = None  # type: ignore[assignment]
    return True, "openvino_telemetry blocked for this process (OpenVINO uses its no-op stub)"


def disable_onnxruntime_telemetry() -> str:
    """Ask ONNX Runtime not to collect telemetry or persist a device id.  Call before ``import onnxruntime``."""
    for var in ORT_TELEMETRY_ENV_VARS:
        os.environ.setdefault(var, "1")
    if "onnxruntime" in sys.modules:
        return "onnxruntime was already imported before telemetry could be disabled"
    return "onnxruntime telemetry disabled (" + ", ".join(f"{v}={os.environ[v]}" for v in ORT_TELEMETRY_ENV_VARS) + ")"


def probe_onnxruntime() -> dict[str, Any]:
    out: dict[str, Any] = {"available": False, "version": None, "providers": [], "reason": ""}
    if not _installed("onnxruntime"):
        out["reason"] = "onnxruntime not installed"
        return out
    out["telemetry_note"] = disable_onnxruntime_telemetry()
    try:
        ort = importlib.import_module("onnxruntime")
        out["version"] = str(getattr(ort, "__version__", None) or _dist_version("onnxruntime"))
        out["providers"] = [str(p) for p in ort.get_available_providers()]
    except Exception as exc:
        out["reason"] = f"onnxruntime failed to load: {exc!r}"
        return out
    out["available"] = True
    out["reason"] = f"onnxruntime {out['version']} providers: {', '.join(out['providers']) or 'none'}"
    return out


def probe_openvino() -> dict[str, Any]:
    out: dict[str, Any] = {"available": False, "version": None, "devices": [], "reason": "",
                           "telemetry_blocked": False, "telemetry_note": ""}
    if not _installed("openvino"):
        out["reason"] = "openvino not installed"
        return out
    out["telemetry_blocked"], out["telemetry_note"] = block_openvino_telemetry()
    try:
        ov = importlib.import_module("openvino")
        core_cls = getattr(ov, "Core", None)
        if core_cls is None:  # OpenVINO 2022.x exposes Core only under openvino.runtime
            core_cls = importlib.import_module("openvino.runtime").Core
        version = getattr(ov, "__version__", None) or _dist_version("openvino")
        out["version"] = str(version) if version else None
        out["devices"] = [str(d) for d in core_cls().available_devices]
    except Exception as exc:
        out["reason"] = f"openvino failed to load or enumerate devices: {exc!r}"
        return out
    out["available"] = True
    out["reason"] = f"openvino {out['version']} devices: {', '.join(out['devices']) or 'none'}"
    return out


def find_edgetpu_library() -> str | None:
    """Path or soname of libedgetpu.so.1 when the loader can find it; None otherwise.  Never loads it."""
    import ctypes.util  # here, not at the top: ctypes is only needed when a backend lists its targets

    try:
        found = ctypes.util.find_library(EDGETPU_LIBRARY_NAME)
    except Exception:
        found = None
    if found:
        return found
    return next((p for p in EDGETPU_LIBRARY_PATHS if os.path.exists(p)), None)


def probe_tflite() -> dict[str, Any]:
    out: dict[str, Any] = {"available": False, "module": None, "version": None, "delegates": {}, "reason": ""}
    for module, dist in TFLITE_MODULES:
        if _installed(module):
            out["module"] = module
            out["version"] = _dist_version(dist)
            break
    edgetpu = find_edgetpu_library()
    edgetpu_info = {"available": edgetpu is not None, "library": edgetpu,
                    "reason": f"libedgetpu found: {edgetpu}" if edgetpu else
                    "libedgetpu.so.1 not found (ldconfig cache and common library paths)"}
    if out["module"] is None:
        out["reason"] = "no TFLite runtime installed (ai_edge_litert, tflite_runtime)"
        out["delegates"] = {"edgetpu": edgetpu_info}
        return out
    out["available"] = True
    builtin = {"available": True, "reason": f"built into {out['module']}"}
    out["delegates"] = {"cpu": builtin, "xnnpack": builtin, "edgetpu": edgetpu_info}
    out["reason"] = f"{out['module']} {out['version'] or '(version unknown)'}"
    return out


def probe_runtimes() -> dict[str, Any]:
    """Probe all supported runtimes.  Never raises."""
    result: dict[str, Any] = {}
    for name, probe in (("onnxruntime", probe_onnxruntime), ("openvino", probe_openvino), ("tflite", probe_tflite)):
        try:
            result[name] = probe()
        except Exception as exc:  # belt and braces: the probes already catch
            log.exception("runtime probe %s failed", name)
            result[name] = {"available": False, "reason": f"probe failed: {exc!r}"}
    return result
