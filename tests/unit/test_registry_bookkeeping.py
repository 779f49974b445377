"""The registry's per-call bookkeeping under one lock (agent/serving/registry.py): a call binds to
its version and takes its model's slot in one critical section and gives both back in another.

The runtime is a stand-in whose calls can be held at a known point (a real runtime cannot be
paused mid-call); everything else is the registry as the daemon and a worker run it."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest

from agent import errors
from agent.bundles.manifest import TensorSpec
from agent.serving.admission import Limits
from agent.serving.registry import Registry, ServingVersion

WAIT_S = 10.0
POLL_S = 0.005
SPECS = (TensorSpec("x", "float32", (None, 4)),)
OUT = (TensorSpec("y", "float32", (None, 4)),)


class HeldModel:
    """Answers its input; while ``hold`` is clear, each call waits for it (bounded)."""

    backend_id = "stand-in"
    inputs = SPECS
    outputs = OUT
    details: dict[str, Any] = {}
    known_shapes: list[Any] = []

    def __init__(self, running: list[int], peak: list[int], lock: threading.Lock) -> None:
        self.hold = threading.Event()
        self.hold.set()
        self.closed = threading.Event()
        self._running, self._peak, self._lock = running, peak, lock

    def infer(self, inputs: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            self._running[0] += 1
            self._peak[0] = max(self._peak[0], self._running[0])
        try:
            assert not self.closed.is_set(), "called after close"
            assert self.hold.wait(WAIT_S)
            return {"y": inputs["x"]}
        finally:
            with self._lock:
                self._running[0] -= 1

    def close(self) -> None:
        self.closed.set()


def _models(n: int) -> tuple[list[HeldModel], list[int]]:
    running, peak, lock = [0], [0], threading.Lock()
    return [HeldModel(running, peak, lock) for _ in range(n)], peak


def _until(cond: Any) -> None:
    deadline = time.monotonic() + WAIT_S
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(POLL_S)


X = {"x": np.ones((1, 4), np.float32)}


def test_a_swapped_out_version_closes_only_after_its_call_returns() -> None:
    (old, new), _ = _models(2)
    reg = Registry()
    reg.activate(ServingVersion("m", 1, "v", old))
    old.hold.clear()
    got: list[int] = []
    t = threading.Thread(target=lambda: got.append(reg.infer("m", X)[0].version))
    t.start()
    sv1 = reg.get("m")
    assert sv1 is not None and sv1.gate is not None
    _until(lambda: sv1.gate is not None and sv1.gate.count == 1)
    reg.activate(ServingVersion("m", 2, "v", new))
    assert reg.infer("m", X)[0].version == 2  # new calls go to the new version at once
    time.sleep(0.05)
    assert not old.closed.is_set(), "closed under a call in flight"
    old.hold.set()
    t.join(WAIT_S)
    assert got == [1]  # the call stays bound to the version it started on
    _until(old.closed.is_set)
    reg.close()


def test_the_inflight_bound_holds_across_swaps() -> None:
    models, peak = _models(6)
    reg = Registry(limits=Limits(max_inflight=2, max_queue=64, queue_wait_s=WAIT_S))
    reg.activate(ServingVersion("m", 1, "v", models[0]))
    for m in models:
        m.hold.clear()
    fails: list[BaseException] = []
    stop = threading.Event()

    def caller() -> None:
        for _ in range(200):  # bounded
            if stop.is_set():
                return
            try:
                reg.infer("m", X)
            except BaseException as e:  # reported below
                fails.append(e)
                return

    threads = [threading.Thread(target=caller) for _ in range(8)]
    for t in threads:
        t.start()
    for i, m in enumerate(models[1:], start=2):
        time.sleep(0.02)
        for prev in models[:i - 1]:
            prev.hold.set()  # let the previous versions' calls finish while new ones start
        reg.activate(ServingVersion("m", i, "v", m))
    for m in models:
        m.hold.set()
    stop.set()
    for t in threads:
        t.join(WAIT_S)
    assert not fails, fails[:3]
    assert peak[0] == 2, f"{peak[0]} runtime calls at once with max_inflight 2"
    sv = reg.get("m")
    assert sv is not None and sv.gate is not None and sv.gate.count == 0
    reg.close()


def test_too_large_is_refused_at_once_while_the_model_is_busy_and_busy_takes_nothing() -> None:
    (model,), _ = _models(1)
    seen: list[bool] = []
    reg = Registry(observer=lambda name, version, backend, latency_s, ok: seen.append(ok),
                   limits=Limits(max_batch=4, max_inflight=1, max_queue=0, queue_wait_s=WAIT_S))
    reg.activate(ServingVersion("m", 1, "v", model))
    model.hold.clear()
    t = threading.Thread(target=lambda: reg.infer("m", X))
    t.start()
    sv = reg.get("m")
    assert sv is not None and sv.gate is not None
    _until(lambda: sv.gate is not None and sv.gate.count == 1)
    t0 = time.monotonic()
    with pytest.raises(errors.RejectError) as big:
        reg.infer("m", {"x": np.ones((5, 4), np.float32)})
    with pytest.raises(errors.RetryableError) as busy:
        reg.infer("m", X)
    assert time.monotonic() - t0 < WAIT_S / 2, "neither refusal waited for a slot"
    assert big.value.code == errors.TOO_LARGE and busy.value.code == errors.BUSY
    assert sv.gate.count == 1 and sv.errors == 0  # the refused calls hold nothing, blame nothing
    assert seen == [False, False] and sv.calls == 2  # ... and count as calls that failed
    model.hold.set()
    t.join(WAIT_S)
    assert sv.gate.count == 0 and seen == [False, False, True]
    assert reg.infer("m", X)[0] is sv  # the slot was given back
    with pytest.raises(errors.RejectError) as unknown:
        reg.infer("m", X, version=7)
    assert unknown.value.code == errors.UNKNOWN_MODEL and "serving: 1" in unknown.value.message
    assert len(seen) == 4 and sv.calls == 4  # a call to no version is nobody's call
    reg.close()
