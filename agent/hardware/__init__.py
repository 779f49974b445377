"""Hardware detection, hardware profiles and backend ranking.

* `detect(root)` -> `HardwareFacts` (probe.py): reads files below root, never raises.
* `load_profiles(dirs)` / `match_profile(facts, profiles, forced)` (profiles.py): TOML hardware profiles.
* `probe_runtimes()` (runtimes.py): lazy probes of onnxruntime / openvino / TFLite.
* `hw_report(...)` (report.py): all of the above as one JSON-able dict.

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


__all__ = [
    "HardwareFacts",
    "Match",
    "Profile",
    "ProfileProblem",
    "default_profile_dirs",
    "detect",
    "hw_report",
    "load_profiles",
    "match_profile",
    "probe_runtimes",
    "shipped_profiles_dir",
]
