"""Run one deploy step under its deadline and cut it off at it.

The step runs on its own thread; the deploy thread waits at most the deadline. At the deadline
``cut_off`` stops what the step still runs (a worker process is killed; a download's own watchdog,
armed with the same instant, shuts its socket), the step gets ``ABANDON_GRACE_S`` to unwind, and
the deploy ends ``TIMED_OUT`` either way. A call that cannot be interrupted (an in-process
runtime) is abandoned: when its thread returns at last, ``discard`` frees what it made.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from agent import errors

log = logging.getLogger(__name__)

ABANDON_GRACE_S = 2.0  # after the deadline: how long a cut-off step gets to unwind before it is abandoned


class StepTimedOut(errors.AgentError):
    """A step ran past its deadline (``errors.TIMEOUT``): the job ends ``TIMED_OUT``."""


class StepRun:
    """One step's run; ``abandoned`` once the deploy went on without it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._done = threading.Event()
        self.abandoned = False

    def run(self, what: str, fn: Callable[[], str], until: float, limit_s: float,
            cut_off: Callable[[], None], discard: Callable[[], None]) -> str:
        """``fn()``'s outcome, or StepTimedOut at ``until`` (``time.monotonic()``; after
        ``cut_off``); ``limit_s``: the deadline's length, for the message. A step that failed at or after ``until`` was cut off by a deadline watchdog
        of its own (a download's): that is a timeout too."""
        box: dict[str, Any] = {}

        def body() -> None:
            try:
                box["outcome"] = fn()
            except BaseException as e:  # handed to the deploy thread, which re-raises it
                box["error"] = e
            finally:
                with self._lock:
                    self._done.set()
                    late = self.abandoned
                if late:  # the job already ended TIMED_OUT: free what this step still made
                    discard()

        threading.Thread(target=body, name=f"step-{what}", daemon=True).start()
        if not self._done.wait(max(0.0, until - time.monotonic())):
            log.error("%s ran past its deadline of %g s; cutting it off", what, limit_s)
            cut_off()
            self._done.wait(ABANDON_GRACE_S)
            with self._lock:
                self.abandoned = not self._done.is_set()
            if self.abandoned:
                log.warning("%s did not unwind within %.1f s of its deadline; abandoned", what, ABANDON_GRACE_S)
            raise StepTimedOut(errors.TIMEOUT, f"{what} ran past its deadline of {limit_s:g} s")
        if "error" in box:
            if isinstance(box["error"], errors.AgentError) and time.monotonic() >= until:
                raise StepTimedOut(errors.TIMEOUT, f"{what} ran past its deadline of {limit_s:g} s "
                                   f"({box['error'].message})") from box["error"]
            raise box["error"]
        return str(box["outcome"])
