"""A deploy step is cut off at its deadline (agent/deploy/deadline.py), with real threads.

The blocking call stands for an in-process runtime call that cannot be interrupted: the step
still ends at its deadline and what the call returns later is discarded.
"""

from __future__ import annotations

import threading
import time

import pytest

from agent import errors
from agent.deploy import deadline
from agent.deploy.deadline import StepRun, StepTimedOut

LIMIT_S = 0.2
WAIT_S = 10.0  # bound on every wait below


def test_a_step_within_its_deadline_returns_its_outcome() -> None:
    assert StepRun().run("s", lambda: "ok", time.monotonic() + WAIT_S, WAIT_S, lambda: None, lambda: None) == "ok"


def test_a_step_error_is_raised_as_is() -> None:
    def fail() -> str:
        raise errors.RejectError(errors.LOAD_FAILED, "bad model")

    with pytest.raises(errors.RejectError) as e:
        StepRun().run("s", fail, time.monotonic() + WAIT_S, WAIT_S, lambda: None, lambda: None)
    assert e.value.code == errors.LOAD_FAILED


def test_a_step_cut_off_by_its_hook_ends_timed_out() -> None:
    """The cut-off hook stops the call (as killing a worker does): a timeout, not its error."""
    stop = threading.Event()

    def hung() -> str:
        stop.wait(WAIT_S)
        raise errors.RejectError(errors.LOAD_FAILED, "worker died while loading")

    run = StepRun()
    with pytest.raises(StepTimedOut) as e:
        run.run("loading of m", hung, time.monotonic() + LIMIT_S, LIMIT_S, stop.set, lambda: None)
    assert e.value.code == errors.TIMEOUT and "deadline of 0.2 s" in e.value.message
    assert not run.abandoned


def test_an_uninterruptible_step_is_abandoned_and_its_result_discarded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(deadline, "ABANDON_GRACE_S", LIMIT_S)
    release, discarded = threading.Event(), threading.Event()
    run = StepRun()
    t0 = time.monotonic()
    with pytest.raises(StepTimedOut):
        run.run("validating of m", lambda: "ok" if release.wait(WAIT_S) else "late", time.monotonic() + LIMIT_S,
                LIMIT_S, lambda: None, discarded.set)
    assert time.monotonic() - t0 < WAIT_S / 2, "the step ended at its deadline, not when the call returned"
    assert run.abandoned and not discarded.is_set()
    release.set()  # the call returns at last: what it made is freed
    assert discarded.wait(WAIT_S)
