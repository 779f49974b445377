"""Autotune: measure the top-ranked candidates on the golden inputs and keep the fastest.

Ranking says what *should* be fastest on a hardware class; autotune checks it on this device.

Invariants:
- Bounded: at most ``TOP_K`` candidates in rank order, at most ``MAX_PER_TARGET`` of them on one
  target (a profile that ranks one target first would otherwise only compare its variants), each
  timed for at most ``MAX_RUNS`` runs or ``BUDGET_S`` seconds (at least ``MIN_RUNS``), after
  ``WARMUP_RUNS`` untimed runs.
- Only correct candidates compete: a candidate whose golden outputs fall outside its variant's
  tolerance, or that fails to load, is reported (``on_failure``: the runner emits
  ``backend_fallback``), recorded in the explanation and ordered last. It never wins.
- At most two models are loaded at once (the best so far and the one being measured).
- The verdict is cached in the state database under (sha256 of every variant file of the bundle,
  hardware fingerprint); a re-deploy of the same model files on the same hardware and runtimes
  reuses it instead of measuring. Entries older than ``CACHE_TTL_S`` are measured again.
- The measurements, the winner and whether they came from the cache are in the decision's
  explanation (``Decision.autotune``).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from agent import errors
from agent.backends.base import LoadedModel, Target
from agent.backends.selection import Candidate, Decision, variant_tolerance
from agent.bundles.manifest import Manifest

log = logging.getLogger(__name__)

TOP_K = 3  # candidates measured: beyond the top three the ranking is rarely wrong enough to matter
MAX_PER_TARGET = 2  # so the top three span targets, not only variants of the first target
WARMUP_RUNS = 2  # first runs allocate and JIT; not timed
MIN_RUNS = 3
MAX_RUNS = 50
BUDGET_S = 2.0  # per candidate, timed runs only
CACHE_TTL_S = 30 * 86400.0  # re-measure a month-old verdict (firmware, thermal set-up drift)
CACHE_PREFIX = "autotune/"
RUNTIME_DISTS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "openvino", "ai-edge-litert", "tflite-runtime")
FINGERPRINT_HEX = 16


class KV(Protocol):
    def get(self, key: str, default: Any = None) -> Any: ...

    def put(self, key: str, value: Any) -> None: ...


def _dist_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def fingerprint(facts: Mapping[str, Any] | None, targets: Sequence[Target]) -> str:
    """A short hash of what decides speed here: CPU, board, accelerators, runtime versions and the
    usable targets. Any change (a runtime upgrade, a Coral plugged in) invalidates cached verdicts."""
    f = facts or {}
    doc = {
        "arch": f.get("architecture") or platform.machine(),
        "cpu": f.get("cpu_model"), "cpus": f.get("cpu_count"), "isa": sorted(f.get("cpu_isa") or []),
        "board": f.get("board"),
        "accelerators": sorted(k for k, v in (f.get("accelerators") or {}).items() if isinstance(v, dict) and v.get("present")),
        "runtimes": {d: v for d in RUNTIME_DISTS if (v := _dist_version(d))},
        "targets": sorted(t.id for t in targets if t.availability.usable),
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:FINGERPRINT_HEX]


def model_hash(manifest: Manifest) -> str:
    """sha256 over every variant's file hashes: the same model files give the same key."""
    parts = sorted(f"{v.id}:{f.path}:{f.sha256}" for v in manifest.variants for f in v.files)
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def cache_key(manifest: Manifest, hw_fingerprint: str) -> str:
    return f"{CACHE_PREFIX}{model_hash(manifest)}/{hw_fingerprint}"


def _find(decision: Decision, variant: str, backend: str) -> Candidate | None:
    return next((c for c in decision.candidates if c.variant.id == variant and c.target.id == backend), None)


def plan(decision: Decision, manifest: Manifest, kv: KV, key: str, *, enabled: bool, pinned: bool,
         now: float | None = None) -> list[int]:
    """Indices of the candidates to measure; [] when there is nothing to measure or a cached
    verdict applies (then the decision is already reordered). Fills ``decision.autotune``."""
    n = len(decision.candidates)
    skip = ("backends.autotune is off" if not enabled else "the deploy command pins the backend" if pinned
            else "one candidate" if n < 2 else "the bundle has no golden inputs to measure with"
            if manifest.validation is None else "")
    if skip:
        decision.autotune = {"state": "skipped", "why": skip}
        return []
    t = time.time() if now is None else now
    cached = kv.get(key)
    if isinstance(cached, dict) and isinstance(cached.get("winner"), dict) and t - float(cached.get("at", 0)) < CACHE_TTL_S:
        w = cached["winner"]
        c = _find(decision, str(w.get("variant")), str(w.get("backend")))
        if c is not None:
            decision.promote([c, *(x for x in decision.candidates if x is not c)])
            decision.autotune = {"state": "cached", "key": key, "measured_at": cached.get("at"),
                                 "winner": w, "measured": cached.get("measured", [])}
            return []
        log.info("cached autotune winner %s is not a candidate any more; measuring again", w)
    picked: list[int] = []
    per_target: dict[str, int] = {}
    for i, c in enumerate(decision.candidates):
        if per_target.get(c.target.id, 0) < MAX_PER_TARGET:
            per_target[c.target.id] = per_target.get(c.target.id, 0) + 1
            picked.append(i)
        if len(picked) == TOP_K:
            break
    decision.autotune = {"state": "planned", "key": key, "candidates": len(picked)}
    return picked


