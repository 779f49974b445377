"""Command intake (agent/commands/intake.py) over a real state database and outbox.

Only the network is replaced: ``publish_now`` (the direct MQTT publish) appends to a list. A full
database is made by SQLite itself (``PRAGMA max_page_count``), which answers SQLITE_FULL ("database
or disk is full") exactly as a full disk does.
"""

from __future__ import annotations

import errno
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import errors
from agent.bundles import dsse
from agent.bundles.trust import TrustStore, key_id
from agent.commands.intake import CommandIntake
from agent.commands.verify import Command, CommandVerifier
from agent.deploy.jobs import JobReporter
from agent.logs import RateLimit
from agent.mqtt.topics import Topics
from agent.state import StateDB
from agent.telemetry.outbox import Outbox
from agent.timeutil import now_rfc3339

NOW = 1_800_000_000.0
SKEW = 300
BACK_S = 95 * 60


class Rig:
    def __init__(self, tmp: Path) -> None:
        self.key = Ed25519PrivateKey.generate()
        self.other = Ed25519PrivateKey.generate()
        trust = TrustStore({key_id(self.key.public_key()): self.key.public_key()})
        self.verifier = CommandVerifier(trust, 1, "dev1", ["cams"], SKEW)
        self.db = StateDB(tmp / "state.db")
        self.outbox = Outbox(tmp / "outbox.db", 2**20)
        self.reporter = JobReporter(self.db, self.outbox, Topics("edge", "dev1"))
        self.direct: list[tuple[str, dict[str, Any]]] = []
        self.routed: list[Command] = []
        self.now = NOW
        self.route_error: BaseException | None = None
        self.intake = CommandIntake(self.verifier, self.db, self.reporter, self._route, self._publish_now,
                                    clock=lambda: self.now)

    def _route(self, cmd: Command) -> None:
        if self.route_error is not None:
            raise self.route_error
        self.routed.append(cmd)
        self.reporter.update(cmd.id, cmd.type, "SUCCEEDED", result={})

    def _publish_now(self, topic: str, doc: dict[str, Any]) -> bool:
        self.direct.append((topic, doc))
        return True

    def command(self, cid: str, type_: str = "ping", issued: float = NOW - 10, ttl: float = 600,
                key: Ed25519PrivateKey | None = None, params: dict[str, Any] | None = None) -> bytes:
        doc = {"v": 1, "id": cid, "type": type_, "target": {"device": "dev1"}, "issued_at": now_rfc3339(issued),
               "expires_at": now_rfc3339(issued + ttl), "params": params or {}}
        return json.dumps(dsse.sign(dsse.COMMAND_TYPE, json.dumps(doc).encode(), [key or self.key])).encode()

    def queued(self, prefix: str = "edge/dev1/") -> list[dict[str, Any]]:
        return [json.loads(r.payload) for r in self.outbox.peek(0, 1000) if r.topic.startswith(prefix)]

    def job_updates(self, cid: str) -> list[dict[str, Any]]:
        return self.queued(f"edge/dev1/jobs/{cid}")


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return Rig(tmp_path)


def test_messages_failing_before_the_signature_check_publish_nothing_and_are_counted(rig: Rig) -> None:
    unsigned = json.dumps({"v": 1, "id": "u-1", "type": "ping", "target": {"device": "dev1"},
                           "issued_at": now_rfc3339(NOW), "expires_at": now_rfc3339(NOW + 60)}).encode()
    for i in range(50):
        assert rig.intake.handle("edge/dev1/cmd", unsigned.replace(b"u-1", f"u-{i}".encode()))
    assert rig.intake.handle("edge/dev1/cmd", rig.command("x-1", key=rig.other))
    assert rig.intake.handle("edge/dev1/cmd", b"\x00 not json")
    assert rig.intake.refused() == {"unsigned_command": 50, "untrusted_key": 1, "invalid_command": 1}
    assert rig.queued("edge/dev1/jobs/") == [] and rig.direct == [] and rig.routed == []
    events = [d for d in rig.queued("edge/dev1/events") if d["event"] == "commands_refused"]
    assert len(events) == 1 and events[0]["total"] == {"unsigned_command": 1}  # the first one; then rate-limited


def test_a_command_refused_as_expired_stays_refused_when_the_clock_goes_back(rig: Rig) -> None:
    raw = rig.command("cfg-1", "config", issued=NOW - 7200, ttl=3600 + 1800, params={"set": {}})
    assert rig.intake.handle("edge/dev1/cmd", raw)
    assert rig.job_updates("cfg-1")[-1]["error"]["code"] == "expired"
    assert (rig.db.job("cfg-1") or {})["state"] == "REJECTED"
    rig.now = NOW - BACK_S  # the command is inside its window by this clock
    rig.db.put("last_trusted_time", 0.0)  # even with no trusted time to compare against
    assert rig.intake.handle("edge/dev1/cmd", raw)
    last = rig.job_updates("cfg-1")[-1]
    assert (last["state"], last["error"]["code"]) == ("REJECTED", "expired") and rig.routed == []


