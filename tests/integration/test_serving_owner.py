"""The serving owner (agent/deploy/owner.py) against real parts: a real state database, registry,
KServe server and onnxruntime models (one per version, each with its own weights, so an answer
tells which version computed it).

- Deploys, rollback commands, removes and probation verdicts race from their own threads; at every
  sample the table and the registry agree, and every KServe answer comes from exactly the version
  it names.
- A probation verdict against v2 that lands after a deploy activated v3 is refused: v3 keeps
  serving and the job ends once; a deploy landing while v2 is judged keeps its own probation.
- A change whose write the state database refuses leaves the table and the registry as they were
  (and closes the model it was handed); a failed clean-up after an activation does not undo it.
"""

from __future__ import annotations

import errno
import http.client
import json
import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from conftest import make_linear_onnx

from agent import errors
from agent.backends.base import LoadOptions
from agent.backends.onnxruntime import CPU, OnnxRuntimeBackend
from agent.bundles.store import Store
from agent.deploy.jobs import JobReporter
from agent.deploy.owner import ServingOwner
from agent.deploy.probation import ProbationSettings, Supervisor
from agent.mqtt.topics import Topics
from agent.serving.kserve import KServeServer
from agent.serving.registry import Registry, ServingVersion
from agent.state import TERMINAL, StateDB
from agent.telemetry.outbox import Outbox

NAME = "m"
VERSIONS = (1, 2, 3, 4)
ROUNDS = 15  # requests per writer thread
TIMEOUT_S = 30.0
X = np.arange(8, dtype=np.float32).reshape(2, 4) / 8


class CountingReporter(JobReporter):
    """The real reporter, counting the terminal updates asked of it per job."""

    def __init__(self, *a: Any) -> None:
        super().__init__(*a)
        self.ends: Counter[str] = Counter()

    def update(self, job_id: str, type_: str, state: str, *a: Any, **kw: Any) -> None:
        if state in TERMINAL and kw.get("persist", True):
            self.ends[job_id] += 1
        super().update(job_id, type_, state, *a, **kw)


class Env:
    def __init__(self, root: Path) -> None:
        self.db = StateDB(root / "state" / "state.db")
        self.registry = Registry()
        self.owner = ServingOwner(self.db, self.registry, Store(root / "store"))
        self.reporter = CountingReporter(self.db, Outbox(root / "state" / "outbox.db", 2**20), Topics("edge", "dev1"))
        self.backend = OnnxRuntimeBackend()
        self.paths = {v: make_linear_onnx(root / f"v{v}.onnx", seed=v) for v in VERSIONS}
        self.expected = {v: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"x": X})[0]
                         for v, p in self.paths.items()}
        self.install()
        self.server = KServeServer(self.registry, "127.0.0.1", 0)
        self.server.start()

    def install(self) -> None:
        for v in VERSIONS:
            self.db.record_install(NAME, v, "onnx-fp32", "onnxruntime:" + CPU, {"name": NAME, "version": v}, {})

    def load(self, v: int) -> ServingVersion:
        return ServingVersion(NAME, v, "onnx-fp32", self.backend.load(self.paths[v], CPU, LoadOptions(threads=1)))

    def close(self) -> None:
        self.server.stop(timeout_s=2)
        self.registry.close(timeout_s=2)


@pytest.fixture
def env(tmp_path: Path) -> Any:
    e = Env(tmp_path)
    try:
        yield e
    finally:
        e.close()


def _ask(c: http.client.HTTPConnection) -> tuple[int, dict[str, Any]]:
    body = json.dumps({"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": X.ravel().tolist()}]})
    c.request("POST", f"/v2/models/{NAME}/infer", body=body, headers={"Content-Type": "application/json"})
    r = c.getresponse()
    return r.status, json.loads(r.read())


