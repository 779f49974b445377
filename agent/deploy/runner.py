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
from typing import TYPE_CHECKING, Any

from agent import errors
from agent.backends import RUNTIME_MODULES, find_backend  # noqa: F401 (re-exported)
from agent.backends.base import Backend, LoadedModel
from agent.backends.selection import (
    Candidate,
    Decision,
    Policy,
    all_targets,
    select,
)
from agent.bundles.fetch import Fetcher, join_url
from agent.bundles.manifest import MAX_MANIFEST_BYTES, Manifest, verify_manifest
from agent.bundles.sealed import CODES as SEALED_CODES
from agent.bundles.sealed import check_recipient
from agent.bundles.store import Store
from agent.bundles.trust import TrustStore
from agent.deploy.deadline import StepRun, StepTimedOut
from agent.deploy.jobs import JobReporter
from agent.deploy.owner import ServingOwner
from agent.deploy.validation import SLO_RUNS_MIN, recheck, validate  # noqa: F401 (recheck re-exported)
from agent.deploy.versions import load_model, sealed_spec
from agent.serving.registry import Registry, ServingVersion
from agent.state import StateDB
from agent.timeutil import parse_rfc3339

if TYPE_CHECKING:  # imported where used, as autotune is: an idle daemon does without both (≈ 1.5 MB)
    from agent.bundles.archive import BundleArchive

log = logging.getLogger(__name__)

FETCHING, VERIFYING, SELECTING, DOWNLOADING, INSTALLING, LOADING, VALIDATING, ACTIVATING = (
    "fetching_manifest", "verifying", "selecting_backend", "downloading", "installing", "loading",
    "validating", "activating")
PROBATION = "probation"
DONE = "done"
HANDED_OVER = "handed_over"  # the probation supervisor ends the job
OK, FALLBACK, DEFERRED, ON_PROBATION = "ok", "fallback", "deferred", "on_probation"

# (step, outcome) -> next step. Errors end the job (REJECTED before anything was downloaded,
# FAILED after); FALLBACK tries the next ranked candidate; a version that replaced another goes
# on probation, whose end (SUCCEEDED, or FAILED with a rollback) the supervisor reports.
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
    (ACTIVATING, OK): DONE,  # nothing served before: nothing to fall back to, no probation
    (ACTIVATING, ON_PROBATION): PROBATION,
    (PROBATION, OK): DONE,
    (PROBATION, DEFERRED): HANDED_OVER,
}
# Recovery after a restart: the event each persisted step (None: still queued) takes. RESUME runs
# the deploy again from the start (downloads continue from their partial files; at most
# deploy.max_resumes times); SETTLE ends it from what the database says serves: when the job's
# version serves, probation continues (or the job succeeds, or rolls back after an unclean stop
# with in-process runtimes); when it does not, the deploy never activated and RESUME applies.
# agent/deploy/recovery.py applies it (``decide``: the event and the database → one action).
RESUME, SETTLE = "resume", "settle"
RECOVERY: dict[str | None, str] = {
    None: RESUME, FETCHING: RESUME, VERIFYING: RESUME, SELECTING: RESUME, DOWNLOADING: RESUME,
    INSTALLING: RESUME, LOADING: RESUME, VALIDATING: RESUME, ACTIVATING: SETTLE, PROBATION: SETTLE,
}
REJECTING_STEPS = (FETCHING, VERIFYING, SELECTING)  # a refusal here is REJECTED, not FAILED
MAX_STEP_ENTRIES = 8  # per step per job: fallbacks are bounded by the candidates, this by design
# Each step runs under its deadline (seconds) and is cut off at it: the job ends TIMED_OUT and
# what served keeps serving. Downloads, loads and validations have config keys (deploy.*_timeout_s).
STEP_TIMEOUT_S = {FETCHING: 120.0, VERIFYING: 10.0, SELECTING: 30.0, DOWNLOADING: 3600.0,
                  INSTALLING: 60.0, LOADING: 300.0, VALIDATING: 300.0, ACTIVATING: 30.0,
                  PROBATION: 5.0}
UNBOUNDED_STEPS = (ACTIVATING, PROBATION)  # they change what serves: run to their end, never abandoned
PROGRESS_INTERVAL_S = 0.5


