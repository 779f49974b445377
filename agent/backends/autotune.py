"""Autotune: measure the top-ranked candidates on the golden inputs and keep the fastest.

Ranking says what *should* be fastest on a hardware class; autotune checks it on this device.

Invariants:
- Bounded: at most ``TOP_K`` candidates in rank order, at most ``MAX_PER_TARGET`` of them on one
  target (a profile that ranks one target first would otherwise only compare its variants), each
  timed for at most ``MAX_RUNS`` runs or ``BUDGET_S`` seconds (at least ``MIN_RUNS``), after the
  checked golden run and ``WARMUP_RUNS`` untimed runs. Loading is the larger cost (each candidate
  is loaded once: the winner stays loaded and serves, its golden check and timings stand in for
  the deploy's validation).
- Only correct candidates compete: a candidate whose golden outputs fall outside its variant's
  tolerance, or that fails to load, is reported (``on_failure``: the runner emits
  ``backend_fallback``), recorded in the explanation and ordered last. It never wins.
- At most two models are loaded at once (the best so far and the one being measured). With
  process isolation the first two candidates load at the same time (each in its own worker);
  golden checks and timings always run one at a time, never beside a load.
- The verdict is cached in the state database under (sha256 of every variant file of the bundle,
  hardware fingerprint); a re-deploy of the same model files on the same hardware and runtimes
  reuses it instead of measuring. It is also cached under the bundle's *layout* (model name,
  tensor specs, variant ids, formats, precisions, file paths and sizes, but not the size of an
  OpenVINO IR's .xml, which varies with generated node names; see ``layout_hash``): a
  new version that only changes the weights runs at the speed of the one measured, so it reuses
  that verdict too (``"basis": "layout"`` in the explanation). A cached winner is still validated
  before it serves, and a failed one falls back in rank order. Entries older than
  ``CACHE_TTL_S`` are measured again.
- Each candidate gets both figures: the median single-call latency and the requests/s of
  ``concurrency`` callers at once (``THROUGHPUT_CALLS`` calls or ``THROUGHPUT_BUDGET_S`` at most),
  measured where the model runs. The objective (``backends.autotune_objective``) says which one
  picks the winner: ``latency`` (lowest median) or ``throughput`` (most requests/s). A cached
  verdict counts only for the objective and concurrency it was measured for.
- The measurements, the winner, the objective and why the winner won are in the decision's
  explanation (``Decision.autotune``).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import platform
import statistics
import threading
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
WARMUP_RUNS = 1  # after the checked golden run (which allocates and JITs): not timed
MIN_RUNS = 5
MAX_RUNS = 50
BUDGET_S = 0.25  # per candidate, timed runs only: a median of 5+ runs ranks runtimes that differ by >10 %
CACHE_TTL_S = 30 * 86400.0  # re-measure a month-old verdict (firmware, thermal set-up drift)
CACHE_PREFIX = "autotune/"
RUNTIME_DISTS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "openvino", "ai-edge-litert", "tflite-runtime")
FINGERPRINT_HEX = 16
MAX_LOADED = 2  # models autotune holds at once: the best so far and the one being measured
OBJECTIVES = ("latency", "throughput")
DEFAULT_CONCURRENCY = 4
THROUGHPUT_CALLS = 200  # per candidate, all callers together: enough to settle a pool of 4-8 callers
THROUGHPUT_BUDGET_S = 0.5  # per candidate: the larger models stop on time, not on calls
METRICS = {"latency": "median_ms on the golden inputs, one call at a time",
           "throughput": "requests/s on the golden inputs, {n} callers at once"}


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


def _layout_size(fmt: str, path: str, size: int) -> int | None:
    """A file's size as part of the layout; None for an OpenVINO IR's .xml, whose size follows the
    node names the converter generates from a process-wide counter (the same model converted twice
    gets ``Constant_2360`` or ``Constant_17890``): the .bin beside it carries the weights' sizes."""
    return None if fmt == "openvino" and path.endswith(".xml") else size


