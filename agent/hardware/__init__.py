"""Hardware detection, hardware profiles and backend ranking.

* `detect(root)` -> `HardwareFacts` (probe.py): reads files below root, never raises.
* `load_profiles(dirs)` / `match_profile(facts, profiles, forced)` (profiles.py): TOML hardware profiles.
* `probe_runtimes()` (runtimes.py): lazy probes of onnxruntime / openvino / TFLite.
* `hw_report(...)` (report.py): all of the above as one JSON-able dict.
* `hw_report_once(...)`: the same for a one-off caller (the daemon), which drops the detection
  modules again afterwards.

Importing this package imports no inference runtime.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.hardware.probe import HardwareFacts, detect
    from agent.hardware.profiles import (
        Match,
        Profile,
        ProfileProblem,
        default_profile_dirs,
        load_profiles,
        match_profile,
        shipped_profiles_dir,
    )
    from agent.hardware.report import hw_report
    from agent.hardware.runtimes import probe_runtimes

# Names load from their submodule on first use (PEP 562): a model worker imports
# agent.hardware.runtimes for the runtimes' telemetry opt-outs, and the detection code it does not
# need (probe, profiles, report) cost it ~6 MB of RSS and ~40 ms of start-up (docs/benchmarks.md).
_LAZY = {"HardwareFacts": "probe", "detect": "probe", "Match": "profiles", "Profile": "profiles",
         "ProfileProblem": "profiles", "default_profile_dirs": "profiles", "load_profiles": "profiles",
         "match_profile": "profiles", "shipped_profiles_dir": "profiles", "hw_report": "report",
         "probe_runtimes": "runtimes"}


def __getattr__(name: str) -> Any:
    sub = _LAZY.get(name)
    if sub is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{sub}"), name)
    globals()[name] = value
    return value


# The detection code a daemon runs once at start; `hw_report_once` drops it again.
_DETECTION_MODULES = ("report", "profiles", "probe")


def hw_report_once(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """``hw_report(*args, **kwargs)`` for a caller that needs it once (the daemon at start): the
    detection modules this call imported (probe, profiles, report: ~0.3 MB of code and classes in
    an idle daemon) are dropped from ``sys.modules`` again, so they are freed. Modules loaded
    before the call are left as they are, and a later ``hw_report`` simply imports them again."""
    import gc
    import sys

    fresh = [m for m in _DETECTION_MODULES if f"{__name__}.{m}" not in sys.modules]
    try:
        report: dict[str, Any] = importlib.import_module(f"{__name__}.report").hw_report(*args, **kwargs)
    finally:
        for m in fresh:
            sys.modules.pop(f"{__name__}.{m}", None)
            globals().pop(m, None)  # the submodule attribute the import set on this package
        if fresh:
            gc.collect()  # their functions and classes are in reference cycles
    return report


__all__ = [
    "HardwareFacts",
    "Match",
    "Profile",
    "ProfileProblem",
    "default_profile_dirs",
    "detect",
    "hw_report",
    "hw_report_once",
    "load_profiles",
    "match_profile",
    "probe_runtimes",
    "shipped_profiles_dir",
]
