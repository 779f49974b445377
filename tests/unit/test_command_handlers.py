"""Each command handler (agent/commands/handlers.py, bench.py) built with only the parts it uses:
a real StateDB, store, registry, serving owner, version loader and job reporter, onnxruntime on
the tiny bundles tests/unit/test_deploy_runner.py builds and deploys with the real runner."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from test_deploy_runner import CPU, Env, X, _ort, build_bundle, env  # noqa: F401 (env: the fixture)

from agent import config, errors
from agent.backends.onnxruntime import OnnxRuntimeBackend
from agent.bundles.trust import TrustStore, key_id, public_pem
from agent.commands.bench import Bench
from agent.commands.handlers import (
    REMOTE_CONFIG_FILE,
    Cancel,
    RemoteConfig,
    Remove,
    Rollback,
    TrustRotation,
    load_remote_overrides,
)
from agent.deploy.queue import DeployQueue
from agent.deploy.runner import DeployContext
from agent.deploy.versions import VersionLoader


class Changes:
    """The ``changed`` callback a handler is given (the daemon publishes its status there)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


def loader(e: Env) -> VersionLoader:
    return VersionLoader(e.db, e.store, [OnnxRuntimeBackend()], lambda: e.settings)


def two_versions(e: Env) -> tuple[Path, Path]:
    m1 = build_bundle(e.tmp / "b1", e.key, version=1, seed=1)
    m2 = build_bundle(e.tmp / "b2", e.key, version=2, seed=2)
    assert e.deploy("job-1", m1)["state"] == "SUCCEEDED"
    assert e.deploy("job-2", m2)["state"] == "SUCCEEDED"
    return m1, m2


def events(e: Env, kind: str) -> list[dict[str, Any]]:
    docs = [json.loads(r.payload) for r in e.outbox.peek(0, 10_000) if r.topic.endswith("/events")]
    return [d for d in docs if d.get("event") == kind]


def code_of(fn: Any, params: dict[str, Any]) -> str:
    with pytest.raises(errors.AgentError) as e:
        fn(params)
    return e.value.code


# -- rollback --------------------------------------------------------------------------------
def test_rollback_serves_the_previous_version_through_the_owner(env: Env) -> None:  # noqa: F811
    m1, _ = two_versions(env)
    changed = Changes()
    rollback = Rollback(env.db, loader(env), env.runner.owner, env.runner.reporter, changed)
    out = rollback({"model": "lin"})
    assert out == {"name": "lin", "version": 1, "backend": CPU, "previous": 2}
    sv = env.registry.get("lin")
    assert sv is not None and sv.version == 1
    np.testing.assert_allclose(env.infer(X), _ort(m1.parent / "model.onnx", X), rtol=1e-6)
    rec = env.db.model("lin")
    assert rec is not None and (rec["serving"], rec["previous"]) == (1, 2)  # undoable
    assert changed.calls == 1
    assert [(ev["frm"], ev["to"]) for ev in events(env, "rollback")] == [(2, 1)]
    assert env.runner.owner.snapshot("lin") == (1, 1)


def test_rollback_refusals_name_the_reason_and_change_nothing(env: Env) -> None:  # noqa: F811
    two_versions(env)
    changed = Changes()
    rollback = Rollback(env.db, loader(env), env.runner.owner, env.runner.reporter, changed)
    assert code_of(rollback, {}) == errors.INVALID_COMMAND
    assert code_of(rollback, {"model": "nope"}) == errors.UNKNOWN_MODEL
    assert code_of(rollback, {"model": "lin", "to_version": 2}) == errors.ROLLBACK_REFUSED  # serving already
    assert code_of(rollback, {"model": "lin", "to_version": 9}) == errors.ROLLBACK_REFUSED  # not kept
    assert code_of(rollback, {"model": "lin", "to_version": True}) == errors.ROLLBACK_REFUSED
    assert env.runner.owner.snapshot("lin") == (2, 2) and changed.calls == 0


def test_rollback_to_a_version_that_fails_its_samples_keeps_what_serves(env: Env) -> None:  # noqa: F811
    two_versions(env)
    # v1's golden samples no longer match its model (a corrupted kept file would do the same).
    expected = env.store.version_dir("lin", 1) / "samples" / "expected.npz"
    with np.load(expected) as z:
        y = z["y"] + np.float32(1.0)
    expected.unlink()  # a hard link into the store: write a new file, not through the link
    np.savez(expected, y=y)
    rollback = Rollback(env.db, loader(env), env.runner.owner, env.runner.reporter, Changes())
    assert code_of(rollback, {"model": "lin"}) == errors.VALIDATION_FAILED
    assert env.runner.owner.snapshot("lin") == (2, 2)


# -- remove ----------------------------------------------------------------------------------
def test_remove_stops_serving_and_frees_the_files(env: Env) -> None:  # noqa: F811
    two_versions(env)
    changed = Changes()
    remove = Remove(env.db, env.runner.owner, changed)
    out = remove({"model": "lin"})
    assert out["name"] == "lin" and out["freed_bytes"] > 0
    assert env.registry.get("lin") is None and changed.calls == 1
    rec = env.db.model("lin")
    assert rec is not None and (rec["serving"], rec["state"], rec["highwater"]) == (None, "removed", 2)
    assert env.db.versions("lin") == [] and not env.store.version_dir("lin", 2).exists()
    assert code_of(remove, {"model": "lin"}) == errors.UNKNOWN_MODEL  # nothing left to remove
    assert changed.calls == 1


