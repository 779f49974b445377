"""Durable, bounded outbox: every device→fleet message except the live status passes through it.

Invariants:
- A row is deleted only after the broker acknowledged it (PUBACK); an agent restart re-sends what
  was not acknowledged (paho's own session lives in memory only).
- ``seq`` increases by one per stream and is assigned in the same transaction that stores the
  row, so it is contiguous across restarts (streams: status, heartbeat, telemetry, events, jobs).
- Bounded: past ``max_bytes`` heartbeats and telemetry are evicted oldest first; job updates
  and events are kept until a hard cap (``HARD_CAP_FACTOR`` × max_bytes), then oldest first.
  Every eviction is counted per kind and reported in the heartbeat.
- Job updates and events are committed with synchronous=FULL; telemetry with NORMAL (WAL).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

KIND_JOB = "job"
KIND_EVENT = "event"
KIND_HEARTBEAT = "heartbeat"
KIND_TELEMETRY = "telemetry"
EVICT_FIRST = (KIND_HEARTBEAT, KIND_TELEMETRY)  # cheap to lose: the next window says the same
DURABLE = (KIND_JOB, KIND_EVENT)
HARD_CAP_FACTOR = 1.25
BUSY_TIMEOUT_S = 5.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  topic TEXT NOT NULL, payload BLOB NOT NULL, qos INTEGER NOT NULL, retain INTEGER NOT NULL,
  kind TEXT NOT NULL, created REAL NOT NULL, size INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS seq (stream TEXT PRIMARY KEY, n INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS dropped (kind TEXT PRIMARY KEY, n INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class Row:
    id: int
    topic: str
    payload: bytes
    qos: int
    retain: bool
    kind: str
    created: float


def dumps(doc: dict[str, Any]) -> bytes:
    """Compact JSON: every byte counts on a cellular link."""
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


class Outbox:
    """SQLite-backed FIFO of messages waiting for their PUBACK."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._db = self._open()
        self._bytes = self._db.execute("SELECT COALESCE(SUM(size), 0) FROM messages").fetchone()[0]

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, check_same_thread=False, timeout=BUSY_TIMEOUT_S,
                             isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(SCHEMA)
            db.execute("SELECT COUNT(*) FROM messages").fetchone()
        except sqlite3.DatabaseError as e:
            db.close()
            quarantine = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            log.error("outbox %s is corrupt (%s); moved to %s and recreated", self.path, e, quarantine)
            self.path.rename(quarantine)
            for suffix in ("-wal", "-shm"):
                side = self.path.with_name(self.path.name + suffix)
                if side.exists():
                    side.rename(quarantine.with_name(quarantine.name + suffix))
            db = sqlite3.connect(self.path, check_same_thread=False, timeout=BUSY_TIMEOUT_S,
                                 isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)
            db.execute("INSERT OR REPLACE INTO dropped(kind, n) VALUES ('corrupt_db', 1)")
        return db

    def next_seq(self, stream: str) -> int:
        """Allocate the next ``seq`` of ``stream`` (for messages that bypass the queue)."""
        with self._lock:
            return self._next_seq_locked(stream)

    def _next_seq_locked(self, stream: str) -> int:
        row = self._db.execute(
            "INSERT INTO seq(stream, n) VALUES (?, 1) ON CONFLICT(stream) DO UPDATE SET n = n + 1 "
            "RETURNING n", (stream,)).fetchone()
        return int(row[0])

    def add(self, topic: str, doc: dict[str, Any], kind: str, stream: str | None = None,
            qos: int = 1, retain: bool = False) -> int:
        """Store ``doc`` (with its ``seq`` set) for delivery; returns the seq."""
        with self._lock:
            sync = "FULL" if kind in DURABLE else "NORMAL"
            self._db.execute(f"PRAGMA synchronous={sync}")
            self._db.execute("BEGIN IMMEDIATE")
            try:
                seq = self._next_seq_locked(stream or kind)
                doc["seq"] = seq
                payload = dumps(doc)
                self._db.execute(
                    "INSERT INTO messages(topic, payload, qos, retain, kind, created, size) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (topic, payload, qos, int(retain), kind, time.time(), len(payload) + len(topic)))
                self._bytes += len(payload) + len(topic)
                self._evict_locked()
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                self._bytes = self._db.execute("SELECT COALESCE(SUM(size), 0) FROM messages").fetchone()[0]
                raise
            self._changed.notify_all()
            return seq

    def _evict_locked(self) -> None:
        if self._bytes <= self.max_bytes:
            return
        for kinds, cap in ((EVICT_FIRST, self.max_bytes), (None, int(self.max_bytes * HARD_CAP_FACTOR))):
            while self._bytes > cap:
                if kinds is None:
                    row = self._db.execute("SELECT id, kind, size FROM messages ORDER BY id LIMIT 1").fetchone()
                else:
                    row = self._db.execute(
                        "SELECT id, kind, size FROM messages WHERE kind IN (?, ?) ORDER BY id LIMIT 1",
                        kinds).fetchone()
                if row is None:
                    break
                self._db.execute("DELETE FROM messages WHERE id = ?", (row[0],))
                self._db.execute("INSERT INTO dropped(kind, n) VALUES (?, 1) "
                                 "ON CONFLICT(kind) DO UPDATE SET n = n + 1", (row[1],))
                self._bytes -= row[2]

    def peek(self, after_id: int, limit: int) -> list[Row]:
        """Up to ``limit`` rows with id > ``after_id``, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, topic, payload, qos, retain, kind, created FROM messages "
                "WHERE id > ? ORDER BY id LIMIT ?", (after_id, limit)).fetchall()
        return [Row(r[0], r[1], bytes(r[2]), r[3], bool(r[4]), r[5], r[6]) for r in rows]

    def ack(self, ids: list[int]) -> None:
        """The broker acknowledged these rows: forget them."""
        if not ids:
            return
        with self._lock:
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("BEGIN")
            sizes = 0
            for i in ids:
                r = self._db.execute("DELETE FROM messages WHERE id = ? RETURNING size", (i,)).fetchone()
                if r is not None:
                    sizes += r[0]
            self._db.execute("COMMIT")
            self._bytes -= sizes
            self._changed.notify_all()

    def wait_change(self, timeout_s: float) -> None:
        with self._changed:
            self._changed.wait(timeout_s)

    def stats(self) -> dict[str, Any]:
        """Depth, age of the oldest row, bytes and drops per kind (for the heartbeat)."""
        with self._lock:
            depth, oldest = self._db.execute("SELECT COUNT(*), MIN(created) FROM messages").fetchone()
            dropped = dict(self._db.execute("SELECT kind, n FROM dropped").fetchall())
        return {"depth": depth, "oldest_s": round(time.time() - oldest, 1) if oldest else 0,
                "bytes": self._bytes, "dropped": sum(dropped.values()), "dropped_by_kind": dropped}

    def close(self) -> None:
        with self._lock:
            self._db.close()
