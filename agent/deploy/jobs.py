"""Job updates (PROTOCOL.md "Job updates"): persisted to the state database, then queued durably.

Every state change of a job is written to state.db (the timeline `agentctl explain` shows) and
to the outbox as one job update on ``{prefix}/{device}/jobs/{id}`` with the ``jobs`` seq stream.
When the outbox cannot store it (a full disk) the update is published directly (no ``seq``, not
re-sent after a reconnect) rather than lost silently.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from typing import Any

from agent.errors import AgentError
from agent.logs import RateLimit
from agent.mqtt.topics import Topics
from agent.state import TERMINAL, StateDB
from agent.telemetry.outbox import KIND_EVENT, KIND_JOB, Outbox
from agent.timeutil import now_rfc3339

log = logging.getLogger(__name__)
FALLBACK_LOG_INTERVAL_S = 10.0


class JobReporter:
    def __init__(self, db: StateDB, outbox: Outbox, topics: Topics) -> None:
        self.db = db
        self.outbox = outbox
        self.topics = topics
        # Publishes (topic, doc) now, outside the outbox: used when the outbox cannot store a job
        # update (a full disk), so the fleet still hears how the job ended.
        self.publish_now: Callable[[str, dict[str, Any]], bool] | None = None
        self._fallback_log = RateLimit(FALLBACK_LOG_INTERVAL_S)

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
        topic = self.topics.job(job_id)
        try:
            self.outbox.add(topic, doc, KIND_JOB, stream="jobs", terminal_job=job_id if terminal else None)
        except (sqlite3.Error, OSError) as e:
            if self.publish_now is None or not self.publish_now(topic, doc):
                raise
            self._fallback_log.log(log, logging.WARNING, "job %s: outbox unavailable (%s); update sent directly", job_id, e)
        if persist:
            try:
                self.db.update_job(job_id, state, step, err, result)
            except (sqlite3.Error, OSError) as e:  # the fleet was told; a restart settles the record
                self._fallback_log.log(log, logging.WARNING, "job %s: %s not recorded in state.db: %s", job_id, state, e)
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
