"""After activation: probation, worker health, automatic rollback.

Invariants:
- Only the model's own faults count against a version; traffic does not decide rollbacks.
  When a worker dies or hangs, the version is re-checked on a fresh worker with its golden
  samples first (``recheck``). A version that passes keeps serving on the fresh worker
  (``worker_restarted`` event, no strike, probation goes on). One that fails (its worker dies,
  hangs or answers wrong again) is at fault.
- A deploy that replaced a serving version is not SUCCEEDED until its probation window passed:
  a fault of its own (a failed re-check, or repeated inference errors inside the window) restores
  the previous version, sends a ``rollback`` event and ends the job FAILED with the reason.
- Outside probation a failed re-check rolls back to the previous version when there is one;
  without one, ``CRASH_LOOP_MAX`` failed re-checks within ``CRASH_LOOP_WINDOW_S`` report the
  model down.
- Every job handed to probation ends in exactly one terminal state (SUCCEEDED or FAILED).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent import errors
from agent.backends.wire import DeathReason
from agent.deploy.jobs import JobReporter
from agent.deploy.owner import ServingOwner
from agent.serving.registry import Registry, ServingVersion
from agent.state import StateDB
from agent.timeutil import now_rfc3339

log = logging.getLogger(__name__)

TICK_S = 0.2
CRASH_LOOP_MAX = 3  # worker deaths of one version within the window that count as a crash loop
CRASH_LOOP_WINDOW_S = 600.0
MIN_CALLS_FOR_ERROR_RATE = 5
MEMORY_HOLD_S = 1.0  # a worker's RSS above the ceiling this long has it replaced ...
RECYCLE_MIN_INTERVAL_S = 30.0  # ... at most this often per model (a ceiling below a fresh worker loops)


@dataclass
class ProbationSettings:
    window_s: float = 60.0
    max_errors: int = 5  # errors in the window that end probation ...
    max_error_ratio: float = 0.5  # ... when they are also at least this share of the calls
    worker_memory_max_mb: float = 0.0  # a worker above this RSS for MEMORY_HOLD_S is replaced; 0: off


@dataclass
class Watch:
    job_id: str
    name: str
    version: int
    previous: int
    until: float
    result: dict[str, Any]
    calls0: int = 0
    errors0: int = 0


@dataclass
class _Health:
    deaths: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=CRASH_LOOP_MAX))


Reload = Callable[[str, int], ServingVersion]
Recheck = Callable[[str, int], ServingVersion]  # a fresh worker that passed the golden samples


def _death(sv: ServingVersion) -> str:
    """What ended ``sv``'s worker, for events and job errors."""
    return (sv.worker.death if sv.worker is not None else "") or "worker died"


