"""Commands routed to handlers, the deploy queue and crash recovery."""

# mypy: disable-error-code="misc"
# (the methods here annotate ``self: Agent``: the class they are mixed into, not a supertype of this one)

from __future__ import annotations

import logging
import queue
from typing import TYPE_CHECKING, Any

from agent import __version__, errors
from agent.commands.verify import Command
from agent.deploy.runner import RECOVERY, RESUME, SETTLE, DeployContext
from agent.timeutil import now_rfc3339

if TYPE_CHECKING:
    from agent.daemon import Agent

log = logging.getLogger("agent.daemon")

DEPLOY_QUEUE_MAX = 64


class CommandRouting:
    """Methods of `Agent` (agent/daemon/__init__.py): commands routed to handlers, the deploy queue and crash recovery."""

    # -- commands ----------------------------------------------------------------------------
    def on_command(self: Agent, topic: str, raw: bytes, dup: bool = False) -> bool:
        """Verify, record and route one command (on the command worker, never the network
        thread). True once it may be acknowledged to the broker (agent/commands/intake.py)."""
        return self.intake.handle(topic, raw, dup)

    def _route(self: Agent, cmd: Command) -> None:
        p = cmd.params
        if cmd.type == "ping":
            self.reporter.update(cmd.id, "ping", "SUCCEEDED", result={"pong": now_rfc3339()})
        elif cmd.type == "status":
            self.reporter.update(cmd.id, "status", "SUCCEEDED", result=self.full_status())
        elif cmd.type == "deploy":
            model, url = p.get("model"), p.get("manifest_url")
            if not isinstance(model, str) or not isinstance(url, str):
                raise errors.RejectError(errors.INVALID_COMMAND, "deploy needs params.model and params.manifest_url (strings)")
            pin = p.get("backend")
            sha = p.get("manifest_sha256")
            self.submit_deploy(DeployContext(cmd.id, model, url, sha if isinstance(sha, str) else None,
                                             pin if isinstance(pin, str) else None))
        elif cmd.type in ("config", "trust", "cancel"):
            result = getattr(self.handlers, cmd.type)(p)
            self.reporter.update(cmd.id, cmd.type, "SUCCEEDED", result=result)
        elif cmd.type in ("rollback", "remove", "bench"):
            self.reporter.update(cmd.id, cmd.type, "IN_PROGRESS")
            self._ops.submit(self._run_op, cmd)
        else:  # the verifier knows every type; this is a bug guard
            raise errors.RejectError(errors.UNKNOWN_COMMAND, f"command type {cmd.type!r} is not supported by agent {__version__}")

    def _run_op(self: Agent, cmd: Command) -> None:
        try:
            result = getattr(self.handlers, cmd.type)(cmd.params)
        except errors.AgentError as e:
            self.reporter.update(cmd.id, cmd.type, "REJECTED" if isinstance(e, errors.RejectError) else "FAILED", error=e)
        except Exception as e:
            log.exception("%s %s failed", cmd.type, cmd.id)
            self.reporter.update(cmd.id, cmd.type, "FAILED", error=errors.AgentError(errors.INTERNAL, f"{type(e).__name__}: {e}"))
        else:
            self.reporter.update(cmd.id, cmd.type, "SUCCEEDED", result=result)

    def _supersede(self: Agent, new: DeployContext) -> None:
        """A newer deploy of the same model cancels the running or queued one (CANCELED, superseded)."""
        with self._queue_lock:
            olds = [c for c in self._queued.values() if c.model == new.model]
        cur = self._current
        if cur is not None and cur.model == new.model and cur not in olds:
            olds.append(cur)
        for old in olds:
            old.cancel_code = errors.SUPERSEDED
            old.cancel.set()

    def submit_deploy(self: Agent, ctx: DeployContext) -> None:
        """Queue a deploy (a fleet command, ``agentctl install`` or a resumed one); a newer deploy
        of the same model supersedes the running or queued one."""
        self._supersede(ctx)
        with self._queue_lock:  # registered before the worker can see it, so it can be canceled
            self._queued[ctx.job_id] = ctx
        try:
            self._deploys.put_nowait(ctx)
        except queue.Full as e:
            with self._queue_lock:
                self._queued.pop(ctx.job_id, None)
            raise errors.RetryableError(errors.BUSY, f"{DEPLOY_QUEUE_MAX} deploys already queued") from e

    def cancel_deploy(self: Agent, job_id: str, code: str) -> bool:
        with self._queue_lock:
            ctx = self._queued.get(job_id)
        if ctx is None and self._current is not None and self._current.job_id == job_id:
            ctx = self._current
        if ctx is None:
            return False
        ctx.cancel_code = code
        ctx.cancel.set()
        return True

    def config_changed(self: Agent, keys: set[str]) -> None:
        """Apply remotely changed settings that live parts hold copies of."""
        if "groups" in keys:
            self.verifier.groups = self.cfg.groups
            self.mqtt.set_subscriptions([self.topics.cmd] + [self.topics.group_cmd(g) for g in self.cfg.groups])
        if "telemetry.outbox_max_mb" in keys:
            self.outbox.max_bytes = int(self.cfg.telemetry.outbox_max_mb * 2**20)
        if "telemetry.drain_rate_per_s" in keys:
            self.mqtt.drain_rate_per_s = self.cfg.telemetry.drain_rate_per_s

    def _deploy_loop(self: Agent) -> None:
        while True:
            ctx = self._deploys.get()
            if ctx is None or self.stopping.is_set():
                return
            with self._queue_lock:
                self._queued.pop(ctx.job_id, None)
            self._current = ctx
            try:
                self.runner.run(ctx)
            finally:
                self._current = None
            self.publish_status()

    # -- restore -----------------------------------------------------------------------------
    def restore(self: Agent) -> list[DeployContext]:
        """Bring back what served, then settle every job the last run left unfinished.

        Returns the deploys to run again (their downloads resume from the partial files).
        """
        clean = bool(self.db.get("clean_shutdown", True))
        self.db.put("clean_shutdown", False)
        for rec in self.db.models():
            for version in (rec["serving"], rec["previous"]):
                if version is None or self.db.version(rec["name"], version) is None:
                    continue
                try:
                    sv = self.handlers.load_version(rec["name"], version, validate_samples=False)
                except (errors.AgentError, ValueError) as e:
                    log.error("%s v%s could not be restored: %s", rec["name"], version, e)
                    self.reporter.event("restore_failed", model=rec["name"], version=version, error=str(e))
                    continue
                self.runner.owner.restore(sv)
                if version != rec["serving"]:
                    self.reporter.event("rollback", model=rec["name"], frm=rec["serving"], to=version,
                                        reason="serving version failed to load at start")
                break
        resume: dict[str, DeployContext] = {}
        for job in self.db.unfinished_jobs():
            ctx = self._settle(job, clean)
            if ctx is None:
                continue
            older = resume.pop(ctx.model, None)
            if older is not None:
                self.reporter.update(older.job_id, "deploy", "CANCELED", error=errors.RejectError(
                    errors.SUPERSEDED, f"superseded by {ctx.job_id} while the agent was down"))
            resume[ctx.model] = ctx
        return list(resume.values())

    def _settle(self: Agent, job: dict[str, Any], clean: bool) -> DeployContext | None:
        """One unfinished job after a restart: finish, fail, hand to probation, or resume."""
        jid, step = job["id"], job["step"]
        reported = self.outbox.reported(jid)
        if reported is not None:  # its end went out just before the crash: record it
            self.db.update_job(jid, str(reported["state"]), reported.get("step"), reported.get("error"),
                               reported.get("result"))
            return None
        if job["type"] != "deploy":
            self.reporter.update(jid, job["type"], "FAILED", step, error=errors.AgentError(
                errors.INTERRUPTED, f"the agent restarted while {job['type']} was running; run it again"))
            return None
        params = job["params"] or {}
        model = str(params.get("model", ""))
        version = job.get("version")
        rec = self.db.model(model) or {}
        if RECOVERY.get(step, RESUME) == SETTLE and version is not None and rec.get("serving") == version:
            info = self.db.version(model, version) or {}
            result = {"name": model, "version": version, "variant": info.get("variant"),
                      "backend": info.get("backend"), "previous": rec.get("previous"), "resumed": True}
            if rec.get("previous") is None:
                self.reporter.update(jid, "deploy", "SUCCEEDED", step, result=result)
            elif not clean and self.cfg.backends.isolation == "none":
                # In-process runtime and an unclean stop during probation: the new version may
                # have crashed the daemon. Go back to the version that served before it.
                prev = rec["previous"]
                try:
                    sv = self.handlers.load_version(model, prev, validate_samples=False)
                    self.runner.owner.rollback(sv, version)
                except errors.AgentError as e:
                    log.error("%s: cannot roll back to v%s: %s", model, prev, e)
                else:
                    self.reporter.event("rollback", model=model, frm=version, to=prev,
                                        reason="the agent died during probation")
                self.reporter.update(jid, "deploy", "FAILED", step, error=errors.AgentError(
                    errors.PROBATION_FAILED, f"{model} v{version}: the agent died during probation; rolled back to v{prev}"))
            else:
                self.supervisor.begin(jid, model, version, rec["previous"], result)
            return None
        resumes = self.db.count_resume(jid)
        if resumes > self.cfg.deploy.max_resumes:
            self.reporter.update(jid, "deploy", "FAILED", step, error=errors.AgentError(
                errors.INTERRUPTED, f"interrupted by {resumes - 1} restarts; giving up"))
            return None
        pin, sha = params.get("backend"), params.get("manifest_sha256")
        log.info("resuming deploy %s of %s (was at %s)", jid, model, step or "QUEUED")
        return DeployContext(jid, model, str(params.get("manifest_url", "")), sha if isinstance(sha, str) else None,
                             pin if isinstance(pin, str) else None)
