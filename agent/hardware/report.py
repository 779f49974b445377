"""The hardware report: detected facts + matched profile + ranked, evaluated backends.

`hw_report()` returns a JSON-able dict (see its docstring for the shape).

Invariants:

* Never raises: detection, profile loading and runtime probing each degrade to reasons in the report.
* The shipped profiles (``shipped_profiles_dir()``) are always consulted, after the given directories,
  so a config listing only /etc and /usr/share still matches on a checkout; earlier dirs override them.
* Every backend carries ``usable`` and a non-empty ``reason``; ``rank`` is 1-based in merged order.
* Usability for a captured root (root != "/") is judged from hardware evidence only, because the
  runtimes of the captured device cannot be probed from here: a backend is ``usable`` when the
  accelerators it ``requires`` are present and ready in the capture (CPU backends always are), and its
  reason says "runtime not probed (captured root)".  The same applies on "/" when
  ``probe_runtimes=False``.
* On "/" with live runtime probing, the agent's own backend targets are reconciled in: a profile backend
  whose target reports itself unusable takes that reason, and targets the profile does not rank are
  appended (``profile`` None) after the ranked ones, so the list names every backend selection can see.
* On "/" with runtime probing, a backend is usable only when both hold: the hardware evidence (as above)
  and the runtime (installed, version inside the backend's range, target listed: an ONNX Runtime
  provider in get_available_providers(), an OpenVINO device in Core().available_devices, a TFLite
  delegate found).  A failing check gives the reason, hardware first (e.g. "onnxruntime not installed").
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from agent.hardware.probe import HardwareFacts, detect
from agent.hardware.profiles import (
    AUTO,
    BackendSpec,
    RankedBackend,
    default_profile_dirs,
    load_profiles,
    match_profile,
    shipped_profiles_dir,
    version_in_range,
)
from agent.hardware.runtimes import probe_runtimes as _probe_runtimes

log = logging.getLogger(__name__)

CAPTURED_NOTE = "runtime not probed (captured root)"
NOT_PROBED_NOTE = "runtime not probed (probe_runtimes=False)"
FALLBACK_BACKENDS = (
    BackendSpec(runtime="onnxruntime", target="CPUExecutionProvider", precisions=("fp32",),
                why="no hardware profile matched: the portable CPU baseline"),
)


def _hardware_check(spec: BackendSpec, facts: HardwareFacts) -> tuple[bool, str]:
    reasons = []
    for req in spec.requires:
        ok, why = facts.accelerator_ready(req)
        if not ok:
            return False, why
        reasons.append(why)
    return True, "; ".join(reasons)


def _effective_precisions(spec: BackendSpec, facts: HardwareFacts) -> tuple[list[str], list[str]]:
    needs = dict(spec.precision_requires)
    kept: list[str] = []
    dropped: list[str] = []
    for p in spec.precisions:
        tag = needs.get(p)
        if tag and facts.cpu_features and tag not in facts.cpu_isa:
            dropped.append(f"{p}: CPU lacks {tag}")
        else:
            kept.append(p)
    return kept or list(spec.precisions), dropped


def _runtime_check(spec: BackendSpec, runtimes: Mapping[str, Any]) -> tuple[bool, str]:
    info = runtimes.get(spec.runtime) or {}
    if not info.get("available"):
        return False, str(info.get("reason") or f"{spec.runtime} not installed")
    version = info.get("version")
    ok, why = version_in_range(version, spec.runtime_version_min, spec.runtime_version_below)
    if not ok:
        bounds = " and ".join(x for x in (
            f">= {spec.runtime_version_min}" if spec.runtime_version_min else "",
            f"< {spec.runtime_version_below}" if spec.runtime_version_below else "") if x)
        return False, f"{spec.runtime} {why}; {spec.target} needs {spec.runtime} {bounds}"
    if spec.runtime == "onnxruntime":
        providers = [str(p) for p in info.get("providers", [])]
        if spec.target in providers:
            return True, f"{spec.target} listed by onnxruntime {version}"
        return False, f"{spec.target} not in onnxruntime {version} providers ({', '.join(providers) or 'none'})"
    if spec.runtime == "openvino":
        devices = [str(d) for d in info.get("devices", [])]
        if any(d == spec.target or d.startswith(spec.target + ".") for d in devices):
            return True, f"{spec.target} in openvino {version} available_devices"
        return False, f"{spec.target} not in openvino {version} available_devices ({', '.join(devices) or 'none'})"
    delegate = (info.get("delegates") or {}).get(spec.target)
    if delegate and delegate.get("available"):
        return True, f"{spec.target} delegate: {delegate.get('reason', 'available')}"
    why = delegate.get("reason") if delegate else f"unknown delegate {spec.target!r}"
    return False, f"{info.get('module') or 'tflite'}: {why}"


def evaluate_backend(spec: BackendSpec, facts: HardwareFacts,
                     runtimes: Mapping[str, Any] | None) -> tuple[bool, str]:
    """(usable, reason) for one backend; see the module docstring for the rules."""
    hw_ok, hw_why = _hardware_check(spec, facts)
    if not hw_ok:
        return False, f"hardware: {hw_why}"
    if facts.captured or runtimes is None:
        note = CAPTURED_NOTE if facts.captured else NOT_PROBED_NOTE
        if spec.requires:
            where = "in capture" if facts.captured else "on this machine"
            return True, f"hardware present {where} ({hw_why}); {note}"
        return True, f"CPU backend, needs no accelerator; {note}"
    rt_ok, rt_why = _runtime_check(spec, runtimes)
    if not rt_ok:
        return False, rt_why
    return True, rt_why + (f"; {hw_why}" if hw_why else "")


def _backend_entry(rank: int, ranked: RankedBackend, facts: HardwareFacts,
                   runtimes: Mapping[str, Any] | None) -> dict[str, Any]:
    spec = ranked.spec
    usable, reason = evaluate_backend(spec, facts, runtimes)
    precisions, dropped = _effective_precisions(spec, facts)
    entry: dict[str, Any] = {"name": spec.name, "runtime": spec.runtime, "target": spec.target,
                             "usable": usable, "reason": reason, "rank": rank, "precisions": precisions,
                             "profile": ranked.profile, "why": spec.why, "requires": list(spec.requires)}
    if dropped:
        entry["precisions_dropped"] = dropped
    return entry


def hw_report(root: str | Path = "/", profiles_dirs: Sequence[Path | str] | None = None,
              forced: str = AUTO, probe_runtimes: bool = True,
              runtime_info: Mapping[str, Any] | None = None,
              reconcile: Callable[[list[dict[str, Any]]], None] | None = None) -> dict[str, Any]:
    """Detect, match and rank.  Returns::

        {
          "root": str, "captured": bool,
          "facts": {...HardwareFacts.to_dict()...},
          "profile": str | None,            # primary matched (or forced) profile name
          "profile_reason": str,
          "profiles_matched": [str, ...],   # all matching profiles, primary first
          "profile_forced": bool,
          "profile_dirs": [str, ...],       # precedence order
          "profile_problems": [{"path": str, "reason": str}, ...],
          "runtimes": {...probe_runtimes()...} | None,
          "runtimes_probed": bool,
          "backends": [{"name": "runtime:target", "runtime", "target", "usable": bool, "reason": str,
                        "rank": int, "precisions": [str], "profile": str, "why": str,
                        "requires": [str], "precisions_dropped"?: [str]}, ...],
          "selected_backend": str | None,   # first usable backend name
        }

    `runtime_info` replaces the live runtime probe (tests, or a caller that already probed).  Runtimes
    are probed only for root "/" (a captured root's runtimes are not this machine's).
    `reconcile` (agent.backends.selection.merge_live_targets) then merges the agent's own backend
    targets into ``backends`` when runtimes were probed live: hardware knows nothing of backends.
    """
    facts = detect(root)
    dirs = [Path(d) for d in (profiles_dirs if profiles_dirs is not None else default_profile_dirs())]
    shipped = shipped_profiles_dir()
    if all(d.resolve() != shipped.resolve() for d in dirs):
        dirs.append(shipped)  # the shipped profiles are always the last resort; earlier dirs override them
    profiles, problems = load_profiles(dirs)
    match = match_profile(facts, profiles, forced)
    runtimes: Mapping[str, Any] | None = None
    if not facts.captured:
        if runtime_info is not None:
            runtimes = runtime_info
        elif probe_runtimes:
            try:
                runtimes = _probe_runtimes()
            except Exception as exc:  # probe_runtimes already never raises; keep the report alive anyway
                log.exception("runtime probe failed")
                runtimes = {"error": f"{exc!r}"}
    ranked = match.backends or [RankedBackend(spec, "(fallback)") for spec in FALLBACK_BACKENDS]
    backends = [_backend_entry(i, rb, facts, runtimes) for i, rb in enumerate(ranked, start=1)]
    if reconcile is not None and not facts.captured and runtime_info is None and probe_runtimes:
        reconcile(backends)
    selected = next((b["name"] for b in backends if b["usable"]), None)
    return {
        "root": str(root),
        "captured": facts.captured,
        "facts": facts.to_dict(),
        "profile": match.name,
        "profile_reason": match.reason,
        "profiles_matched": [name for name, _ in match.matched],
        "profile_forced": match.forced,
        "profile_dirs": [str(d) for d in dirs],
        "profile_problems": [p.to_dict() for p in problems],
        "runtimes": dict(runtimes) if runtimes is not None else None,
        "runtimes_probed": runtimes is not None,
        "backends": backends,
        "selected_backend": selected,
    }
