"""The deploy queue (agent/deploy/queue.py): one owner of the queued and the running deploy.

Most tests give the queue a ``run`` that records and blocks on events (the queue's declared
seam: any callable that runs one deploy); the last runs it with the real deploy runner on real
bundles, real SQLite and onnxruntime (tests/unit/test_deploy_runner.py's parts).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from test_deploy_runner import Env, build_bundle, env  # noqa: F401 (env: the fixture)

from agent import errors
from agent.deploy.queue import DeployQueue
from agent.deploy.runner import DeployContext, DeployProgress

WAIT_S = 10.0  # upper bound on any wait here; each returns as soon as its event fires


class Recorder:
    """A ``run`` that records each deploy it is given and holds it until released."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.overlap = 0
        self.active = 0

    def __call__(self, ctx: DeployContext) -> None:
        with self.lock:
            self.active += 1
            self.overlap = max(self.overlap, self.active)
            self.started.append(ctx.job_id)
        self.entered.set()
        try:
            assert self.release.wait(WAIT_S)
        finally:
            with self.lock:
                self.active -= 1
            ctx.progress.end()


def ctx(job: str, model: str = "m") -> DeployContext:
    return DeployContext(job, model, f"file:///bundles/{model}/manifest.json")


@pytest.fixture
def rec() -> Iterator[Recorder]:
    r = Recorder()
    yield r
    r.release.set()


