"""Recovery after a restart is a table over the deploy's persisted steps (agent/deploy/runner.py),
applied by agent/deploy/recovery.py: against a real state database, outbox, store and onnxruntime
models deployed by the real runner (tests/unit/test_deploy_runner.py's parts)."""

from __future__ import annotations

import time
from typing import Any

import pytest
from test_deploy_runner import Env, build_bundle, env  # noqa: F401 (env: the fixture)

from agent import errors
from agent.backends.onnxruntime import OnnxRuntimeBackend
from agent.deploy import recovery, runner
from agent.deploy.owner import ServingOwner
from agent.deploy.recovery import Recovery, RecoverySettings
from agent.deploy.versions import VersionLoader
from agent.serving.registry import Registry
from agent.state import MODEL_DOWN, TERMINAL


def test_every_persisted_step_has_a_recovery_event() -> None:
    """A step added to the transition table without a recovery decision fails here."""
    steps = {s for s, _ in runner.TRANSITIONS}
    assert set(runner.RECOVERY) == steps | {None}
    assert set(runner.RECOVERY.values()) == {runner.RESUME, runner.SETTLE}


def test_only_steps_that_may_have_changed_what_serves_settle() -> None:
    settle = {s for s, e in runner.RECOVERY.items() if e == runner.SETTLE}
    assert settle == {runner.ACTIVATING, runner.PROBATION}


# -- the actions recovery takes (agent/deploy/recovery.py) -------------------------------------
SETTINGS = RecoverySettings(max_resumes=3, in_process=True)


@pytest.mark.parametrize(("job", "model", "reported", "clean", "action"), [
    ({"type": "deploy", "step": "downloading"}, {}, True, True, recovery.RECORD),
    ({"type": "rollback", "step": None}, {}, False, True, recovery.INTERRUPT),
    ({"type": "install", "step": "loading"}, {}, False, True, recovery.INTERRUPT),  # its archive is gone
    ({"type": "deploy", "step": None}, {}, False, False, recovery.RESUME_AGAIN),
    ({"type": "deploy", "step": "downloading", "version": 2, "resumes": 2}, {"serving": 2}, False, True,
     recovery.RESUME_AGAIN),  # a step before activation resumes even when its version serves
    ({"type": "deploy", "step": "downloading", "resumes": 3}, {}, False, True, recovery.GIVE_UP),
    ({"type": "deploy", "step": "activating", "version": 2}, {"serving": 1, "previous": None}, False, True,
     recovery.RESUME_AGAIN),  # it never activated
    ({"type": "deploy", "step": "activating", "version": 2}, {"serving": 2, "previous": None}, False, False,
     recovery.SUCCEED),
    ({"type": "deploy", "step": "probation", "version": 2}, {"serving": 2, "previous": 1}, False, True,
     recovery.PROBATION),
    ({"type": "deploy", "step": "probation", "version": 2}, {"serving": 2, "previous": 1}, False, False,
     recovery.ROLL_BACK),
])
def test_decide(job: dict[str, Any], model: dict[str, Any], reported: bool, clean: bool, action: str) -> None:
    assert recovery.decide(job, model, reported, clean, SETTINGS) == action


def test_an_unclean_stop_with_worker_processes_keeps_probation_going() -> None:
    job = {"type": "deploy", "step": "probation", "version": 2}
    isolated = RecoverySettings(max_resumes=3, in_process=False)
    assert recovery.decide(job, {"serving": 2, "previous": 1}, False, False, isolated) == recovery.PROBATION


class Restart:
    """The parts a restart builds on the same state: a fresh registry and serving owner."""

    def __init__(self, e: Env, clean: bool = True) -> None:
        self.registry = Registry()
        self.owner = ServingOwner(e.db, self.registry, e.store)
        self.probations: list[tuple[Any, ...]] = []
        loader = VersionLoader(e.db, e.store, [OnnxRuntimeBackend()], lambda: e.settings)
        e.db.put(recovery.CLEAN_SHUTDOWN_KEY, clean)
        self.recovery = Recovery(e.db, e.runner.reporter, self.owner, loader, e.outbox.reported,
                                 lambda *a: self.probations.append(a), lambda: SETTINGS)

    def close(self) -> None:
        self.registry.close()


def deployed(e: Env, *versions: int) -> None:
    for v in versions:
        m = build_bundle(e.tmp / f"b{v}", e.key, version=v, seed=v)
        assert e.deploy(f"job-{v}", m)["state"] == "SUCCEEDED"


