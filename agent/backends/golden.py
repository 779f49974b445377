"""Golden-sample checks and timings, where the model runs.

Why here and not in the runner: with process isolation the model lives in a worker process, and
the golden inputs (megabytes for an image model) would otherwise be loaded into the daemon — with
numpy, ≈ 14 MB of RSS it keeps for good — and pickled across the pipe for every timed run. The
worker runs ``run()`` itself (agent/serving/worker.py) and returns the figures; in-process models
call it directly. Light imports only: a worker imports this module, not the daemon's stack.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from agent import errors
from agent.backends.base import IsolatedCapable, LoadedModel


@dataclass(frozen=True)
class TimingPlan:
    """How often to time the golden inputs: ``warmup`` untimed runs, then at least ``min_runs``
    and at most ``max_runs`` timed ones, stopping once ``budget_s`` has passed. With ``quick_runs``,
    also stop after that many runs and ``quick_budget_s`` when the p95 could no longer pass
    ``slo_ms`` (or there is no SLO to check). With ``concurrency`` > 0, then also ``concurrency``
    callers at once for at most ``tp_calls`` calls in all or ``tp_budget_s`` seconds (requests/s)."""

    warmup: int = 0
    min_runs: int = 3
    max_runs: int = 20
    budget_s: float = 2.0
    quick_runs: int = 0
    quick_budget_s: float = 0.0
    slo_ms: float | None = None
    concurrency: int = 0
    tp_calls: int = 0
    tp_budget_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def bound_s(self, per_run_s: float) -> float:
        """Longest the whole plan may take when no run takes longer than ``per_run_s``."""
        throughput = per_run_s * (1 + self.concurrency) + self.tp_budget_s if self.concurrency else 0.0
        return per_run_s * (2 + self.warmup + self.min_runs) + self.budget_s + throughput


def load_samples(inputs: Path, expected: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The golden inputs and expected outputs (.npz, no pickles)."""
    import numpy as np

    try:
        with np.load(inputs, allow_pickle=False) as z:
            ins = {k: z[k] for k in z.files}
        with np.load(expected, allow_pickle=False) as z:
            exp = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise errors.RejectError(errors.VALIDATION_FAILED, f"golden samples unreadable: {e}") from e
    return ins, exp


EXACT_KINDS = "iubUSO"  # integer, boolean and string outputs (class labels) must match exactly


def _check_exact(name: str, got: Any, exp: Any, backend_id: str) -> None:
    """``validation_failed`` unless ``got`` equals ``exp`` element for element."""
    import numpy as np

    g = np.asarray(got)
    if g.shape != exp.shape:
        raise errors.RejectError(errors.VALIDATION_FAILED,
                                 f"output {name!r}: shape {list(g.shape)}, expected {list(exp.shape)}")
    if exp.dtype.kind in "USO":
        same = g.astype(str) == exp.astype(str) if g.dtype.kind in "USO" else np.zeros(exp.shape, bool)
    else:
        same = g == exp
    if not bool(np.all(same)):
        i = int(np.argmin(np.asarray(same).reshape(-1)))
        g_i, e_i = (x.item() if hasattr(x, "item") else x for x in (g.reshape(-1)[i], exp.reshape(-1)[i]))
        raise errors.RejectError(
            errors.VALIDATION_FAILED,
            f"output {name!r} on {backend_id}: {int(np.size(same) - np.count_nonzero(same))} value(s) differ "
            f"from the golden ones, which must match exactly (at flat index {i}: "
            f"{g_i!r}, expected {e_i!r})")


def max_error(out: Mapping[str, Any], expected: Mapping[str, Any], rtol: float, atol: float, backend_id: str) -> float:
    """Largest |got - expected|; ``validation_failed`` when any element is outside atol + rtol·|expected|,
    or, for integer, boolean and string outputs (class labels), differs at all."""
    import numpy as np

    worst = 0.0
    for name, exp in expected.items():
        if name not in out:
            raise errors.RejectError(errors.VALIDATION_FAILED, f"output {name!r} missing from {backend_id}")
        if np.asarray(exp).dtype.kind in EXACT_KINDS:
            _check_exact(name, out[name], np.asarray(exp), backend_id)
            continue
        got = np.asarray(out[name], dtype=np.float64)
        e = np.asarray(exp, dtype=np.float64)
        if got.shape != e.shape:
            raise errors.RejectError(errors.VALIDATION_FAILED,
                                     f"output {name!r}: shape {list(got.shape)}, expected {list(e.shape)}")
        diff = np.abs(got - e)
        allowed = atol + rtol * np.abs(e)
        if diff.size and not bool(np.all(diff <= allowed)):
            i = int(np.argmax(diff - allowed))
            raise errors.RejectError(
                errors.VALIDATION_FAILED,
                f"output {name!r} on {backend_id}: max abs error {float(diff.max()):.3g} exceeds "
                f"atol {atol:g} + rtol {rtol:g}·|expected| (at flat index {i})")
        worst = max(worst, float(diff.max()) if diff.size else 0.0)
    return worst


