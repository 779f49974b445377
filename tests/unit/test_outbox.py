"""The durable, bounded outbox on a real SQLite file."""

from __future__ import annotations

import json
from pathlib import Path

from agent.telemetry.outbox import (
    HARD_CAP_FACTOR,
    KIND_EVENT,
    KIND_HEARTBEAT,
    KIND_JOB,
    KIND_TELEMETRY,
    Outbox,
    dumps,
)

BIG = 64 * 1024 * 1024


def _seqs(box: Outbox, topic: str | None = None) -> list[int]:
    return [json.loads(r.payload)["seq"] for r in box.peek(0, 10_000) if topic is None or r.topic == topic]


def test_seq_contiguous_per_stream_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    box = Outbox(path, BIG)
    assert [box.add("t/hb", {"n": i}, KIND_HEARTBEAT) for i in range(3)] == [1, 2, 3]
    assert [box.add("t/jobs/a", {"n": i}, KIND_JOB, stream="jobs") for i in range(2)] == [1, 2]
    assert box.next_seq("status") == 1
    box.close()

    box = Outbox(path, BIG)
    assert box.add("t/hb", {"n": 3}, KIND_HEARTBEAT) == 4
    assert box.add("t/jobs/a", {"n": 2}, KIND_JOB, stream="jobs") == 3
    assert box.next_seq("status") == 2
    assert _seqs(box, "t/hb") == [1, 2, 3, 4]
    assert _seqs(box, "t/jobs/a") == [1, 2, 3]
    box.close()


