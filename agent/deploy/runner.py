"""The deploy job: a state machine written as one transition table.

Invariants:
- Steps never choose their successor: each returns an outcome and ``TRANSITIONS`` decides.
- The job's state and step are persisted (state.db) and reported before each step runs.
- A bounded re-entry counter (``MAX_STEP_ENTRIES``) breaks fallback loops.
- Nothing serves before it was verified (signature, sizes, hashes) and validated on the backend
  that will serve it; the previously serving version stays as last-known-good.
- A refused or failed deploy leaves the serving model untouched.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent import errors
from agent.backends.base import Backend, LoadedModel, LoadOptions
from agent.backends.selection import Candidate, Decision, all_targets, rank
from agent.bundles.fetch import Fetcher, join_url
from agent.bundles.manifest import MAX_MANIFEST_BYTES, Manifest, verify_manifest
from agent.bundles.store import Store
from agent.bundles.trust import TrustStore
from agent.deploy.jobs import JobReporter
from agent.serving.registry import Registry, ServingVersion
from agent.state import StateDB
from agent.timeutil import parse_rfc3339

log = logging.getLogger(__name__)

FETCHING, VERIFYING, SELECTING, DOWNLOADING, INSTALLING, LOADING, VALIDATING, ACTIVATING = (
    "fetching_manifest", "verifying", "selecting_backend", "downloading", "installing", "loading",
    "validating", "activating")
DONE = "done"
OK, FALLBACK = "ok", "fallback"

# (step, outcome) -> next step. Errors end the job (REJECTED before anything was downloaded,
# FAILED after); FALLBACK tries the next ranked candidate.
TRANSITIONS: dict[tuple[str, str], str] = {
    (FETCHING, OK): VERIFYING,
    (VERIFYING, OK): SELECTING,
    (SELECTING, OK): DOWNLOADING,
    (DOWNLOADING, OK): INSTALLING,
    (INSTALLING, OK): LOADING,
    (LOADING, OK): VALIDATING,
    (LOADING, FALLBACK): DOWNLOADING,
    (VALIDATING, OK): ACTIVATING,
    (VALIDATING, FALLBACK): DOWNLOADING,
    (ACTIVATING, OK): DONE,
}
REJECTING_STEPS = (FETCHING, VERIFYING, SELECTING)  # a refusal here is REJECTED, not FAILED
MAX_STEP_ENTRIES = 8  # per step per job: fallbacks are bounded by the candidates, this by design
STEP_TIMEOUT_S = {FETCHING: 120.0, VERIFYING: 10.0, SELECTING: 30.0, DOWNLOADING: 3600.0,
                  INSTALLING: 60.0, LOADING: 300.0, VALIDATING: 300.0, ACTIVATING: 30.0}
PROGRESS_INTERVAL_S = 0.5
SLO_RUNS_MIN = 20  # golden inputs are timed this often for the p95 ...
SLO_BUDGET_S = 3.0  # ... unless that takes longer than this (then at least 3 runs)


@dataclass
class DeployContext:
    job_id: str
    model: str
    manifest_url: str
    manifest_sha256: str | None = None
    pin: str | None = None
    manifest_raw: bytes = b""
    manifest: Manifest | None = None
    decision: Decision | None = None
    candidate_index: int = 0
    files: dict[str, str] = field(default_factory=dict)  # bundle path -> sha256
    loaded: LoadedModel | None = None
    figures: dict[str, Any] = field(default_factory=dict)
    cancel: threading.Event = field(default_factory=threading.Event)
    cancel_code: str = errors.CANCELED

    @property
    def candidate(self) -> Candidate:
        assert self.decision is not None
        return self.decision.candidates[self.candidate_index]


@dataclass
class DeploySettings:
    threshold: int = 1
    max_clock_skew_s: float = 300
    prefer: Sequence[str] = ()
    threads: int = 0
    allow_spinning: bool = False
    keep_versions: int = 2
    max_disk_bytes: int = 4096 * 1024 * 1024
    isolation: str = "none"  # "process": each model runs in a worker process the daemon survives
    infer_timeout_s: float = 30.0


class DeployRunner:
    """Runs deploy jobs one step at a time through ``TRANSITIONS``."""

    def __init__(self, db: StateDB, store: Store, fetcher: Fetcher, trust: Callable[[], TrustStore],
                 registry: Registry, backends: Sequence[Backend], reporter: JobReporter,
                 settings: Callable[[], DeploySettings]) -> None:
        self.db = db
        self.store = store
        self.fetcher = fetcher
        self.trust = trust
        self.registry = registry
        self.backends = backends
        self.reporter = reporter
        self.settings = settings
        self._steps: dict[str, Callable[[DeployContext], str]] = {
            FETCHING: self._fetch_manifest, VERIFYING: self._verify, SELECTING: self._select,
            DOWNLOADING: self._download, INSTALLING: self._install, LOADING: self._load,
            VALIDATING: self._validate, ACTIVATING: self._activate,
        }
        self.activation_lock = threading.Lock()  # one activation at a time, deploy or rollback

    def run(self, ctx: DeployContext) -> None:
        """Drive ``ctx`` to a terminal state, reporting every step."""
        step = FETCHING
        entries: dict[str, int] = {}
        t_start = time.monotonic()
        while step != DONE:
            if ctx.cancel.is_set():
                self._close_unused(ctx)
                self.reporter.update(ctx.job_id, "deploy", "CANCELED", step, error=errors.RejectError(
                    ctx.cancel_code, f"deploy of {ctx.model} {ctx.cancel_code} at {step}"))
                return
            entries[step] = entries.get(step, 0) + 1
            if entries[step] > MAX_STEP_ENTRIES:
                self._close_unused(ctx)
                self.reporter.update(ctx.job_id, "deploy", "FAILED", step, error=errors.AgentError(
                    errors.INTERNAL, f"step {step} entered {MAX_STEP_ENTRIES} times; giving up"))
                return
            self.reporter.update(ctx.job_id, "deploy", "IN_PROGRESS", step)
            t0 = time.monotonic()
            try:
                outcome = self._steps[step](ctx)
            except errors.AgentError as e:
                self._close_unused(ctx)
                state = "REJECTED" if step in REJECTING_STEPS and isinstance(e, errors.RejectError) else "FAILED"
                self.reporter.update(ctx.job_id, "deploy", state, step, error=e)
                return
            except Exception as e:  # a bug must end the job, not the worker
                log.exception("deploy %s: step %s crashed", ctx.job_id, step)
                self._close_unused(ctx)
                self.reporter.update(ctx.job_id, "deploy", "FAILED", step,
                                     error=errors.AgentError(errors.INTERNAL, f"{step}: {type(e).__name__}: {e}"))
                return
            elapsed = time.monotonic() - t0
            ctx.figures.setdefault("steps_s", {})[step] = round(elapsed, 4)
            if elapsed > STEP_TIMEOUT_S[step]:
                self._close_unused(ctx)
                self.reporter.update(ctx.job_id, "deploy", "TIMED_OUT", step,
                                     error=errors.AgentError(errors.TIMEOUT, f"{step} took {elapsed:.0f} s (limit {STEP_TIMEOUT_S[step]:.0f} s)"))
                return
            step = TRANSITIONS[(step, outcome)]
        ctx.figures["total_s"] = round(time.monotonic() - t_start, 4)
        m = ctx.manifest
        assert m is not None
        result = {"name": m.name, "version": m.version, "variant": ctx.candidate.variant.id,
                  "backend": ctx.candidate.target.id, "figures": ctx.figures,
                  "selection": ctx.decision.explain() if ctx.decision else None}
        self.reporter.update(ctx.job_id, "deploy", "SUCCEEDED", None, result=result)

    # -- steps -------------------------------------------------------------------------------
    def _fetch_manifest(self, ctx: DeployContext) -> str:
        import hashlib

        raw = self.fetcher.fetch_bytes(ctx.manifest_url, MAX_MANIFEST_BYTES, what="manifest")
        if ctx.manifest_sha256 and hashlib.sha256(raw).hexdigest() != ctx.manifest_sha256.lower():
            raise errors.RejectError(errors.HASH_MISMATCH,
                                     f"manifest {ctx.manifest_url}: sha256 differs from the command's manifest_sha256")
        ctx.manifest_raw = raw
        return OK

    def _verify(self, ctx: DeployContext) -> str:
        s = self.settings()
        m = verify_manifest(ctx.manifest_raw, self.trust(), s.threshold)
        now = time.time()
        last_trusted = float(self.db.get("last_trusted_time", 0.0))
        if now + s.max_clock_skew_s < last_trusted:
            raise errors.RejectError(errors.CLOCK_UNTRUSTED,
                                     f"device clock ({now:.0f}) is earlier than the last trusted time ({last_trusted:.0f}); fix the clock (NTP) before installing")
        if m.name != ctx.model:
            raise errors.RejectError(errors.INVALID_COMMAND,
                                     f"manifest is for model {m.name!r}, the command deploys {ctx.model!r}")
        if m.is_expired(now):
            raise errors.RejectError(errors.EXPIRED, f"manifest {m.name} v{m.version} expired at {m.expires_at}")
        rec = self.db.model(m.name)
        if rec is not None and m.version <= rec["highwater"]:
            raise errors.RejectError(errors.ROLLBACK_REFUSED,
                                     f"{m.name} v{m.version} is not newer than v{rec['highwater']} already installed; use a signed rollback")
        if m.created_at:
            created = parse_rfc3339(m.created_at)
            if created > last_trusted and created <= now + s.max_clock_skew_s:
                self.db.put("last_trusted_time", created)
        min_mem = m.requires.get("min_free_memory_mb")
        if isinstance(min_mem, (int, float)):
            import psutil

            avail_mb = psutil.virtual_memory().available / 2**20
            if avail_mb < min_mem:
                raise errors.RejectError(errors.INSUFFICIENT_MEMORY,
                                         f"{m.name} needs {min_mem} MB free memory, {avail_mb:.0f} MB available")
        ctx.manifest = m
        return OK

    def _select(self, ctx: DeployContext) -> str:
        assert ctx.manifest is not None
        s = self.settings()
        ctx.decision = rank(ctx.manifest, all_targets(self.backends), pin=ctx.pin, prefer=s.prefer)
        ctx.candidate_index = 0
        log.info("deploy %s: %s v%d → %s (%s); %d candidate(s)", ctx.job_id, ctx.model,
                 ctx.manifest.version, ctx.candidate.target.id, ctx.candidate.variant.id,
                 len(ctx.decision.candidates))
        return OK

    def _download(self, ctx: DeployContext) -> str:
        m = ctx.manifest
        assert m is not None
        files = m.files_for(ctx.candidate.variant)
        missing = [f for f in files if not self.store.has(f.sha256, f.size)]
        need = sum(f.size for f in missing)
        s = self.settings()
        if self.store.usage_bytes() + need > s.max_disk_bytes:
            raise errors.RejectError(errors.DISK_FULL,
                                     f"{m.name} v{m.version} needs {need} more bytes; the store budget (storage.max_disk_mb) would be exceeded")
        total = need
        done_before = 0
        last_report = 0.0
        for f in missing:
            url = join_url(ctx.manifest_url, f.path)

            def progress(n: int, base: int = done_before) -> None:
                nonlocal last_report
                now = time.monotonic()
                if ctx.cancel.is_set():
                    raise errors.RejectError(ctx.cancel_code, "canceled while downloading")
                if now - last_report >= PROGRESS_INTERVAL_S:
                    last_report = now
                    self.reporter.progress(ctx.job_id, "deploy", DOWNLOADING, base + n, total)

            self.fetcher.download(url, self.store.partial_path(f.sha256), f.size, f.sha256, progress)
            self.store.commit_partial(f.sha256)
            done_before += f.size
        ctx.files = {f.path: f.sha256 for f in files}
        ctx.figures["downloaded_bytes"] = need
        ctx.figures["reused_files"] = len(files) - len(missing)
        return OK

    def _install(self, ctx: DeployContext) -> str:
        m = ctx.manifest
        assert m is not None
        self.store.link_version(m.name, m.version, ctx.files)
        self.db.record_install(m.name, m.version, ctx.candidate.variant.id, ctx.candidate.target.id,
                               m.raw, ctx.files)
        return OK

    def _load(self, ctx: DeployContext) -> str:
        m = ctx.manifest
        assert m is not None
        c = ctx.candidate
        path = self.store.version_dir(m.name, m.version) / c.variant.main_file.path
        try:
            t0 = time.monotonic()
            ctx.loaded = load_model(self.backends, c.target.runtime, c.target.target, path, self.settings())
            ctx.figures["load_ms"] = round((time.monotonic() - t0) * 1000, 2)
        except errors.AgentError as e:
            return self._fallback(ctx, e)
        return OK

    def _validate(self, ctx: DeployContext) -> str:
        m = ctx.manifest
        assert m is not None and ctx.loaded is not None
        if m.validation is None:
            ctx.figures["validation"] = "none in manifest"
            return OK
        try:
            ctx.figures["validation"] = validate(ctx.loaded, self.store.version_dir(m.name, m.version), m)
        except errors.AgentError as e:
            return self._fallback(ctx, e)
        return OK

    def _activate(self, ctx: DeployContext) -> str:
        m = ctx.manifest
        assert m is not None and ctx.loaded is not None
        with self.activation_lock:
            rec = self.db.model(m.name)
            previous = rec["serving"] if rec else None
            sv = ServingVersion(m.name, m.version, ctx.candidate.variant.id, ctx.loaded, manifest=m.raw)
            self.db.set_serving(m.name, m.version, previous, ctx.candidate.target.id)
            self.registry.activate(sv)
            ctx.loaded = None  # owned by the registry now
            self._prune(m.name)
        return OK

    # -- helpers -----------------------------------------------------------------------------
    def _fallback(self, ctx: DeployContext, e: errors.AgentError) -> str:
        """Try the next ranked candidate after a load or validation failure, or give up."""
        assert ctx.decision is not None
        failed = ctx.candidate
        self._close_unused(ctx)
        ctx.figures.setdefault("fallbacks", []).append(
            {"backend": failed.target.id, "variant": failed.variant.id, "error": e.to_dict()})
        if ctx.pin or ctx.candidate_index + 1 >= len(ctx.decision.candidates):
            raise e
        ctx.candidate_index += 1
        nxt = ctx.candidate
        self.reporter.event("backend_fallback", model=ctx.model, job=ctx.job_id,
                            failed={"backend": failed.target.id, "variant": failed.variant.id},
                            error=e.to_dict(), next={"backend": nxt.target.id, "variant": nxt.variant.id})
        return FALLBACK

    @staticmethod
    def _close_unused(ctx: DeployContext) -> None:
        if ctx.loaded is not None:
            ctx.loaded.close()
            ctx.loaded = None

    def _prune(self, name: str) -> None:
        """Keep ``keep_versions`` versions (always the serving and previous ones); collect files."""
        keep = self.settings().keep_versions
        rec = self.db.model(name)
        protected = {rec["serving"], rec["previous"]} if rec else set()
        versions = self.db.versions(name)
        excess = [v for v in versions if v not in protected][: max(0, len(versions) - keep)]
        for v in excess:
            self.db.delete_version(name, v)
            self.store.remove_version(name, v)
        if excess:
            referenced = {sha for files in self.db.all_version_files() for sha in files.values()}
            freed = self.store.collect(referenced)
            log.info("%s: removed versions %s, freed %d bytes", name, excess, freed)


RUNTIME_MODULES = {"onnxruntime": "agent.backends.onnxruntime", "openvino": "agent.backends.openvino",
                   "tflite": "agent.backends.tflite"}


def find_backend(runtime: str) -> Backend:
    """A fresh Backend for ``runtime`` (used in worker processes, which have no daemon)."""
    import importlib

    modname = RUNTIME_MODULES.get(runtime)
    if modname is None:
        raise errors.RejectError(errors.NO_COMPATIBLE_BACKEND, f"unknown runtime {runtime!r}")
    try:
        mod = importlib.import_module(modname)
    except ImportError as e:
        raise errors.RejectError(errors.NO_COMPATIBLE_BACKEND, f"runtime {runtime!r} is not available: {e}") from e
    for obj in vars(mod).values():
        if isinstance(obj, type) and getattr(obj, "runtime", None) == runtime and hasattr(obj, "targets"):
            backend: Backend = obj()
            return backend
    raise errors.RejectError(errors.NO_COMPATIBLE_BACKEND, f"{modname} defines no backend for {runtime!r}")


def load_model(backends: Sequence[Backend], runtime: str, target: str, path: Path,
               settings: DeploySettings) -> LoadedModel:
    """Load on ``runtime:target``, in a worker process unless ``backends.isolation = "none"``."""
    options = LoadOptions(threads=settings.threads, allow_spinning=settings.allow_spinning)
    if not any(b.runtime == runtime for b in backends):
        raise errors.RejectError(errors.NO_COMPATIBLE_BACKEND, f"runtime {runtime!r} is not available")
    if settings.isolation == "process":
        from agent.backends.isolated import IsolatedModel

        return IsolatedModel(runtime, target, path, options, infer_timeout_s=settings.infer_timeout_s)
    for b in backends:
        if b.runtime == runtime:
            return b.load(path, target, options)
    raise AssertionError("unreachable")


def validate(model: LoadedModel, vdir: Path, m: Manifest) -> dict[str, Any]:
    """Golden samples within rtol/atol, and p95 latency under the SLO, on the serving backend."""
    import numpy as np

    assert m.validation is not None
    v = m.validation
    try:
        with np.load(vdir / v.inputs, allow_pickle=False) as z:
            inputs = {k: z[k] for k in z.files}
        with np.load(vdir / v.expected, allow_pickle=False) as z:
            expected = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise errors.RejectError(errors.VALIDATION_FAILED, f"golden samples unreadable: {e}") from e
    try:
        out = model.infer(inputs)
    except errors.AgentError as e:
        raise errors.RejectError(errors.VALIDATION_FAILED, f"golden inputs rejected: {e.message}") from e
    worst = 0.0
    for name, exp in expected.items():
        if name not in out:
            raise errors.RejectError(errors.VALIDATION_FAILED, f"output {name!r} missing from {model.backend_id}")
        got = np.asarray(out[name])
        if got.shape != exp.shape:
            raise errors.RejectError(errors.VALIDATION_FAILED,
                                     f"output {name!r}: shape {list(got.shape)}, expected {list(exp.shape)}")
        diff = np.abs(got.astype(np.float64) - exp.astype(np.float64))
        allowed = v.atol + v.rtol * np.abs(exp.astype(np.float64))
        if diff.size and not bool(np.all(diff <= allowed)):
            i = int(np.argmax(diff - allowed))
            raise errors.RejectError(
                errors.VALIDATION_FAILED,
                f"output {name!r} on {model.backend_id}: max abs error {float(diff.max()):.3g} exceeds "
                f"atol {v.atol:g} + rtol {v.rtol:g}·|expected| (at flat index {i})")
        worst = max(worst, float(diff.max()) if diff.size else 0.0)
    times: list[float] = []
    t_end = time.monotonic() + SLO_BUDGET_S
    while len(times) < SLO_RUNS_MIN and (len(times) < 3 or time.monotonic() < t_end):
        t0 = time.perf_counter()
        model.infer(inputs)
        times.append(time.perf_counter() - t0)
    times.sort()
    p95 = times[min(len(times) - 1, int(0.95 * len(times)))] * 1000
    if v.max_p95_ms is not None and p95 > v.max_p95_ms:
        raise errors.RejectError(errors.SLO_FAILED,
                                 f"p95 latency {p95:.2f} ms on {model.backend_id} exceeds max_p95_ms {v.max_p95_ms:g}")
    return {"max_abs_error": worst, "p95_ms": round(p95, 3), "runs": len(times)}