def test_a_model_taken_down_is_refused_a_rollback_and_can_be_removed(env: Env) -> None:  # noqa: F811
    m1 = build_bundle(env.tmp / "b1", env.key, version=1, seed=1)
    assert env.deploy("job-1", m1)["state"] == "SUCCEEDED"
    sv = env.registry.get("lin")
    assert sv is not None and env.runner.owner.take_down(sv)
    rollback = Rollback(env.db, loader(env), env.runner.owner, env.runner.reporter, Changes())
    with pytest.raises(errors.RejectError) as e:
        rollback({"model": "lin", "to_version": 1})
    assert e.value.code == errors.ROLLBACK_REFUSED and "down" in e.value.message
    out = Remove(env.db, env.runner.owner, Changes())({"model": "lin"})
    assert out["freed_bytes"] > 0
    rec = env.db.model("lin")
    assert rec is not None and (rec["serving"], rec["state"]) == (None, "removed")
    assert env.db.versions("lin") == []


# -- cancel ----------------------------------------------------------------------------------
def test_cancel_reaches_the_deploy_queue_and_names_a_job_that_is_not_running(env: Env) -> None:  # noqa: F811
    queue = DeployQueue(env.runner.run)  # not started: the deploy stays queued
    ctx = DeployContext("job-q", "lin", "file:///nowhere/manifest.json")
    queue.submit(ctx)
    cancel = Cancel(queue.cancel, env.db)
    assert cancel({"job": "job-q"}) == {"job": "job-q", "canceled": True}
    assert ctx.cancel.is_set() and ctx.cancel_code == errors.CANCELED
    assert env.db.create_job("job-done", "ping", None, {}, time.time() + 60, state="SUCCEEDED")
    with pytest.raises(errors.RejectError) as e:
        cancel({"job": "job-done"})
    assert e.value.code == errors.INVALID_COMMAND and "state SUCCEEDED" in e.value.message
    assert code_of(cancel, {"job": 7}) == errors.INVALID_COMMAND


# -- config ----------------------------------------------------------------------------------
def test_config_applies_all_or_nothing_and_persists(tmp_path: Path) -> None:
    cfg = config.from_dict({"device_id": "dev1"})
    path = tmp_path / REMOTE_CONFIG_FILE
    applied: list[set[str]] = []
    remote = RemoteConfig(cfg, path, applied.append)
    out = remote({"set": {"telemetry.heartbeat_s": 5, "storage.keep_versions": 3}})
    assert out == {"storage.keep_versions": 3, "telemetry.heartbeat_s": 5.0}
    assert (cfg.telemetry.heartbeat_s, cfg.storage.keep_versions) == (5.0, 3)
    assert applied == [{"telemetry.heartbeat_s", "storage.keep_versions"}]
    assert load_remote_overrides(path) == {"telemetry.heartbeat_s": 5, "storage.keep_versions": 3}

    # One bad value: nothing applied, nothing persisted.
    assert code_of(remote, {"set": {"telemetry.heartbeat_s": 7, "storage.keep_versions": -1}}) == errors.INVALID_COMMAND
    assert code_of(remote, {"set": {"state_dir": "/tmp"}}) == errors.INVALID_COMMAND  # not remotely settable
    assert code_of(remote, {"set": {}}) == errors.INVALID_COMMAND
    assert cfg.telemetry.heartbeat_s == 5.0 and len(applied) == 1
    assert load_remote_overrides(path) == {"telemetry.heartbeat_s": 5, "storage.keep_versions": 3}


# -- trust -----------------------------------------------------------------------------------
def test_trust_rotation_keeps_the_threshold(tmp_path: Path, env: Env) -> None:  # noqa: F811
    old, new = Ed25519PrivateKey.generate().public_key(), Ed25519PrivateKey.generate().public_key()
    folder = tmp_path / "trust"
    folder.mkdir()
    (folder / "old.pem").write_bytes(public_pem(old))
    store = TrustStore.load(folder)
    threshold = [1]
    rotate = TrustRotation(store, lambda: threshold[0], env.runner.reporter)
    out = rotate({"add": [public_pem(new).decode()], "remove": [key_id(old)]})
    assert out == {"keys": [key_id(new)]}
    assert list(TrustStore.load(folder).key_ids()) == [key_id(new)]  # persisted
    assert [ev["keys"] for ev in events(env, "trust_changed")] == [[key_id(new)]]

    threshold[0] = 2  # one key would remain: refused, nothing changed
    assert code_of(rotate, {"remove": [key_id(old)]}) == errors.INVALID_COMMAND
    with pytest.raises(errors.RejectError) as e:
        rotate({"add": ["not a pem"]})
    assert e.value.code == errors.INVALID_COMMAND and "add[0]" in e.value.message
    assert list(store.key_ids()) == [key_id(new)]


# -- bench -----------------------------------------------------------------------------------
def test_bench_times_the_serving_version_and_changes_nothing(env: Env) -> None:  # noqa: F811
    m1 = build_bundle(env.tmp / "b1", env.key, version=1, seed=1)
    assert env.deploy("job-1", m1)["state"] == "SUCCEEDED"
    sv = env.registry.get("lin")
    bench = Bench(env.registry, loader(env), [OnnxRuntimeBackend()])
    out = bench({"model": "lin", "iterations": 5})
    assert (out["model"], out["version"], out["serving_backend"], out["iterations"]) == ("lin", 1, CPU, 5)
    timing = out["backends"][CPU]
    assert timing["usable"] and timing["runs"] == 5 and timing["min_ms"] <= timing["p50_ms"] <= timing["max_ms"]
    assert env.registry.get("lin") is sv  # the same loaded model still serves
    assert code_of(bench, {"model": "lin", "iterations": 0}) == errors.INVALID_COMMAND
    assert code_of(bench, {"model": "nope"}) == errors.UNKNOWN_MODEL
