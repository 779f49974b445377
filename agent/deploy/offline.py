"""``agentctl install BUNDLE``: an offline bundle as a client of the deploy queue.

Invariants:
- The install goes through the same deploy state machine as a fleet deploy (same checks, same
  high-water mark, same validation, activation and probation); only the source differs. It is a
  local job (``local-install-…``), visible in ``agentctl jobs`` and reported to the fleet.
- It is a client of the deploy queue (agent/deploy/queue.py): it queues the deploy there as a
  fleet command does, then waits on the job's ``DeployProgress`` (ended by the deploy runner, or
  by the queue when the daemon stops), not on the database. It returns once the job ended or the
  new version serves on probation, or at ``INSTALL_WAIT_S``; the job goes on either way.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from agent import errors
from agent.bundles.archive import BundleArchive
from agent.bundles.offline import peek_name
from agent.deploy.queue import DeployQueue
from agent.deploy.runner import PROBATION, DeployContext, deploy_result
from agent.state import TERMINAL

INSTALL_WAIT_S = 280.0  # the control client gives up at 300 s (serving.control.CLIENT_TIMEOUT_S)
LOCAL_JOB_KEEP_S = 7 * 86400  # a local job's id is remembered this long


class JobRecords(Protocol):
    """The jobs table as an install uses it (``agent.state.StateDB``)."""

    def create_job(self, job_id: str, type_: str, model: str | None, params: dict[str, Any],
                   expires_at: float, state: str = "QUEUED") -> bool: ...
    def job(self, job_id: str) -> dict[str, Any] | None: ...


def install_op(deploys: DeployQueue, jobs: JobRecords, params: dict[str, Any],
               emit: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """The control socket's ``install``: queue an offline bundle as a deploy and wait for its end,
    passing each step the job enters to ``emit``."""
    path = params.get("path")
    if not isinstance(path, str) or not Path(path).is_absolute():
        raise errors.RejectError(errors.INVALID_COMMAND, "install needs params.path, an absolute path to a bundle archive")
    archive = BundleArchive(path)  # invalid_bundle unless a .tar, .tar.gz or .zip
    model = params.get("model")
    if isinstance(model, str) and model:
        name = model
    else:
        try:
            name = peek_name(archive.manifest_bytes())
        except errors.AgentError:
            name = "unknown"  # the job's first step reports why the manifest cannot be read
    pin = params.get("backend")
    job_id = f"local-install-{uuid.uuid4().hex[:12]}"
    job_params = {"model": name, "path": str(Path(path)), "origin": "agentctl"}
    jobs.create_job(job_id, "install", name, job_params, time.time() + LOCAL_JOB_KEEP_S)
    ctx = DeployContext(job_id, name, Path(path).resolve().as_uri(), pin=pin if isinstance(pin, str) else None,
                        source=archive)
    progress = deploys.submit(ctx)
    deadline = time.monotonic() + INSTALL_WAIT_S
    step, ended = None, False
    while not ended and (left := deadline - time.monotonic()) > 0:
        seen = step
        step, ended = progress.wait(seen, left)
        if emit is not None and step and step != seen:  # the last step too: at least one is shown
            emit({"step": step, "message": f"{name} from {Path(path).name}"})
    job = jobs.job(job_id) or {}
    if job.get("state") not in TERMINAL and job.get("step") == PROBATION and ctx.manifest is not None:
        # Serving now; the supervisor ends the job later (SUCCEEDED, or FAILED with a rollback).
        job = {**job, "result": {**deploy_result(ctx), "probation": True}}
    return {"job": job_id, "model": name, "state": job.get("state", "UNKNOWN"), "step": job.get("step"),
            "error": job.get("error"), "result": job.get("result")}


def installed(reply: dict[str, Any]) -> bool:
    """Whether an ``install`` reply means the bundle serves (done, or serving on probation)."""
    return reply.get("state") == "SUCCEEDED" or (reply.get("step") == PROBATION and not reply.get("error"))
