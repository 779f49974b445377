"""Durable, bounded outbox: every device→fleet message except the live status passes through it.

Invariants:
- A row is deleted only after the broker acknowledged it (PUBACK); an agent restart re-sends what
  was not acknowledged (paho's own session lives in memory only).
- ``seq`` increases by one per stream and is assigned in the same transaction that stores the
  row, so it is contiguous across restarts (streams: status, heartbeat, telemetry, events, jobs).
- Bounded: past ``max_bytes`` heartbeats and telemetry are evicted oldest first; job updates
  and events are kept until a hard cap (``HARD_CAP_FACTOR`` × max_bytes), then oldest first.
  Every eviction is counted per kind and reported in the heartbeat. The files on disk are bounded
  too: SQLite reuses freed pages, and the WAL is checkpointed and truncated at a size that
  scales with ``max_bytes`` (``WAL_*`` constants).
- Job updates and events are committed with synchronous=FULL; telemetry with NORMAL (WAL).
- A corrupt database (at open or while running) is moved aside (``*.corrupt-<time>``, newest
  ``QUARANTINE_KEEP`` kept), recreated, counted as ``dropped.corrupt_db`` and listed in
  ``recoveries`` for the daemon to report as an event. The ``seq`` counters are salvaged from
  the damaged file when it can still be read; otherwise the recovery says ``seq_reset``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.mqtt.queue import dumps

log = logging.getLogger(__name__)

KIND_JOB = "job"
KIND_EVENT = "event"
KIND_HEARTBEAT = "heartbeat"
KIND_TELEMETRY = "telemetry"
EVICT_FIRST = (KIND_HEARTBEAT, KIND_TELEMETRY)  # cheap to lose: the next window says the same
DURABLE = (KIND_JOB, KIND_EVENT)
HARD_CAP_FACTOR = 1.25
BUSY_TIMEOUT_S = 5.0
PAGE_BYTES = 4096  # SQLite's default page size
WAL_MIN_PAGES = 16  # checkpoint the WAL at least this often (64 KiB) ...
WAL_MAX_PAGES = 1000  # ... and at most at SQLite's default (4 MiB)
WAL_FRACTION = 8  # WAL checkpoint threshold = max_bytes / WAL_FRACTION, within the bounds above
# SQLite's page cache for the queue (default 2 MiB): a FIFO read once after it is written, so the
# OS's file cache serves it as well; the default kept ≈ 2 MiB resident for good after a backlog.
CACHE_KIB = 256
QUARANTINE_KEEP = 2  # damaged databases kept for a post-mortem; older ones are deleted
CORRUPT = "corrupt_db"

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  topic TEXT NOT NULL, payload BLOB NOT NULL, qos INTEGER NOT NULL, retain INTEGER NOT NULL,
  kind TEXT NOT NULL, created REAL NOT NULL, size INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS messages_kind ON messages(kind, id);
CREATE TABLE IF NOT EXISTS seq (stream TEXT PRIMARY KEY, n INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS dropped (kind TEXT PRIMARY KEY, n INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS reported (job TEXT PRIMARY KEY, state TEXT NOT NULL, doc BLOB NOT NULL,
  ts REAL NOT NULL);
CREATE INDEX IF NOT EXISTS reported_ts ON reported(ts);
"""

AddListener = Callable[[str, str, dict[str, Any]], None]  # (kind, topic, doc)


@dataclass(frozen=True)
class Row:
    id: int
    topic: str
    payload: bytes
    qos: int
    retain: bool
    kind: str
    created: float


def _is_corruption(e: sqlite3.DatabaseError) -> bool:
    """True for a damaged file; False for transient trouble such as a busy lock or a full disk."""
    if type(e) is sqlite3.DatabaseError:  # "file is not a database", "disk image is malformed"
        return True
    msg = str(e).lower()
    return "malformed" in msg or "not a database" in msg or "corrupt" in msg


