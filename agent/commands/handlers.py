"""Handlers for the fleet commands other than deploy (PROTOCOL.md command table).

Each handler runs after the command passed every check and was recorded (so a replay is never
executed twice); it returns the ``result`` of the final job update or raises an AgentError
whose code ends the job. Handlers that take more than a moment run on their own thread.

Each handler is an object built with only the parts it uses, named here as small protocols
(the daemon wires the real ones: ``StateDB``, ``ServingOwner``, ``JobReporter``, ``TrustStore``,
the deploy queue's ``cancel``): a rollback changes what serves only through the serving owner,
a cancel reaches a deploy only through the deploy queue, nothing here writes the database.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from agent import config, errors
from agent.bundles.trust import load_public_pem
from agent.fsutil import atomic_write
from agent.state import MODEL_DOWN

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from agent.deploy.versions import VersionLoader
    from agent.serving.registry import ServingVersion

log = logging.getLogger(__name__)
REMOTE_CONFIG_FILE = "remote-config.json"

Handler = Callable[[dict[str, Any]], dict[str, Any]]  # params -> the final job update's result


def model_param(params: dict[str, Any]) -> str:
    model = params.get("model")
    if not isinstance(model, str) or not model:
        raise errors.RejectError(errors.INVALID_COMMAND, "params.model (a model name) is required")
    return model


class ModelRecords(Protocol):
    """The models and versions tables, read only (``agent.state.StateDB``)."""

    def model(self, name: str) -> dict[str, Any] | None: ...
    def version(self, name: str, version: int) -> dict[str, Any] | None: ...
    def versions(self, name: str) -> list[int]: ...


class JobRecords(Protocol):
    """The jobs table, read only (``agent.state.StateDB``)."""

    def job(self, job_id: str) -> dict[str, Any] | None: ...


class ServingChanges(Protocol):
    """Requests to the one owner of what serves (``agent.deploy.owner.ServingOwner``): each
    names the version it expects to replace and is refused ``serving_moved`` if that moved."""

    def serving(self, name: str) -> int | None: ...
    def rollback(self, sv: ServingVersion, bad: int, keep_previous: bool = False) -> Any: ...
    def remove(self, name: str, expect: int | None) -> int: ...


class Events(Protocol):
    """Where device events go (``agent.deploy.jobs.JobReporter``)."""

    def event(self, kind: str, **fields: Any) -> None: ...


class KeyRing(Protocol):
    """The trusted keys (``agent.bundles.trust.TrustStore``)."""

    def key_ids(self) -> Iterable[str]: ...
    def apply(self, add: list[Ed25519PublicKey], remove: list[str]) -> list[str]: ...


class Rollback:
    """``rollback``: serve a kept version again (default: the previous one), validated before
    it serves; the version it replaces is kept as previous (a rollback can be undone)."""

    def __init__(self, models: ModelRecords, loader: VersionLoader, owner: ServingChanges, events: Events,
                 changed: Callable[[], None]) -> None:
        self.models = models
        self.loader = loader
        self.owner = owner
        self.events = events
        self.changed = changed  # what serves changed: the daemon publishes its status

    def __call__(self, params: dict[str, Any]) -> dict[str, Any]:
        name = model_param(params)
        rec = self.models.model(name)
        if rec is not None and rec["state"] == MODEL_DOWN:
            raise errors.RejectError(errors.ROLLBACK_REFUSED, f"{name} is down (its version failed every re-check "
                                     "and nothing served before it): deploy a newer version or remove it")
        if rec is None or rec["serving"] is None:
            raise errors.RejectError(errors.UNKNOWN_MODEL, f"model {name!r} is not deployed here")
        to = params.get("to_version", rec["previous"])
        if not isinstance(to, int) or isinstance(to, bool):
            raise errors.RejectError(errors.ROLLBACK_REFUSED, f"{name}: no previous version to roll back to")
        if to == rec["serving"]:
            raise errors.RejectError(errors.ROLLBACK_REFUSED, f"{name} v{to} is already serving")
        if self.models.version(name, to) is None:
            raise errors.RejectError(errors.ROLLBACK_REFUSED,
                                     f"{name} v{to} is not kept on this device (kept: {self.models.versions(name)})")
        try:
            sv = self.loader.load(name, to)
        except errors.AgentError as e:  # a deploy may have pruned it (or a remove taken it) meanwhile
            kept = self.models.version(name, to) is not None
            if not kept or self.owner.serving(name) != rec["serving"]:
                raise errors.RejectError(errors.SERVING_MOVED, f"{name} changed while v{to} loaded for the "
                                         f"rollback (v{to} kept: {kept})") from e
            raise
        self.owner.rollback(sv, rec["serving"], keep_previous=True)  # refused if it moved meanwhile
        self.events.event("rollback", model=name, frm=rec["serving"], to=to, reason="rollback command")
        self.changed()
        return {"name": name, "version": to, "backend": sv.backend, "previous": rec["serving"]}


class Remove:
    """``remove``: stop serving a model and delete its files; its high-water mark stays (no replays)."""

    def __init__(self, models: ModelRecords, owner: ServingChanges, changed: Callable[[], None]) -> None:
        self.models = models
        self.owner = owner
        self.changed = changed

    def __call__(self, params: dict[str, Any]) -> dict[str, Any]:
        name = model_param(params)
        rec = self.models.model(name)
        if rec is None or (rec["serving"] is None and not self.models.versions(name)):
            raise errors.RejectError(errors.UNKNOWN_MODEL, f"model {name!r} is not deployed here")
        freed = self.owner.remove(name, rec["serving"])  # refused if what serves moved meanwhile
        self.changed()
        return {"name": name, "freed_bytes": freed}


class Cancel:
    """``cancel``: end a queued or running deploy (the deploy runner reports it CANCELED)."""

    def __init__(self, cancel: Callable[[str, str], bool], jobs: JobRecords) -> None:
        self.cancel = cancel  # the deploy queue's: (job id, code) -> whether it was queued or running
        self.jobs = jobs

    def __call__(self, params: dict[str, Any]) -> dict[str, Any]:
        job = params.get("job")
        if not isinstance(job, str):
            raise errors.RejectError(errors.INVALID_COMMAND, "params.job (the id of a running job) is required")
        if not self.cancel(job, errors.CANCELED):
            rec = self.jobs.job(job)
            state = rec["state"] if rec else "unknown"
            raise errors.RejectError(errors.INVALID_COMMAND, f"job {job} is not running or queued (state {state})")
        return {"job": job, "canceled": True}


class RemoteConfig:
    """``config``: apply remotely settable keys atomically (all valid or none applied), persisted
    in ``path`` so that a restart applies them again."""

    def __init__(self, cfg: config.Config, path: Path, applied: Callable[[set[str]], None]) -> None:
        self.cfg = cfg  # changed in place: every part reads the one Config
        self.path = path
        self.applied = applied  # the keys changed: parts that hold copies take the new values

    def __call__(self, params: dict[str, Any]) -> dict[str, Any]:
        changes = params.get("set")
        if not isinstance(changes, dict) or not changes:
            raise errors.RejectError(errors.INVALID_COMMAND, 'params.set must be an object {"dotted.key": value}')
        refused = sorted(k for k in changes if k not in config.REMOTE_SETTABLE)
        if refused:
            raise errors.RejectError(errors.INVALID_COMMAND,
                                     f"not remotely settable: {', '.join(refused)} (allowed: {', '.join(sorted(config.REMOTE_SETTABLE))})")
        trial = _copy_config(self.cfg)
        try:
            for k, v in changes.items():
                config.set_dotted(trial, k, v)
        except errors.ConfigError as e:
            raise errors.RejectError(errors.INVALID_COMMAND, e.message) from e
        stored = load_remote_overrides(self.path)
        stored.update(changes)
        atomic_write(self.path, json.dumps(stored, indent=1, sort_keys=True).encode(), mode=0o640)
        for k, v in changes.items():
            config.set_dotted(self.cfg, k, v)
        self.applied(set(changes))
        return {k: _get_dotted(self.cfg, k) for k in sorted(stored)}


class TrustRotation:
    """``trust``: add and remove keys; the command itself already met the current threshold."""

    def __init__(self, keys: KeyRing, threshold: Callable[[], int], events: Events) -> None:
        self.keys = keys
        self.threshold = threshold
        self.events = events

    def __call__(self, params: dict[str, Any]) -> dict[str, Any]:
        add_pems = params.get("add") or []
        remove = params.get("remove") or []
        if not isinstance(add_pems, list) or not isinstance(remove, list) or not (add_pems or remove):
            raise errors.RejectError(errors.INVALID_COMMAND, "params.add (PEM list) and/or params.remove (key id list) required")
        keys = [load_public_pem(str(p).encode(), f"add[{i}]") for i, p in enumerate(add_pems)]
        remaining = len(set(self.keys.key_ids()) - {str(r) for r in remove}) + len(keys)
        threshold = self.threshold()
        if remaining < threshold:
            raise errors.RejectError(errors.INVALID_COMMAND,
                                     f"after this change fewer keys would remain than the threshold {threshold}")
        ids = self.keys.apply(keys, [str(r) for r in remove])
        self.events.event("trust_changed", keys=ids)
        return {"keys": ids}


def _copy_config(cfg: config.Config) -> config.Config:
    import copy

    return copy.deepcopy(cfg)


def _get_dotted(cfg: config.Config, key: str) -> Any:
    obj: Any = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def load_remote_overrides(path: Any) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.error("remote config %s unreadable (%s); ignoring it", path, e)
        return {}
    return doc if isinstance(doc, dict) else {}


def apply_remote_overrides(cfg: config.Config, path: Any) -> list[str]:
    """Apply persisted remote settings at start; a key that no longer validates is skipped."""
    applied = []
    for k, v in load_remote_overrides(path).items():
        if k not in config.REMOTE_SETTABLE:
            continue
        try:
            config.set_dotted(cfg, k, v)
            applied.append(k)
        except errors.ConfigError as e:
            log.error("remote config %s=%r no longer valid: %s", k, v, e.message)
    return applied