CLOCK_UNTRUSTED_KEY = "clock_untrusted"  # kv: why installs are refused for the clock ("" when they are not)


def check_clock(db: StateDB, max_clock_skew_s: float, now: float | None = None) -> str | None:
    """Why installs must wait for the clock (the device clock is earlier than the last trusted
    time it recorded), or None; kept in kv ``clock_untrusted`` for the status document."""
    now = time.time() if now is None else now
    last_trusted = float(db.get("last_trusted_time", 0.0))
    reason = None
    if now + max_clock_skew_s < last_trusted:
        reason = (f"device clock ({now:.0f}) is earlier than the last trusted time ({last_trusted:.0f}); "
                  "fix the clock (NTP) before installing")
    if (db.get(CLOCK_UNTRUSTED_KEY) or None) != reason:
        db.put(CLOCK_UNTRUSTED_KEY, reason or "")
    return reason


class DeployProgress:
    """The step a deploy is in and whether its run ended, for a caller that waits on it
    (``agentctl install``) instead of polling the database. The runner writes; waiters read."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self.step: str | None = None
        self.ended = False  # terminal, or handed over to the probation supervisor

    def enter(self, step: str) -> None:
        with self._changed:
            self.step = step
            self._changed.notify_all()

    def end(self) -> None:
        with self._changed:
            self.ended = True
            self._changed.notify_all()

    def wait(self, seen: str | None, timeout_s: float) -> tuple[str | None, bool]:
        """Wait (at most ``timeout_s``) for a step other than ``seen`` or the end; (step, ended)."""
        with self._changed:
            self._changed.wait_for(lambda: self.ended or self.step != seen, max(timeout_s, 0.0))
            return self.step, self.ended


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
    source: BundleArchive | None = None  # offline bundle (agentctl install): manifest and files come from it
    previous: int | None = None  # the version that served before this one activated
    tune: list[int] = field(default_factory=list)  # candidates autotune measures in LOADING (once)
    tuned: dict[str, Any] | None = None  # autotune's row for ``loaded``: its golden check and timings
    spares: list[Any] = field(default_factory=list)  # workers started while the bundle downloads
    progress: DeployProgress = field(default_factory=DeployProgress)  # completed by ``DeployRunner.run``
    until: float | None = None  # time.monotonic() at which the running step's deadline passes
    step_lock: threading.Lock = field(default_factory=threading.Lock)  # ``loaded``/``spares`` hand-back

    @property
    def candidate(self) -> Candidate:
        assert self.decision is not None
        return self.decision.candidates[self.candidate_index]


def deploy_result(ctx: DeployContext) -> dict[str, Any]:
    """The final job update's ``result`` for a deploy that activated."""
    m = ctx.manifest
    assert m is not None
    return {"name": m.name, "version": m.version, "variant": ctx.candidate.variant.id,
            "backend": ctx.candidate.target.id, "previous": ctx.previous, "figures": ctx.figures,
            "selection": ctx.decision.explain() if ctx.decision else None}


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
    autotune: bool = False  # measure the top candidates on the golden inputs (config backends.autotune)
    autotune_objective: str = "latency"  # what picks the winner: "latency" or "throughput" (agent/backends/autotune.py)
    autotune_concurrency: int = 4  # callers at once when measuring throughput
    policy: Policy | None = None  # the hardware profile's ranking; None: the default ranking
    hw_facts: dict[str, Any] | None = None  # detected hardware (hw_report facts): part of the autotune cache key
    hw_fingerprint: str = ""  # overrides the key's hardware part (tests); "": from hw_facts and the targets
    cache_dir: str = ""  # compiled-model caches (OpenVINO, TensorRT); "": none
    decryption_keys: tuple[str, ...] = ()  # age identity files for encrypted bundles (trust.decryption_keys)
    step_timeout_s: dict[str, float] = field(default_factory=lambda: dict(STEP_TIMEOUT_S))  # per step, seconds