def test_seq_survives_ack(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", BIG)
    box.add("t", {}, KIND_EVENT)
    box.ack([r.id for r in box.peek(0, 10)])
    assert box.add("t", {}, KIND_EVENT) == 2
    box.close()


def test_peek_order_and_paging(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", BIG)
    kinds = [KIND_TELEMETRY, KIND_JOB, KIND_EVENT, KIND_HEARTBEAT, KIND_JOB]
    for i, k in enumerate(kinds):
        box.add(f"t/{i}", {"i": i}, k, qos=1, retain=(i == 2))
    rows = box.peek(0, 100)
    assert [json.loads(r.payload)["i"] for r in rows] == [0, 1, 2, 3, 4]
    assert [r.kind for r in rows] == kinds
    assert [r.retain for r in rows] == [False, False, True, False, False]
    assert all(r.qos == 1 for r in rows)
    first = box.peek(0, 2)
    assert [r.topic for r in first] == ["t/0", "t/1"]
    nxt = box.peek(first[-1].id, 2)
    assert [r.topic for r in nxt] == ["t/2", "t/3"]
    box.close()


def test_payload_is_compact_json_with_seq(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", BIG)
    box.add("t", {"a": "é", "b": [1, 2]}, KIND_EVENT)
    raw = box.peek(0, 1)[0].payload
    assert raw == dumps({"a": "é", "b": [1, 2], "seq": 1})
    assert b" " not in raw
    box.close()


def test_ack_deletes_and_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    box = Outbox(path, BIG)
    for i in range(4):
        box.add("t", {"i": i}, KIND_EVENT)
    rows = box.peek(0, 10)
    box.ack([rows[0].id, rows[2].id, 999_999])  # an unknown id is harmless
    assert [json.loads(r.payload)["i"] for r in box.peek(0, 10)] == [1, 3]
    assert box.stats()["depth"] == 2
    box.close()
    box = Outbox(path, BIG)
    assert [json.loads(r.payload)["i"] for r in box.peek(0, 10)] == [1, 3]
    assert box.stats()["bytes"] == sum(len(r.payload) + len(r.topic) for r in box.peek(0, 10))
    box.close()


def test_eviction_drops_cheap_kinds_first_and_keeps_jobs_until_hard_cap(tmp_path: Path) -> None:
    topic = "t"
    pad = "x" * 200
    size = len(dumps({"pad": pad, "seq": 1})) + len(topic)  # every row here is this size (seq < 10)
    max_bytes = size * 10
    box = Outbox(tmp_path / "o.db", max_bytes)
    # 4 heartbeats + 1 telemetry, then jobs/events until over the soft cap.
    for _ in range(4):
        box.add(topic, {"pad": pad}, KIND_HEARTBEAT)
    box.add(topic, {"pad": pad}, KIND_TELEMETRY)
    for i in range(5):
        box.add(topic, {"pad": pad}, KIND_JOB if i % 2 else KIND_EVENT, stream="durable")
    assert box.stats()["depth"] == 10 and box.stats()["dropped"] == 0

    # Over the soft cap: the oldest heartbeat/telemetry goes, durable rows stay.
    box.add(topic, {"pad": pad}, KIND_JOB, stream="durable")
    st = box.stats()
    assert st["depth"] == 10
    assert st["dropped_by_kind"] == {KIND_HEARTBEAT: 1}
    for _ in range(4):
        box.add(topic, {"pad": pad}, KIND_EVENT, stream="durable")
    st = box.stats()
    assert st["dropped_by_kind"] == {KIND_HEARTBEAT: 4, KIND_TELEMETRY: 1}
    kinds = [r.kind for r in box.peek(0, 100)]
    assert KIND_HEARTBEAT not in kinds and KIND_TELEMETRY not in kinds
    assert len(kinds) == 10

    # No cheap rows left: durable rows may exceed the soft cap up to the hard cap ...
    hard_rows = int(max_bytes * HARD_CAP_FACTOR) // size
    while box.stats()["depth"] < hard_rows:
        box.add(topic, {"pad": pad}, KIND_JOB, stream="durable")
    assert box.stats()["dropped"] == 5
    assert box.stats()["bytes"] > max_bytes
    first_before = box.peek(0, 1)[0].id
    # ... and past it the oldest durable row is dropped and counted.
    box.add(topic, {"pad": pad}, KIND_JOB, stream="durable")
    st = box.stats()
    assert st["depth"] == hard_rows
    assert st["bytes"] <= int(max_bytes * HARD_CAP_FACTOR)
    assert sum(st["dropped_by_kind"].get(k, 0) for k in (KIND_JOB, KIND_EVENT)) == 1
    assert box.peek(0, 1)[0].id > first_before
    box.close()


def test_a_fresh_heartbeat_evicts_older_heartbeats_not_jobs(tmp_path: Path) -> None:
    topic = "t"
    pad = "y" * 100
    size = len(dumps({"pad": pad, "seq": 1})) + len(topic)
    box = Outbox(tmp_path / "o.db", size * 3)
    box.add(topic, {"pad": pad}, KIND_JOB)
    box.add(topic, {"pad": pad}, KIND_JOB)
    box.add(topic, {"pad": pad}, KIND_HEARTBEAT)
    box.add(topic, {"pad": pad}, KIND_HEARTBEAT)
    assert [r.kind for r in box.peek(0, 10)] == [KIND_JOB, KIND_JOB, KIND_HEARTBEAT]
    assert box.stats()["dropped_by_kind"] == {KIND_HEARTBEAT: 1}
    box.close()


def test_corrupt_database_is_quarantined_and_recreated(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    garbage = b"this is not an sqlite database, just garbage bytes\x00\xff" * 200
    path.write_bytes(garbage)
    box = Outbox(path, BIG)
    quarantined = list(tmp_path.glob("outbox.db.corrupt-*"))
    assert len(quarantined) == 1
    assert quarantined[0].read_bytes() == garbage  # kept for a post-mortem, untouched
    st = box.stats()
    assert st["dropped_by_kind"].get("corrupt_db") == 1
    assert st["depth"] == 0
    # The new database works.
    assert box.add("t", {"x": 1}, KIND_JOB) == 1
    assert len(box.peek(0, 10)) == 1
    box.close()
    box = Outbox(path, BIG)
    assert len(box.peek(0, 10)) == 1
    box.close()


def test_stats_oldest_and_depth(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", BIG)
    assert box.stats()["depth"] == 0 and box.stats()["oldest_s"] == 0
    box.add("t", {}, KIND_HEARTBEAT)
    st = box.stats()
    assert st["depth"] == 1
    assert 0 <= st["oldest_s"] < 5
    box.close()