def job_at(e: Env, jid: str, step: str | None, type_: str = "deploy", model: str = "lin",
           version: int | None = None, resumes: int = 0) -> None:
    assert e.db.create_job(jid, type_, model, {"model": model, "manifest_url": f"file:///{jid}/manifest.json"},
                           time.time() + 600)
    if step is not None:
        e.db.update_job(jid, "IN_PROGRESS", step)
    if version is not None:
        e.db.set_job_version(jid, version)
    for _ in range(resumes):
        e.db.count_resume(jid)


def ends(e: Env, jid: str) -> list[dict[str, Any]]:
    return [u for u in e.updates(jid) if u["state"] in TERMINAL]


def test_restart_settles_every_unfinished_job_once(env: Env) -> None:  # noqa: F811
    deployed(env, 1, 2)  # v2 serves, v1 is its previous
    job_at(env, "activated", "probation", version=2)
    job_at(env, "queued-old", None)
    job_at(env, "queued-new", "downloading")
    job_at(env, "looping", "loading", model="other", resumes=3)
    job_at(env, "op", None, type_="rollback")
    job_at(env, "told", "validating", model="third")
    env.outbox.add("edge/dev1/jobs/told", {"job": "told", "state": "FAILED", "step": "validating",
                                           "error": {"code": errors.VALIDATION_FAILED}}, "job", stream="jobs",
                   terminal_job="told")
    r = Restart(env)
    try:
        resumed = r.recovery.run()
        assert r.owner.snapshot("lin") == (2, 2)  # what served is back
        assert [(c.job_id, c.model, c.manifest_url) for c in resumed] == [
            ("queued-new", "lin", "file:///queued-new/manifest.json")]
        assert (env.db.job("queued-new") or {})["resumes"] == 1
        assert [p[:4] for p in r.probations] == [("activated", "lin", 2, 1)]
        assert [(u["state"], u["error"]["code"]) for u in ends(env, "queued-old")] == [("CANCELED", errors.SUPERSEDED)]
        assert [(u["state"], u["error"]["code"]) for u in ends(env, "looping")] == [("FAILED", errors.INTERRUPTED)]
        assert [(u["state"], u["error"]["code"]) for u in ends(env, "op")] == [("FAILED", errors.INTERRUPTED)]
        assert len(ends(env, "told")) == 1  # the end sent before the crash: recorded, not reported again
        assert ((env.db.job("told") or {})["state"], (env.db.job("told") or {})["error"]["code"]) == (
            "FAILED", errors.VALIDATION_FAILED)
        assert [j["id"] for j in env.db.unfinished_jobs()] == ["activated", "queued-new"]
        assert env.db.get(recovery.CLEAN_SHUTDOWN_KEY) is False
        r.recovery.stopped_cleanly()
        assert env.db.get(recovery.CLEAN_SHUTDOWN_KEY) is True
    finally:
        r.close()


def test_an_unclean_stop_in_probation_rolls_back_with_in_process_runtimes(env: Env) -> None:  # noqa: F811
    deployed(env, 1, 2)
    job_at(env, "activated", "probation", version=2)
    r = Restart(env, clean=False)
    try:
        assert r.recovery.run() == []
        assert r.owner.snapshot("lin") == (1, 1) and r.probations == []
        assert [(u["state"], u["error"]["code"]) for u in ends(env, "activated")] == [
            ("FAILED", errors.PROBATION_FAILED)]
        sv = r.registry.get("lin")
        assert sv is not None and sv.version == 1
    finally:
        r.close()


def test_a_model_taken_down_is_recorded_down_and_stays_down_after_a_restart(env: Env) -> None:  # noqa: F811
    deployed(env, 1)  # nothing to roll back to
    owner = env.runner.owner
    sv = env.registry.get("lin")
    assert sv is not None
    assert owner.take_down(sv)
    assert not owner.take_down(sv)  # once
    assert owner.snapshot("lin") == (None, None)  # the table says what the registry says
    rec = env.db.model("lin")
    assert rec is not None and (rec["serving"], rec["state"], rec["highwater"]) == (None, MODEL_DOWN, 1)
    assert env.db.versions("lin") == [1]  # kept
    r = Restart(env)
    try:
        assert r.recovery.run() == []
        assert r.registry.get("lin") is None and r.owner.snapshot("lin") == (None, None)
    finally:
        r.close()
    # A newer version serves again, without a probation against the version that went down.
    m2 = build_bundle(env.tmp / "b2", env.key, version=2, seed=2)
    final = env.deploy("job-2", m2)
    assert final["state"] == "SUCCEEDED" and final["result"]["previous"] is None
    rec = env.db.model("lin")
    assert rec is not None and (rec["serving"], rec["previous"], rec["state"]) == (2, None, "serving")
