"""The state database on a real SQLite file: jobs, replay ids, versions, high-water marks."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.state import StateDB


@pytest.fixture
def db(tmp_path: Path) -> Iterator[StateDB]:
    d = StateDB(tmp_path / "state" / "state.db")
    yield d
    d.close()


def test_create_job_twice_is_a_replay(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    exp = time.time() + 600
    db = StateDB(path)
    assert db.create_job("c1", "deploy", "det", {"model": "det"}, exp) is True
    assert db.create_job("c1", "deploy", "det", {"model": "other"}, exp) is False
    j = db.job("c1")
    assert j is not None
    assert j["params"] == {"model": "det"}  # the replay changed nothing
    assert j["state"] == "QUEUED"
    assert len(db.job_timeline("c1")) == 1
    db.close()
    # Remembered across a reopen.
    db = StateDB(path)
    try:
        assert db.create_job("c1", "deploy", "det", {}, exp) is False
    finally:
        db.close()


def test_update_job_timeline_in_order(db: StateDB) -> None:
    db.create_job("c2", "deploy", "det", {}, time.time() + 600)
    db.update_job("c2", "IN_PROGRESS", "fetching_manifest")
    db.update_job("c2", "IN_PROGRESS", "verifying")
    db.update_job("c2", "FAILED", "downloading", error={"code": "hash_mismatch", "message": "m"})
    tl = db.job_timeline("c2")
    assert [(e["state"], e["step"]) for e in tl] == [
        ("QUEUED", None), ("IN_PROGRESS", "fetching_manifest"), ("IN_PROGRESS", "verifying"),
        ("FAILED", "downloading")]
    assert tl[-1]["detail"] == {"code": "hash_mismatch", "message": "m"}
    assert [e["ts"] for e in tl] == sorted(e["ts"] for e in tl)
    j = db.job("c2")
    assert j is not None
    assert (j["state"], j["step"], j["error"]["code"]) == ("FAILED", "downloading", "hash_mismatch")


def test_update_job_result(db: StateDB) -> None:
    db.create_job("c3", "ping", None, {}, time.time() + 600)
    db.update_job("c3", "SUCCEEDED", result={"pong": "now"})
    j = db.job("c3")
    assert j is not None and j["result"] == {"pong": "now"} and j["error"] is None


def test_highwater_rises_when_a_version_serves_never_falls(db: StateDB) -> None:
    db.record_install("det", 3, "onnx-fp32", "onnxruntime:CPUExecutionProvider", {"version": 3}, {"model.onnx": "a" * 64})
    m = db.model("det")
    # Installed but not serving (it may still fail validation): the number is not used up yet.
    assert m is not None and m["highwater"] == 0 and m["serving"] is None and m["state"] == "installing"
    db.set_serving("det", 3, None)
    assert db.model("det")["highwater"] == 3  # type: ignore[index]
    db.record_install("det", 5, "onnx-fp32", "onnxruntime:CPUExecutionProvider", {}, {})
    db.set_serving("det", 5, 3)
    assert db.model("det")["highwater"] == 5  # type: ignore[index]
    db.record_install("det", 4, "onnx-fp32", "onnxruntime:CPUExecutionProvider", {}, {})
    db.set_serving("det", 4, 5)  # a signed rollback serves an older version: the mark stays
    assert db.model("det")["highwater"] == 5  # type: ignore[index]
    assert db.versions("det") == [3, 4, 5]
    v = db.version("det", 3)
    assert v is not None
    assert v["variant"] == "onnx-fp32" and v["manifest"] == {"version": 3}
    assert v["files"] == {"model.onnx": "a" * 64}
    # Deleting a version never lowers the high-water mark.
    db.delete_version("det", 5)
    assert db.versions("det") == [3, 4]
    assert db.model("det")["highwater"] == 5  # type: ignore[index]


def test_highwater_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    a = StateDB(path)
    a.record_install("det", 9, "v", "b", {}, {})
    a.set_serving("det", 9, None)
    a.close()
    b = StateDB(path)
    try:
        assert b.model("det")["highwater"] == 9  # type: ignore[index]
    finally:
        b.close()


def test_set_serving_and_previous(db: StateDB) -> None:
    db.record_install("det", 1, "onnx-fp32", "onnxruntime:CPUExecutionProvider", {}, {})
    db.set_serving("det", 1, None)
    m = db.model("det")
    assert m is not None and (m["serving"], m["previous"], m["state"]) == (1, None, "serving")
    db.record_install("det", 2, "onnx-fp32", "onnxruntime:CPUExecutionProvider", {}, {})
    db.set_serving("det", 2, 1, backend="openvino:CPU")
    m = db.model("det")
    assert m is not None and (m["serving"], m["previous"]) == (2, 1)
    assert db.version("det", 2)["backend"] == "openvino:CPU"  # type: ignore[index]
    assert db.version("det", 1)["backend"] == "onnxruntime:CPUExecutionProvider"  # type: ignore[index]
    assert [x["name"] for x in db.models()] == ["det"]


def test_unfinished_jobs(db: StateDB) -> None:
    exp = time.time() + 600
    for i, state in enumerate(["QUEUED", "IN_PROGRESS", "SUCCEEDED", "FAILED", "REJECTED",
                               "CANCELED", "TIMED_OUT", "IN_PROGRESS"]):
        db.create_job(f"j{i}", "deploy", "m", {}, exp)
        if state != "QUEUED":
            db.update_job(f"j{i}", state, "downloading" if state == "IN_PROGRESS" else None)
    assert [j["id"] for j in db.unfinished_jobs()] == ["j0", "j1", "j7"]


def test_forget_expired_jobs(db: StateDB) -> None:
    now = time.time()
    keep = 100.0
    db.create_job("old-done", "ping", None, {}, now - keep - 10)
    db.update_job("old-done", "SUCCEEDED")
    db.create_job("old-running", "deploy", "m", {}, now - keep - 10)
    db.update_job("old-running", "IN_PROGRESS", "downloading")
    db.create_job("recent-done", "ping", None, {}, now - keep + 10)
    db.update_job("recent-done", "FAILED")
    db.create_job("live", "ping", None, {}, now + 600)
    db.update_job("live", "SUCCEEDED")
    assert db.forget_expired_jobs(now=now, keep_s=keep) == 1
    assert db.job("old-done") is None
    assert db.job_timeline("old-done") == []
    for j in ("old-running", "recent-done", "live"):
        assert db.job(j) is not None
    # A forgotten id may be used again.
    assert db.create_job("old-done", "ping", None, {}, now + 600) is True


def test_kv_and_tx(db: StateDB) -> None:
    assert db.get("last_trusted_time", 0.0) == 0.0
    db.put("last_trusted_time", 123.5)
    assert db.get("last_trusted_time") == 123.5
    with pytest.raises(RuntimeError), db.tx() as conn:
        conn.execute("INSERT INTO kv(key, value) VALUES ('x', '1')")
        raise RuntimeError("abort")
    assert db.get("x") is None  # rolled back
    with db.tx() as conn:
        conn.execute("INSERT INTO kv(key, value) VALUES ('x', '1')")
    assert db.get("x") == 1
