"""Handlers for the fleet commands other than deploy (PROTOCOL.md command table).

Each handler runs after the command passed every check and was recorded (so a replay is never
executed twice); it returns the ``result`` of the final job update or raises an AgentError
whose code ends the job. Handlers that take more than a moment run on their own thread.
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Any, Protocol

from agent import config, errors
from agent.bundles.manifest import parse_document
from agent.bundles.trust import load_public_pem
from agent.deploy.runner import load_model, sealed_spec, validate
from agent.fsutil import atomic_write
from agent.serving.registry import ServingVersion

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

    from agent.bundles.store import Store
    from agent.bundles.trust import TrustStore
    from agent.deploy.jobs import JobReporter
    from agent.deploy.runner import DeployRunner, DeploySettings
    from agent.serving.registry import Registry
    from agent.state import StateDB

log = logging.getLogger(__name__)
REMOTE_CONFIG_FILE = "remote-config.json"
BENCH_MAX_ITERATIONS = 10_000
BENCH_MAX_S = 60.0


def _model_param(params: dict[str, Any]) -> str:
    model = params.get("model")
    if not isinstance(model, str) or not model:
        raise errors.RejectError(errors.INVALID_COMMAND, "params.model (a model name) is required")
    return model


class CommandHost(Protocol):
    """What the handlers use of the daemon that wires them (agent/daemon/ implements it): the
    seam is declared here, below the daemon, so that commands never import the daemon."""

    @property
    def cfg(self) -> config.Config: ...
    @property
    def state_dir(self) -> Path: ...
    @property
    def db(self) -> StateDB: ...
    @property
    def store(self) -> Store: ...
    @property
    def trust(self) -> TrustStore: ...
    @property
    def registry(self) -> Registry: ...
    @property
    def reporter(self) -> JobReporter: ...
    @property
    def backends(self) -> Sequence[Any]: ...
    @property
    def runner(self) -> DeployRunner: ...
    def deploy_settings(self) -> DeploySettings: ...
    def publish_status(self) -> None: ...
    def cancel_deploy(self, job_id: str, code: str) -> bool: ...
    def config_changed(self, keys: set[str]) -> None: ...


class Handlers:
    def __init__(self, agent: CommandHost) -> None:
        self.agent = agent

    # -- rollback / remove ---------------------------------------------------------------------
    def rollback(self, params: dict[str, Any]) -> dict[str, Any]:
        """Serve a kept version again (default: the previous one), validated before it serves."""
        a = self.agent
        name = _model_param(params)
        rec = a.db.model(name)
        if rec is None or rec["serving"] is None:
            raise errors.RejectError(errors.UNKNOWN_MODEL, f"model {name!r} is not deployed here")
        to = params.get("to_version", rec["previous"])
        if not isinstance(to, int) or isinstance(to, bool):
            raise errors.RejectError(errors.ROLLBACK_REFUSED, f"{name}: no previous version to roll back to")
        if to == rec["serving"]:
            raise errors.RejectError(errors.ROLLBACK_REFUSED, f"{name} v{to} is already serving")
        info = a.db.version(name, to)
        if info is None:
            raise errors.RejectError(errors.ROLLBACK_REFUSED,
                                     f"{name} v{to} is not kept on this device (kept: {a.db.versions(name)})")
        try:
            sv = self.load_version(name, to)
        except errors.AgentError as e:  # a deploy may have pruned it (or a remove taken it) meanwhile
            if a.db.version(name, to) is None or a.runner.owner.serving(name) != rec["serving"]:
                raise errors.RejectError(errors.SERVING_MOVED, f"{name} changed while v{to} loaded for the "
                                         f"rollback (v{to} kept: {a.db.version(name, to) is not None})") from e
            raise
        a.runner.owner.rollback(sv, rec["serving"], keep_previous=True)  # refused if it moved meanwhile
        a.reporter.event("rollback", model=name, frm=rec["serving"], to=to, reason="rollback command")
        a.publish_status()
        return {"name": name, "version": to, "backend": sv.backend, "previous": rec["serving"]}

    def load_version(self, name: str, version: int, validate_samples: bool = True) -> ServingVersion:
        """Load a kept version on its recorded backend and (by default) check it against its
        golden samples; a restart or a worker restart skips the check (it passed at deploy)."""
        a = self.agent
        info = a.db.version(name, version)
        if info is None:
            raise errors.RejectError(errors.UNKNOWN_MODEL, f"{name} v{version} is not installed")
        m = parse_document(info["manifest"])
        runtime, target = info["backend"].split(":", 1)
        vdir = a.store.version_dir(name, version)
        variant = m.variant(info["variant"])
        s = a.deploy_settings()
        model = load_model(a.backends, runtime, target, vdir / variant.main_file.path,
                           s, precision=variant.precision, sealed=sealed_spec(m, variant, vdir, s))
        if m.validation is not None and validate_samples:
            try:
                validate(model, vdir, m, variant)
            except errors.AgentError:
                model.close()
                raise
        return ServingVersion(name, version, info["variant"], model, manifest=m.raw)

    def remove(self, params: dict[str, Any]) -> dict[str, Any]:
        """Stop serving a model and delete its files; its high-water mark stays (no replays)."""
        a = self.agent
        name = _model_param(params)
        rec = a.db.model(name)
        if rec is None or (rec["serving"] is None and not a.db.versions(name)):
            raise errors.RejectError(errors.UNKNOWN_MODEL, f"model {name!r} is not deployed here")
        freed = a.runner.owner.remove(name, rec["serving"])  # refused if what serves moved meanwhile
        a.publish_status()
        return {"name": name, "freed_bytes": freed}

    # -- cancel --------------------------------------------------------------------------------
    def cancel(self, params: dict[str, Any]) -> dict[str, Any]:
        job = params.get("job")
        if not isinstance(job, str):
            raise errors.RejectError(errors.INVALID_COMMAND, "params.job (the id of a running job) is required")
        if not self.agent.cancel_deploy(job, errors.CANCELED):
            rec = self.agent.db.job(job)
            state = rec["state"] if rec else "unknown"
            raise errors.RejectError(errors.INVALID_COMMAND, f"job {job} is not running or queued (state {state})")
        return {"job": job, "canceled": True}

    # -- config --------------------------------------------------------------------------------
    def config(self, params: dict[str, Any]) -> dict[str, Any]:
        """Apply remotely settable keys atomically: all valid or none applied; persisted."""
        a = self.agent
        changes = params.get("set")
        if not isinstance(changes, dict) or not changes:
            raise errors.RejectError(errors.INVALID_COMMAND, 'params.set must be an object {"dotted.key": value}')
        refused = sorted(k for k in changes if k not in config.REMOTE_SETTABLE)
        if refused:
            raise errors.RejectError(errors.INVALID_COMMAND,
                                     f"not remotely settable: {', '.join(refused)} (allowed: {', '.join(sorted(config.REMOTE_SETTABLE))})")
        trial = _copy_config(a.cfg)
        try:
            for k, v in changes.items():
                config.set_dotted(trial, k, v)
        except errors.ConfigError as e:
            raise errors.RejectError(errors.INVALID_COMMAND, e.message) from e
        path = a.state_dir / REMOTE_CONFIG_FILE
        stored = load_remote_overrides(path)
        stored.update(changes)
        atomic_write(path, json.dumps(stored, indent=1, sort_keys=True).encode(), mode=0o640)
        for k, v in changes.items():
            config.set_dotted(a.cfg, k, v)
        a.config_changed(set(changes))
        return {k: _get_dotted(a.cfg, k) for k in sorted(stored)}

    # -- trust ---------------------------------------------------------------------------------
    def trust(self, params: dict[str, Any]) -> dict[str, Any]:
        """Rotate keys; the command itself already met the current threshold."""
        a = self.agent
        add_pems = params.get("add") or []
        remove = params.get("remove") or []
        if not isinstance(add_pems, list) or not isinstance(remove, list) or not (add_pems or remove):
            raise errors.RejectError(errors.INVALID_COMMAND, "params.add (PEM list) and/or params.remove (key id list) required")
        keys = [load_public_pem(str(p).encode(), f"add[{i}]") for i, p in enumerate(add_pems)]
        remaining = len(set(a.trust.key_ids()) - {str(r) for r in remove}) + len(keys)
        if remaining < a.cfg.trust.threshold:
            raise errors.RejectError(errors.INVALID_COMMAND,
                                     f"after this change fewer keys would remain than the threshold {a.cfg.trust.threshold}")
        ids = a.trust.apply(keys, [str(r) for r in remove])
        a.reporter.event("trust_changed", keys=ids)
        return {"keys": ids}

    # -- bench ---------------------------------------------------------------------------------
    def bench(self, params: dict[str, Any]) -> dict[str, Any]:
        """Latency of the serving version on its backend (and others that run its variant)."""
        import numpy as np

        a = self.agent
        name = _model_param(params)
        n = params.get("iterations", 100)
        if not isinstance(n, int) or not 1 <= n <= BENCH_MAX_ITERATIONS:
            raise errors.RejectError(errors.INVALID_COMMAND, f"iterations must be 1..{BENCH_MAX_ITERATIONS}")
        sv = a.registry.get(name)
        if sv is None:
            raise errors.RejectError(errors.UNKNOWN_MODEL, f"model {name!r} is not serving")
        m = parse_document(sv.manifest)
        vdir = a.store.version_dir(name, sv.version)
        if m.validation is None:
            raise errors.RejectError(errors.INVALID_COMMAND, f"{name} v{sv.version} has no golden inputs to bench with")
        with np.load(vdir / m.validation.inputs, allow_pickle=False) as z:
            inputs = {k: z[k] for k in z.files}
        wanted = params.get("backends", [sv.backend])
        all_targets = [t for b in a.backends for t in b.targets()]
        # Every variant whose files are on this device (the serving one first), on every wanted target.
        present = [v for v in m.variants if all((vdir / f.path).is_file() for f in v.files)]
        per_variant: dict[str, dict[str, Any]] = {}
        for variant in sorted(present, key=lambda v: v.id != sv.variant):
            out: dict[str, Any] = per_variant.setdefault(variant.id, {})
            for t in all_targets:
                if variant.format not in t.formats or not (wanted == "all" or t.id in wanted):
                    continue
                if not t.availability.usable:
                    out[t.id] = {"usable": False, "reason": t.availability.reason}
                    continue
                serving = t.id == sv.backend and variant.id == sv.variant
                model = sv.model if serving else None
                try:
                    if model is None:
                        s = a.deploy_settings()
                        model = load_model(a.backends, t.runtime, t.target, vdir / variant.main_file.path,
                                           s, precision=variant.precision, sealed=sealed_spec(m, variant, vdir, s))
                    out[t.id] = _time_model(model, inputs, n)
                    if model.details.get("compute_precision"):
                        out[t.id]["compute_precision"] = model.details["compute_precision"]
                except errors.AgentError as e:
                    out[t.id] = {"usable": False, "reason": e.message}
                finally:
                    if model is not None and model is not sv.model:
                        model.close()
        return {"model": name, "version": sv.version, "variant": sv.variant, "serving_backend": sv.backend,
                "iterations": n, "backends": per_variant.get(sv.variant, {}), "variants": per_variant}


def _time_model(model: Any, inputs: dict[str, Any], n: int) -> dict[str, Any]:
    model.infer(inputs)  # warm-up: first runs allocate
    times = []
    t_end = time.monotonic() + BENCH_MAX_S
    for _ in range(n):
        t0 = time.perf_counter()
        model.infer(inputs)
        times.append(time.perf_counter() - t0)
        if time.monotonic() > t_end:
            break
    times.sort()

    def pct(q: float) -> float:
        return round(times[min(len(times) - 1, int(q / 100 * len(times)))] * 1000, 3)

    return {"usable": True, "runs": len(times), "p50_ms": pct(50), "p90_ms": pct(90), "p99_ms": pct(99),
            "min_ms": round(times[0] * 1000, 3), "max_ms": round(times[-1] * 1000, 3)}


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
