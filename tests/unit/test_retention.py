"""Retention on real SQLite files: jobs, recovery entries and final-update records are swept by
age and count, and no id whose command is still valid (plus the skew) is ever forgotten."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import retention
from agent.config import ConfigError, RetentionConfig, from_dict
from agent.retention import Sweeper
from agent.state import StateDB
from agent.telemetry.outbox import Outbox

SKEW_S = 30.0


@pytest.fixture
def parts(tmp_path: Path) -> Iterator[tuple[StateDB, Outbox]]:
    db = StateDB(tmp_path / "state.db")
    ob = Outbox(tmp_path / "outbox.db", 2**20)
    yield db, ob
    db.close()
    ob.close()


def _done(db: StateDB, jid: str, expires_at: float, state: str = "SUCCEEDED") -> None:
    assert db.create_job(jid, "ping", None, {}, expires_at)
    db.update_job(jid, state)


def test_count_bound_forgets_oldest_expired_never_an_unexpired_id(parts: tuple[StateDB, Outbox]) -> None:
    db, ob = parts
    now = time.time()
    for i in range(10):  # expired (plus the skew) long enough ago to be forgettable
        _done(db, f"old{i}", now - SKEW_S - 100 + i)
    _done(db, "within-skew", now - SKEW_S / 2)  # expired, but not beyond the skew: still refuses a replay
    _done(db, "valid", now + 600)
    assert db.create_job("running", "deploy", "m", {}, now - SKEW_S - 1000)  # unfinished: kept
    cfg = RetentionConfig(jobs_max=5, jobs_keep_s=86400.0)
    swept = Sweeper(db, ob, cfg, lambda: SKEW_S, clock=lambda: now).sweep()
    assert swept["jobs"] == 8
    assert db.sizes()["jobs"] == 5
    assert [j for j in ("old8", "old9", "within-skew", "valid", "running") if db.job(j) is None] == []
    assert db.job("old0") is None and db.job_timeline("old0") == []
    # Replay protection holds for every id not yet forgettable.
    for jid in ("within-skew", "valid", "running"):
        assert db.create_job(jid, "ping", None, {}, now + 600) is False


def test_unexpired_ids_stay_even_past_the_count_bound(parts: tuple[StateDB, Outbox]) -> None:
    db, ob = parts
    now = time.time()
    for i in range(6):
        _done(db, f"v{i}", now + 60)
    Sweeper(db, ob, RetentionConfig(jobs_max=2), lambda: SKEW_S, clock=lambda: now).sweep()
    assert db.sizes()["jobs"] == 6


def test_age_bound_keeps_recovery_state_in_the_rows_that_stay(parts: tuple[StateDB, Outbox]) -> None:
    db, ob = parts
    now = time.time()
    _done(db, "aged", now - SKEW_S - 200)
    _done(db, "young", now - SKEW_S - 50, state="FAILED")
    assert db.create_job("live", "deploy", "m", {}, now + 600)
    db.update_job("live", "IN_PROGRESS", "downloading")
    db.set_job_version("live", 3)
    assert db.count_resume("live") == 1
    db.put("last_trusted_time", now)
    Sweeper(db, ob, RetentionConfig(jobs_keep_s=100.0), lambda: SKEW_S, clock=lambda: now).sweep()
    assert db.job("aged") is None and db.job("young") is not None
    live = db.job("live")
    assert live is not None and (live["version"], live["resumes"]) == (3, 1)  # its job has not ended
    assert db.get("last_trusted_time") == now
    assert db.sizes()["kv"] == 1  # nothing per job in kv


def test_reported_records_swept_by_count_and_counted_by_state(parts: tuple[StateDB, Outbox]) -> None:
    db, ob = parts
    for i in range(7):
        ob.add("t/job", {"job": f"j{i}", "state": "FAILED" if i % 3 == 0 else "SUCCEEDED"}, "job",
               terminal_job=f"j{i}")
    assert ob.reported_sizes() == {"FAILED": 3, "SUCCEEDED": 4}
    sw = Sweeper(db, ob, RetentionConfig(reported_max=4), lambda: SKEW_S)
    assert sw.sweep()["reported"] == 3
    assert sum(ob.reported_sizes().values()) == 4
    assert ob.reported("j0") is None and ob.reported("j6") is not None  # the oldest went first
    st = sw.status()
    assert (st["reported_max"], st["forgotten"]["reported"], st["outbox_depth"]) == (4, 3, 7)


def test_reported_records_swept_by_age(parts: tuple[StateDB, Outbox]) -> None:
    _, ob = parts
    ob.add("t/job", {"job": "j", "state": "SUCCEEDED"}, "job", terminal_job="j")
    assert ob.forget_reported(3600.0) == 0
    assert ob.forget_reported(-1.0) == 1  # older than "one second from now": all of them
    assert ob.reported_sizes() == {}


def test_an_old_database_moves_its_recovery_entries_into_job_columns(tmp_path: Path) -> None:
    """A state.db written before the columns existed: kv ``job_version:``/``resumes:`` entries
    become ``jobs.version``/``jobs.resumes``; opening it again changes nothing."""
    import sqlite3

    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
        "CREATE TABLE jobs (id TEXT PRIMARY KEY, type TEXT NOT NULL, model TEXT, state TEXT NOT NULL, step TEXT,"
        " params TEXT NOT NULL, error TEXT, result TEXT, expires_at REAL NOT NULL,"
        " created REAL NOT NULL, updated REAL NOT NULL);"
        "INSERT INTO jobs VALUES ('d1', 'deploy', 'm', 'IN_PROGRESS', 'activating', '{}', NULL, NULL, 9e9, 1, 1);"
        "INSERT INTO jobs VALUES ('d2', 'deploy', 'm', 'QUEUED', NULL, '{}', NULL, NULL, 9e9, 1, 1);"
        "INSERT INTO kv VALUES ('job_version:d1', '4'), ('resumes:d1', '2'), ('resumes:gone', '1'),"
        " ('last_trusted_time', '123.0');")
    old.commit()
    old.close()
    for _ in range(2):  # the migration is idempotent
        db = StateDB(path)
        d1, d2 = db.job("d1"), db.job("d2")
        assert d1 is not None and (d1["version"], d1["resumes"]) == (4, 2)
        assert d2 is not None and (d2["version"], d2["resumes"]) == (None, 0)
        assert db.get("job_version:d1") is None and db.get("resumes:gone") is None
        assert db.get("last_trusted_time") == 123.0 and db.sizes()["kv"] == 1
        db.close()


@pytest.mark.parametrize("key, value", [("sweep_interval_s", 0.0), ("jobs_max", 0), ("reported_max", 0),
                                        ("jobs_keep_s", -1.0), ("reported_keep_s", 400 * 86400.0)])
def test_retention_settings_out_of_range_are_refused_by_name(key: str, value: float) -> None:
    with pytest.raises(ConfigError, match=f"retention.{key}"):
        from_dict({"device_id": "d", "retention": {key: value}})


def test_a_large_backlog_is_swept_in_batches(parts: tuple[StateDB, Outbox], monkeypatch: pytest.MonkeyPatch) -> None:
    db, ob = parts
    now = time.time()
    for i in range(25):
        _done(db, f"b{i}", now - SKEW_S - 10 - i)
    _done(db, "valid", now + 600)
    monkeypatch.setattr(retention, "SWEEP_BATCH", 4)
    assert db.forget_expired_jobs(now=now, keep_s=0.0, skew_s=SKEW_S, batch=4) == 4  # one batch
    assert Sweeper(db, ob, RetentionConfig(jobs_keep_s=0.0), lambda: SKEW_S, clock=lambda: now).sweep()["jobs"] == 21
    assert db.sizes()["jobs"] == 1 and db.job("valid") is not None