class DeployRunner:
    """Runs deploy jobs one step at a time through ``TRANSITIONS``."""

    def __init__(self, db: StateDB, store: Store, fetcher: Fetcher, trust: Callable[[], TrustStore],
                 registry: Registry, backends: Sequence[Backend], reporter: JobReporter,
                 settings: Callable[[], DeploySettings],
                 probation: Callable[[DeployContext, dict[str, Any]], bool] | None = None,
                 owner: ServingOwner | None = None) -> None:
        self.db = db
        self.store = store
        self.fetcher = fetcher
        self.trust = trust
        self.registry = registry
        self.backends = backends
        self.reporter = reporter
        self.settings = settings
        self.probation = probation
        self._steps: dict[str, Callable[[DeployContext], str]] = {
            FETCHING: self._fetch_manifest, VERIFYING: self._verify, SELECTING: self._select,
            DOWNLOADING: self._download, INSTALLING: self._install, LOADING: self._load,
            VALIDATING: self._validate, ACTIVATING: self._activate, PROBATION: self._probation,
        }
        self.owner = owner or ServingOwner(db, registry, store)  # the only writer of what serves

    def run(self, ctx: DeployContext) -> None:
        """Drive ``ctx`` to a terminal state (or to probation), reporting every step; ends
        ``ctx.progress`` however it returns."""
        try:
            self._run(ctx)
        finally:
            ctx.progress.end()

    def _run(self, ctx: DeployContext) -> None:
        step = FETCHING
        entries: dict[str, int] = {}
        t_start = time.monotonic()
        while step not in (DONE, HANDED_OVER):
            if ctx.cancel.is_set() and step != PROBATION:  # once activated, a deploy is not undone by a cancel
                return self._end(ctx, "CANCELED", step, errors.RejectError(
                    ctx.cancel_code, f"deploy of {ctx.model} {ctx.cancel_code} at {step}"))
            entries[step] = entries.get(step, 0) + 1
            if entries[step] > MAX_STEP_ENTRIES:
                return self._end(ctx, "FAILED", step, errors.AgentError(
                    errors.INTERNAL, f"step {step} entered {MAX_STEP_ENTRIES} times; giving up"))
            self.reporter.update(ctx.job_id, "deploy", "IN_PROGRESS", step)
            ctx.progress.enter(step)
            t0 = time.monotonic()
            try:
                outcome = self._run_step(ctx, step)
            except StepTimedOut as e:
                return self._end(ctx, "TIMED_OUT", step, e)
            except errors.AgentError as e:
                if ctx.cancel.is_set():  # the step stopped because of the cancel, not a fault
                    return self._end(ctx, "CANCELED", step, errors.RejectError(
                        ctx.cancel_code, f"deploy of {ctx.model} {ctx.cancel_code} at {step}"))
                rejected = step in REJECTING_STEPS and isinstance(e, errors.RejectError)
                return self._end(ctx, "REJECTED" if rejected else "FAILED", step, e)
            except Exception as e:  # a bug must end the job, not the worker
                log.exception("deploy %s: step %s crashed", ctx.job_id, step)
                return self._end(ctx, "FAILED", step, errors.AgentError(errors.INTERNAL, f"{step}: {type(e).__name__}: {e}"))
            elapsed = time.monotonic() - t0
            ctx.figures.setdefault("steps_s", {})[step] = round(elapsed, 4)
            step = TRANSITIONS[(step, outcome)]
        ctx.figures["total_s"] = round(time.monotonic() - t_start, 4)
        self._close_spares(ctx)
        self.sweep()
        if step == DONE:
            self.reporter.update(ctx.job_id, "deploy", "SUCCEEDED", None, result=deploy_result(ctx))

    def _run_step(self, ctx: DeployContext, step: str) -> str:
        """Run one step under its deadline, cut off at it (agent/deploy/deadline.py): a download
        by the fetcher's own watchdog (``ctx.until``), a load or validation in a worker process by
        killing the worker. An in-process runtime call cannot be interrupted: the step still ends
        at its deadline, and what its thread returns later is closed and discarded."""
        if step in UNBOUNDED_STEPS:
            return self._steps[step](ctx)
        limit = self.settings().step_timeout_s.get(step, STEP_TIMEOUT_S[step])
        ctx.until = time.monotonic() + limit

        def discard() -> None:
            self._close_unused(ctx)
            self._close_spares(ctx)

        try:
            return StepRun().run(f"{step} of {ctx.model}", lambda: self._steps[step](ctx), ctx.until, limit,
                                 lambda: self._cut_off(ctx, step, limit), discard)
        finally:
            ctx.until = None

    def _cut_off(self, ctx: DeployContext, step: str, limit: float) -> None:
        """Stop what a step that outlived its deadline still runs: the candidate's workers."""
        for sp in ctx.spares:
            sp.kill()
        kill = getattr(ctx.loaded, "kill", None)
        if kill is not None:
            kill(f"{step} ran past its deadline of {limit:g} s; worker killed")

    def sweep(self) -> int:
        """Remove files no kept version references (a crash or a failed deploy leaves some)."""
        referenced = {sha for files in self.db.all_version_files() for sha in files.values()}
        kept = {(name, v) for name in {m["name"] for m in self.db.models()} for v in self.db.versions(name)}
        return self.store.sweep(referenced, kept)

    def _end(self, ctx: DeployContext, state: str, step: str, error: errors.AgentError) -> None:
        """End a deploy that did not activate: free what it loaded and downloaded, report."""
        self._close_unused(ctx)
        self._close_spares(ctx)
        self._discard(ctx)
        self.sweep()
        self.reporter.update(ctx.job_id, "deploy", state, step, error=error)

    def _discard(self, ctx: DeployContext) -> None:
        """After a failed deploy: forget its installed version unless it serves or is kept as previous."""
        if ctx.manifest is None:
            return
        rec = self.db.model(ctx.manifest.name) or {}
        if ctx.manifest.version not in (rec.get("serving"), rec.get("previous")):
            self.db.delete_version(ctx.manifest.name, ctx.manifest.version)

    # -- steps -------------------------------------------------------------------------------
    def _fetch_manifest(self, ctx: DeployContext) -> str:
        import hashlib

        raw = (ctx.source.manifest_bytes() if ctx.source is not None
               else self.fetcher.fetch_bytes(ctx.manifest_url, MAX_MANIFEST_BYTES, what="manifest", until=ctx.until))
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
        clock = check_clock(self.db, s.max_clock_skew_s, now)  # status says "clock": "untrusted" and why
        if clock is not None:
            raise errors.RejectError(errors.CLOCK_UNTRUSTED, clock)
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
            from agent.telemetry.system import memory

            avail_mb = memory()[1] / 2**20
            if avail_mb < min_mem:
                raise errors.RejectError(errors.INSUFFICIENT_MEMORY,
                                         f"{m.name} needs {min_mem} MB free memory, {avail_mb:.0f} MB available")
        check_recipient(m.raw, s.decryption_keys)  # encrypted bundles: before any byte is downloaded
        ctx.manifest = m
        self.db.set_job_version(ctx.job_id, m.version)
        return OK

    def _select(self, ctx: DeployContext) -> str:
        assert ctx.manifest is not None
        s = self.settings()
        targets = all_targets(self.backends)
        ctx.decision = select(ctx.manifest, targets, pin=ctx.pin, prefer=s.prefer, policy=s.policy)
        ctx.candidate_index = 0
        from agent.backends import autotune

        hw = s.hw_fingerprint or autotune.fingerprint(s.hw_facts, targets)
        ctx.tune = autotune.plan(ctx.decision, ctx.manifest, self.db, autotune.cache_key(ctx.manifest, hw),
                                 enabled=s.autotune, pinned=bool(ctx.pin), layout=autotune.layout_key(ctx.manifest, hw),
                                 objective=s.autotune_objective, concurrency=s.autotune_concurrency)
        if s.isolation == "process":  # their interpreters start and import the runtime during the download
            from agent.backends.isolated import prestart

            first = [ctx.decision.candidates[i] for i in ctx.tune[:2]] if ctx.tune else [ctx.candidate]
            ctx.spares = [sp for c in first if (sp := prestart(c.target.runtime)) is not None]
        log.info("deploy %s: %s v%d → %s (%s); %d candidate(s)", ctx.job_id, ctx.model,
                 ctx.manifest.version, ctx.candidate.target.id, ctx.candidate.variant.id,
                 len(ctx.decision.candidates))
        return OK

    def _download(self, ctx: DeployContext) -> str:
        m = ctx.manifest
        assert m is not None
        variants = [ctx.candidate.variant, *(ctx.decision.candidates[i].variant for i in ctx.tune if ctx.decision)]
        files = list({f.path: f for v in variants for f in m.files_for(v)}.values())  # autotune: all measured
        missing = [f for f in files if not self.store.has(f.sha256, f.size)]
        need = sum(f.size for f in missing)
        s = self.settings()
        if self.store.usage_bytes() + need > s.max_disk_bytes:
            raise errors.RejectError(errors.DISK_FULL,
                                     f"{m.name} v{m.version} needs {need} more bytes; the store budget (storage.max_disk_mb) would be exceeded")
        self.fetcher.check_disk(self.store.partial, need, f"{m.name} v{m.version}")  # free disk, before any byte
        if ctx.source is not None:  # offline bundle: one checked pass over the whole archive
            def archive_progress(n: int) -> None:
                if ctx.cancel.is_set():
                    raise errors.RejectError(ctx.cancel_code, "canceled while installing from the archive")

            ctx.source.install_into(ctx.manifest_raw, m, missing, self.store, archive_progress)
        total = need
        done_before = 0
        last_report = 0.0
        for f in missing if ctx.source is None else []:
            url = join_url(ctx.manifest_url, f.path)

            def progress(n: int, base: int = done_before) -> None:
                nonlocal last_report
                now = time.monotonic()
                if ctx.cancel.is_set():
                    raise errors.RejectError(ctx.cancel_code, "canceled while downloading")
                if now - last_report >= PROGRESS_INTERVAL_S:
                    last_report = now
                    self.reporter.progress(ctx.job_id, "deploy", DOWNLOADING, base + n, total)

            self.fetcher.download(url, self.store.partial_path(f.sha256), f.size, f.sha256, progress, until=ctx.until)
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
        if ctx.tune:
            return self._autotune(ctx)
        c = ctx.candidate
        if self.settings().isolation == "process" and not any(
                sp.runtime == c.target.runtime and not sp.claimed for sp in ctx.spares):
            from agent.backends.isolated import prestart  # a worker the step's deadline can kill

            ctx.spares.extend(sp for sp in [prestart(c.target.runtime)] if sp is not None)
        path = self.store.version_dir(m.name, m.version) / c.variant.main_file.path
        try:
            t0 = time.monotonic()
            ctx.loaded = load_model(self.backends, c.target.runtime, c.target.target, path, self.settings(),
                                    precision=c.variant.precision, spares=ctx.spares,
                                    sealed=sealed_spec(m, c.variant, self.store.version_dir(m.name, m.version), self.settings()))
            ctx.figures["load_ms"] = round((time.monotonic() - t0) * 1000, 2)
        except errors.AgentError as e:
            return self._fallback(ctx, e)
        return OK

    def _autotune(self, ctx: DeployContext) -> str:
        """Measure the planned candidates (agent/backends/autotune.py); keep the fastest correct one loaded."""
        m, d = ctx.manifest, ctx.decision
        assert m is not None and d is not None
        s = self.settings()
        indices, ctx.tune = ctx.tune, []
        vdir = self.store.version_dir(m.name, m.version)

        def load(c: Candidate) -> LoadedModel:
            return load_model(self.backends, c.target.runtime, c.target.target, vdir / c.variant.main_file.path, s,
                              precision=c.variant.precision, spares=ctx.spares, sealed=sealed_spec(m, c.variant, vdir, s))

        def failed(c: Candidate, e: errors.AgentError) -> None:
            ctx.figures.setdefault("fallbacks", []).append(
                {"backend": c.target.id, "variant": c.variant.id, "error": e.to_dict(), "during": "autotune"})
            self.reporter.event("backend_fallback", model=ctx.model, job=ctx.job_id, during="autotune",
                                failed={"backend": c.target.id, "variant": c.variant.id}, error=e.to_dict())

        planned = d.autotune or {}
        from agent.backends import autotune

        res = autotune.tune(d, indices, m, vdir, load, failed, self.db, str(planned.get("key", "")),
                            str(planned.get("layout_key", "")),
                            concurrent_loads=2 if s.isolation == "process" else 1,  # workers load in parallel
                            objective=s.autotune_objective, concurrency=s.autotune_concurrency)
        ctx.candidate_index = 0
        if res.loaded is None:  # every measured candidate failed: an unmeasured one goes through download
            if res.unmeasured == 0:
                raise res.last_error or errors.AgentError(errors.INTERNAL, "autotune measured nothing")
            return FALLBACK
        ctx.loaded = res.loaded
        ctx.tuned = res.row
        w = ctx.candidate
        self.db.record_install(m.name, m.version, w.variant.id, w.target.id, m.raw, ctx.files)
        log.info("deploy %s: autotune chose %s (%s)", ctx.job_id, w.target.id, w.variant.id)
        return OK

    def _validate(self, ctx: DeployContext) -> str:
        m = ctx.manifest
        assert m is not None and ctx.loaded is not None
        if m.validation is None:
            ctx.figures["validation"] = "none in manifest"
            return OK
        tuned, ctx.tuned = ctx.tuned, None
        slo = m.validation.max_p95_ms
        if tuned is not None and "p95_ms" in tuned and (
                slo is None or (tuned["runs"] >= SLO_RUNS_MIN and tuned["p95_ms"] <= slo)):
            # Autotune checked this very loaded model on the golden inputs against the variant's
            # tolerance and timed it: validate()'s checks, already done (an SLO, over as many runs).
            ctx.figures["validation"] = {"max_abs_error": tuned["max_abs_error"], "p95_ms": tuned["p95_ms"],
                                         "runs": tuned["runs"], "measured_by": "autotune"}
            return OK
        try:
            ctx.figures["validation"] = validate(ctx.loaded, self.store.version_dir(m.name, m.version), m,
                                                 ctx.candidate.variant)
        except errors.AgentError as e:
            return self._fallback(ctx, e)
        return OK

    def _activate(self, ctx: DeployContext) -> str:
        m = ctx.manifest
        assert m is not None and ctx.loaded is not None
        # The newest deploy replaces whatever serves when it gets here; the owner refuses it only
        # if that changed between this read and the swap (another writer got in between).
        previous = self.owner.serving(m.name)
        ctx.previous = previous if previous != m.version else None
        sv = ServingVersion(m.name, m.version, ctx.candidate.variant.id, ctx.loaded, manifest=m.raw)
        ctx.loaded = None  # owned by the owner now (closed by it if refused)
        self.owner.activate(sv, previous, previous, ctx.candidate.target.id, then=lambda: self._prune(m.name))
        return ON_PROBATION if ctx.previous is not None and self.probation is not None else OK

    def _probation(self, ctx: DeployContext) -> str:
        """Hand the job to the supervisor when there is a previous version to fall back to."""
        if self.probation is None or ctx.previous is None:
            return OK
        return DEFERRED if self.probation(ctx, deploy_result(ctx)) else OK

    # -- helpers -----------------------------------------------------------------------------
    def _fallback(self, ctx: DeployContext, e: errors.AgentError) -> str:
        """Try the next ranked candidate after a load or validation failure, or give up."""
        assert ctx.decision is not None
        failed = ctx.candidate
        self._close_unused(ctx)
        ctx.figures.setdefault("fallbacks", []).append(
            {"backend": failed.target.id, "variant": failed.variant.id, "error": e.to_dict()})
        if ctx.pin or ctx.candidate_index + 1 >= len(ctx.decision.candidates) or e.code in SEALED_CODES:
            raise e
        ctx.candidate_index += 1
        nxt = ctx.candidate
        self.reporter.event("backend_fallback", model=ctx.model, job=ctx.job_id,
                            failed={"backend": failed.target.id, "variant": failed.variant.id},
                            error=e.to_dict(), next={"backend": nxt.target.id, "variant": nxt.variant.id})
        return FALLBACK

    @staticmethod
    def _close_unused(ctx: DeployContext) -> None:
        ctx.tuned = None
        with ctx.step_lock:  # the deploy thread and an abandoned step's thread may both get here
            loaded, ctx.loaded = ctx.loaded, None
        if loaded is not None:
            loaded.close()

    @staticmethod
    def _close_spares(ctx: DeployContext) -> None:
        with ctx.step_lock:
            spares, ctx.spares = ctx.spares, []
        for sp in spares:
            sp.close()

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

