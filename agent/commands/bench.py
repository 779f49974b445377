"""``bench`` (a fleet command and ``agentctl bench``): latency of the serving version on its
backend, and of every variant on this device on the other targets that run it.

Read only: it times the serving model in place (its calls count like any other) and loads any
other variant beside it, closed before it returns; nothing it does changes what serves.
Bounded: at most ``BENCH_MAX_ITERATIONS`` calls per target and ``BENCH_MAX_S`` of timing each.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from agent import errors
from agent.bundles.manifest import parse_document
from agent.commands.handlers import model_param

if TYPE_CHECKING:
    from agent.backends.base import Backend, LoadedModel
    from agent.deploy.versions import VersionLoader
    from agent.serving.registry import ServingVersion

BENCH_MAX_ITERATIONS = 10_000
BENCH_MAX_S = 60.0


class ServingLookup(Protocol):
    """What serves a model now (``agent.serving.registry.Registry``)."""

    def get(self, name: str) -> ServingVersion | None: ...


class Bench:
    def __init__(self, serving: ServingLookup, loader: VersionLoader, backends: Sequence[Backend]) -> None:
        self.serving = serving
        self.loader = loader
        self.backends = backends

    def __call__(self, params: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        name = model_param(params)
        n = params.get("iterations", 100)
        if not isinstance(n, int) or not 1 <= n <= BENCH_MAX_ITERATIONS:
            raise errors.RejectError(errors.INVALID_COMMAND, f"iterations must be 1..{BENCH_MAX_ITERATIONS}")
        sv = self.serving.get(name)
        if sv is None:
            raise errors.RejectError(errors.UNKNOWN_MODEL, f"model {name!r} is not serving")
        m = parse_document(sv.manifest)
        vdir = self.loader.version_dir(name, sv.version)
        if m.validation is None:
            raise errors.RejectError(errors.INVALID_COMMAND, f"{name} v{sv.version} has no golden inputs to bench with")
        with np.load(vdir / m.validation.inputs, allow_pickle=False) as z:
            inputs = {k: z[k] for k in z.files}
        wanted = params.get("backends", [sv.backend])
        all_targets = [t for b in self.backends for t in b.targets()]
        # Every variant whose files are on this device (the serving one first), on every wanted target.
        present = [v for v in m.variants if all((vdir / f.path).is_file() for f in v.files)]
        per_variant: dict[str, dict[str, Any]] = {}
        for variant in sorted(present, key=lambda v: v.id != sv.variant):
            out: dict[str, Any] = per_variant.setdefault(variant.id, {})
            for t in all_targets:
                if variant.format not in t.formats or not (wanted == "all" or t.id in wanted):
                    continue
                if not t.availability.usable:
                    out[t.id] = {"usable": False, "reason": t.availability.reason}
                    continue
                serving = t.id == sv.backend and variant.id == sv.variant
                model: LoadedModel | None = sv.model if serving else None
                try:
                    if model is None:
                        model = self.loader.load_variant(m, variant, vdir, t.runtime, t.target)
                    out[t.id] = _time_model(model, inputs, n)
                    if model.details.get("compute_precision"):
                        out[t.id]["compute_precision"] = model.details["compute_precision"]
                except errors.AgentError as e:
                    out[t.id] = {"usable": False, "reason": e.message}
                finally:
                    if model is not None and model is not sv.model:
                        model.close()
        return {"model": name, "version": sv.version, "variant": sv.variant, "serving_backend": sv.backend,
                "iterations": n, "backends": per_variant.get(sv.variant, {}), "variants": per_variant}


def _time_model(model: LoadedModel, inputs: dict[str, Any], n: int) -> dict[str, Any]:
    model.infer(inputs)  # warm-up: first runs allocate
    times = []
    t_end = time.monotonic() + BENCH_MAX_S
    for _ in range(n):
        t0 = time.perf_counter()
        model.infer(inputs)
        times.append(time.perf_counter() - t0)
        if time.monotonic() > t_end:
            break
    times.sort()

    def pct(q: float) -> float:
        return round(times[min(len(times) - 1, int(q / 100 * len(times)))] * 1000, 3)

    return {"usable": True, "runs": len(times), "p50_ms": pct(50), "p90_ms": pct(90), "p99_ms": pct(99),
            "min_ms": round(times[0] * 1000, 3), "max_ms": round(times[-1] * 1000, 3)}