class Outbox:
    """SQLite-backed FIFO of messages waiting for their PUBACK."""

    def __init__(self, path: Path, max_bytes: int, on_add: AddListener | None = None) -> None:
        self.path = Path(path)
        self._max_bytes = max_bytes
        self.on_add = on_add
        self.recoveries: list[dict[str, Any]] = []  # corrupt databases replaced (for an event)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._db = self._open()
        self._bytes = self._sum_bytes()

    # -- opening and recovery ---------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, timeout=BUSY_TIMEOUT_S,
                             isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
            self._apply_wal_limits(db)
            db.executescript(SCHEMA)
            row = db.execute("PRAGMA quick_check(1)").fetchone()
            if row is None or row[0] != "ok":
                raise sqlite3.DatabaseError(f"quick_check: {row[0] if row else 'no answer'}")
            db.execute("SELECT COUNT(*) FROM messages").fetchone()
        except BaseException:
            db.close()
            raise
        return db

    def _apply_wal_limits(self, db: sqlite3.Connection) -> None:
        pages = max(WAL_MIN_PAGES, min(WAL_MAX_PAGES, self._max_bytes // PAGE_BYTES // WAL_FRACTION))
        db.execute(f"PRAGMA wal_autocheckpoint={int(pages)}")
        db.execute(f"PRAGMA journal_size_limit={int(pages) * PAGE_BYTES}")

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            return self._connect()
        except sqlite3.DatabaseError as e:
            if not _is_corruption(e):
                raise  # a lock or a permission problem is not a reason to throw the queue away
            return self._recover(e)

    def _recover(self, e: Exception) -> sqlite3.Connection:
        """Move the damaged database aside, start a new one, salvage ``seq`` if possible."""
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        quarantine = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{time.monotonic_ns() % 10**6:06d}")
        log.error("outbox %s is corrupt (%s); moved to %s and recreated", self.path, e, quarantine)
        if self.path.exists():
            self.path.rename(quarantine)
        for suffix in ("-wal", "-shm"):
            side = self.path.with_name(self.path.name + suffix)
            if side.exists():
                side.rename(quarantine.with_name(quarantine.name + suffix))
        seqs = self._salvage_seq(quarantine)
        ends = self._salvage_table(quarantine, "SELECT job, state, doc, ts FROM reported")
        self._prune_quarantine()
        db = self._connect()
        db.execute("BEGIN")
        for stream, n in seqs.items():
            db.execute("INSERT OR REPLACE INTO seq(stream, n) VALUES (?, ?)", (stream, n))
        db.executemany("INSERT OR IGNORE INTO reported(job, state, doc, ts) VALUES (?, ?, ?, ?)", ends)
        db.execute("INSERT INTO dropped(kind, n) VALUES (?, 1) ON CONFLICT(kind) DO UPDATE SET n = n + 1",
                   (CORRUPT,))
        db.execute("COMMIT")
        self.recoveries.append({"quarantined": quarantine.name, "error": str(e)[:200],
                                "seq_reset": not seqs})
        return db

    @staticmethod
    def _salvage_seq(path: Path) -> dict[str, int]:
        """The ``seq`` counters of a damaged database, if that table can still be read."""
        if not path.exists():
            return {}
        try:
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S)
            try:
                return {str(s): int(n) for s, n in db.execute("SELECT stream, n FROM seq").fetchall()}
            finally:
                db.close()
        except (sqlite3.Error, ValueError) as e:
            log.warning("outbox: seq counters not salvageable from %s: %s", path.name, e)
            return {}

    @staticmethod
    def _salvage_table(path: Path, query: str) -> list[Any]:
        """Rows of a damaged database's small table, if they can still be read (else none)."""
        if not path.exists():
            return []
        try:
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S)
            try:
                return list(db.execute(query).fetchall())
            finally:
                db.close()
        except sqlite3.Error as e:
            log.warning("outbox: %r not salvageable from %s: %s", query, path.name, e)
            return []

    def _prune_quarantine(self) -> None:
        olds = sorted(self.path.parent.glob(f"{self.path.name}.corrupt-*[0-9]"))
        for old in olds[:-QUARANTINE_KEEP]:
            for p in (old, old.with_name(old.name + "-wal"), old.with_name(old.name + "-shm")):
                p.unlink(missing_ok=True)

    def _recover_locked(self, e: sqlite3.DatabaseError) -> None:
        """A running database turned out corrupt: replace it (the caller holds the lock)."""
        with contextlib.suppress(sqlite3.Error):
            self._db.close()
        self._db = self._recover(e)
        self._bytes = self._sum_bytes()

    def _sum_bytes(self) -> int:
        return int(self._db.execute("SELECT COALESCE(SUM(size), 0) FROM messages").fetchone()[0])

    # -- settings ---------------------------------------------------------------------------
    @property
    def max_bytes(self) -> int:
        return self._max_bytes

    @max_bytes.setter
    def max_bytes(self, value: int) -> None:
        """Change the bound (a remote config change); evicts at once if now over it."""
        with self._lock:
            self._max_bytes = int(value)
            self._apply_wal_limits(self._db)
            self._db.execute("BEGIN IMMEDIATE")
            self._evict_locked()
            self._db.execute("COMMIT")

    # -- sequence numbers ---------------------------------------------------------------------
    def next_seq(self, stream: str) -> int:
        """Allocate the next ``seq`` of ``stream`` (for messages that bypass the queue)."""
        with self._lock:
            try:
                return self._next_seq_locked(stream)
            except sqlite3.DatabaseError as e:
                if not _is_corruption(e):
                    raise
                self._recover_locked(e)
                return self._next_seq_locked(stream)

    def _next_seq_locked(self, stream: str) -> int:
        row = self._db.execute(
            "INSERT INTO seq(stream, n) VALUES (?, 1) ON CONFLICT(stream) DO UPDATE SET n = n + 1 "
            "RETURNING n", (stream,)).fetchone()
        return int(row[0])

    def last_seq(self) -> dict[str, int]:
        """The last ``seq`` allocated per stream."""
        with self._lock:
            return {str(s): int(n) for s, n in self._db.execute("SELECT stream, n FROM seq").fetchall()}

    # -- queue ------------------------------------------------------------------------------
    def add(self, topic: str, doc: dict[str, Any], kind: str, stream: str | None = None,
            qos: int = 1, retain: bool = False, terminal_job: str | None = None) -> int:
        """Store ``doc`` (with its ``seq`` set) for delivery; returns the seq.

        ``terminal_job``: this is that job's final update; it is recorded in ``reported`` in the
        same transaction, so after a crash the agent knows whether the fleet was (or will be)
        told, and never reports a job's end twice or never.
        """
        with self._lock:
            try:
                seq = self._add_locked(topic, doc, kind, stream, qos, retain, terminal_job)
            except sqlite3.DatabaseError as e:
                if not _is_corruption(e):
                    raise
                self._recover_locked(e)
                seq = self._add_locked(topic, doc, kind, stream, qos, retain, terminal_job)
            self._changed.notify_all()
        listener = self.on_add
        if listener is not None:
            try:
                listener(kind, topic, doc)
            except Exception:  # metrics must never stop a message
                log.exception("outbox: add listener failed")
        return seq

    def _add_locked(self, topic: str, doc: dict[str, Any], kind: str, stream: str | None,
                    qos: int, retain: bool, terminal_job: str | None = None) -> int:
        sync = "FULL" if kind in DURABLE else "NORMAL"
        self._db.execute(f"PRAGMA synchronous={sync}")
        self._db.execute("BEGIN IMMEDIATE")
        try:
            seq = self._next_seq_locked(stream or kind)
            doc["seq"] = seq
            payload = dumps(doc)
            size = len(payload) + len(topic)
            self._db.execute(
                "INSERT INTO messages(topic, payload, qos, retain, kind, created, size) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (topic, payload, qos, int(retain), kind, time.time(), size))
            self._bytes += size
            if terminal_job is not None:
                self._db.execute("INSERT OR IGNORE INTO reported(job, state, doc, ts) VALUES (?, ?, ?, ?)",
                                 (terminal_job, str(doc.get("state")), payload, time.time()))
            self._evict_locked()
            self._db.execute("COMMIT")
        except BaseException:
            try:
                self._db.execute("ROLLBACK")
                self._bytes = self._sum_bytes()
            except sqlite3.Error:
                pass
            raise
        return seq

    def _evict_locked(self) -> None:
        if self._bytes <= self._max_bytes:
            return
        hard = int(self._max_bytes * HARD_CAP_FACTOR)
        # First the cheap kinds down to the soft bound; durable rows only past the hard cap.
        for kinds, cap in ((EVICT_FIRST, self._max_bytes), (None, hard)):
            while self._bytes > cap:
                if kinds is None:
                    row = self._db.execute("SELECT id, kind, size FROM messages ORDER BY id LIMIT 1").fetchone()
                else:  # the oldest of each cheap kind through the (kind, id) index, then the older
                    firsts = [self._db.execute("SELECT id, kind, size FROM messages WHERE kind = ? "
                                               "ORDER BY id LIMIT 1", (k,)).fetchone() for k in kinds]
                    row = min((r for r in firsts if r is not None), default=None)
                if row is None:
                    break
                self._db.execute("DELETE FROM messages WHERE id = ?", (row[0],))
                self._db.execute("INSERT INTO dropped(kind, n) VALUES (?, 1) "
                                 "ON CONFLICT(kind) DO UPDATE SET n = n + 1", (row[1],))
                self._bytes -= row[2]

    def reported(self, job: str) -> dict[str, Any] | None:
        """The final update recorded for ``job`` (None: its end was never reported)."""
        with self._lock:
            row = self._db.execute("SELECT doc FROM reported WHERE job = ?", (job,)).fetchone()
        return None if row is None else dict(json.loads(row[0]))

    def forget_reported(self, older_than_s: float, max_rows: int | None = None) -> int:
        """Drop final-update records older than ``older_than_s``, then the oldest past ``max_rows``.
        A record matters only until state.db holds the job's end (restart reconciliation copies it
        from here when a crash fell in between), which is moments after it is written."""
        with self._lock:
            n = self._db.execute("DELETE FROM reported WHERE ts < ?", (time.time() - older_than_s,)).rowcount
            if max_rows is not None:
                over = self._db.execute("SELECT COUNT(*) FROM reported").fetchone()[0] - max_rows
                if over > 0:
                    n += self._db.execute("DELETE FROM reported WHERE job IN "
                                          "(SELECT job FROM reported ORDER BY ts LIMIT ?)", (over,)).rowcount
        return int(n)

    def reported_sizes(self) -> dict[str, int]:
        """Final-update records by job state (for `agentctl status`)."""
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM reported GROUP BY state").fetchall()
        return {str(r[0]): int(r[1]) for r in rows}

    def peek(self, after_id: int, limit: int) -> list[Row]:
        """Up to ``limit`` rows with id > ``after_id``, oldest first."""
        with self._lock:
            try:
                rows = self._peek_locked(after_id, limit)
            except sqlite3.DatabaseError as e:
                if not _is_corruption(e):
                    raise
                self._recover_locked(e)
                rows = self._peek_locked(after_id, limit)
        return [Row(r[0], r[1], bytes(r[2]), r[3], bool(r[4]), r[5], r[6]) for r in rows]

    def _peek_locked(self, after_id: int, limit: int) -> list[Any]:
        return self._db.execute(
            "SELECT id, topic, payload, qos, retain, kind, created FROM messages "
            "WHERE id > ? ORDER BY id LIMIT ?", (after_id, limit)).fetchall()

    def ack(self, ids: list[int]) -> None:
        """The broker acknowledged these rows: forget them."""
        if not ids:
            return
        with self._lock:
            self._db.execute("PRAGMA synchronous=NORMAL")  # losing an ack re-sends: harmless
            self._db.execute("BEGIN")
            sizes = 0
            try:
                for i in ids:
                    r = self._db.execute("DELETE FROM messages WHERE id = ? RETURNING size", (i,)).fetchone()
                    if r is not None:
                        sizes += r[0]
                self._db.execute("COMMIT")
            except sqlite3.DatabaseError as e:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                if not _is_corruption(e):
                    raise
                self._recover_locked(e)
                sizes = 0
            self._bytes -= sizes
            self._changed.notify_all()

    def notify(self) -> None:
        """Wake a waiter of ``wait_change`` (an acknowledgement arrived)."""
        with self._changed:
            self._changed.notify_all()

    def wait_change(self, timeout_s: float) -> None:
        with self._changed:
            self._changed.wait(timeout_s)

    # -- small durable settings (the daily byte budget) ----------------------------------------
    def meta_get(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def meta_set(self, key: str, value: str) -> None:
        with self._lock:
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    # -- figures ----------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Depth, age of the oldest row, bytes and drops per kind (for the heartbeat)."""
        with self._lock:
            depth = self._db.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
            oldest = self._db.execute("SELECT created FROM messages ORDER BY id LIMIT 1").fetchone()
            dropped = dict(self._db.execute("SELECT kind, n FROM dropped").fetchall())
        return {"depth": depth, "oldest_s": round(time.time() - oldest[0], 1) if oldest else 0,
                "bytes": self._bytes, "max_bytes": self._max_bytes,
                "dropped": sum(dropped.values()), "dropped_by_kind": dropped}

    def depth(self) -> int:
        """Messages waiting for their PUBACK."""
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM messages").fetchone()[0])

    def disk_bytes(self) -> int:
        """Bytes the outbox occupies on disk (database, WAL and shared-memory files)."""
        total = 0
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                total += self.path.with_name(self.path.name + suffix).stat().st_size
        return total

    def close(self) -> None:
        with self._lock:
            self._db.close()
