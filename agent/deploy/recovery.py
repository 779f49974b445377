"""Recovery at start: bring back what served, then settle every job the last run left unfinished.

Invariants:
- What served comes back first: each model's recorded serving version (without its golden-sample
  check: it passed at deploy), or the previous one when that fails to load (``rollback`` event).
  A model taken down (state ``down``) or removed serves nothing and stays so.
- Each unfinished job takes the ``RECOVERY`` event of its persisted step (agent/deploy/runner.py);
  ``decide`` turns that event and what the database says into one action:
  - ``record``: its end went out just before the crash (the outbox holds it): state.db copies it;
  - ``interrupt``: a job other than a deploy cannot continue: FAILED ``interrupted``;
  - ``succeed`` / ``probation`` / ``roll_back``: a deploy that activated (SETTLE and its version
    serves) ends SUCCEEDED when nothing served before it, goes on with its probation, or (an
    unclean stop during probation with an in-process runtime: the new version may have crashed
    the daemon) rolls back and ends FAILED ``probation_failed``;
  - ``resume``: anything else runs again from the start (its downloads continue from their partial
    files), at most ``deploy.max_resumes`` times (``give_up``: FAILED ``interrupted``).
- Of two deploys of one model to resume, the newer supersedes the older (CANCELED ``superseded``).
- Every job ends once: the reporter refuses a second end.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent import errors
from agent.deploy.jobs import JobReporter
from agent.deploy.owner import ServingOwner
from agent.deploy.runner import RECOVERY, RESUME, SETTLE, DeployContext
from agent.deploy.versions import VersionLoader
from agent.state import StateDB

log = logging.getLogger(__name__)

CLEAN_SHUTDOWN_KEY = "clean_shutdown"  # kv: False while the daemon runs, True once it stopped in order
RECORD, INTERRUPT, SUCCEED, PROBATION, ROLL_BACK, RESUME_AGAIN, GIVE_UP = (
    "record", "interrupt", "succeed", "probation", "roll_back", "resume", "give_up")

Probation = Callable[[str, str, int, int, dict[str, Any]], None]  # (job, model, version, previous, result)


@dataclass(frozen=True)
class RecoverySettings:
    max_resumes: int = 3  # deploy.max_resumes
    in_process: bool = True  # backends.isolation == "none": a model's crash is the daemon's


def decide(job: dict[str, Any], model: dict[str, Any], reported: bool, clean: bool,
           settings: RecoverySettings) -> str:
    """The action for one unfinished ``job`` after a restart; ``model`` is its model's row."""
    if reported:
        return RECORD
    if job["type"] != "deploy":
        return INTERRUPT
    version = job.get("version")
    if RECOVERY.get(job["step"], RESUME) == SETTLE and version is not None and model.get("serving") == version:
        if model.get("previous") is None:
            return SUCCEED
        return ROLL_BACK if not clean and settings.in_process else PROBATION
    return GIVE_UP if int(job.get("resumes") or 0) + 1 > settings.max_resumes else RESUME_AGAIN


