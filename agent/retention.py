"""Retention: what the agent remembers is swept by age and count on one timer thread.

Every ping, status or deploy adds a job (state.db ``jobs`` and its timeline) and a final-update
record (outbox.db ``reported``); without a sweep both grow for as long as the device runs. The
sweeper, started by the daemon, owns their forgetting:

- jobs: a finished job is dropped ``retention.jobs_keep_s`` after its command expired plus the
  clock skew, and the oldest such jobs past ``retention.jobs_max`` rows. A job whose command has
  not expired plus the skew is never dropped, because its id is what refuses a replay (commands
  valid longer than 30 days are refused, so every id becomes forgettable).
- a deploy's recovery state lives in its job's row (``version``, ``resumes``) and goes with it.
- outbox final-update records older than ``retention.reported_keep_s`` or past
  ``retention.reported_max`` (they matter only until state.db records the job's end).

docs/deployments.md "Retention" states the bounds.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from agent.config import RetentionConfig
from agent.logs import RateLimit
from agent.state import StateDB
from agent.telemetry.outbox import Outbox

log = logging.getLogger(__name__)

FAIL_LOG_INTERVAL_S = 60.0  # a failing sweep (a full disk) is logged once per this
SWEEP_BATCH = 1000  # jobs forgotten per transaction (a long-running device's first sweep may hold many)


class Sweeper:
    """Forgets old jobs, recovery entries and final-update records; one thread, one interval."""

    def __init__(self, db: StateDB, outbox: Outbox, cfg: RetentionConfig, skew_s: Callable[[], float],
                 clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.outbox = outbox
        self.cfg = cfg
        self._skew_s = skew_s  # read at each sweep: the trust settings may be reloaded
        self._clock = clock
        self._fail_log = RateLimit(FAIL_LOG_INTERVAL_S)
        self._forgotten = {"jobs": 0, "reported": 0}
        self._lock = threading.Lock()

    def sweep(self) -> dict[str, int]:
        """One pass; returns how many rows of each kind it dropped."""
        c = self.cfg
        jobs = 0
        while True:  # in batches: the command worker waits for the database at most one batch
            n = self.db.forget_expired_jobs(now=self._clock(), keep_s=c.jobs_keep_s, skew_s=self._skew_s(),
                                            max_rows=c.jobs_max, batch=SWEEP_BATCH)
            jobs += n
            if n < SWEEP_BATCH:
                break
        reported = self.outbox.forget_reported(c.reported_keep_s, max_rows=c.reported_max)
        with self._lock:
            self._forgotten["jobs"] += jobs
            self._forgotten["reported"] += reported
        if jobs or reported:
            log.debug("retention: forgot %d job(s) and %d final-update record(s)", jobs, reported)
        return {"jobs": jobs, "reported": reported}

    def run(self, stopping: threading.Event) -> None:
        """Sweep every ``retention.sweep_interval_s`` until ``stopping`` is set."""
        while not stopping.wait(self.cfg.sweep_interval_s):
            try:
                self.sweep()
            except Exception as e:  # e.g. a full disk or a locked database: tried again next interval
                self._fail_log.log(log, logging.WARNING, "retention sweep failed: %s", e)

    def status(self) -> dict[str, Any]:
        """Table sizes, their bounds and what was forgotten since start (`agentctl status`)."""
        c = self.cfg
        sizes = self.db.sizes()
        with self._lock:
            forgotten = dict(self._forgotten)
        return {"jobs": sizes["jobs"], "jobs_max": c.jobs_max, "jobs_keep_s": c.jobs_keep_s,
                "job_events": sizes["job_events"], "kv": sizes["kv"],
                "reported": self.outbox.reported_sizes(), "reported_max": c.reported_max,
                "reported_keep_s": c.reported_keep_s, "outbox_depth": self.outbox.depth(),
                "sweep_interval_s": c.sweep_interval_s, "forgotten": forgotten}