def wait_until(cond: object, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def ended(progress: DeployProgress, timeout_s: float = WAIT_S * 3) -> bool:
    """Wait on a deploy's progress, step by step, until its run ended (False at the deadline)."""
    deadline = time.monotonic() + timeout_s
    step, done = None, False
    while not done and time.monotonic() < deadline:
        step, done = progress.wait(step, deadline - time.monotonic())
    return done


def test_deploys_run_one_at_a_time_in_order(rec: Recorder) -> None:
    done: list[str] = []
    q = DeployQueue(rec, after=lambda: done.append("after"))
    for job, model in (("a", "m1"), ("b", "m2"), ("c", "m3")):
        q.submit(ctx(job, model))
    assert q.queued() == ["a", "b", "c"] and q.running() is None
    rec.release.set()
    q.start()
    wait_until(lambda: len(done) == 3 and q.running() is None, "three deploys ran")
    assert rec.started == ["a", "b", "c"] and rec.overlap == 1
    assert q.queued() == []
    q.stop()
    assert q.join(WAIT_S)


def test_the_queue_is_bounded_and_a_full_queue_supersedes_nothing(rec: Recorder) -> None:
    q = DeployQueue(rec, max_queued=2)
    first, second = ctx("a", "m"), ctx("b", "other")
    q.submit(first)
    q.submit(second)
    with pytest.raises(errors.RetryableError) as e:
        q.submit(ctx("c", "m"))  # would supersede "a", but it is refused first
    assert e.value.code == errors.BUSY
    assert q.queued() == ["a", "b"]
    assert not first.cancel.is_set() and not second.cancel.is_set()


def test_a_newer_deploy_supersedes_the_running_and_the_queued_one(rec: Recorder) -> None:
    q = DeployQueue(rec)
    running, queued, other = ctx("a", "m"), ctx("b", "m"), ctx("x", "n")
    q.submit(running)
    q.start()
    assert rec.entered.wait(WAIT_S) and q.running() == "a"
    q.submit(other)
    q.submit(queued)  # supersedes the running "a"
    assert running.cancel.is_set() and running.cancel_code == errors.SUPERSEDED
    assert not other.cancel.is_set()
    newest = ctx("c", "m")
    q.submit(newest)  # supersedes the queued "b"
    assert queued.cancel.is_set() and queued.cancel_code == errors.SUPERSEDED
    assert not newest.cancel.is_set() and not other.cancel.is_set()
    assert q.queued() == ["x", "b", "c"]
    rec.release.set()
    q.stop()
    assert q.join(WAIT_S)


def test_cancel_reaches_a_queued_or_running_deploy_only(rec: Recorder) -> None:
    q = DeployQueue(rec)
    running, queued = ctx("a", "m"), ctx("b", "n")
    q.submit(running)
    q.start()
    assert rec.entered.wait(WAIT_S)
    q.submit(queued)
    assert q.cancel("b", errors.CANCELED) and queued.cancel.is_set() and queued.cancel_code == errors.CANCELED
    assert q.cancel("a", errors.CANCELED) and running.cancel.is_set()
    assert not q.cancel("nope", errors.CANCELED)
    rec.release.set()
    wait_until(lambda: q.running() is None and not q.queued(), "both ran")
    assert not q.cancel("a", errors.CANCELED)  # ended: nothing to cancel
    q.stop()
    assert q.join(WAIT_S)


def test_stop_cancels_the_running_deploy_releases_waiters_and_joins_by_its_deadline(rec: Recorder) -> None:
    q = DeployQueue(rec)
    running, queued = ctx("a", "m"), ctx("b", "n")
    q.submit(running)
    q.start()
    assert rec.entered.wait(WAIT_S)
    progress = q.submit(queued)
    q.stop()
    assert running.cancel.is_set() and running.cancel_code == errors.CANCELED
    # The queued deploy's client is released at once: its job resumes at the next start.
    assert ended(progress, WAIT_S) and progress.step is None
    # The running deploy holds on (a step that ignores its cancel): join gives up at its deadline.
    assert not q.join(0.05)
    # A deploy after the stop is not run (its QUEUED row resumes at the next start) and supersedes nothing.
    assert ended(q.submit(ctx("c", "m")), WAIT_S) and running.cancel_code == errors.CANCELED
    rec.release.set()
    assert q.join(WAIT_S)
    assert rec.started == ["a"]  # nothing more runs once stopped


def test_a_run_that_raises_ends_its_progress_and_the_worker_goes_on() -> None:
    ran: list[str] = []

    def run(c: DeployContext) -> None:
        ran.append(c.job_id)
        if c.job_id == "a":
            raise RuntimeError("a bug in a step")
        c.progress.end()

    q = DeployQueue(run)
    bad = q.submit(ctx("a", "m"))
    good = q.submit(ctx("b", "n"))
    q.start()
    assert ended(bad) and ended(good)
    assert ran == ["a", "b"]
    q.stop()
    assert q.join(WAIT_S)


def test_the_same_job_is_queued_once(rec: Recorder) -> None:
    q = DeployQueue(rec)
    c = ctx("a", "m")
    p1 = q.submit(c)
    p2 = q.submit(ctx("a", "m"))
    assert p1 is p2 and q.queued() == ["a"] and not c.cancel.is_set()


def test_with_the_real_runner_a_superseded_deploy_ends_canceled_and_the_newer_serves(env: Env) -> None:  # noqa: F811
    m1 = build_bundle(env.tmp / "b1", env.key, version=1, seed=1)
    m2 = build_bundle(env.tmp / "b2", env.key, version=2, seed=2)
    q = DeployQueue(env.runner.run)
    for job in ("job-1", "job-2"):
        assert env.db.create_job(job, "deploy", "lin", {"model": "lin"}, time.time() + 600)
    p1 = q.submit(DeployContext("job-1", "lin", m1.as_uri()))
    p2 = q.submit(DeployContext("job-2", "lin", m2.as_uri()))  # before the worker starts: supersedes job-1
    q.start()
    assert ended(p1) and ended(p2)
    q.stop()
    assert q.join(WAIT_S)
    first, second = env.updates("job-1")[-1], env.updates("job-2")[-1]
    assert (first["state"], first["error"]["code"]) == ("CANCELED", errors.SUPERSEDED)
    assert second["state"] == "SUCCEEDED"
    assert [u["state"] for u in env.updates("job-1")].count("CANCELED") == 1
    sv = env.registry.get("lin")
    assert sv is not None and sv.version == 2
    assert (env.db.job("job-1") or {}).get("state") == "CANCELED"
