"""Choose a (variant, backend target) pair for a bundle, and explain the choice.

Order of authority: a ``backend`` pin in the deploy command (honoured or refused with
``no_compatible_backend``), then ``[backends] prefer`` from the config, then the matched hardware
profile's ranking (hw-profiles/, through ``Policy``), then the built-in default ranking below.
Every candidate considered is listed in the explanation with why it ranked where it did, and
every target left out with why it was unusable.

Invariants:
- ``rank`` is a pure function of its arguments: no runtime is imported, nothing is measured.
- A target the profile marks unusable for a hardware reason (``requires`` an accelerator that is
  absent or not ready) is unusable here too, with the profile's reason, even if its runtime
  lists it: the runtime's word is necessary, the hardware evidence as well.
- Within one target, variants order by the target's precision preference, then by the target's
  native format (an OpenVINO device prefers IR over ONNX of the same precision), then by the
  bundle's variant order. Targets not in the ranking come after every ranked one.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent import errors
from agent.backends import available_backends
from agent.backends.base import Availability, Backend, Target
from agent.bundles.manifest import Manifest, Variant

log = logging.getLogger(__name__)

# Without a profile: accelerators before CPU (they exist to be used), and on each target the
# precision it runs natively first (fp16 on GPUs, fp32 on CPUs where fp16 is emulated).
DEFAULT_RANKING: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("onnxruntime:TensorrtExecutionProvider", ("fp16", "fp32", "int8")),
    ("onnxruntime:CUDAExecutionProvider", ("fp16", "fp32")),
    ("openvino:NPU", ("fp16", "int8")),
    ("openvino:GPU", ("fp16", "fp32")),
    ("tflite:edgetpu", ("int8",)),
    ("openvino:MYRIAD", ("fp16",)),
    ("onnxruntime:OpenVINOExecutionProvider", ("fp32", "fp16")),
    ("openvino:CPU", ("fp32", "int8", "fp16")),
    ("onnxruntime:CPUExecutionProvider", ("fp32", "int8", "fp16")),
    ("tflite:xnnpack", ("fp32", "int8", "fp16")),
    ("tflite:cpu", ("fp32", "int8")),  # reference kernels: only when XNNPACK cannot take a model
)
DEFAULT_PRECISIONS = ("fp32", "fp16", "int8")
# Per runtime, the formats it reads in order of preference (its own format first).
NATIVE_FORMATS = {"openvino": ("openvino", "onnx"), "onnxruntime": ("onnx",), "tflite": ("tflite",)}
PROFILE_HARDWARE_PREFIX = "hardware:"  # hw_report's reason prefix for a missing accelerator
MAX_TOLERANCE = 1e6  # a per-variant rtol/atol above this is a typo, not a tolerance


@dataclass(frozen=True)
class Policy:
    """What the matched hardware profile contributes to selection (see ``policy_from_report``)."""

    profile: str | None = None
    ranking: tuple[tuple[str, tuple[str, ...]], ...] = ()
    why: Mapping[str, str] = field(default_factory=dict)
    blocked: Mapping[str, str] = field(default_factory=dict)
    reason: str = ""


def policy_from_report(report: Mapping[str, Any]) -> Policy:
    """The profile's ranked backends (rank order, preferred precisions, why) from ``hw_report``.

    A report without a matched profile gives the default ranking (an empty ``ranking``).
    """
    profile = report.get("profile")
    if not profile:
        return Policy(reason=str(report.get("profile_reason", "no profile matched")))
    ranking: list[tuple[str, tuple[str, ...]]] = []
    why: dict[str, str] = {}
    blocked: dict[str, str] = {}
    for b in sorted(report.get("backends", []), key=lambda b: int(b.get("rank", 0))):
        if b.get("profile") is None:
            continue  # an unranked target the report appended, not part of the profile
        name = str(b["name"])
        ranking.append((name, tuple(str(p) for p in b.get("precisions", ()))))
        why[name] = f"{b.get('profile')}: {b.get('why', '')}".strip()
        reason = str(b.get("reason", ""))
        if not b.get("usable") and reason.startswith(PROFILE_HARDWARE_PREFIX):
            blocked[name] = f"profile {b.get('profile')}: {reason}"
    return Policy(str(profile), tuple(ranking), why, blocked, str(report.get("profile_reason", "")))


@dataclass
class Candidate:
    variant: Variant
    target: Target
    score: tuple[int, ...]
    why: str
    rationale: str = ""  # the profile's reason for ranking this target where it is

    def to_dict(self) -> dict[str, Any]:
        d = {"variant": self.variant.id, "backend": self.target.id, "why": self.why}
        if self.rationale:
            d["rationale"] = self.rationale
        return d


@dataclass
class Decision:
    chosen: Candidate
    candidates: list[Candidate]
    rejected: list[dict[str, str]] = field(default_factory=list)
    profile: str | None = None
    autotune: dict[str, Any] | None = None

    def explain(self) -> dict[str, Any]:
        out: dict[str, Any] = {"chosen": self.chosen.to_dict(),
                               "ranked": [c.to_dict() for c in self.candidates],
                               "unusable": self.rejected}
        if self.profile:
            out["profile"] = self.profile
        if self.autotune is not None:
            out["autotune"] = self.autotune
        return out

    def promote(self, order: Sequence[Candidate]) -> None:
        """Replace the candidate order (autotune's verdict); ``chosen`` becomes the first."""
        self.candidates = list(order)
        self.chosen = self.candidates[0]


def all_targets(backends: Sequence[Backend]) -> list[Target]:
    out: list[Target] = []
    for b in backends:
        out.extend(b.targets())
    return out


def rank(manifest: Manifest, targets: list[Target], pin: str | None = None,
         prefer: Sequence[str] = (), ranking: Sequence[tuple[str, Sequence[str]]] = DEFAULT_RANKING,
         *, profile: str | None = None, rationale: Mapping[str, str] | None = None) -> Decision:
    """Rank every usable (variant, target) pair; raise ``no_compatible_backend`` if none."""
    order = {tid: i for i, (tid, _) in enumerate(ranking)}
    precs = {tid: tuple(p) for tid, p in ranking}
    source = "default ranking" if ranking is DEFAULT_RANKING else (f"profile {profile}" if profile else "profile")
    rejected: list[dict[str, str]] = []
    cands: list[Candidate] = []
    for t in targets:
        if pin and t.id != pin:
            continue
        if not t.availability.usable:
            rejected.append({"backend": t.id, "reason": t.availability.reason})
            continue
        fitting = [v for v in manifest.variants if v.format in t.formats]
        refused = {v.id: ops for v in fitting if (ops := unsupported_operators(t.runtime, v))}
        fitting = [v for v in fitting if v.id not in refused]
        if not fitting:
            rejected.append({"backend": t.id, "reason": _no_variant_reason(manifest, t, refused)})
            continue
        formats = NATIVE_FORMATS.get(t.runtime, t.formats)
        for vi, v in enumerate(fitting):
            if t.id in prefer:
                primary = list(prefer).index(t.id)
                why = f"listed #{primary + 1} in [backends] prefer"
            elif t.id in order:
                primary = len(prefer) + order[t.id]
                why = f"ranked #{order[t.id] + 1} by the {source}"
            else:
                primary = len(prefer) + len(order)
                why = "not ranked; usable"
            p = precs.get(t.id, DEFAULT_PRECISIONS)
            secondary = p.index(v.precision) if v.precision in p else len(p)
            fmt = formats.index(v.format) if v.format in formats else len(formats)
            if pin:
                why = f"pinned by the deploy command; {why}"
            pref = (f"{v.precision} is preference #{secondary + 1} there" if v.precision in p
                    else f"{v.precision} is not among its preferred precisions ({', '.join(p)})")
            cands.append(Candidate(v, t, (primary, secondary, fmt, vi), f"{why}; {pref}",
                                   (rationale or {}).get(t.id, "")))
    if not cands:
        if pin:
            known = {t.id for t in targets}
            reason = (f"pinned backend {pin!r} is not known here (known: {', '.join(sorted(known))})"
                      if pin not in known else f"pinned backend {pin!r} cannot run this bundle")
        else:
            reason = "no variant of the bundle runs on a usable backend here"
        detail = "; ".join(f"{r['backend']}: {r['reason']}" for r in rejected[:8])
        raise errors.RejectError(errors.NO_COMPATIBLE_BACKEND, f"{reason}" + (f" ({detail})" if detail else ""),
                                 unusable=rejected)
    cands.sort(key=lambda c: c.score)
    return Decision(cands[0], cands, rejected, profile=profile)


def unsupported_operators(runtime: str, variant: Variant) -> list[str]:
    """The operators of an ONNX ``variant`` (as its manifest lists them) ``runtime`` cannot run."""
    if variant.format != "onnx" or not variant.operators:
        return []
    if runtime == "openvino":
        from agent.backends import openvino

        return openvino.unsupported_operators(variant.operators)
    return []  # onnxruntime runs every ONNX-ML operator; LiteRT reads no ONNX at all


def _no_variant_reason(manifest: Manifest, t: Target, refused: Mapping[str, list[str]]) -> str:
    """Why ``t`` takes no variant of the bundle, naming the operators it cannot run."""
    if refused:
        vid, ops = next(iter(refused.items()))
        return f"{t.runtime} cannot run operators {', '.join(ops)} (variant {vid}); onnxruntime runs them"
    reason = f"no {'/'.join(t.formats)} variant in the bundle"
    if t.runtime == "tflite":
        from agent.backends import tflite

        ops = sorted({op for v in manifest.variants for op in tflite.unsupported_operators(v.operators)})
        if ops:
            reason += f"; LiteRT has no kernels for the model's operators {', '.join(ops)}"
    return reason


def gate(targets: Sequence[Target], blocked: Mapping[str, str]) -> list[Target]:
    """Targets with the profile's hardware verdicts applied (a blocked target becomes unusable)."""
    out = []
    for t in targets:
        if t.availability.usable and t.id in blocked:
            t = Target(t.runtime, t.target, t.formats, Availability(False, blocked[t.id]))
        out.append(t)
    return out


def select(manifest: Manifest, targets: list[Target], pin: str | None = None, prefer: Sequence[str] = (),
           policy: Policy | None = None) -> Decision:
    """``rank`` under a hardware profile's policy (the default ranking without one)."""
    if policy is None or not policy.ranking:
        return rank(manifest, gate(targets, policy.blocked if policy else {}), pin, prefer)
    return rank(manifest, gate(targets, policy.blocked), pin, prefer, policy.ranking,
                profile=policy.profile, rationale=policy.why)


def variant_tolerance(manifest: Manifest, variant: Variant) -> tuple[float, float]:
    """(rtol, atol) for ``variant``'s golden check: its own ``tolerance`` when the signed manifest
    gives one (reduced-precision variants need more room than fp32), else the bundle's."""
    assert manifest.validation is not None
    rtol, atol = manifest.validation.rtol, manifest.validation.atol
    for raw in manifest.raw.get("variants", []) or []:
        if not isinstance(raw, dict) or raw.get("id") != variant.id or "tolerance" not in raw:
            continue
        tol = raw["tolerance"]
        if not isinstance(tol, dict):
            raise errors.RejectError(errors.INVALID_MANIFEST, f"variant {variant.id}: tolerance is not an object")
        vals = []
        for key, default in (("rtol", rtol), ("atol", atol)):
            v = tol.get(key, default)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v <= MAX_TOLERANCE:
                raise errors.RejectError(errors.INVALID_MANIFEST, f"variant {variant.id}: tolerance.{key} {v!r} is not a number in 0..{MAX_TOLERANCE:g}")
            vals.append(float(v))
        return vals[0], vals[1]
    return rtol, atol


UNRANKED_WHY = "not in the profile's ranking: tried after every ranked backend"


def merge_live_targets(backends: list[dict[str, Any]]) -> None:
    """Reconcile with the agent's own backends on this machine (what selection will use): a profile
    backend whose target the backend reports unusable takes that reason, and every target the
    profile does not rank is appended after the ranked ones, usable or with its reason."""
    try:
        targets = all_targets(available_backends())
    except Exception:  # the report must survive a broken backend module
        log.exception("backend targets could not be listed")
        return
    default_precisions = dict(DEFAULT_RANKING)
    names = {b["name"] for b in backends}
    for b in backends:
        t = next((t for t in targets if t.id == b["name"]), None)
        if b["usable"] and t is not None and not t.availability.usable:
            b["usable"], b["reason"] = False, t.availability.reason
    for t in targets:
        if t.id in names:
            continue
        names.add(t.id)
        backends.append({"name": t.id, "runtime": t.runtime, "target": t.target, "usable": t.availability.usable,
                         "reason": t.availability.reason or "usable", "rank": len(backends) + 1,
                         "precisions": list(default_precisions.get(t.id, ())), "profile": None,
                         "why": UNRANKED_WHY, "requires": []})
