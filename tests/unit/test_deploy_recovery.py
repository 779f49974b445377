"""Recovery after a restart is a table over the deploy's persisted steps (agent/deploy/runner.py)."""

from __future__ import annotations

from agent.deploy import runner


def test_every_persisted_step_has_a_recovery_event() -> None:
    """A step added to the transition table without a recovery decision fails here."""
    steps = {s for s, _ in runner.TRANSITIONS}
    assert set(runner.RECOVERY) == steps | {None}
    assert set(runner.RECOVERY.values()) == {runner.RESUME, runner.SETTLE}


def test_only_steps_that_may_have_changed_what_serves_settle() -> None:
    settle = {s for s, e in runner.RECOVERY.items() if e == runner.SETTLE}
    assert settle == {runner.ACTIVATING, runner.PROBATION}
