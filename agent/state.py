"""The agent's state database (SQLite, WAL, synchronous=FULL).

Holds what must survive a restart or a power cut: commands seen (replay protection until they
expire) and their jobs with a timeline, installed versions and which one serves, the highest
version installed per model (so an old signed bundle cannot be replayed), the last trusted time.
Every change is one transaction, so a crash leaves the old or the new state.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

BUSY_TIMEOUT_S = 5.0
CACHE_KIB = 512  # SQLite's page cache (default 2 MiB): small tables, read through the OS's file cache
TRUSTED_TIME_KEY = "last_trusted_time"  # kv: the latest verified signed time; the clock never goes back past it
TERMINAL = ("SUCCEEDED", "FAILED", "REJECTED", "CANCELED", "TIMED_OUT")
MODEL_DOWN = "down"  # models.state of a model taken down (its serving version crash-looped, nothing to go back to)
LEGACY_RECOVERY_PREFIXES = ("job_version:", "resumes:")  # kv entries older databases kept per job id

SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
  id TEXT PRIMARY KEY, type TEXT NOT NULL, model TEXT, state TEXT NOT NULL, step TEXT,
  params TEXT NOT NULL, error TEXT, result TEXT, expires_at REAL NOT NULL,
  created REAL NOT NULL, updated REAL NOT NULL, version INTEGER, resumes INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS job_events (
  job TEXT NOT NULL, ts REAL NOT NULL, state TEXT NOT NULL, step TEXT, detail TEXT);
CREATE INDEX IF NOT EXISTS job_events_job ON job_events(job);
CREATE TABLE IF NOT EXISTS models (
  name TEXT PRIMARY KEY, serving INTEGER, previous INTEGER, highwater INTEGER NOT NULL DEFAULT 0,
  state TEXT NOT NULL DEFAULT 'serving', updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS versions (
  name TEXT NOT NULL, version INTEGER NOT NULL, variant TEXT NOT NULL, backend TEXT NOT NULL,
  manifest TEXT NOT NULL, files TEXT NOT NULL, installed REAL NOT NULL,
  PRIMARY KEY (name, version));
"""


def _j(v: Any) -> str | None:
    return None if v is None else json.dumps(v, separators=(",", ":"))


def _l(v: str | None) -> Any:
    return None if v is None else json.loads(v)


