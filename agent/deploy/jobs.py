"""Job updates (PROTOCOL.md "Job updates"): persisted to the state database, then queued durably.

Every state change of a job is written to state.db (the timeline `agentctl explain` shows) and
to the outbox as one job update on ``{prefix}/{device}/jobs/{id}`` with the ``jobs`` seq stream.
"""

from __future__ import annotations

import logging
from typing import Any

from agent.errors import AgentError
from agent.mqtt.topics import Topics
from agent.state import TERMINAL, StateDB
from agent.telemetry.outbox import KIND_EVENT, KIND_JOB, Outbox
from agent.timeutil import now_rfc3339

log = logging.getLogger(__name__)


class JobReporter:
    def __init__(self, db: StateDB, outbox: Outbox, topics: Topics) -> None:
        self.db = db
        self.outbox = outbox
        self.topics = topics

    def update(self, job_id: str, type_: str, state: str, step: str | None = None,
               error: AgentError | dict[str, Any] | None = None, result: dict[str, Any] | None = None,
               progress: dict[str, int] | None = None, persist: bool = True,
               extra: dict[str, Any] | None = None) -> None:
        err = error.to_dict() if isinstance(error, AgentError) else error
        terminal = persist and state in TERMINAL
        if terminal and self.outbox.reported(job_id) is not None:
            log.warning("job %s already reported its end; not reporting %s again", job_id, state)
            return
        doc: dict[str, Any] = {"v": 1, "device": self.topics.device, "job": job_id, "type": type_,
                               "state": state, "ts": now_rfc3339()}
        if step:
            doc["step"] = step
        if progress:
            doc["progress"] = progress
        if err:
            doc["error"] = err
        if result is not None:
            doc["result"] = result
        if extra:
            doc.update(extra)
        # Outbox first (with the job's end recorded in the same transaction), then the state
        # database: a crash in between leaves a reported end that restart reconciliation copies
        # into state.db, never a job reported twice or never.
        self.outbox.add(self.topics.job(job_id), doc, KIND_JOB, stream="jobs",
                        terminal_job=job_id if terminal else None)
        if persist:
            self.db.update_job(job_id, state, step, err, result)
        if err:
            log.warning("job %s (%s): %s%s: %s", job_id, type_, state, f" at {step}" if step else "",
                        err.get("message"))
        else:
            log.info("job %s (%s): %s%s", job_id, type_, state, f" {step}" if step else "")

    def progress(self, job_id: str, type_: str, step: str, done: int, total: int) -> None:
        """A progress-only update: not persisted (the step is), only published."""
        self.update(job_id, type_, "IN_PROGRESS", step, progress={"done": done, "total": total}, persist=False)

    def event(self, kind: str, **fields: Any) -> None:
        doc = {"v": 1, "device": self.topics.device, "ts": now_rfc3339(), "event": kind, **fields}
        self.outbox.add(self.topics.events, doc, KIND_EVENT, stream="events")
        log.info("event %s %s", kind, fields)
