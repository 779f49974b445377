"""Per-model admission (agent/serving/admission.py): bounds from a model's inputs, the in-flight
and queue bounds, and the bounded book of computable shapes."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from agent import errors
from agent.bundles.manifest import TensorSpec
from agent.serving import admission
from agent.serving.admission import Admission, Limits, ShapeBook

LIN = (TensorSpec("x", "float32", (None, 4)),)
IMAGE = (TensorSpec("x", "float32", (None, 1, None, None)),)
WAIT_S = 5.0
POLL_S = 0.01


def test_bounds_follow_the_inputs_and_max_batch() -> None:
    assert admission.request_bound(LIN, 64) == (64 * 4 * 4, 64 * 4)
    assert admission.request_bound(IMAGE, 64) is None  # h, w dynamic: no bound from shapes
    body = admission.body_bound(LIN, 64, 1 << 30)
    assert body == admission.BODY_SLACK_BYTES + 64 * 4 * admission.JSON_BYTES_PER_ELEMENT
    assert admission.body_bound(IMAGE, 64, 12345) == 12345
    assert admission.body_bound(LIN, 64, 1000) == 1000


def test_check_size_refuses_more_rows_than_max_batch() -> None:
    admission.check_size(LIN, {"x": np.zeros((8, 4), np.float32)}, 8)
    with pytest.raises(errors.RejectError) as e:
        admission.check_size(LIN, {"x": np.zeros((9, 4), np.float32)}, 8)
    assert e.value.code == errors.TOO_LARGE and "'x'" in e.value.message and "9" in e.value.message


def test_busy_beyond_inflight_and_queue() -> None:
    gate = Admission("m", Limits(max_inflight=1, max_queue=1, queue_wait_s=WAIT_S))
    entered, release, done = threading.Event(), threading.Event(), threading.Event()

    def holder() -> None:
        with gate.slot():
            entered.set()
            release.wait(WAIT_S)

    def waiter() -> None:
        with gate.slot():
            done.set()

    t1 = threading.Thread(target=holder)
    t1.start()
    assert entered.wait(WAIT_S)
    t2 = threading.Thread(target=waiter)
    t2.start()
    for _ in range(int(WAIT_S / POLL_S)):  # until the second call queues
        if gate._waiting:
            break
        time.sleep(POLL_S)
    assert gate._waiting == 1
    with pytest.raises(errors.RetryableError) as e, gate.slot():  # the queue is full: busy at once
        pass
    assert e.value.code == errors.BUSY
    release.set()
    t1.join(WAIT_S)
    t2.join(WAIT_S)
    assert done.is_set(), "the queued call ran once the slot was free"


def test_busy_after_waiting_past_the_queue_wait() -> None:
    gate = Admission("m", Limits(max_inflight=1, max_queue=4, queue_wait_s=0.05))
    with gate.slot(), pytest.raises(errors.RetryableError) as e, gate.slot():
        pass
    assert e.value.code == errors.BUSY
    with gate.slot():  # freed again
        pass


def test_shape_book_is_bounded_and_reports_what_it_learned() -> None:
    book = ShapeBook()
    key = admission.shape_key({"x": np.zeros((2, 4), np.float32)})
    assert not book.knows("m", key)
    book.add("m", [key], report=True)
    assert book.knows("m", key) and not book.knows("other", key)
    assert book.fresh() == [("m", key)] and book.fresh() == []
    book.add("m", ([("x", [i, 4])] for i in range(3, 3 + 2 * admission.MAX_SHAPES)))
    assert len(book.shapes("m")) == admission.MAX_SHAPES


def test_body_budget_reserves_releases_and_never_goes_negative() -> None:
    b = admission.BodyBudget(100)
    assert b.reserve(60) and b.used == 60
    assert not b.reserve(41) and b.used == 60  # a refusal takes nothing
    assert b.reserve(40) and b.used == 100
    assert b.reserve(0)  # a request without a body always passes
    b.release(100)
    assert b.used == 0
    b.release(5)  # more than held: stays at zero
    assert b.used == 0
    assert b.reserve(500) and b.used == 500  # one body alone always fits, even over the limit
    assert not b.reserve(1)
    b.release(500)
    assert b.reserve(1)


def test_body_budget_is_thread_safe() -> None:
    b = admission.BodyBudget(1000)
    over: list[int] = []
    lock = threading.Lock()
    held = [0]

    def worker() -> None:
        for _ in range(2000):
            if b.reserve(300):
                with lock:
                    held[0] += 300
                    if held[0] > 1000:
                        over.append(held[0])
                with lock:
                    held[0] -= 300
                b.release(300)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S * 6)
    assert over == [] and b.used == 0