class StateDB:
    """Thread-safe access to state.db."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=BUSY_TIMEOUT_S,
                                   isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
        self._db.executescript(SCHEMA)
        self._migrate()

    def _migrate(self) -> None:
        """Bring an older database up to ``SCHEMA`` (idempotent): a deploy's recovery state (the
        version it installs, how often a restart resumed it) moved from kv entries
        (``job_version:<id>``, ``resumes:<id>``) into columns of ``jobs``."""
        with self.tx() as db:
            have = {r[1] for r in db.execute("PRAGMA table_info(jobs)")}
            if "version" not in have:
                db.execute("ALTER TABLE jobs ADD COLUMN version INTEGER")
            if "resumes" not in have:
                db.execute("ALTER TABLE jobs ADD COLUMN resumes INTEGER NOT NULL DEFAULT 0")
            for prefix, column in zip(LEGACY_RECOVERY_PREFIXES, ("version", "resumes"), strict=True):
                rows = db.execute("SELECT key, value FROM kv WHERE key GLOB ?", (prefix + "*",)).fetchall()
                db.executemany(f"UPDATE jobs SET {column} = ? WHERE id = ?",
                               [(int(json.loads(v)), k[len(prefix):]) for k, v in rows])
                db.executemany("DELETE FROM kv WHERE key = ?", [(k,) for k, _ in rows])

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def tx(self) -> _Tx:
        return _Tx(self)

    # -- kv ----------------------------------------------------------------------------------
    def get(self, key: str, default: Any = None) -> Any:
        with self._lock:
            row = self._db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def put(self, key: str, value: Any) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO kv(key, value) VALUES (?, ?)", (key, json.dumps(value)))

    def raise_trusted_time(self, t: float) -> float:
        """Raise the last trusted time (kv ``last_trusted_time``) to ``t`` if later; returns it.
        Fed by verified signed times only (a command's ``issued_at``, a manifest's ``created_at``)."""
        with self._lock:
            current = float(self.get(TRUSTED_TIME_KEY, 0.0))
            if t > current:
                self.put(TRUSTED_TIME_KEY, t)
                return t
            return current

    def trusted_time(self) -> float:
        return float(self.get(TRUSTED_TIME_KEY, 0.0))

    # -- jobs --------------------------------------------------------------------------------
    def job(self, job_id: str) -> dict[str, Any] | None:
        with self._lock:
            r = self._db.execute(
                "SELECT id, type, model, state, step, params, error, result, expires_at, created, updated, "
                "version, resumes FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if r is None:
            return None
        return {"id": r[0], "type": r[1], "model": r[2], "state": r[3], "step": r[4],
                "params": _l(r[5]), "error": _l(r[6]), "result": _l(r[7]), "expires_at": r[8],
                "created": r[9], "updated": r[10], "version": r[11], "resumes": r[12]}

    def set_job_version(self, job_id: str, version: int) -> None:
        """The version a deploy installs, once its manifest verified (recovery reads it)."""
        with self._lock:
            self._db.execute("UPDATE jobs SET version = ? WHERE id = ?", (version, job_id))

    def count_resume(self, job_id: str) -> int:
        """One more resume of an interrupted deploy after a restart; returns how many so far."""
        with self.tx() as db:
            db.execute("UPDATE jobs SET resumes = resumes + 1 WHERE id = ?", (job_id,))
            row = db.execute("SELECT resumes FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return 0 if row is None else int(row[0])

    def create_job(self, job_id: str, type_: str, model: str | None, params: dict[str, Any],
                   expires_at: float, state: str = "QUEUED") -> bool:
        """Record a new job; False when the id is already known (a replay)."""
        return self._insert_job(job_id, type_, model, state, params, None, expires_at)

    def record_refusal(self, job_id: str, type_: str, params: dict[str, Any], expires_at: float,
                       error: dict[str, Any]) -> bool:
        """Remember a signed command refused for good (e.g. ``expired``) under its id, so that no
        clock change revives it; False when the id is already known."""
        return self._insert_job(job_id, type_, None, "REJECTED", params, error, expires_at)

    def _insert_job(self, job_id: str, type_: str, model: str | None, state: str, params: dict[str, Any],
                    error: dict[str, Any] | None, expires_at: float) -> bool:
        now = time.time()
        try:
            with self.tx() as db:
                db.execute(
                    "INSERT INTO jobs(id, type, model, state, step, params, error, expires_at, created, updated) "
                    "VALUES (?, ?, ?, ?, NULL, ?, ?, ?, ?, ?)",
                    (job_id, type_, model, state, _j(params), _j(error), expires_at, now, now))
                db.execute("INSERT INTO job_events(job, ts, state, step, detail) VALUES (?, ?, ?, NULL, ?)",
                           (job_id, now, state, _j(error)))
        except sqlite3.IntegrityError:
            return False
        return True

    def update_job(self, job_id: str, state: str, step: str | None = None,
                   error: dict[str, Any] | None = None, result: dict[str, Any] | None = None,
                   detail: dict[str, Any] | None = None) -> None:
        """Persist a job's new state/step before the step runs (and its outcome after)."""
        now = time.time()
        with self.tx():
            self._db.execute("UPDATE jobs SET state = ?, step = ?, error = ?, result = ?, updated = ? WHERE id = ?",
                             (state, step, _j(error), _j(result), now, job_id))
            self._db.execute("INSERT INTO job_events(job, ts, state, step, detail) VALUES (?, ?, ?, ?, ?)",
                             (job_id, now, state, step, _j(detail or error)))

    def jobs(self, limit: int = 50) -> list[dict[str, Any]]:
        with self._lock:
            ids = [r[0] for r in self._db.execute(
                "SELECT id FROM jobs ORDER BY created DESC LIMIT ?", (limit,)).fetchall()]
        return [j for j in (self.job(i) for i in ids) if j is not None]

    def unfinished_jobs(self) -> list[dict[str, Any]]:
        with self._lock:
            ids = [r[0] for r in self._db.execute(
                f"SELECT id FROM jobs WHERE state NOT IN ({','.join('?' * len(TERMINAL))}) ORDER BY created",
                TERMINAL).fetchall()]
        return [j for j in (self.job(i) for i in ids) if j is not None]

    def job_timeline(self, job_id: str) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT ts, state, step, detail FROM job_events WHERE job = ? ORDER BY rowid",
                                    (job_id,)).fetchall()
        return [{"ts": r[0], "state": r[1], "step": r[2], "detail": _l(r[3])} for r in rows]

    def forget_expired_jobs(self, now: float | None = None, keep_s: float = 7 * 86400,
                            skew_s: float = 0.0, max_rows: int | None = None, batch: int = -1) -> int:
        """Drop finished jobs (with their timelines) whose command expired more than ``skew_s +
        keep_s`` ago, then the oldest finished expired ones past ``max_rows`` rows; at most
        ``batch`` in this transaction (-1: all). A job whose command has not expired plus the
        skew is never dropped: its id is what refuses a replay (commands valid over 30 days are
        refused, so every id becomes forgettable)."""
        now = time.time() if now is None else now
        done = f"state IN ({','.join('?' * len(TERMINAL))})"
        with self.tx() as db:
            ids = [r[0] for r in db.execute(
                f"SELECT id FROM jobs WHERE expires_at + ? < ? AND {done} LIMIT ?",
                (skew_s + keep_s, now, *TERMINAL, batch))]
            if max_rows is not None and (batch < 0 or len(ids) < batch):
                over = db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] - len(ids) - max_rows
                if batch >= 0:
                    over = min(over, batch - len(ids))
                if over > 0:
                    ids += [r[0] for r in db.execute(
                        f"SELECT id FROM jobs WHERE expires_at + ? < ? AND expires_at + ? >= ? AND {done} "
                        "ORDER BY expires_at LIMIT ?", (skew_s, now, skew_s + keep_s, now, *TERMINAL, over))]
            db.executemany("DELETE FROM job_events WHERE job = ?", [(i,) for i in ids])
            db.executemany("DELETE FROM jobs WHERE id = ?", [(i,) for i in ids])
        return len(ids)

    def sizes(self) -> dict[str, int]:
        """Rows per table that grows with traffic (for `agentctl status`)."""
        with self._lock:
            jobs = self._db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
            events = self._db.execute("SELECT COUNT(*) FROM job_events").fetchone()[0]
            kv = self._db.execute("SELECT COUNT(*) FROM kv").fetchone()[0]
        return {"jobs": int(jobs), "job_events": int(events), "kv": int(kv)}

    # -- models and versions -----------------------------------------------------------------
    def model(self, name: str) -> dict[str, Any] | None:
        with self._lock:
            r = self._db.execute("SELECT name, serving, previous, highwater, state FROM models WHERE name = ?",
                                 (name,)).fetchone()
        if r is None:
            return None
        return {"name": r[0], "serving": r[1], "previous": r[2], "highwater": r[3], "state": r[4]}

    def models(self) -> list[dict[str, Any]]:
        with self._lock:
            names = [r[0] for r in self._db.execute("SELECT name FROM models ORDER BY name").fetchall()]
        return [m for m in (self.model(n) for n in names) if m is not None]

    def version(self, name: str, version: int) -> dict[str, Any] | None:
        with self._lock:
            r = self._db.execute("SELECT variant, backend, manifest, files, installed FROM versions "
                                 "WHERE name = ? AND version = ?", (name, version)).fetchone()
        if r is None:
            return None
        return {"name": name, "version": version, "variant": r[0], "backend": r[1],
                "manifest": _l(r[2]), "files": _l(r[3]), "installed": r[4]}

    def versions(self, name: str) -> list[int]:
        with self._lock:
            return [r[0] for r in self._db.execute(
                "SELECT version FROM versions WHERE name = ? ORDER BY version", (name,)).fetchall()]

    def all_version_files(self) -> list[dict[str, str]]:
        with self._lock:
            return [_l(r[0]) for r in self._db.execute("SELECT files FROM versions").fetchall()]

    def record_install(self, name: str, version: int, variant: str, backend: str,
                       manifest: dict[str, Any], files: dict[str, str]) -> None:
        """An installed (verified, on disk) version. The high-water mark rises only when a
        version serves (set_serving): a version that fails validation can be fixed and
        re-published under the same number."""
        now = time.time()
        with self.tx():
            self._db.execute("INSERT OR REPLACE INTO versions(name, version, variant, backend, manifest, files, installed) "
                             "VALUES (?, ?, ?, ?, ?, ?, ?)",
                             (name, version, variant, backend, _j(manifest), _j(files), now))
            self._db.execute("INSERT INTO models(name, serving, previous, highwater, state, updated) "
                             "VALUES (?, NULL, NULL, 0, 'installing', ?) ON CONFLICT(name) DO UPDATE SET "
                             "updated = excluded.updated",
                             (name, now))

    def set_serving(self, name: str, version: int, previous: int | None, backend: str | None = None) -> None:
        with self.tx():
            self._db.execute("UPDATE models SET serving = ?, previous = ?, state = 'serving', "
                             "highwater = MAX(highwater, ?), updated = ? WHERE name = ?",
                             (version, previous, version, time.time(), name))
            if backend is not None:
                self._db.execute("UPDATE versions SET backend = ? WHERE name = ? AND version = ?",
                                 (backend, name, version))

    def set_down(self, name: str, version: int) -> bool:
        """``version`` stopped serving with nothing to fall back to (a crash loop): nothing serves
        ``name`` now, the version stays kept, the row says ``down`` (a restart does not load it
        again). False when ``version`` was not the recorded serving one (nothing changed)."""
        with self._lock:
            cur = self._db.execute("UPDATE models SET serving = NULL, state = ?, updated = ? "
                                   "WHERE name = ? AND serving = ?", (MODEL_DOWN, time.time(), name, version))
        return cur.rowcount == 1

    def delete_version(self, name: str, version: int) -> None:
        with self._lock:
            self._db.execute("DELETE FROM versions WHERE name = ? AND version = ?", (name, version))


class _Tx:
    def __init__(self, db: StateDB) -> None:
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db._lock.acquire()
        self.db._db.execute("BEGIN IMMEDIATE")
        return self.db._db

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        """Commit, or roll back on any error (a full disk included, at the commit too): a failed
        write never leaves the connection inside a transaction that blocks every later one."""
        conn = self.db._db
        try:
            if exc_type is None:
                try:
                    conn.execute("COMMIT")
                    return
                except sqlite3.Error:
                    if conn.in_transaction:
                        with contextlib.suppress(sqlite3.Error):
                            conn.execute("ROLLBACK")
                    raise
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
        finally:
            self.db._lock.release()
