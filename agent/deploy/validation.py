"""Golden-sample checks of a loaded version: validation before it serves (with the latency SLO)
and the re-check on a fresh worker after one died or hung while serving (without it).

The samples are read and run where the model runs (agent/backends/golden.py: inside its worker
with process isolation), so numpy never enters a process-isolated daemon.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from agent import errors
from agent.backends.base import LoadedModel
from agent.backends.selection import variant_tolerance
from agent.bundles.manifest import Manifest, Variant
from agent.serving.registry import ServingVersion

SLO_RUNS_MIN = 20  # golden inputs are timed this often for the p95 (of 20 runs or fewer: the slowest) ...
SLO_BUDGET_S = 3.0  # ... unless that takes longer than this (then at least 3 runs);
SLO_QUICK_RUNS = 5  # but a quick sample, this many runs and about this long, ends the timing when
SLO_QUICK_BUDGET_S = 0.1  # the manifest sets no SLO (p95 only reported) or it already misses it


def validate(model: LoadedModel, vdir: Path, m: Manifest, variant: Variant | None = None) -> dict[str, Any]:
    """Golden samples within rtol/atol (the variant's own tolerance when the manifest gives one),
    and p95 latency under the SLO, on the serving backend (inside its worker, when it has one:
    agent/backends/golden.py)."""
    from agent.backends import golden

    assert m.validation is not None
    v = m.validation
    rtol, atol = variant_tolerance(m, variant) if variant is not None else (v.rtol, v.atol)
    plan = golden.TimingPlan(min_runs=3, max_runs=SLO_RUNS_MIN, budget_s=SLO_BUDGET_S, quick_runs=SLO_QUICK_RUNS,
                             quick_budget_s=SLO_QUICK_BUDGET_S, slo_ms=v.max_p95_ms)
    res = golden.check(model, vdir / v.inputs, vdir / v.expected, rtol, atol, plan)
    times = sorted(res["times_s"])
    p95 = times[min(len(times) - 1, int(0.95 * len(times)))] * 1000
    if v.max_p95_ms is not None and p95 > v.max_p95_ms:
        raise errors.RejectError(errors.SLO_FAILED,
                                 f"p95 latency {p95:.2f} ms on {model.backend_id} exceeds max_p95_ms {v.max_p95_ms:g}")
    return {"max_abs_error": res["max_abs_error"], "p95_ms": round(p95, 3), "runs": len(times)}


def recheck(sv: ServingVersion, vdir: Path) -> ServingVersion:
    """``sv`` (just loaded on a fresh worker) run on its golden samples within their tolerance,
    without the latency SLO (traffic may be heavy right now): the re-check after a worker died
    or hung while serving (agent/deploy/probation.py). Closes the model and raises when it fails."""
    from agent.backends import golden
    from agent.bundles.manifest import parse_document

    try:
        m = parse_document(sv.manifest)
        if m.validation is not None:
            variant = m.variant(sv.variant)
            rtol, atol = variant_tolerance(m, variant)
            plan = golden.TimingPlan(min_runs=1, max_runs=1, budget_s=0.0)
            golden.check(sv.model, vdir / m.validation.inputs, vdir / m.validation.expected, rtol, atol, plan)
    except errors.AgentError:
        sv.model.close()
        raise
    return sv