class Supervisor:
    def __init__(self, registry: Registry, db: StateDB, reporter: JobReporter, reload: Reload,
                 owner: ServingOwner, settings: Callable[[], ProbationSettings],
                 on_change: Callable[[], None], recheck: Recheck | None = None) -> None:
        self.registry = registry
        self.db = db
        self.reporter = reporter
        self.reload = reload
        self.recheck = recheck or reload
        self.owner = owner  # the only writer of what serves (agent/deploy/owner.py)
        self.settings = settings
        self.on_change = on_change
        self._lock = threading.Lock()
        self._watches: dict[str, Watch] = {}
        self._health: dict[str, _Health] = collections.defaultdict(_Health)
        self._over: dict[str, float] = {}  # model → since when its worker is above the memory ceiling
        self._recycled: dict[str, float] = {}  # model → when its worker was last replaced for memory
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- probation -----------------------------------------------------------------------------
    def begin(self, job_id: str, name: str, version: int, previous: int, result: dict[str, Any],
              window_s: float | None = None) -> None:
        """Watch ``name`` v``version`` for ``window_s``; the job ends when the watch does."""
        sv = self.registry.get(name)
        window = self.settings().window_s if window_s is None else window_s
        w = Watch(job_id, name, version, previous, time.monotonic() + window,
                  result, sv.calls if sv else 0, sv.errors if sv else 0)
        with self._lock:
            old = self._watches.pop(name, None)
            self._watches[name] = w
        # How long the job stays IN_PROGRESS at this step, so a fleet can show a countdown
        # (docs/protocol.md); published only, like download progress.
        self.reporter.update(job_id, "deploy", "IN_PROGRESS", "probation", persist=False,
                             extra={"probation": {"window_s": round(window, 3),
                                                  "ends_at": now_rfc3339(time.time() + window)}})
        if old is not None:  # a newer version replaced one still on probation: that one served fine
            self._finish(old, "SUCCEEDED", note="probation cut short by a newer deploy")

    def in_probation(self, name: str) -> bool:
        with self._lock:
            return name in self._watches

    def tick(self) -> None:
        now = time.monotonic()
        with self._lock:
            watches = list(self._watches.values())
        for w in watches:
            sv = self.registry.get(w.name)
            if sv is None or sv.version != w.version:
                if self._take(w):
                    self._finish(w, "SUCCEEDED", note="replaced or removed during probation")
                continue
            reason = self._verdict(w, sv)
            if reason is not None:
                if not self._take(w):  # a newer deploy ended this watch while it was judged
                    continue
                code, message = reason
                if self._rollback(sv, w.previous, f"probation: {message}"):
                    w.result["rolled_back_to"] = w.previous
                    outcome = f"rolled back to v{w.previous}"
                else:
                    outcome = "not rolled back (it no longer serves or the rollback failed)"
                self._finish(w, "FAILED", error=errors.AgentError(code, f"{w.name} v{w.version} {message}; {outcome}"))
            elif now >= w.until and self._take(w):
                w.result["probation"] = {"calls": sv.calls - w.calls0, "errors": sv.errors - w.errors0}
                self._finish(w, "SUCCEEDED")
        self._check_health(now)
        self._check_memory(now)

    def _take(self, w: Watch) -> bool:
        """Stop watching ``w`` if it is still its model's watch. False when ``begin`` of a newer
        deploy took (and ended) it meanwhile: then it must neither end again nor roll anything
        back, and the newer deploy's watch stays."""
        with self._lock:
            if self._watches.get(w.name) is not w:
                return False
            del self._watches[w.name]
            return True

    def _verdict(self, w: Watch, sv: ServingVersion) -> tuple[str, str] | None:
        if not sv.alive:
            death = _death(sv)
            failed = self._restart_checked(sv, death)
            if failed is None:
                return None  # traffic's doing: the fresh worker passed; probation goes on
            hung = sv.worker is not None and sv.worker.death_reason is DeathReason.HUNG
            return (errors.WORKER_HUNG if hung else errors.WORKER_CRASHED), f"{death}; {failed}"
        s = self.settings()
        calls, errs = sv.calls - w.calls0, sv.errors - w.errors0
        if errs >= s.max_errors and calls >= MIN_CALLS_FOR_ERROR_RATE and errs / max(1, calls) >= s.max_error_ratio:
            return errors.PROBATION_FAILED, f"failed {errs} of {calls} inference calls in probation"
        return None

    def _restart_checked(self, sv: ServingVersion, death: str) -> str | None:
        """Re-check ``sv``'s version on a fresh worker with its golden samples and let that worker
        serve: None when it passed (the death was the traffic's doing), else why it failed."""
        log.warning("%s v%d: %s; re-checking on a fresh worker", sv.name, sv.version, death)
        try:
            fresh = self.recheck(sv.name, sv.version)
        except errors.AgentError as e:
            log.error("%s v%d: re-check on a fresh worker failed: %s", sv.name, sv.version, e)
            return f"re-check on a fresh worker failed: {e.code}: {e.message}"
        fresh.calls, fresh.errors = sv.calls, sv.errors  # probation counts on across the restart
        self.owner.replace_worker(sv, fresh)
        self.reporter.event("worker_restarted", model=sv.name, version=sv.version, reason=death, recheck="passed")
        self.on_change()
        return None

    def _finish(self, w: Watch, state: str, error: errors.AgentError | None = None, note: str = "") -> None:
        if note:
            w.result["probation_note"] = note
        self.reporter.update(w.job_id, "deploy", state, "probation", error=error,
                             result=w.result if state == "SUCCEEDED" else None)
        self.on_change()

    # -- health outside probation ----------------------------------------------------------------
    def _check_health(self, now: float) -> None:
        for sv in self.registry.all():
            if sv.alive or self.in_probation(sv.name):
                continue
            death = _death(sv)
            failed = self._restart_checked(sv, death)
            if failed is None:
                continue
            h = self._health[sv.name]
            h.deaths.append(now)
            while h.deaths and now - h.deaths[0] > CRASH_LOOP_WINDOW_S:
                h.deaths.popleft()
            rec = self.db.model(sv.name) or {}
            prev = rec.get("previous")
            if prev is not None:
                self._rollback(sv, prev, f"{death}; {failed}")
                h.deaths.clear()
            elif len(h.deaths) >= CRASH_LOOP_MAX:
                self.reporter.event("model_down", model=sv.name, version=sv.version, reason=f"{death}; {failed}")
                if self.owner.take_down(sv):
                    self.on_change()
            else:
                self.reporter.event("worker_restart_failed", model=sv.name, version=sv.version, reason=failed)

    def _check_memory(self, now: float) -> None:
        """Replace a worker whose RSS stays above ``worker_memory_max_mb``: a fresh worker loads the
        same version and takes the traffic over as in a swap (at request boundaries, no request
        fails); the old one drains and ends."""
        ceiling = self.settings().worker_memory_max_mb * 2**20
        if ceiling <= 0:
            return
        for sv in self.registry.all():
            rss = sv.worker.rss_bytes() if sv.worker is not None else 0
            if not sv.alive or rss <= ceiling:
                self._over.pop(sv.name, None)
                continue
            since = self._over.setdefault(sv.name, now)
            if now - since < MEMORY_HOLD_S or now - self._recycled.get(sv.name, -RECYCLE_MIN_INTERVAL_S) < RECYCLE_MIN_INTERVAL_S:
                continue
            self._over.pop(sv.name, None)
            self._recycled[sv.name] = now
            try:
                fresh = self.reload(sv.name, sv.version)
            except errors.AgentError as e:
                self.reporter.event("worker_recycle_failed", model=sv.name, version=sv.version, error=e.to_dict())
                continue
            fresh.calls, fresh.errors = sv.calls, sv.errors
            if not self.owner.replace_worker(sv, fresh):
                continue
            log.warning("%s v%d: worker RSS %d MB above %d MB; replaced", sv.name, sv.version,
                        rss >> 20, int(ceiling) >> 20)
            self.reporter.event("worker_recycled", model=sv.name, version=sv.version, rss_mb=rss >> 20,
                                limit_mb=int(ceiling) >> 20, pid=sv.worker.pid if sv.worker else None,
                                new_pid=fresh.worker.pid if fresh.worker else None)

    def _rollback(self, bad: ServingVersion, to: int, reason: str) -> bool:
        """Serve ``to`` in place of ``bad`` — only while ``bad`` still serves (a deploy, rollback
        or remove that replaced it meanwhile stays, and the refusal says ``serving_moved``);
        True when it did."""
        try:
            self._rollback_unless_moved(bad, to)
        except errors.AgentError as e:
            log.error("%s: rollback v%d → v%d not applied: %s", bad.name, bad.version, to, e)
            self.reporter.event("rollback_failed", model=bad.name, frm=bad.version, to=to, error=e.to_dict())
            return False
        self.reporter.event("rollback", model=bad.name, frm=bad.version, to=to, reason=reason)
        log.warning("%s: rolled back v%d → v%d (%s)", bad.name, bad.version, to, reason)
        self.on_change()
        return True

    def _moved(self, bad: ServingVersion, to: int, cause: str) -> errors.RejectError:
        return errors.RejectError(errors.SERVING_MOVED, f"rollback of {bad.name} v{bad.version} to v{to} refused: "
                                  f"v{bad.version} no longer serves ({cause})")

    def _rollback_unless_moved(self, bad: ServingVersion, to: int) -> None:
        if self.owner.serving(bad.name) != bad.version:  # moved before anything was loaded
            raise self._moved(bad, to, "moved before the rollback began")
        try:
            good = self.reload(bad.name, to)
        except errors.AgentError as e:  # a remove or prune meanwhile took ``to``'s files with it
            if self.owner.serving(bad.name) != bad.version:
                raise self._moved(bad, to, f"moved while v{to} loaded, which then failed: {e.code}") from e
            raise
        self.owner.rollback(good, bad.version)  # the owner refuses it if what serves moved since

    # -- thread ---------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="supervisor", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(TICK_S):
            try:
                self.tick()
            except Exception:  # the supervisor must outlive any single bad tick
                log.exception("supervisor tick failed")

    def stop(self, timeout_s: float = 2.0) -> list[Watch]:
        """Stop watching; returns the probations still open (their jobs stay IN_PROGRESS and
        resume at the next start)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        with self._lock:
            return list(self._watches.values())
