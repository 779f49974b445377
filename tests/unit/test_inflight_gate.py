"""The in-flight gate a version is retired behind: no lost wake-up, nothing counted twice."""

from __future__ import annotations

import threading
import time

from agent.backends.base import InflightGate


def test_wait_idle_returns_when_the_last_call_leaves() -> None:
    g = InflightGate()
    g.enter()
    g.enter()
    assert not g.wait_idle(0.05) and g.count == 2
    done: list[float] = []

    def waiter() -> None:
        t0 = time.monotonic()
        assert g.wait_idle(10)
        done.append(time.monotonic() - t0)

    t = threading.Thread(target=waiter)
    t.start()
    time.sleep(0.05)
    g.leave()
    time.sleep(0.05)
    assert not done, "one call still in flight"
    g.leave()
    t.join(5)
    assert done and done[0] < 5 and g.count == 0
    assert g.wait_idle(0), "idle: no wait at all"


def test_concurrent_calls_balance_and_a_waiter_never_misses_the_end() -> None:
    g = InflightGate()
    stop = time.monotonic() + 0.5
    woke: list[float] = []

    def caller() -> None:
        while time.monotonic() < stop:
            g.enter()
            g.leave()

    def waiter() -> None:
        # Waits while the callers run; a lost wake-up would leave it asleep until its timeout.
        while time.monotonic() < stop:
            assert g.wait_idle(10.0)
        woke.append(time.monotonic())

    threads = [threading.Thread(target=caller) for _ in range(4)] + [threading.Thread(target=waiter) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    assert g.count == 0
    assert len(woke) == 2 and max(woke) - stop < 2.0, "a waiter slept past the last leave"