def layout_hash(manifest: Manifest) -> str:
    """sha256 over what decides a model's speed but not its weights' values: name, tensor specs,
    and each variant's id, format, precision, file paths and sizes (plus the bundle's own files,
    the golden inputs among them). Retrained weights keep it; a new architecture changes sizes."""
    doc = {
        "name": manifest.name,
        "inputs": [[t.name, t.dtype, list(t.shape)] for t in manifest.inputs],
        "outputs": [[t.name, t.dtype, list(t.shape)] for t in manifest.outputs],
        "variants": sorted([v.id, v.format, v.precision,
                            sorted([f.path, _layout_size(v.format, f.path, f.size)] for f in v.files)]
                           for v in manifest.variants),
        "files": sorted([f.path, f.size] for f in manifest.files),
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def layout_key(manifest: Manifest, hw_fingerprint: str) -> str:
    return f"{CACHE_PREFIX}layout/{layout_hash(manifest)}/{hw_fingerprint}"


def _find(decision: Decision, variant: str, backend: str) -> Candidate | None:
    return next((c for c in decision.candidates if c.variant.id == variant and c.target.id == backend), None)


def plan(decision: Decision, manifest: Manifest, kv: KV, key: str, *, enabled: bool, pinned: bool,
         now: float | None = None, layout: str = "", objective: str = "latency",
         concurrency: int = DEFAULT_CONCURRENCY) -> list[int]:
    """Indices of the candidates to measure; [] when there is nothing to measure or a cached
    verdict applies (then the decision is already reordered). Fills ``decision.autotune``.

    ``layout`` (``layout_key``): the verdict of another version with the same layout applies
    when none is cached for these exact files. A verdict cached for another ``objective`` (or,
    for throughput, another ``concurrency``) does not apply."""
    n = len(decision.candidates)
    skip = ("backends.autotune is off" if not enabled else "the deploy command pins the backend" if pinned
            else "one candidate" if n < 2 else "the bundle has no golden inputs to measure with"
            if manifest.validation is None else "")
    if skip:
        decision.autotune = {"state": "skipped", "why": skip}
        return []
    t = time.time() if now is None else now
    for k, basis in ((key, "files"), (layout, "layout")):
        cached = kv.get(k) if k else None
        if not (isinstance(cached, dict) and isinstance(cached.get("winner"), dict)
                and t - float(cached.get("at", 0)) < CACHE_TTL_S
                and _same_objective(cached, objective, concurrency)):
            continue
        w = cached["winner"]
        c = _find(decision, str(w.get("variant")), str(w.get("backend")))
        if c is None:
            log.info("cached autotune winner %s is not a candidate any more; measuring again", w)
            continue
        decision.promote([c, *(x for x in decision.candidates if x is not c)])
        decision.autotune = {"state": "cached", "key": k, "basis": basis, "measured_at": cached.get("at"),
                             "winner": w, "measured": cached.get("measured", []),
                             "objective": objective, "concurrency": concurrency, "won": cached.get("won", "")}
        if basis == "layout":
            decision.autotune["measured_version"] = cached.get("version")
            decision.autotune["why"] = ("measured on another version of this model with the same layout "
                                        "(tensor specs, variants, file sizes) on this hardware")
        return []
    picked: list[int] = []
    per_target: dict[str, int] = {}
    for i, c in enumerate(decision.candidates):
        if per_target.get(c.target.id, 0) < MAX_PER_TARGET:
            per_target[c.target.id] = per_target.get(c.target.id, 0) + 1
            picked.append(i)
        if len(picked) == TOP_K:
            break
    decision.autotune = {"state": "planned", "key": key, "candidates": len(picked)}
    if layout:
        decision.autotune["layout_key"] = layout
    return picked


def _same_objective(cached: Mapping[str, Any], objective: str, concurrency: int) -> bool:
    """Whether a cached verdict was measured for ``objective`` (older entries: latency)."""
    was = cached.get("objective", "latency")
    return bool(was == objective and (objective == "latency" or cached.get("concurrency") == concurrency))


def _plan(concurrency: int = 0) -> Any:
    from agent.backends.golden import TimingPlan

    return TimingPlan(warmup=WARMUP_RUNS, min_runs=MIN_RUNS, max_runs=MAX_RUNS, budget_s=BUDGET_S,
                      concurrency=concurrency, tp_calls=THROUGHPUT_CALLS if concurrency else 0,
                      tp_budget_s=THROUGHPUT_BUDGET_S if concurrency else 0.0)


def score(row: Mapping[str, Any], objective: str) -> float:
    """Lower is better: the median latency, or the negated requests/s."""
    return -float(row["throughput_rps"]) if objective == "throughput" else float(row["median_ms"])


def why_won(rows: Sequence[Mapping[str, Any]], winner: Mapping[str, Any], objective: str) -> str:
    """One line saying why ``winner`` won against the runner-up under ``objective``."""
    ok = sorted((r for r in rows if "error" not in r), key=lambda r: score(r, objective))
    fig = (lambda r: f"{r['throughput_rps']:g} req/s") if objective == "throughput" else (lambda r: f"{r['median_ms']:g} ms")
    head = f"objective {objective}: {winner['backend']} ({winner['variant']}) {fig(winner)}"
    if len(ok) < 2:
        return head + ", the only correct candidate"
    second = ok[1]
    return (f"{head}, best of {len(ok)}; next {second['backend']} ({second['variant']}) {fig(second)}")


def figures(times_s: Sequence[float]) -> dict[str, Any]:
    """Median / p90 / p95 / min latency in ms of the timed runs."""
    times = sorted(t * 1000 for t in times_s)

    def pct(q: float) -> float:
        return round(times[min(len(times) - 1, int(q * len(times)))], 4)

    return {"median_ms": round(statistics.median(times), 4), "p90_ms": pct(0.9), "p95_ms": pct(0.95),
            "min_ms": round(times[0], 4), "runs": len(times)}


def time_model(model: LoadedModel, inputs: dict[str, Any]) -> dict[str, Any]:
    """Autotune's timing of ``model`` on ``inputs`` held here (figures as in the measured rows)."""
    from agent.backends.golden import time_runs

    return figures(time_runs(model, inputs, _plan()))


@dataclass
class TuneResult:
    loaded: LoadedModel | None  # the winner, loaded; None when every measured candidate failed
    last_error: errors.AgentError | None
    unmeasured: int  # candidates left that autotune did not try (they follow the measured ones)
    row: dict[str, Any] | None = None  # the winner's measurement: golden check and timings of ``loaded``


def _load_wave(wave: Sequence[Candidate], load: Callable[[Candidate], LoadedModel],
               ) -> list[tuple[LoadedModel | None, BaseException | None, float]]:
    """Load ``wave`` at once (one thread per extra candidate); per candidate (model, error, ms)."""
    out: list[tuple[LoadedModel | None, BaseException | None, float]] = [(None, None, 0.0)] * len(wave)

    def one(i: int) -> None:
        t0 = time.monotonic()
        try:
            out[i] = (load(wave[i]), None, round((time.monotonic() - t0) * 1000, 2))
        except BaseException as e:  # handed to the caller, which raises what is not an AgentError
            out[i] = (None, e, round((time.monotonic() - t0) * 1000, 2))

    threads = [threading.Thread(target=one, args=(i,), name=f"autotune-load-{i}", daemon=True)
               for i in range(1, len(wave))]
    for t in threads:
        t.start()
    one(0)
    for t in threads:
        t.join()
    return out


def tune(decision: Decision, indices: Sequence[int], manifest: Manifest, vdir: Path,
         load: Callable[[Candidate], LoadedModel], on_failure: Callable[[Candidate, errors.AgentError], None],
         kv: KV, key: str, layout: str = "", concurrent_loads: int = 1, objective: str = "latency",
         concurrency: int = DEFAULT_CONCURRENCY) -> TuneResult:
    """Measure ``decision.candidates[i]`` for i in ``indices``; reorder the decision (fastest
    correct first, then the unmeasured in rank order, then the failed) and cache the verdict
    (under ``key`` and, when given, ``layout``).

    ``concurrent_loads`` = 2 loads two candidates at once when no best one is held yet (models
    in worker processes load in parallel; at most two are loaded at any time either way). The
    golden checks and timings always run one candidate at a time. Every candidate gets both
    figures (median latency, requests/s at ``concurrency``); ``objective`` picks by one of them."""
    from agent.backends import golden

    top = [decision.candidates[i] for i in indices]
    assert manifest.validation is not None
    samples = (vdir / manifest.validation.inputs, vdir / manifest.validation.expected)  # read where each model runs
    rows: list[dict[str, Any]] = []
    ok: list[tuple[float, int, Candidate]] = []
    failed: list[Candidate] = []
    best: tuple[float, LoadedModel, dict[str, Any]] | None = None
    last_error: errors.AgentError | None = None
    pos = 0
    while pos < len(top):
        width = max(1, min(concurrent_loads, MAX_LOADED - (best is not None)))
        wave = top[pos:pos + width]
        loaded = _load_wave(wave, load)
        try:
            for i, c in enumerate(wave):
                model, err, load_ms = loaded[i]
                loaded[i] = (None, None, load_ms)  # from here on this loop owns (and closes) ``model``
                row: dict[str, Any] = {"variant": c.variant.id, "backend": c.target.id}
                if len(wave) > 1:
                    row["loaded_with"] = len(wave) - 1  # its load ran beside this many others
                try:
                    if err is not None:
                        raise err
                    assert model is not None
                    row["load_ms"] = load_ms
                    rtol, atol = variant_tolerance(manifest, c.variant)
                    res = golden.check(model, *samples, rtol, atol, _plan(concurrency))  # where the model runs
                    row["max_abs_error"] = res["max_abs_error"]
                    row.update(figures(res["times_s"]))
                    row.update({k: res[k] for k in ("throughput_rps", "concurrency", "throughput_calls") if k in res})
                    if model.details.get("compute_precision"):
                        row["compute_precision"] = model.details["compute_precision"]
                except errors.AgentError as e:
                    last_error = e
                    row["error"] = e.to_dict()
                    failed.append(c)
                    if model is not None:
                        model.close()
                    on_failure(c, e)
                    rows.append(row)
                    continue
                except BaseException:
                    if model is not None:
                        model.close()
                    raise
                rows.append(row)
                ok.append((score(row, objective), pos + i, c))
                if best is None or score(row, objective) < best[0]:
                    if best is not None:
                        best[1].close()
                    best = (score(row, objective), model, row)
                else:
                    model.close()
        except BaseException:  # a bug, not a candidate's failure: free every model before it propagates
            for m, _, _ in loaded:
                if m is not None:
                    m.close()
            if best is not None:
                best[1].close()
            raise
        pos += len(wave)
    order = _promote(decision, top, ok, failed, rows, manifest.version, kv, key, layout, objective, concurrency)
    return TuneResult(best[1] if best is not None else None, last_error, len(order) - len(top),
                      best[2] if best is not None else None)


def _promote(decision: Decision, top: list[Candidate], ok: list[tuple[float, int, Candidate]],
             failed: list[Candidate], rows: list[dict[str, Any]], version: int, kv: KV, key: str,
             layout: str, objective: str, concurrency: int) -> list[Candidate]:
    """Reorder ``decision`` (fastest correct first, then the unmeasured in rank order, then the
    failed), record the verdict on it and cache it under ``key`` (and ``layout``); the new order."""
    ok.sort(key=lambda x: (x[0], x[1]))
    measured = {id(c) for c in top}
    order = [c for _, _, c in ok] + [c for c in decision.candidates if id(c) not in measured] + failed
    decision.promote(order)
    state: dict[str, Any] = {"state": "measured", "key": key, "measured_at": time.time(), "measured": rows,
                             "metric": METRICS[objective].format(n=concurrency), "objective": objective,
                             "concurrency": concurrency}
    if ok:
        w = ok[0][2]
        state["winner"] = {"variant": w.variant.id, "backend": w.target.id}
        row = next(r for r in rows if r["variant"] == w.variant.id and r["backend"] == w.target.id and "error" not in r)
        state["won"] = why_won(rows, row, objective)
        entry = {"winner": state["winner"], "measured": rows, "at": state["measured_at"], "version": version,
                 "objective": objective, "concurrency": concurrency, "won": state["won"]}
        kv.put(key, entry)
        if layout:
            kv.put(layout, entry)
    decision.autotune = state
    return order
