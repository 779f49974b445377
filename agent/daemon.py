"""The daemon's composition root: build the parts, start them, stop them in reverse order.

Start: config → state → trust (refused if writable by others) → serving models restored →
local API and control socket → MQTT (birth status, subscriptions) → telemetry timers → READY.
Stop (SIGTERM/SIGINT): STOPPING → no new commands → in-flight requests and the running deploy
step finish (bounded) → final status ``online: false`` → disconnect → state closed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import sys
import threading
import time
import types
import uuid
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout  # not the builtin before Python 3.11
from pathlib import Path
from typing import Any

from agent import __version__, config, errors, logs
from agent.backends.probed import probed_backends
from agent.bundles.fetch import fetcher_from_config
from agent.bundles.store import Store
from agent.bundles.trust import TrustStore, describe_writable, folder_problem
from agent.commands.handlers import REMOTE_CONFIG_FILE, Handlers, apply_remote_overrides
from agent.commands.intake import CommandIntake
from agent.commands.verify import Command, CommandVerifier
from agent.deploy.jobs import JobReporter
from agent.deploy.probation import ProbationSettings, Supervisor
from agent.deploy.runner import DeployContext, DeployRunner, DeploySettings, check_clock, recheck
from agent.mqtt.connection import Connection
from agent.mqtt.topics import Topics
from agent.retention import Sweeper
from agent.sdnotify import Notifier
from agent.serving.admission import Limits
from agent.serving.control import ControlServer
from agent.serving.registry import Registry
from agent.state import StateDB
from agent.telemetry.budget import DailyBudget
from agent.telemetry.metrics import Metrics
from agent.telemetry.outbox import Outbox
from agent.telemetry.reporting import TelemetryReporter, manifest_max_p95_ms
from agent.telemetry.system import release_free_memory
from agent.telemetry.windows import LatencyWindows
from agent.timeutil import now_rfc3339

log = logging.getLogger("agent.daemon")

STOP_TIMEOUT_S = 5.0  # SIGTERM to exit, in-flight work included
STOP_FLUSH_S = 1.0  # at most this long of the stop sends what is still queued (the last window)
REGISTRY_CLOSE_S = 2.0  # at most this long of the stop waits for in-flight calls before models close
LOCAL_OP_TIMEOUT_S = 120.0  # an agentctl rollback/remove/config waits this long for the ops worker
BENCH_OP_TIMEOUT_S = 280.0  # agentctl bench: under the control client's 300 s; the handler bounds each run
LOCAL_BENCH_MAX = 4  # agentctl bench calls running or waiting on their own worker; more are "busy"
LOCAL_JOB_KEEP_S = 7 * 86400  # local jobs are kept (for `agentctl jobs`) like fleet jobs
DEPLOY_QUEUE_MAX = 64
TICK_LOG_INTERVAL_S = 60.0  # a failing heartbeat or window (a full disk) is logged once per this
EXIT_CONFIG = 2
EXIT_UNSAFE = 3


class Agent:
    """All long-lived parts of one running agent."""

    def __init__(self, cfg: config.Config) -> None:
        self.cfg = cfg
        self.started = time.time()
        self.boot_id = uuid.uuid4().hex[:16]
        self.state_dir = Path(cfg.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        self.topics = Topics(cfg.mqtt.topic_prefix, cfg.device_id)
        self.db = StateDB(self.state_dir / "state.db")
        self.outbox = Outbox(self.state_dir / "outbox.db", int(cfg.telemetry.outbox_max_mb * 2**20))
        self.store = Store(self.state_dir / "store")
        applied = apply_remote_overrides(cfg, self.state_dir / REMOTE_CONFIG_FILE)
        if applied:
            log.info("remote config applied: %s", ", ".join(applied))
        self.trust = TrustStore.load(Path(cfg.trust.keys_dir))
        self.windows = LatencyWindows()
        # Each call recorded once, by the windows: /metrics reads its totals from them at scrape time.
        bc = cfg.backends
        self.registry = Registry(observer=self.windows.observe,
                                 limits=Limits(bc.max_batch, bc.max_inflight, bc.max_queue, bc.infer_timeout_s))
        self.reporter = JobReporter(self.db, self.outbox, self.topics)
        # Targets listed by a child process (cached under state_dir): no runtime import in an idle daemon.
        self.backends = probed_backends(self._backends(), self.state_dir / "cache" / "backend-targets.json")
        self.profile = self._profile()
        self.runner = DeployRunner(self.db, self.store, fetcher_from_config(cfg.downloads), lambda: self.trust, self.registry,
                                   self.backends, self.reporter, self.deploy_settings, probation=self._begin_probation)
        self.verifier = CommandVerifier(self.trust, cfg.trust.threshold, cfg.device_id, cfg.groups,
                                        cfg.trust.max_clock_skew_s, cfg.trust.require_signed_commands)
        subs = [self.topics.cmd] + [self.topics.group_cmd(g) for g in cfg.groups]
        self.mqtt = Connection(cfg.mqtt, cfg.mqtt.client_id or cfg.device_id, subs, self.topics.status,
                               birth=lambda: self.status_doc(True), will=lambda: self.status_doc(False, "connection lost"),
                               outbox=self.outbox, on_command=self.on_command)
        self.intake = CommandIntake(self.verifier, self.db, self.reporter, self._route, self.mqtt.publish_now,
                                    clock_flag_changed=lambda: self.publish_status())
        self.reporter.publish_now = self.mqtt.publish_now
        self.sweeper = Sweeper(self.db, self.outbox, cfg.retention, lambda: self.verifier.max_clock_skew_s)
        self._telemetry_parts()
        self.notifier = Notifier()
        self.stopping = threading.Event()
        self._deploys: queue.Queue[DeployContext | None] = queue.Queue(DEPLOY_QUEUE_MAX)
        self._current: DeployContext | None = None
        self._queued: dict[str, DeployContext] = {}
        self._queue_lock = threading.Lock()
        self.handlers = Handlers(self)
        self.supervisor = Supervisor(self.registry, self.db, self.reporter,
                                     lambda name, v: self.handlers.load_version(name, v, validate_samples=False),
                                     self.runner.activation_lock, self.probation_settings, self.publish_status,
                                     recheck=lambda name, v: recheck(self.handlers.load_version(name, v, validate_samples=False),
                                                                     self.store.version_dir(name, v)))
        self._ops = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ops")  # fleet and admin changes, in order
        # agentctl bench (any control-socket user): its own worker and bound, so local read-only
        # work never delays a fleet rollback or remove on the ops worker.
        self._bench = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench")
        self._bench_slots = threading.BoundedSemaphore(LOCAL_BENCH_MAX)
        self._threads: list[threading.Thread] = []
        self._tick_log = logs.RateLimit(TICK_LOG_INTERVAL_S)  # heartbeat/window failures
        self.kserve: Any = None
        self.control: ControlServer | None = None

    # -- parts -------------------------------------------------------------------------------
    def _telemetry_parts(self) -> None:
        """Byte budget, Prometheus metrics and the heartbeat/window reporter (docs/telemetry.md)."""
        t = self.cfg.telemetry
        self.budget = DailyBudget(int(t.daily_budget_mb * 2**20))
        self.mqtt.drain_rate_per_s = t.drain_rate_per_s
        self.mqtt.on_sent = self.budget.record
        self.telemetry = TelemetryReporter(
            self.cfg, self.outbox, self.topics, self.windows, self.budget, self.reporter.event,
            lambda: self.mqtt.state.to_dict(), slo_for=self._model_p95_limit, started=self.started)
        self.metrics = Metrics(self.outbox.stats, lambda: self.mqtt.state.to_dict(),
                               budget=self.telemetry.budget_status, sent=lambda: dict(self.mqtt.sent),
                               windows=self.windows, refused=lambda: self.intake.refused())
        self.outbox.on_add = self.metrics.on_outbox_add

    def _model_p95_limit(self, name: str) -> float | None:
        sv = self.registry.get(name)
        return manifest_max_p95_ms(sv.manifest) if sv is not None else None

    @staticmethod
    def _backends() -> list[Any]:
        from agent.backends import available_backends

        return available_backends()

    def _profile(self) -> str:
        """Detect the hardware; keep its profile's ranking (``self.policy``) and fingerprint for selection."""
        self.policy: Any = None
        self.hw_facts: dict[str, Any] | None = None
        try:
            # hw_report_once: the detection code is dropped afterwards (~0.3 MB of an idle daemon)
            from agent.backends.selection import policy_from_report
            from agent.hardware import hw_report_once

            rep = hw_report_once("/", self.cfg.hardware.profiles_dirs, self.cfg.hardware.profile, probe_runtimes=False)
            self.policy = policy_from_report(rep)
            self.hw_facts = rep.get("facts")
            return str(rep.get("profile", "unknown"))
        except Exception as e:  # detection must never stop the agent
            log.warning("hardware detection failed: %s", e)
            return "unknown"

    def deploy_settings(self) -> DeploySettings:
        c = self.cfg
        return DeploySettings(threshold=c.trust.threshold, max_clock_skew_s=c.trust.max_clock_skew_s,
                              prefer=tuple(c.backends.prefer), threads=c.backends.threads,
                              allow_spinning=c.backends.allow_spinning, keep_versions=c.storage.keep_versions,
                              max_disk_bytes=int(c.storage.max_disk_mb * 2**20),
                              isolation=c.backends.isolation, infer_timeout_s=c.backends.infer_timeout_s,
                              autotune=c.backends.autotune, policy=self.policy, hw_facts=self.hw_facts,
                              cache_dir=str(self.state_dir / "cache"))

    def probation_settings(self) -> ProbationSettings:
        d = self.cfg.deploy
        return ProbationSettings(d.probation_s, d.probation_max_errors, d.probation_max_error_ratio,
                                 self.cfg.backends.worker_memory_max_mb)

    def _begin_probation(self, ctx: DeployContext, result: dict[str, Any]) -> bool:
        if self.cfg.deploy.probation_s <= 0 or ctx.previous is None or ctx.manifest is None:
            return False
        self.supervisor.begin(ctx.job_id, ctx.model, ctx.manifest.version, ctx.previous, result)
        return True

    # -- status ------------------------------------------------------------------------------
    def models_status(self) -> list[dict[str, Any]]:
        out = []
        for rec in self.db.models():
            sv = self.registry.get(rec["name"])
            if sv is None and rec["state"] == "removed":
                continue  # its row stays only for the version high-water mark
            entry: dict[str, Any] = {"name": rec["name"], "version": rec["serving"], "state": rec["state"] if sv else "not_loaded",
                                     "previous": rec["previous"]}
            if sv is not None:
                entry.update(variant=sv.variant, backend=sv.backend)
                if self.supervisor.in_probation(rec["name"]):
                    entry["state"] = "probation"
            out.append(entry)
        return out

    def status_doc(self, online: bool, reason: str = "") -> dict[str, Any]:
        doc: dict[str, Any] = {"v": 1, "device": self.cfg.device_id, "online": online, "ts": now_rfc3339(),
                               "seq": self.outbox.next_seq("status"), "agent": __version__, "boot_id": self.boot_id,
                               "profile": self.profile, "groups": list(self.cfg.groups),
                               "models": self.models_status()}
        if reason:
            doc["reason"] = reason
        clock = self.db.get("clock_untrusted")
        if clock:
            doc["clock"] = "untrusted"
            if isinstance(clock, str):
                doc["clock_reason"] = clock
        return doc

    def publish_status(self) -> None:
        self.mqtt.publish_status(self.status_doc(True))

    def full_status(self) -> dict[str, Any]:
        """What `agentctl status` and the `status` command report."""
        return {"device": self.cfg.device_id, "agent": __version__, "boot_id": self.boot_id,
                "uptime_s": round(time.time() - self.started, 1), "profile": self.profile,
                "groups": self.cfg.groups, "mqtt": self.mqtt.state.to_dict(), "outbox": self.outbox.stats(),
                "budget": self.telemetry.budget_status(),
                "commands": {"refused_unauthenticated": self.intake.refused()},
                "retention": self.sweeper.status(),
                "models": self.models_status(), "config": self.cfg.source,
                "api": self.kserve.address if self.kserve else None,
                "deploying": self._current.job_id if self._current else None}

    # -- commands ----------------------------------------------------------------------------
    def on_command(self, topic: str, raw: bytes, dup: bool = False) -> bool:
        """Verify, record and route one command (on the command worker, never the network
        thread). True once it may be acknowledged to the broker (agent/commands/intake.py)."""
        return self.intake.handle(topic, raw, dup)

    def _route(self, cmd: Command) -> None:
        p = cmd.params
        if cmd.type == "ping":
            self.reporter.update(cmd.id, "ping", "SUCCEEDED", result={"pong": now_rfc3339()})
        elif cmd.type == "status":
            self.reporter.update(cmd.id, "status", "SUCCEEDED", result=self.full_status())
        elif cmd.type == "deploy":
            model, url = p.get("model"), p.get("manifest_url")
            if not isinstance(model, str) or not isinstance(url, str):
                raise errors.RejectError(errors.INVALID_COMMAND, "deploy needs params.model and params.manifest_url (strings)")
            pin = p.get("backend")
            sha = p.get("manifest_sha256")
            self.submit_deploy(DeployContext(cmd.id, model, url, sha if isinstance(sha, str) else None,
                                             pin if isinstance(pin, str) else None))
        elif cmd.type in ("config", "trust", "cancel"):
            result = getattr(self.handlers, cmd.type)(p)
            self.reporter.update(cmd.id, cmd.type, "SUCCEEDED", result=result)
        elif cmd.type in ("rollback", "remove", "bench"):
            self.reporter.update(cmd.id, cmd.type, "IN_PROGRESS")
            self._ops.submit(self._run_op, cmd)
        else:  # the verifier knows every type; this is a bug guard
            raise errors.RejectError(errors.UNKNOWN_COMMAND, f"command type {cmd.type!r} is not supported by agent {__version__}")

    def _run_op(self, cmd: Command) -> None:
        try:
            result = getattr(self.handlers, cmd.type)(cmd.params)
        except errors.AgentError as e:
            self.reporter.update(cmd.id, cmd.type, "REJECTED" if isinstance(e, errors.RejectError) else "FAILED", error=e)
        except Exception as e:
            log.exception("%s %s failed", cmd.type, cmd.id)
            self.reporter.update(cmd.id, cmd.type, "FAILED", error=errors.AgentError(errors.INTERNAL, f"{type(e).__name__}: {e}"))
        else:
            self.reporter.update(cmd.id, cmd.type, "SUCCEEDED", result=result)

    def _supersede(self, new: DeployContext) -> None:
        """A newer deploy of the same model cancels the running or queued one (CANCELED, superseded)."""
        with self._queue_lock:
            olds = [c for c in self._queued.values() if c.model == new.model]
        cur = self._current
        if cur is not None and cur.model == new.model and cur not in olds:
            olds.append(cur)
        for old in olds:
            old.cancel_code = errors.SUPERSEDED
            old.cancel.set()

    def submit_deploy(self, ctx: DeployContext) -> None:
        """Queue a deploy (a fleet command, ``agentctl install`` or a resumed one); a newer deploy
        of the same model supersedes the running or queued one."""
        self._supersede(ctx)
        with self._queue_lock:  # registered before the worker can see it, so it can be canceled
            self._queued[ctx.job_id] = ctx
        try:
            self._deploys.put_nowait(ctx)
        except queue.Full as e:
            with self._queue_lock:
                self._queued.pop(ctx.job_id, None)
            raise errors.RetryableError("busy", f"{DEPLOY_QUEUE_MAX} deploys already queued") from e

    def cancel_deploy(self, job_id: str, code: str) -> bool:
        with self._queue_lock:
            ctx = self._queued.get(job_id)
        if ctx is None and self._current is not None and self._current.job_id == job_id:
            ctx = self._current
        if ctx is None:
            return False
        ctx.cancel_code = code
        ctx.cancel.set()
        return True

    def config_changed(self, keys: set[str]) -> None:
        """Apply remotely changed settings that live parts hold copies of."""
        if "groups" in keys:
            self.verifier.groups = self.cfg.groups
            self.mqtt.set_subscriptions([self.topics.cmd] + [self.topics.group_cmd(g) for g in self.cfg.groups])
        if "telemetry.outbox_max_mb" in keys:
            self.outbox.max_bytes = int(self.cfg.telemetry.outbox_max_mb * 2**20)
        if "telemetry.drain_rate_per_s" in keys:
            self.mqtt.drain_rate_per_s = self.cfg.telemetry.drain_rate_per_s

    def _deploy_loop(self) -> None:
        while True:
            ctx = self._deploys.get()
            if ctx is None or self.stopping.is_set():
                return
            with self._queue_lock:
                self._queued.pop(ctx.job_id, None)
            self._current = ctx
            try:
                self.runner.run(ctx)
            finally:
                self._current = None
            self.publish_status()

    # -- restore -----------------------------------------------------------------------------
    def restore(self) -> list[DeployContext]:
        """Bring back what served, then settle every job the last run left unfinished.

        Returns the deploys to run again (their downloads resume from the partial files).
        """
        clean = bool(self.db.get("clean_shutdown", True))
        self.db.put("clean_shutdown", False)
        for rec in self.db.models():
            for version in (rec["serving"], rec["previous"]):
                if version is None or self.db.version(rec["name"], version) is None:
                    continue
                try:
                    sv = self.handlers.load_version(rec["name"], version, validate_samples=False)
                except (errors.AgentError, ValueError) as e:
                    log.error("%s v%s could not be restored: %s", rec["name"], version, e)
                    self.reporter.event("restore_failed", model=rec["name"], version=version, error=str(e))
                    continue
                self.registry.activate(sv)
                if version != rec["serving"]:
                    self.db.set_serving(rec["name"], version, None)
                    self.reporter.event("rollback", model=rec["name"], frm=rec["serving"], to=version,
                                        reason="serving version failed to load at start")
                break
        resume: dict[str, DeployContext] = {}
        for job in self.db.unfinished_jobs():
            ctx = self._settle(job, clean)
            if ctx is None:
                continue
            older = resume.pop(ctx.model, None)
            if older is not None:
                self.reporter.update(older.job_id, "deploy", "CANCELED", error=errors.RejectError(
                    errors.SUPERSEDED, f"superseded by {ctx.job_id} while the agent was down"))
            resume[ctx.model] = ctx
        return list(resume.values())

    def _settle(self, job: dict[str, Any], clean: bool) -> DeployContext | None:
        """One unfinished job after a restart: finish, fail, hand to probation, or resume."""
        jid, step = job["id"], job["step"]
        reported = self.outbox.reported(jid)
        if reported is not None:  # its end went out just before the crash: record it
            self.db.update_job(jid, str(reported["state"]), reported.get("step"), reported.get("error"),
                               reported.get("result"))
            return None
        if job["type"] != "deploy":
            self.reporter.update(jid, job["type"], "FAILED", step, error=errors.AgentError(
                errors.INTERRUPTED, f"the agent restarted while {job['type']} was running; run it again"))
            return None
        params = job["params"] or {}
        model = str(params.get("model", ""))
        version = self.db.get(f"job_version:{jid}")
        rec = self.db.model(model) or {}
        if step in ("activating", "probation") and version is not None and rec.get("serving") == version:
            info = self.db.version(model, version) or {}
            result = {"name": model, "version": version, "variant": info.get("variant"),
                      "backend": info.get("backend"), "previous": rec.get("previous"), "resumed": True}
            if rec.get("previous") is None:
                self.reporter.update(jid, "deploy", "SUCCEEDED", step, result=result)
            elif not clean and self.cfg.backends.isolation == "none":
                # In-process runtime and an unclean stop during probation: the new version may
                # have crashed the daemon. Go back to the version that served before it.
                prev = rec["previous"]
                try:
                    sv = self.handlers.load_version(model, prev, validate_samples=False)
                except errors.AgentError as e:
                    log.error("%s: cannot roll back to v%s: %s", model, prev, e)
                else:
                    with self.runner.activation_lock:
                        self.db.set_serving(model, prev, None)
                        self.registry.activate(sv)
                    self.reporter.event("rollback", model=model, frm=version, to=prev,
                                        reason="the agent died during probation")
                self.reporter.update(jid, "deploy", "FAILED", step, error=errors.AgentError(
                    errors.PROBATION_FAILED, f"{model} v{version}: the agent died during probation; rolled back to v{prev}"))
            else:
                self.supervisor.begin(jid, model, version, rec["previous"], result)
            return None
        resumes = int(self.db.get(f"resumes:{jid}", 0)) + 1
        self.db.put(f"resumes:{jid}", resumes)
        if resumes > self.cfg.deploy.max_resumes:
            self.reporter.update(jid, "deploy", "FAILED", step, error=errors.AgentError(
                errors.INTERRUPTED, f"interrupted by {resumes - 1} restarts; giving up"))
            return None
        pin, sha = params.get("backend"), params.get("manifest_sha256")
        log.info("resuming deploy %s of %s (was at %s)", jid, model, step or "QUEUED")
        return DeployContext(jid, model, str(params.get("manifest_url", "")), sha if isinstance(sha, str) else None,
                             pin if isinstance(pin, str) else None)

    # -- telemetry ---------------------------------------------------------------------------
    def _heartbeat_loop(self) -> None:
        while not self.stopping.wait(self.cfg.telemetry.heartbeat_s):
            try:
                self.telemetry.heartbeat()
            except Exception as e:  # e.g. a full disk: said once per interval, not every tick
                if self._tick_log.allow() is not None:
                    log.error("heartbeat failed: %s", e, exc_info=e)

    def _window_loop(self) -> None:
        while not self.stopping.wait(self.cfg.telemetry.window_s):
            self._flush_window()

    def _flush_window(self, final: bool = False) -> None:
        try:
            self.telemetry.window(final=final)
        except Exception as e:
            if self._tick_log.allow() is not None:
                log.error("telemetry window failed: %s", e, exc_info=e)

    def _watchdog_loop(self) -> None:
        interval = self.notifier.watchdog_s / 2
        while not self.stopping.wait(interval):
            self.notifier.watchdog()

    # -- local API ---------------------------------------------------------------------------
    def _control_handlers(self, control: ControlServer) -> None:
        from agent import tensors

        def models(_: dict[str, Any]) -> Any:
            out = []
            for m in self.models_status():
                m["kept"] = self.db.versions(m["name"])
                sv = self.registry.get(m["name"])
                if sv is not None:
                    m["io"] = sv.describe()
                    m["worker_pid"] = getattr(sv.model, "pid", None)
                out.append(m)
            return out

        def infer(p: dict[str, Any]) -> Any:
            name = p.get("model")
            if not isinstance(name, str):
                raise errors.RejectError(errors.INVALID_INPUT, "infer needs a model name")
            raw = p.get("inputs") or {}
            if not isinstance(raw, dict):
                raise errors.RejectError(errors.INVALID_INPUT, "inputs must be an object of tensors")
            inputs = {k: tensors.decode(v, k) for k, v in raw.items()}
            t0 = time.perf_counter()
            sv, out = self.registry.infer(name, inputs)
            return {"model": name, "version": sv.version, "backend": sv.backend,
                    "latency_ms": round((time.perf_counter() - t0) * 1000, 3),
                    "outputs": {k: tensors.encode(v) for k, v in out.items()}}

        def explain(p: dict[str, Any]) -> Any:
            job = self.db.job(str(p.get("job", "")))
            if job is None:
                raise errors.RejectError("unknown_job", f"no job {p.get('job')!r} on this device")
            job["timeline"] = self.db.job_timeline(job["id"])
            return job

        def hw(_: dict[str, Any]) -> Any:
            from agent.hardware import hw_report

            return hw_report("/", self.cfg.hardware.profiles_dirs, self.cfg.hardware.profile)

        control.register("status", lambda _: self.full_status())
        control.register("models", models)
        control.register("jobs", lambda p: self.db.jobs(int(p.get("limit", 20))))
        control.register("explain", explain)
        control.register("infer", infer)
        control.register("hw", hw)
        control.register("bench", lambda p: self._local_bench({
            k: v for k, v in p.items() if k in ("model", "iterations", "backends")}))
        def local_op(type_: str) -> Any:
            """A mutating call from agentctl: a local job (visible in `jobs`, reported to the fleet),
            run on the ops worker so it is ordered with the fleet's rollback/remove/bench."""
            def run(p: dict[str, Any]) -> Any:
                params = {k: v for k, v in p.items() if k in ("model", "to_version", "set")}
                job_id = f"local-{type_}-{uuid.uuid4().hex[:12]}"
                model = params.get("model") if isinstance(params.get("model"), str) else None
                self.db.create_job(job_id, type_, model, params, time.time() + LOCAL_JOB_KEEP_S, state="IN_PROGRESS")
                self.reporter.update(job_id, type_, "IN_PROGRESS", persist=False, extra={"origin": "agentctl"})
                try:
                    result = self._ops.submit(getattr(self.handlers, type_), params).result(LOCAL_OP_TIMEOUT_S)
                except errors.AgentError as e:
                    self.reporter.update(job_id, type_, "REJECTED" if isinstance(e, errors.RejectError) else "FAILED", error=e)
                    raise
                except FutureTimeout as e:
                    err = errors.AgentError(errors.TIMEOUT, f"{type_} did not finish within {LOCAL_OP_TIMEOUT_S:g} s")
                    self.reporter.update(job_id, type_, "TIMED_OUT", error=err)
                    raise err from e
                self.reporter.update(job_id, type_, "SUCCEEDED", result=result)
                if type_ == "config":
                    return result
                return {"job": job_id, **result}
            return run

        set_config = local_op("config")
        control.register("config", lambda p: set_config(p) if p.get("set") else self.cfg.to_dict(),
                         mutating=lambda p: bool(p.get("set")))
        control.register("rollback", local_op("rollback"), mutating=True)
        control.register("remove", local_op("remove"), mutating=True)

        def install(p: dict[str, Any], emit: Any) -> Any:
            from agent.bundles.offline import install_op  # and the archive reader: at first use

            return install_op(self, p, emit)

        control.register("install", install, mutating=True, streaming=True)

    def _local_bench(self, params: dict[str, Any]) -> Any:
        """``agentctl bench`` on the bench worker; refused ``busy`` past ``LOCAL_BENCH_MAX``."""
        if not self._bench_slots.acquire(blocking=False):
            raise errors.RetryableError(errors.BUSY, f"{LOCAL_BENCH_MAX} bench calls are already running or waiting; "
                                        "try again when they finish")
        try:
            fut = self._bench.submit(self.handlers.bench, params)
        except BaseException:
            self._bench_slots.release()
            raise
        fut.add_done_callback(lambda _: self._bench_slots.release())
        try:
            return fut.result(BENCH_OP_TIMEOUT_S)
        except FutureTimeout as e:
            raise errors.AgentError(errors.TIMEOUT, f"bench did not finish within {BENCH_OP_TIMEOUT_S:g} s") from e

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        bad = self.trust.writable_paths()
        if bad:
            raise errors.AgentError("unsafe_trust", f"trust folder {self.cfg.trust.keys_dir} is writable by others than "
                                                    f"its owner: {describe_writable(bad)}")
        if not len(self.trust):
            log.warning("%s: every signed command and bundle will be refused", self.trust.no_keys_message())
        clock = check_clock(self.db, self.cfg.trust.max_clock_skew_s)
        if clock:
            log.warning("installs and other state-changing commands are refused until the clock is fixed: %s", clock)
        self.control = ControlServer(self.cfg.api.control_socket, self.cfg.api.control_group, self.cfg.api.admin_group)
        self._control_handlers(self.control)
        self.control.start()  # first: it also refuses a second daemon on the same socket
        resumed = self.restore()
        if not resumed:
            freed = self.runner.sweep()  # what a crash left behind: partial downloads, half-made folders
            if freed:
                log.info("removed %d bytes of files no version references", freed)
        for ctx in resumed:
            self.submit_deploy(ctx)
        self.supervisor.start()
        if self.cfg.api.listen:
            from agent.serving.kserve import KServeServer, api_options, parse_listen

            host, port = parse_listen(self.cfg.api.listen)
            self.kserve = KServeServer(self.registry, host, port, ready_fn=lambda: not self.stopping.is_set(),
                                       metrics_fn=self.metrics.render, **api_options(self.cfg.api))
            self.kserve.start()
        self.telemetry.report_recoveries()  # a corrupt outbox replaced at open: say so
        self.mqtt.start()
        for target, name in ((self._deploy_loop, "deploy"), (self._heartbeat_loop, "heartbeat"),
                             (self._window_loop, "telemetry"), (lambda: self.sweeper.run(self.stopping), "retention")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        if self.notifier.watchdog_s:
            threading.Thread(target=self._watchdog_loop, name="watchdog", daemon=True).start()
        self.notifier.ready(f"serving {len(self.registry.names())} model(s)")
        log.info("edge-agent %s started: device %s, profile %s, api %s, broker %s",
                 __version__, self.cfg.device_id, self.profile,
                 self.kserve.address if self.kserve else "off", self.cfg.mqtt.url)
        release_free_memory()  # start-up's transient heap (≈ 3 MB where modules had no .pyc) back to the OS

    def stop(self) -> None:
        log.info("stopping")
        self.notifier.stopping()
        self.stopping.set()
        deadline = time.monotonic() + STOP_TIMEOUT_S
        open_probations = self.supervisor.stop()  # first: nothing is rolled back while stopping
        if open_probations:
            log.info("%d probation(s) still open; they continue at the next start", len(open_probations))
        if self._current is not None:
            self._current.cancel_code = errors.CANCELED
            self._current.cancel.set()
        with contextlib.suppress(queue.Full):
            self._deploys.put_nowait(None)
        if self.kserve is not None:
            self.kserve.stop(timeout_s=max(0.5, deadline - time.monotonic() - 2))
        if self.control is not None:
            self.control.stop()
        for t in self._threads:
            t.join(max(0.0, min(1.0, deadline - time.monotonic() - 1.5)))
        final_status = self.status_doc(False, "shutdown")  # the models it served, before they close
        # Models close before the last window: a worker's latest calls reach the windows as it stops.
        self.registry.close(timeout_s=max(0.1, min(REGISTRY_CLOSE_S, deadline - time.monotonic() - 2.0)))
        self._flush_window(final=True)
        self.telemetry.save_budget()
        self.mqtt.flush(timeout_s=max(0.0, min(STOP_FLUSH_S, deadline - time.monotonic() - 1.0)))
        self.mqtt.stop(final_status=final_status, timeout_s=max(0.5, deadline - time.monotonic() - 0.5))
        self._ops.shutdown(wait=False, cancel_futures=True)
        self._bench.shutdown(wait=False, cancel_futures=True)
        self.outbox.close()
        self.db.put("clean_shutdown", True)
        self.db.close()
        log.info("stopped")


def run(cfg: config.Config) -> int:
    agent = Agent(cfg)
    done = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("received %s", signal.Signals(signum).name)
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        agent.start()
    except errors.AgentError as e:
        log.error("cannot start: %s: %s", e.code, e.message)
        return EXIT_UNSAFE
    while not done.wait(1.0):
        pass
    agent.stop()
    return 0


LOG_FORMATS = ("text", "json")
# subcommand → its options (all take a value); the fast path below and the parser agree on these.
_OPTIONS = {"run": ("--config", "--log-format", "--log-level"), "check-config": ("--config",)}


def _parser() -> Any:
    import argparse  # only for --help, --version and malformed command lines (_simple_args): ~0.2 MB idle

    ap = argparse.ArgumentParser(prog="edge-agent", description="Edge ML agent daemon")
    ap.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    sub = ap.add_subparsers(dest="cmd")
    r = sub.add_parser("run", help="run the daemon")
    r.add_argument("--config", help=f"config file (default ${config.ENV_CONFIG} or {config.DEFAULT_CONFIG_PATH})")
    r.add_argument("--log-format", choices=list(LOG_FORMATS), default="text")
    r.add_argument("--log-level", default=os.environ.get("EDGE_AGENT_LOG_LEVEL", "info"))
    c = sub.add_parser("check-config", help="validate the config and print the effective values")
    c.add_argument("--config")
    from agent import devinit

    devinit.add_parser(sub)
    return ap


def _simple_args(argv: list[str]) -> Any:
    """The well-formed command lines (``run --config X``, ``--opt=value``) parsed as ``_parser()``
    would parse them, without importing argparse; None for anything else (help, version, errors,
    abbreviations), which ``_parser()`` then handles."""
    if not argv or argv[0] not in _OPTIONS:
        return None
    cmd, allowed = argv[0], _OPTIONS[argv[0]]
    values: dict[str, str | None] = dict.fromkeys(allowed)
    if cmd == "run":
        values["--log-format"] = "text"
        values["--log-level"] = os.environ.get("EDGE_AGENT_LOG_LEVEL", "info")
    i = 1
    while i < len(argv):
        opt, eq, value = argv[i].partition("=")
        if opt not in allowed:
            return None
        if not eq:
            if i + 1 >= len(argv) or argv[i + 1].startswith("-"):
                return None
            i += 1
            value = argv[i]
        if opt == "--log-format" and value not in LOG_FORMATS:
            return None
        values[opt] = value
        i += 1
    return types.SimpleNamespace(cmd=cmd, **{k[2:].replace("-", "_"): v for k, v in values.items()})


def check_config(path: str | None) -> int:
    """``edge-agent check-config``: the effective values, then what would stop the daemon working:
    a bad key, a missing or unsafe trust folder (exit 2); too few trusted keys (a warning)."""
    import json

    try:
        cfg = config.load(path)
    except errors.ConfigError as e:
        print(f"edge-agent: {e.message}", file=sys.stderr)
        return EXIT_CONFIG
    print(json.dumps(cfg.to_dict(), indent=2))
    where = cfg.source if cfg.source != "defaults" else "no config file, built-in defaults"
    problem = folder_problem(Path(cfg.trust.keys_dir))
    if problem:  # the daemon would refuse every signed command, or not start at all
        print(f"edge-agent: {where}: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    trust = TrustStore.load(Path(cfg.trust.keys_dir))
    if not len(trust):
        print(f"edge-agent: warning: {trust.no_keys_message()}; until then every signed command and bundle "
              "is refused", file=sys.stderr)
    elif len(trust) < cfg.trust.threshold:
        print(f"edge-agent: warning: {trust.where()} holds {len(trust)} key(s) but trust.threshold is "
              f"{cfg.trust.threshold}; every signed command and bundle is refused", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _simple_args(argv)
    if args is None:
        ap = _parser()
        args = ap.parse_args(argv)
        if args.cmd is None:
            ap.print_help(sys.stderr)
            return 2
    if args.cmd == "init":
        from agent import devinit

        return devinit.run(args)
    if args.cmd == "check-config":
        return check_config(args.config)
    logs.setup(args.log_level, args.log_format)
    try:
        cfg = config.load(args.config)
    except errors.ConfigError as e:
        log.error("config: %s", e.message)
        return EXIT_CONFIG
    if "json" in (args.log_format, cfg.log_format):  # either asks for JSON lines; they carry the device id
        logs.setup(args.log_level, "json", device=cfg.device_id)
    return run(cfg)


if __name__ == "__main__":
    sys.exit(main())