def time_runs(model: Any, inputs: dict[str, Any], plan: TimingPlan) -> list[float]:
    """Seconds per timed run, in run order."""
    for _ in range(plan.warmup):
        model.infer(inputs)
    times: list[float] = []
    t_start = time.monotonic()
    t_end, t_quick = t_start + plan.budget_s, t_start + plan.quick_budget_s
    while len(times) < plan.max_runs:
        now = time.monotonic()
        if len(times) >= plan.min_runs and now >= t_end:
            break
        # The p95 of 20 runs or fewer is the slowest, and more runs only raise it: a quick sample
        # gives the same verdict as the full count when it already misses the SLO, and is all
        # that is needed when there is no SLO to check. A met SLO is checked over the full count.
        if (plan.quick_runs and len(times) >= plan.quick_runs and now >= t_quick
                and (plan.slo_ms is None or max(times) * 1000 > plan.slo_ms)):
            break
        t0 = time.perf_counter()
        model.infer(inputs)
        times.append(time.perf_counter() - t0)
    return times


def throughput(model: Any, inputs: dict[str, Any], plan: TimingPlan) -> dict[str, Any]:
    """Requests/s of ``plan.concurrency`` callers calling ``model`` at once, as a loaded server's
    workers would: each caller loops until ``tp_calls`` calls were started in all or
    ``tp_budget_s`` has passed (every caller runs at least one call). A failing call ends the
    measurement with its error."""
    lock = threading.Lock()
    started = [0]
    done = [0]
    failure: list[BaseException] = []
    t_end = time.monotonic() + plan.tp_budget_s

    def caller(first: bool) -> None:
        while True:
            with lock:
                if failure or (not first and (started[0] >= plan.tp_calls or time.monotonic() >= t_end)):
                    return
                started[0] += 1
            first = False
            try:
                model.infer(inputs)
            except BaseException as e:  # re-raised by the measuring thread below
                with lock:
                    failure.append(e)
                return
            with lock:
                done[0] += 1

    threads = [threading.Thread(target=caller, args=(True,), name=f"golden-tp-{i}", daemon=True)
               for i in range(plan.concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if failure:
        raise failure[0]
    return {"throughput_rps": round(done[0] / elapsed, 1) if elapsed > 0 else 0.0,
            "concurrency": plan.concurrency, "throughput_calls": done[0]}


def run(model: LoadedModel, inputs: Path, expected: Path, rtol: float, atol: float,
        plan: TimingPlan) -> dict[str, Any]:
    """One checked run of the golden inputs, then the timed ones: ``max_abs_error``, ``times_s``."""
    ins, exp = load_samples(inputs, expected)
    try:
        out = model.infer(ins)
    except errors.AgentError as e:
        raise errors.RejectError(errors.VALIDATION_FAILED, f"golden inputs rejected: {e.message}") from e
    worst = max_error(out, exp, rtol, atol, model.backend_id)
    shapes = [[(k, list(a.shape)) for k, a in sorted(ins.items())]]
    model.known_shapes = shapes  # shapes this version computes: agent/serving/admission.py
    out_doc: dict[str, Any] = {"max_abs_error": worst, "times_s": time_runs(model, ins, plan), "input_shapes": shapes}
    if plan.concurrency > 0:
        out_doc.update(throughput(model, ins, plan))
    return out_doc


def check(model: LoadedModel, inputs: Path, expected: Path, rtol: float, atol: float, plan: TimingPlan) -> dict[str, Any]:
    """``run()`` where the model is: inside its worker when it has one, else here."""
    if isinstance(model, IsolatedCapable):
        return model.golden(inputs, expected, rtol, atol, plan)
    return run(model, inputs, expected, rtol, atol, plan)