class Recovery:
    """Runs once at start, before the deploy queue and the probation supervisor start."""

    def __init__(self, db: StateDB, reporter: JobReporter, owner: ServingOwner, loader: VersionLoader,
                 reported: Callable[[str], dict[str, Any] | None], probation: Probation,
                 settings: Callable[[], RecoverySettings]) -> None:
        self.db = db
        self.reporter = reporter
        self.owner = owner
        self.loader = loader
        self.reported = reported  # the outbox's record of a job's reported end
        self.probation = probation
        self.settings = settings

    def run(self) -> list[DeployContext]:
        """Restore what served, settle the unfinished jobs; returns the deploys to run again (to
        queue before anything else)."""
        clean = bool(self.db.get(CLEAN_SHUTDOWN_KEY, True))
        self.db.put(CLEAN_SHUTDOWN_KEY, False)
        self.restore_serving()
        return self.settle_jobs(clean)

    def stopped_cleanly(self) -> None:
        """The daemon's last act before the database closes: the next start finds a clean stop."""
        self.db.put(CLEAN_SHUTDOWN_KEY, True)

    def restore_serving(self) -> None:
        for rec in self.db.models():
            for version in (rec["serving"], rec["previous"]):
                if version is None or self.db.version(rec["name"], version) is None:
                    continue
                try:
                    sv = self.loader.load(rec["name"], version, validate_samples=False)
                except (errors.AgentError, ValueError) as e:
                    log.error("%s v%s could not be restored: %s", rec["name"], version, e)
                    self.reporter.event("restore_failed", model=rec["name"], version=version, error=str(e))
                    continue
                self.owner.restore(sv)
                if version != rec["serving"]:
                    self.reporter.event("rollback", model=rec["name"], frm=rec["serving"], to=version,
                                        reason="serving version failed to load at start")
                break

    def settle_jobs(self, clean: bool) -> list[DeployContext]:
        resume: dict[str, DeployContext] = {}
        for job in self.db.unfinished_jobs():
            ctx = self.settle(job, clean)
            if ctx is None:
                continue
            older = resume.pop(ctx.model, None)
            if older is not None:
                self.reporter.update(older.job_id, "deploy", "CANCELED", error=errors.RejectError(
                    errors.SUPERSEDED, f"superseded by {ctx.job_id} while the agent was down"))
            resume[ctx.model] = ctx
        return list(resume.values())

    def settle(self, job: dict[str, Any], clean: bool) -> DeployContext | None:
        """Apply ``decide``'s action to one unfinished job; the deploy to run again, if any."""
        jid, step = job["id"], job["step"]
        reported = self.reported(jid)
        params = job["params"] or {}
        model = str(params.get("model", ""))
        rec = self.db.model(model) or {}
        action = decide(job, rec, reported is not None, clean, self.settings())
        if action == RECORD:
            assert reported is not None
            self.db.update_job(jid, str(reported["state"]), reported.get("step"), reported.get("error"),
                               reported.get("result"))
        elif action == INTERRUPT:
            self.reporter.update(jid, job["type"], "FAILED", step, error=errors.AgentError(
                errors.INTERRUPTED, f"the agent restarted while {job['type']} was running; run it again"))
        elif action in (SUCCEED, PROBATION, ROLL_BACK):
            self._settle_activated(action, job, model, rec)
        elif action == GIVE_UP:
            self.reporter.update(jid, "deploy", "FAILED", step, error=errors.AgentError(
                errors.INTERRUPTED, f"interrupted by {job.get('resumes') or 0} restarts; giving up"))
        else:
            self.db.count_resume(jid)
            pin, sha = params.get("backend"), params.get("manifest_sha256")
            log.info("resuming deploy %s of %s (was at %s)", jid, model, step or "QUEUED")
            return DeployContext(jid, model, str(params.get("manifest_url", "")), sha if isinstance(sha, str) else None,
                                 pin if isinstance(pin, str) else None)
        return None

    def _settle_activated(self, action: str, job: dict[str, Any], model: str, rec: dict[str, Any]) -> None:
        """A deploy whose version serves: it succeeded, its probation goes on, or it rolls back."""
        jid, step, version, prev = job["id"], job["step"], int(job["version"]), rec.get("previous")
        info = self.db.version(model, version) or {}
        result = {"name": model, "version": version, "variant": info.get("variant"),
                  "backend": info.get("backend"), "previous": prev, "resumed": True}
        if action == SUCCEED:
            self.reporter.update(jid, "deploy", "SUCCEEDED", step, result=result)
            return
        assert prev is not None  # decide: probation and roll_back need a version to go back to
        if action == PROBATION:
            self.probation(jid, model, version, prev, result)
        else:
            try:
                self.owner.rollback(self.loader.load(model, prev, validate_samples=False), version)
            except errors.AgentError as e:
                log.error("%s: cannot roll back to v%s: %s", model, prev, e)
            else:
                self.reporter.event("rollback", model=model, frm=version, to=prev,
                                    reason="the agent died during probation")
            self.reporter.update(jid, "deploy", "FAILED", step, error=errors.AgentError(
                errors.PROBATION_FAILED, f"{model} v{version}: the agent died during probation; rolled back to v{prev}"))
