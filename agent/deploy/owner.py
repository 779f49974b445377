"""The one owner of what serves: every change of a model's serving version is a request to it.

Invariants:
- Only ``ServingOwner`` changes what serves: the ``serving``/``previous`` columns of the models
  table and the registry's entry for a model change together, here, under the owner's private
  lock, and nowhere else. No lock leaves this module; requests are applied one at a time, in the
  order they take the lock.
- Every request names the version it expects to replace (``None``: nothing serves). When the
  recorded serving version is not that one, the request is refused with ``serving_moved`` and
  changes nothing: a rollback judged against v2 never overwrites a v3 that a deploy activated
  meanwhile, and a remove never drops a version its sender did not see.
- Only a kept version (a row in the versions table) is activated: a rollback that loaded a
  version a deploy pruned meanwhile is refused.
- A refused request's loaded model is closed here: the caller hands it over with the request.
- A worker replacement (restart, memory recycle) swaps a worker of the same version and is
  applied only while the version it replaces is still the registry's entry.
- The registry and the table agree whenever the lock is free: a request whose write fails
  re-raises after leaving both as they were (the table is written first, in one transaction, and
  the registry changed after it), and closes the model it was handed. What follows a change
  (an activation's pruning of old versions) cannot undo it: its failure is logged.

Callers: the deploy runner (activate), the ops commands (rollback, remove), the supervisor
(probation verdicts, worker replacement, model down) and the daemon at start (restore).
docs/deployments.md ("One owner of what serves") says the same for readers of the docs.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from agent import errors
from agent.bundles.store import Store
from agent.serving.registry import Registry, ServingVersion
from agent.state import StateDB

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Applied:
    """What a request changed: the version that served before it and the one that serves now."""

    name: str
    replaced: int | None
    serving: int | None


class ServingOwner:
    """Applies activate, rollback, remove, restore and worker swaps one at a time."""

    def __init__(self, db: StateDB, registry: Registry, store: Store) -> None:
        self.db = db
        self.registry = registry
        self.store = store
        self._lock = threading.Lock()  # private: never handed out

    def serving(self, name: str) -> int | None:
        """The version recorded as serving ``name`` now (None when none)."""
        rec = self.db.model(name)
        return rec["serving"] if rec else None

    def snapshot(self, name: str) -> tuple[int | None, int | None]:
        """(recorded serving version, registry's serving version), read between two requests:
        equal whenever no request is half-applied."""
        with self._lock:
            sv = self.registry.get(name)
            return self.serving(name), (sv.version if sv is not None else None)

    def _check(self, name: str, expect: int | None, what: str) -> int | None:
        now = self.serving(name)
        if now != expect:
            raise errors.RejectError(errors.SERVING_MOVED, (
                f"{what} of {name} refused: expected v{expect} serving, "
                f"but {'v' + str(now) if now is not None else 'nothing'} serves"))
        return now

    @staticmethod
    def _refuse(sv: ServingVersion, e: errors.AgentError) -> errors.AgentError:
        sv.model.close()
        return e

    def activate(self, sv: ServingVersion, expect: int | None, previous: int | None,
                 backend: str | None = None, then: Callable[[], None] | None = None) -> Applied:
        """Serve ``sv`` in place of ``expect``; ``previous`` is what a later rollback goes back to.
        ``then`` runs before the next request (the deploy prunes old versions: none of them may
        be loaded by a rollback meanwhile)."""
        with self._lock:
            try:
                self._check(sv.name, expect, f"activation of v{sv.version}")
                if self.db.version(sv.name, sv.version) is None:  # pruned or removed while it loaded
                    raise errors.RejectError(errors.SERVING_MOVED,
                                             f"activation of {sv.name} v{sv.version} refused: no longer kept")
            except errors.AgentError as e:
                raise self._refuse(sv, e) from None
            try:
                self.db.set_serving(sv.name, sv.version, previous, backend)
            except Exception:  # nothing changed (the write rolled back): the model is not kept
                sv.model.close()
                raise
            self.registry.activate(sv)
            if then is not None:
                try:
                    then()
                except (OSError, sqlite3.Error) as e:  # housekeeping after the change: the change stands
                    log.warning("%s v%d serves; the clean-up after it failed (retried at the next "
                                "deploy): %s", sv.name, sv.version, e)
        log.info("%s: v%s → v%d", sv.name, expect, sv.version)
        return Applied(sv.name, expect, sv.version)

    def rollback(self, sv: ServingVersion, bad: int, keep_previous: bool = False) -> Applied:
        """Serve ``sv`` (a kept version) in place of ``bad``, only while ``bad`` still serves.
        ``keep_previous``: remember ``bad`` as the previous version (a rollback command can be
        undone); a verdict forgets it (it must not be rolled back to)."""
        return self.activate(sv, bad, bad if keep_previous else None)

    def restore(self, sv: ServingVersion) -> Applied:
        """At start, before any other request: serve ``sv`` (the recorded serving version, or the
        previous one when that failed to load)."""
        with self._lock:
            now = self.serving(sv.name)
            if now != sv.version:
                self.db.set_serving(sv.name, sv.version, None)
            self.registry.activate(sv)
        return Applied(sv.name, now, sv.version)

    def remove(self, name: str, expect: int | None) -> int:
        """Stop serving ``name`` and delete its kept versions and files (its high-water mark
        stays: no replays); returns the bytes freed."""
        with self._lock:
            self._check(name, expect, "removal")
            with self.db.tx() as db:
                db.execute("UPDATE models SET serving = NULL, previous = NULL, state = 'removed', "
                           "updated = ? WHERE name = ?", (time.time(), name))
                db.execute("DELETE FROM versions WHERE name = ?", (name,))
            self.registry.remove(name)  # after the table: a failed write leaves the model serving
            for vdir in sorted(self.store.versions.glob(f"{name}/*")):
                if vdir.name.isdigit():
                    self.store.remove_version(name, int(vdir.name))
            referenced = {sha for files in self.db.all_version_files() for sha in files.values()}
            return self.store.collect(referenced)

    def replace_worker(self, old: ServingVersion, fresh: ServingVersion) -> bool:
        """Let ``fresh`` (same version, new worker) serve in place of ``old`` while ``old`` is
        still the registry's entry; otherwise close ``fresh``. True when it serves."""
        with self._lock:
            if self.registry.get(old.name) is old:
                self.registry.activate(fresh)
                return True
        fresh.model.close()
        return False

    def take_down(self, sv: ServingVersion) -> bool:
        """Stop serving ``sv`` (a crash loop with nothing to roll back to) while it still serves;
        the models row says ``down`` (serving NULL, the version kept)."""
        with self._lock:
            if self.registry.get(sv.name) is not sv:
                return False
            self.db.set_down(sv.name, sv.version)  # the table says what the registry will: nothing serves
            self.registry.remove(sv.name)
            return True
