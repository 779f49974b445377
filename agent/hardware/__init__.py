"""Hardware detection, hardware profiles and backend ranking.

* `detect(root)` -> `HardwareFacts` (probe.py): reads files below root, never raises.
* `load_profiles(dirs)` / `match_profile(facts, profiles, forced)` (profiles.py): TOML hardware profiles.
* `probe_runtimes()` (runtimes.py): lazy probes of onnxruntime / openvino / TFLite.
* `hw_report(...)` (report.py): all of the above as one JSON-able dict.

Importing this package imports no inference runtime.
"""

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
