"""The deploy queue: the one owner of the deploys waiting and the one running.

Invariants:
- Deploys run one at a time, in the order they were queued, on the queue's own thread
  (fleet commands, ``agentctl install`` and deploys resumed after a restart alike).
- Bounded: at most ``max_queued`` deploys wait; one more is refused ``busy`` (retryable) and
  nothing already queued is dropped.
- A newer deploy of a model supersedes the one of that model queued or running: it is canceled
  with ``superseded``. A cancel reaches a queued or a running deploy. Either way the deploy runner
  ends the job (at its next step boundary, a download at its next chunk), so every job ends once
  and by one writer.
- Every wait has a deadline: the worker wakes at least every ``IDLE_WAIT_S`` to see a stop,
  ``join`` waits at most its timeout, a client waits on the deploy's ``DeployProgress`` with its own.
- A stop cancels the running deploy and ends the progress of the queued ones and of any queued
  after it (their jobs stay queued in state.db and resume at the next start): no command is lost
  and no client waits on a queue that stopped.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable

from agent import errors
from agent.deploy.runner import DeployContext, DeployProgress

log = logging.getLogger(__name__)

DEPLOY_QUEUE_MAX = 64  # deploys waiting behind the running one
IDLE_WAIT_S = 1.0  # the idle worker re-checks for a stop at least this often


class DeployQueue:
    """Queues deploys and runs them one at a time with ``run`` (``DeployRunner.run``); ``after``
    runs once each deploy's run returned (the daemon publishes its status)."""

    def __init__(self, run: Callable[[DeployContext], None], after: Callable[[], None] | None = None,
                 max_queued: int = DEPLOY_QUEUE_MAX) -> None:
        self._run = run
        self._after = after
        self.max_queued = max_queued
        self._changed = threading.Condition()  # guards everything below
        self._pending: collections.OrderedDict[str, DeployContext] = collections.OrderedDict()
        self._running: DeployContext | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- clients -----------------------------------------------------------------------------
    def submit(self, ctx: DeployContext) -> DeployProgress:
        """Queue ``ctx`` behind the running deploy, superseding the queued or running deploy of
        the same model; returns what a client waits on. Refused ``busy`` when the queue is full
        (nothing is superseded then). Once stopped, nothing more runs: the progress returned has
        ended and the job, still queued in state.db, resumes at the next start."""
        with self._changed:
            if self._stopping:  # not run now: its job keeps its QUEUED row and resumes at the next start
                ctx.progress.end()
                return ctx.progress
            same = self._pending.get(ctx.job_id) or (
                self._running if self._running is not None and self._running.job_id == ctx.job_id else None)
            if same is not None:  # the same job again: it is queued once
                return same.progress
            if len(self._pending) >= self.max_queued:
                raise errors.RetryableError(errors.BUSY, f"{self.max_queued} deploys already queued")
            olds = [c for c in self._pending.values() if c.model == ctx.model]
            if self._running is not None and self._running.model == ctx.model:
                olds.append(self._running)
            for old in olds:
                self._cancel(old, errors.SUPERSEDED)
            self._pending[ctx.job_id] = ctx
            self._changed.notify_all()
        return ctx.progress

    def cancel(self, job_id: str, code: str = errors.CANCELED) -> bool:
        """Cancel the queued or running deploy ``job_id``; False when there is none."""
        with self._changed:
            ctx = self._pending.get(job_id)
            if ctx is None and self._running is not None and self._running.job_id == job_id:
                ctx = self._running
            if ctx is None:
                return False
            self._cancel(ctx, code)
            return True

    @staticmethod
    def _cancel(ctx: DeployContext, code: str) -> None:
        ctx.cancel_code = code
        ctx.cancel.set()

    def running(self) -> str | None:
        """The job id of the deploy running now (None when idle)."""
        with self._changed:
            return self._running.job_id if self._running is not None else None

    def queued(self) -> list[str]:
        """The job ids waiting, in the order they will run."""
        with self._changed:
            return list(self._pending)

    # -- worker ------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="deploy", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Refuse new deploys, cancel the running one, release the clients of the queued ones."""
        with self._changed:
            self._stopping = True
            if self._running is not None:
                self._cancel(self._running, errors.CANCELED)
            waiting = list(self._pending.values())
            self._changed.notify_all()
        for ctx in waiting:
            ctx.progress.end()

    def join(self, timeout_s: float) -> bool:
        """Wait at most ``timeout_s`` for the worker to end; True when it did (or never started)."""
        if self._thread is None:
            return True
        self._thread.join(max(0.0, timeout_s))
        return not self._thread.is_alive()

    def _next(self) -> DeployContext | None:
        """The next deploy to run (marked running), or None once stopping."""
        with self._changed:
            while not self._stopping:
                if self._pending:
                    _, ctx = self._pending.popitem(last=False)
                    self._running = ctx
                    return ctx
                self._changed.wait(IDLE_WAIT_S)
            return None

    def _loop(self) -> None:
        while (ctx := self._next()) is not None:
            try:
                self._run(ctx)
            except Exception:  # a bug (or a full disk while reporting) must not end the worker
                log.exception("deploy %s: run failed", ctx.job_id)
                ctx.progress.end()
            finally:
                with self._changed:
                    self._running = None
            if self._after is not None:
                try:
                    self._after()
                except Exception:
                    log.exception("after deploy %s", ctx.job_id)