def test_racing_writers_leave_one_consistent_version(env: Env) -> None:
    env.owner.restore(env.load(1))
    refused: Counter[str] = Counter()
    applied: Counter[str] = Counter()
    failures: list[str] = []
    done = threading.Event()

    def attempt(kind: str, fn: Any) -> None:
        try:
            fn()
            applied[kind] += 1
        except errors.AgentError as e:
            if e.code != errors.SERVING_MOVED:
                failures.append(f"{kind}: {e}")
            refused[kind] += 1

    def deployer() -> None:
        for i in range(ROUNDS):
            v = VERSIONS[(i % 3) + 1]
            seen = env.owner.serving(NAME)
            if seen == v:
                continue
            attempt("deploy", lambda v=v, seen=seen: env.owner.activate(env.load(v), seen, seen))

    def rollbacker(verdict: bool) -> None:
        for _ in range(ROUNDS):
            rec = env.db.model(NAME) or {}
            bad, to = rec.get("serving"), rec.get("previous")
            if bad is None or to is None or env.db.version(NAME, to) is None:
                time.sleep(0.001)
                continue
            attempt("verdict" if verdict else "rollback",
                    lambda bad=bad, to=to: env.owner.rollback(env.load(to), bad, keep_previous=not verdict))

    def remover() -> None:
        for _ in range(3):
            time.sleep(0.01)
            attempt("remove", lambda: env.owner.remove(NAME, env.owner.serving(NAME)))
            env.install()  # published again: the next deploys have something to serve

    def observer() -> None:
        c = http.client.HTTPConnection("127.0.0.1", env.server.port, timeout=TIMEOUT_S)
        while not done.is_set():
            recorded, live = env.owner.snapshot(NAME)
            if recorded != live:
                failures.append(f"table says v{recorded}, registry serves v{live}")
            status, doc = _ask(c)
            if status == 200:
                v = int(doc["model_version"])
                got = np.array(doc["outputs"][0]["data"], dtype=np.float32).reshape(2, 3)
                if not np.allclose(got, env.expected[v], atol=1e-5):
                    failures.append(f"answer named v{v} but another version computed it")
            elif status != 404:  # 404: removed, nothing serves for a moment
                failures.append(f"infer answered {status}: {doc}")
        c.close()

    writers = [threading.Thread(target=deployer), threading.Thread(target=rollbacker, args=(False,)),
               threading.Thread(target=rollbacker, args=(True,)), threading.Thread(target=remover)]
    watch = threading.Thread(target=observer)
    watch.start()
    for t in writers:
        t.start()
    for t in writers:
        t.join(TIMEOUT_S)
    done.set()
    watch.join(TIMEOUT_S)
    assert not any(t.is_alive() for t in [*writers, watch])
    assert not failures, failures[:5]
    assert applied["deploy"] > 0 and applied["remove"] + refused["remove"] == 3
    recorded, live = env.owner.snapshot(NAME)
    assert recorded == live


def test_verdict_after_a_newer_deploy_is_refused(env: Env, tmp_path: Path) -> None:
    """The verdict judged v2; while it loads v1 to roll back to, a deploy activates v3. v3 stays."""
    env.owner.restore(env.load(1))
    env.owner.activate(env.load(2), 1, 1)
    env.db.create_job("j2", "deploy", NAME, {"model": NAME}, time.time() + 600, state="IN_PROGRESS")

    def reload(name: str, v: int) -> ServingVersion:
        sv = env.load(v)
        if v == 1:  # the deploy of v3 lands while the rollback's model loads
            env.owner.activate(env.load(3), 2, 2)
        return sv

    sup = Supervisor(env.registry, env.db, env.reporter, reload, env.owner,
                     lambda: ProbationSettings(window_s=600, max_errors=1, max_error_ratio=0.1),
                     on_change=lambda: None)
    sup.begin("j2", NAME, 2, 1, {"name": NAME, "version": 2})
    sv2 = env.registry.get(NAME)
    assert sv2 is not None and sv2.version == 2
    sv2.calls, sv2.errors = 10, 10  # v2 fails its probation
    sup.tick()
    assert env.owner.snapshot(NAME) == (3, 3)
    rec = env.db.model(NAME)
    assert rec is not None and rec["previous"] == 2
    job = env.db.job("j2")
    assert job is not None and job["state"] == "FAILED"
    assert job["error"]["code"] == errors.PROBATION_FAILED and "not rolled back" in job["error"]["message"]
    assert env.reporter.ends["j2"] == 1
    sup.tick()  # nothing left to judge: the job does not end again
    assert env.reporter.ends["j2"] == 1


def test_remove_and_rollback_refused_when_serving_moved(env: Env) -> None:
    env.owner.restore(env.load(1))
    env.owner.activate(env.load(2), 1, 1)
    with pytest.raises(errors.RejectError) as e:
        env.owner.remove(NAME, 1)
    assert e.value.code == errors.SERVING_MOVED
    late = env.load(1)
    with pytest.raises(errors.RejectError) as e:
        env.owner.rollback(late, 3)
    assert e.value.code == errors.SERVING_MOVED and "v2 serves" in e.value.message
    assert env.owner.snapshot(NAME) == (2, 2)
    env.owner.remove(NAME, 2)
    assert env.owner.snapshot(NAME) == (None, None)


