"""Choose a (variant, backend target) pair for a bundle, and explain the choice.

Order of authority: a ``backend`` pin in the deploy command (honoured or refused with
``no_compatible_backend``), then ``[backends] prefer`` from the config, then the hardware
profile's ranking, then the built-in default ranking below. Every candidate considered is
listed in the explanation with why it ranked where it did or why it was unusable.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from agent import errors
from agent.backends.base import Backend, Target
from agent.bundles.manifest import Manifest, Variant

# Without a profile: accelerators before CPU (they exist to be used), and on each target the
# precision it runs natively first (fp16 on GPUs, fp32 on CPUs where fp16 is emulated).
DEFAULT_RANKING: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("onnxruntime:TensorrtExecutionProvider", ("fp16", "fp32", "int8")),
    ("onnxruntime:CUDAExecutionProvider", ("fp16", "fp32")),
    ("openvino:NPU", ("fp16", "int8")),
    ("openvino:GPU", ("fp16", "fp32")),
    ("tflite:edgetpu", ("int8",)),
    ("onnxruntime:OpenVINOExecutionProvider", ("fp32", "fp16")),
    ("openvino:CPU", ("fp32", "int8", "fp16")),
    ("onnxruntime:CPUExecutionProvider", ("fp32", "int8", "fp16")),
    ("tflite:xnnpack", ("fp32", "int8", "fp16")),
)


@dataclass
class Candidate:
    variant: Variant
    target: Target
    score: tuple[int, int]
    why: str

    def to_dict(self) -> dict[str, Any]:
        return {"variant": self.variant.id, "backend": self.target.id, "why": self.why}


@dataclass
class Decision:
    chosen: Candidate
    candidates: list[Candidate]
    rejected: list[dict[str, str]] = field(default_factory=list)

    def explain(self) -> dict[str, Any]:
        return {"chosen": self.chosen.to_dict(),
                "ranked": [c.to_dict() for c in self.candidates],
                "unusable": self.rejected}


def all_targets(backends: Sequence[Backend]) -> list[Target]:
    out: list[Target] = []
    for b in backends:
        out.extend(b.targets())
    return out


def rank(manifest: Manifest, targets: list[Target], pin: str | None = None,
         prefer: Sequence[str] = (), ranking: Sequence[tuple[str, Sequence[str]]] = DEFAULT_RANKING
         ) -> Decision:
    """Rank every usable (variant, target) pair; raise ``no_compatible_backend`` if none."""
    order = {tid: i for i, (tid, _) in enumerate(ranking)}
    precs = {tid: tuple(p) for tid, p in ranking}
    rejected: list[dict[str, str]] = []
    cands: list[Candidate] = []
    for t in targets:
        if pin and t.id != pin:
            continue
        if not t.availability.usable:
            rejected.append({"backend": t.id, "reason": t.availability.reason})
            continue
        fitting = [v for v in manifest.variants if v.format in t.formats]
        if not fitting:
            rejected.append({"backend": t.id, "reason": f"no {'/'.join(t.formats)} variant in the bundle"})
            continue
        for v in fitting:
            if t.id in prefer:
                primary = list(prefer).index(t.id)
                why = f"listed #{primary + 1} in [backends] prefer"
            elif t.id in order:
                primary = len(prefer) + order[t.id]
                why = f"ranked #{order[t.id] + 1} by the {'profile' if ranking is not DEFAULT_RANKING else 'default ranking'}"
            else:
                primary = len(prefer) + len(order)
                why = "not ranked; usable"
            p = precs.get(t.id, ("fp32", "fp16", "int8"))
            secondary = p.index(v.precision) if v.precision in p else len(p)
            if pin:
                why = f"pinned by the deploy command; {why}"
            cands.append(Candidate(v, t, (primary, secondary), f"{why}; {v.precision} is preference #{secondary + 1} there"))
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
    return Decision(cands[0], cands, rejected)