def load_samples(vdir: Path, manifest: Manifest) -> tuple[dict[str, Any], dict[str, Any]]:
    import numpy as np

    assert manifest.validation is not None
    try:
        with np.load(vdir / manifest.validation.inputs, allow_pickle=False) as z:
            inputs = {k: z[k] for k in z.files}
        with np.load(vdir / manifest.validation.expected, allow_pickle=False) as z:
            expected = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise errors.RejectError(errors.VALIDATION_FAILED, f"golden samples unreadable: {e}") from e
    return inputs, expected


def max_error(out: Mapping[str, Any], expected: Mapping[str, Any], rtol: float, atol: float,
              backend_id: str) -> float:
    """Largest |got - expected|; ``validation_failed`` when any element is outside atol + rtol·|expected|."""
    import numpy as np

    worst = 0.0
    for name, exp in expected.items():
        if name not in out:
            raise errors.RejectError(errors.VALIDATION_FAILED, f"output {name!r} missing from {backend_id}")
        got = np.asarray(out[name], dtype=np.float64)
        e = np.asarray(exp, dtype=np.float64)
        if got.shape != e.shape:
            raise errors.RejectError(errors.VALIDATION_FAILED, f"output {name!r} on {backend_id}: shape {list(got.shape)}, expected {list(e.shape)}")
        diff = np.abs(got - e)
        if diff.size and not bool(np.all(diff <= atol + rtol * np.abs(e))):
            raise errors.RejectError(errors.VALIDATION_FAILED,
                                     f"output {name!r} on {backend_id}: max abs error {float(diff.max()):.3g} exceeds atol {atol:g} + rtol {rtol:g}·|expected|")
        worst = max(worst, float(diff.max()) if diff.size else 0.0)
    return worst


def time_model(model: LoadedModel, inputs: dict[str, Any], *, warmup: int = WARMUP_RUNS, min_runs: int = MIN_RUNS,
               max_runs: int = MAX_RUNS, budget_s: float = BUDGET_S) -> dict[str, Any]:
    """Median / p90 / min latency in ms over a bounded number of runs."""
    for _ in range(warmup):
        model.infer(inputs)
    times: list[float] = []
    t_end = time.monotonic() + budget_s
    while len(times) < max_runs and (len(times) < min_runs or time.monotonic() < t_end):
        t0 = time.perf_counter()
        model.infer(inputs)
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    return {"median_ms": round(statistics.median(times), 4), "p90_ms": round(times[min(len(times) - 1, int(0.9 * len(times)))], 4),
            "min_ms": round(times[0], 4), "runs": len(times)}


@dataclass
class TuneResult:
    loaded: LoadedModel | None  # the winner, loaded; None when every measured candidate failed
    last_error: errors.AgentError | None
    unmeasured: int  # candidates left that autotune did not try (they follow the measured ones)


def tune(decision: Decision, indices: Sequence[int], manifest: Manifest, vdir: Path,
         load: Callable[[Candidate], LoadedModel], on_failure: Callable[[Candidate, errors.AgentError], None],
         kv: KV, key: str) -> TuneResult:
    """Measure ``decision.candidates[i]`` for i in ``indices``; reorder the decision (fastest
    correct first, then the unmeasured in rank order, then the failed) and cache the verdict."""
    top = [decision.candidates[i] for i in indices]
    inputs, expected = load_samples(vdir, manifest)
    rows: list[dict[str, Any]] = []
    ok: list[tuple[float, int, Candidate]] = []
    failed: list[Candidate] = []
    best: tuple[float, LoadedModel] | None = None
    last_error: errors.AgentError | None = None
    for pos, c in enumerate(top):
        row: dict[str, Any] = {"variant": c.variant.id, "backend": c.target.id}
        model: LoadedModel | None = None
        try:
            t0 = time.monotonic()
            model = load(c)
            row["load_ms"] = round((time.monotonic() - t0) * 1000, 2)
            rtol, atol = variant_tolerance(manifest, c.variant)
            row["max_abs_error"] = max_error(model.infer(inputs), expected, rtol, atol, model.backend_id)
            row.update(time_model(model, inputs))
            details = getattr(model, "details", None)
            if isinstance(details, dict) and details.get("compute_precision"):
                row["compute_precision"] = details["compute_precision"]
        except errors.AgentError as e:
            last_error = e
            row["error"] = e.to_dict()
            failed.append(c)
            if model is not None:
                model.close()
            on_failure(c, e)
            rows.append(row)
            continue
        rows.append(row)
        ok.append((row["median_ms"], pos, c))
        assert model is not None
        if best is None or row["median_ms"] < best[0]:
            if best is not None:
                best[1].close()
            best = (row["median_ms"], model)
        else:
            model.close()
    ok.sort(key=lambda x: (x[0], x[1]))
    measured = {id(c) for c in top}
    order = [c for _, _, c in ok] + [c for c in decision.candidates if id(c) not in measured] + failed
    decision.promote(order)
    state: dict[str, Any] = {"state": "measured", "key": key, "measured_at": time.time(), "measured": rows,
                             "metric": "median_ms on the golden inputs"}
    if ok:
        w = ok[0][2]
        state["winner"] = {"variant": w.variant.id, "backend": w.target.id}
        kv.put(key, {"winner": state["winner"], "measured": rows, "at": state["measured_at"]})
    decision.autotune = state
    return TuneResult(best[1] if best is not None else None, last_error, len(order) - len(top))