def test_deploy_landing_while_a_verdict_is_judged_keeps_its_probation(env: Env) -> None:
    """The supervisor judges v2 (it fails); before the verdict is applied, a deploy activates v3
    and starts v3's probation (ending v2's job: a newer version replaced it). The verdict then
    neither ends v2's job a second time nor drops v3's watch: v3's job still ends, once."""
    env.owner.restore(env.load(1))
    env.owner.activate(env.load(2), 1, 1)
    for jid, v in (("j2", 2), ("j3", 3)):
        env.db.create_job(jid, "deploy", NAME, {"model": NAME, "version": v}, time.time() + 600, state="IN_PROGRESS")
    failing = ProbationSettings(window_s=600, max_errors=1, max_error_ratio=0.1)
    landed = threading.Event()

    def settings() -> ProbationSettings:  # read by the verdict on v2: the deploy of v3 lands here
        if not landed.is_set():
            landed.set()
            env.owner.activate(env.load(3), 2, 2)
            sup.begin("j3", NAME, 3, 2, {"name": NAME, "version": 3}, window_s=0)
        return failing

    sup = Supervisor(env.registry, env.db, env.reporter, lambda name, v: env.load(v), env.owner, settings,
                     on_change=lambda: None)
    sup.begin("j2", NAME, 2, 1, {"name": NAME, "version": 2}, window_s=600)
    sv2 = env.registry.get(NAME)
    assert sv2 is not None and sv2.version == 2
    sv2.calls, sv2.errors = 10, 10  # v2 fails its probation
    sup.tick()
    assert landed.is_set()
    assert env.owner.snapshot(NAME) == (3, 3)
    assert env.reporter.ends["j2"] == 1
    j2 = env.db.job("j2")
    assert j2 is not None and j2["state"] == "SUCCEEDED", j2  # cut short by v3, not judged after it
    assert sup.in_probation(NAME), "the verdict on v2 dropped v3's probation"
    sup.tick()  # v3's window (0 s) is over: its job ends
    j3 = env.db.job("j3")
    assert j3 is not None and j3["state"] == "SUCCEEDED", j3
    assert env.reporter.ends == Counter({"j2": 1, "j3": 1})
    assert not sup.in_probation(NAME)


def test_verdict_after_a_remove_says_serving_moved(env: Env) -> None:
    """The verdict judged v2; while v1 loads for the rollback, a remove takes every version (and
    v1's load fails for it). The verdict reports ``serving_moved``, not the load's failure."""
    env.owner.restore(env.load(1))
    env.owner.activate(env.load(2), 1, 1)
    env.db.create_job("j2", "deploy", NAME, {"model": NAME}, time.time() + 600, state="IN_PROGRESS")
    events: list[dict[str, Any]] = []

    class Reporter(CountingReporter):
        def event(self, kind: str, **fields: Any) -> None:
            events.append({"event": kind, **fields})
            super().event(kind, **fields)

    reporter = Reporter(env.db, Outbox(env.db.path.parent / "outbox2.db", 2**20), Topics("edge", "dev1"))

    def reload(name: str, v: int) -> ServingVersion:
        env.owner.remove(NAME, 2)
        raise errors.RejectError(errors.UNKNOWN_MODEL, f"{name} v{v} is not installed")

    sup = Supervisor(env.registry, env.db, reporter, reload, env.owner,
                     lambda: ProbationSettings(window_s=600, max_errors=1, max_error_ratio=0.1),
                     on_change=lambda: None)
    sup.begin("j2", NAME, 2, 1, {"name": NAME, "version": 2})
    sv2 = env.registry.get(NAME)
    assert sv2 is not None
    sv2.calls, sv2.errors = 10, 10
    sup.tick()
    assert env.owner.snapshot(NAME) == (None, None)
    failed = [e for e in events if e["event"] == "rollback_failed"]
    assert len(failed) == 1 and failed[0]["error"]["code"] == errors.SERVING_MOVED, events
    assert not [e for e in events if e["event"] == "rollback"], events
    assert reporter.ends["j2"] == 1


def _refuse_writes(db: StateDB, trigger: str) -> None:
    """A write the state database itself refuses (from a second connection, as another process
    would): ``trigger`` is ``BEFORE DELETE ON versions`` or the like."""
    with sqlite3.connect(db.path) as other:
        other.execute(f"CREATE TRIGGER refuse {trigger} BEGIN SELECT RAISE(ABORT, 'refused by a test trigger'); END")


def test_remove_whose_write_fails_leaves_the_model_serving(env: Env) -> None:
    env.owner.restore(env.load(1))
    env.owner.activate(env.load(2), 1, 1)
    _refuse_writes(env.db, "BEFORE DELETE ON versions")
    with pytest.raises(sqlite3.Error):
        env.owner.remove(NAME, 2)
    assert env.owner.snapshot(NAME) == (2, 2)
    c = http.client.HTTPConnection("127.0.0.1", env.server.port, timeout=TIMEOUT_S)
    status, doc = _ask(c)
    c.close()
    assert status == 200 and int(doc["model_version"]) == 2, doc


def test_activation_whose_write_fails_changes_nothing_and_closes_the_model(env: Env) -> None:
    env.owner.restore(env.load(1))
    env.owner.activate(env.load(2), 1, 1)
    _refuse_writes(env.db, "BEFORE UPDATE ON models")
    sv3 = env.load(3)
    with pytest.raises(sqlite3.Error):
        env.owner.activate(sv3, 2, 2)
    assert env.owner.snapshot(NAME) == (2, 2)
    with pytest.raises(Exception):  # noqa: B017 - closed: any failure will do, an answer would not
        sv3.model.infer({"x": X})


def test_a_failed_clean_up_after_activation_does_not_undo_it(env: Env) -> None:
    env.owner.restore(env.load(1))

    def prune() -> None:
        raise OSError(errno.EIO, "the store's disk failed while old versions were removed")

    applied = env.owner.activate(env.load(2), 1, 1, then=prune)
    assert (applied.replaced, applied.serving) == (1, 2)
    assert env.owner.snapshot(NAME) == (2, 2)