def test_while_the_clock_is_behind_the_trusted_time_only_read_only_commands_run(rig: Rig) -> None:
    assert rig.intake.handle("edge/dev1/cmd", rig.command("p-1"))  # raises the trusted time to NOW - 10
    flags: list[bool] = []
    rig.intake._clock_flag_changed = lambda: flags.append(True)
    rig.now = NOW - BACK_S
    for i, type_ in enumerate(("config", "rollback", "remove", "cancel", "trust", "deploy")):
        cid = f"s-{i}"
        assert rig.intake.handle("edge/dev1/cmd", rig.command(cid, type_, issued=rig.now - 5))
        last = rig.job_updates(cid)[-1]
        assert (last["state"], last["error"]["code"]) == ("REJECTED", "clock_untrusted"), last
    assert [c.id for c in rig.routed] == ["p-1"]
    assert rig.intake.handle("edge/dev1/cmd", rig.command("p-2", issued=rig.now - 5))
    assert [c.id for c in rig.routed] == ["p-1", "p-2"]
    assert flags == [True] and rig.db.get("clock_untrusted")


def test_a_command_that_cannot_be_recorded_is_held_and_told_once_then_runs(rig: Rig) -> None:
    pages = rig.db._db.execute("PRAGMA page_count").fetchone()[0]
    rig.db._db.execute(f"PRAGMA max_page_count = {pages}")  # no page more: SQLite answers SQLITE_FULL ...
    with pytest.raises(sqlite3.OperationalError, match="full"):
        for i in range(100_000):  # ... once the free room in the existing pages is used up
            rig.db.put(f"filler-{i}", "x" * 100)
    # Larger than a page: recording it needs a new page, which SQLite now refuses.
    raw = rig.command("c-1", "config", params={"set": {}, "note": "x" * 8000})
    assert rig.intake.handle("edge/dev1/cmd", raw) is False
    assert rig.intake.handle("edge/dev1/cmd", raw) is False
    told = [d for t, d in rig.direct if t == "edge/dev1/jobs/c-1"]
    assert len(told) == 1 and told[0]["state"] == "QUEUED" and told[0]["delayed"]["code"] == "disk_full", told
    assert rig.db.job("c-1") is None and rig.routed == []
    rig.db._db.execute("PRAGMA max_page_count = 1073741823")
    assert rig.intake.handle("edge/dev1/cmd", raw) is True
    assert [c.id for c in rig.routed] == ["c-1"] and (rig.db.job("c-1") or {})["state"] == "SUCCEEDED"


def test_a_failure_after_recording_ends_the_job_failed_with_its_code(rig: Rig) -> None:
    rig.route_error = OSError(errno.ENOSPC, "No space left on device")
    assert rig.intake.handle("edge/dev1/cmd", rig.command("f-1", "config", params={"set": {}}))
    last = rig.job_updates("f-1")[-1]
    assert (last["state"], last["error"]["code"]) == ("FAILED", "disk_full")
    rig.route_error = OSError(errno.EMFILE, "Too many open files")
    assert rig.intake.handle("edge/dev1/cmd", rig.command("f-2"))
    assert rig.job_updates("f-2")[-1]["error"]["code"] == "resource_exhausted"
    rig.route_error = KeyError("bug")
    assert rig.intake.handle("edge/dev1/cmd", rig.command("f-3"))
    assert rig.job_updates("f-3")[-1]["error"]["code"] == "internal"
    assert {(rig.db.job(c) or {})["state"] for c in ("f-1", "f-2", "f-3")} == {"FAILED"}


def test_classify() -> None:
    assert errors.classify(sqlite3.OperationalError("database or disk is full")).code == errors.DISK_FULL
    assert errors.classify(OSError(errno.EDQUOT, "quota")).code == errors.DISK_FULL
    assert errors.classify(sqlite3.OperationalError("unable to open database file")).code == errors.RESOURCE_EXHAUSTED
    assert errors.classify(MemoryError()).code == errors.RESOURCE_EXHAUSTED
    assert errors.classify(ValueError("x")).code == errors.INTERNAL
    e = errors.RejectError(errors.EXPIRED, "x")
    assert errors.classify(e) is e


def test_rate_limit_passes_once_per_interval_and_counts_the_rest() -> None:
    t = [0.0]
    r = RateLimit(10.0, clock=lambda: t[0])
    assert r.allow() == 0
    assert [r.allow() for _ in range(5)] == [None] * 5
    t[0] = 10.0
    assert r.allow() == 5 and r.allow() is None


def test_a_replayed_id_is_answered_once_per_interval(rig: Rig) -> None:
    raw = rig.command("r-1")
    assert rig.intake.handle("edge/dev1/cmd", raw)
    for _ in range(20):
        assert rig.intake.handle("edge/dev1/cmd", raw)
    states = [(u["state"], (u.get("error") or {}).get("code")) for u in rig.job_updates("r-1")]
    assert states == [("QUEUED", None), ("SUCCEEDED", None), ("REJECTED", "replayed")], states
    assert [c.id for c in rig.routed] == ["r-1"]
