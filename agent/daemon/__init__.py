"""The daemon's composition root: build the parts, start them, stop them in reverse order.

Start: config → state → trust (refused if writable by others) → serving models restored →
local API and control socket → MQTT (birth status, subscriptions) → telemetry timers → READY.
Stop (SIGTERM/SIGINT): STOPPING → no new commands → in-flight requests and the running deploy
step finish (bounded) → final status ``online: false`` → disconnect → state closed.

`Agent` wires the parts here: the serving owner, the deploy queue and runner, recovery at start
(agent/deploy/), and each command handler with only the parts it uses (``_handlers``). Its other
methods are grouped by concern in daemon/status.py (status documents, telemetry timers),
daemon/commands.py (command routing) and daemon/control.py (the agentctl control API).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from agent import __version__, config, errors, logs
from agent.backends.probed import probed_backends
from agent.bundles.fetch import fetcher_from_config
from agent.bundles.store import Store
from agent.bundles.trust import TrustStore, describe_writable, folder_problem
from agent.commands.bench import Bench
from agent.commands.handlers import (
    REMOTE_CONFIG_FILE,
    Cancel,
    Handler,
    RemoteConfig,
    Remove,
    Rollback,
    TrustRotation,
    apply_remote_overrides,
)
from agent.commands.intake import CommandIntake
from agent.commands.verify import CommandVerifier
from agent.daemon.commands import CommandRouting
from agent.daemon.control import LOCAL_BENCH_MAX, ControlApi
from agent.daemon.status import StatusReports
from agent.deploy.jobs import JobReporter
from agent.deploy.owner import ServingOwner
from agent.deploy.probation import ProbationSettings, Supervisor
from agent.deploy.queue import DeployQueue
from agent.deploy.recovery import Recovery, RecoverySettings
from agent.deploy.runner import (
    DOWNLOADING,
    LOADING,
    STEP_TIMEOUT_S,
    VALIDATING,
    DeployContext,
    DeployRunner,
    DeploySettings,
    check_clock,
    recheck,
)
from agent.deploy.versions import VersionLoader
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

log = logging.getLogger("agent.daemon")

STOP_TIMEOUT_S = 5.0  # SIGTERM to exit, in-flight work included
STOP_FLUSH_S = 1.0  # at most this long of the stop sends what is still queued (the last window)
REGISTRY_CLOSE_S = 2.0  # at most this long of the stop waits for in-flight calls before models close
TICK_LOG_INTERVAL_S = 60.0  # a failing heartbeat or window (a full disk) is logged once per this
EXIT_CONFIG = 2
EXIT_UNSAFE = 3


class Agent(StatusReports, CommandRouting, ControlApi):
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
                                 limits=Limits(bc.max_batch, bc.max_inflight, bc.max_queue, bc.infer_timeout_s,
                                               cfg.serving.max_batch, cfg.serving.max_queue_delay_us))
        self.reporter = JobReporter(self.db, self.outbox, self.topics)
        # Targets listed by a child process (cached under state_dir): no runtime import in an idle daemon.
        self.backends = probed_backends(self._backends(), self.state_dir / "cache" / "backend-targets.json")
        self.profile = self._profile()
        self.owner = ServingOwner(self.db, self.registry, self.store)  # the only writer of what serves
        self.loader = VersionLoader(self.db, self.store, self.backends, self.deploy_settings)
        self.runner = DeployRunner(self.db, self.store, fetcher_from_config(cfg.downloads), lambda: self.trust, self.registry,
                                   self.backends, self.reporter, self.deploy_settings, probation=self._begin_probation,
                                   owner=self.owner)
        self.deploys = DeployQueue(self.runner.run, after=self.publish_status)
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
        self.supervisor = Supervisor(self.registry, self.db, self.reporter,
                                     lambda name, v: self.loader.load(name, v, validate_samples=False),
                                     self.owner, self.probation_settings, self.publish_status,
                                     recheck=lambda name, v: recheck(self.loader.load(name, v, validate_samples=False),
                                                                     self.store.version_dir(name, v)))
        self.recovery = Recovery(self.db, self.reporter, self.owner, self.loader, self.outbox.reported,
                                 self.supervisor.begin, self.recovery_settings)
        self.handlers = self._handlers()
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
    def _handlers(self) -> dict[str, Handler]:
        """Each command handler with only the parts it uses (agent/commands/handlers.py)."""
        return {"rollback": Rollback(self.db, self.loader, self.owner, self.reporter, self.publish_status),
                "remove": Remove(self.db, self.owner, self.publish_status),
                "cancel": Cancel(self.deploys.cancel, self.db),
                "config": RemoteConfig(self.cfg, self.state_dir / REMOTE_CONFIG_FILE, self.config_changed),
                "trust": TrustRotation(self.trust, lambda: self.cfg.trust.threshold, self.reporter),
                "bench": Bench(self.registry, self.loader, self.backends)}

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
            from agent.backends.selection import policy_from_report
            from agent.hardware import hw_report

            rep = hw_report("/", self.cfg.hardware.profiles_dirs, self.cfg.hardware.profile, probe_runtimes=False)
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
                              autotune=c.backends.autotune, autotune_objective=c.backends.autotune_objective,
                              autotune_concurrency=c.backends.autotune_concurrency, policy=self.policy, hw_facts=self.hw_facts,
                              cache_dir=str(self.state_dir / "cache"),
                              decryption_keys=tuple(c.trust.decryption_keys),
                              step_timeout_s={**STEP_TIMEOUT_S, DOWNLOADING: c.deploy.download_timeout_s,
                                              LOADING: c.deploy.load_timeout_s,
                                              VALIDATING: c.deploy.validate_timeout_s})

    def probation_settings(self) -> ProbationSettings:
        d = self.cfg.deploy
        return ProbationSettings(d.probation_s, d.probation_max_errors, d.probation_max_error_ratio,
                                 self.cfg.backends.worker_memory_max_mb)

    def recovery_settings(self) -> RecoverySettings:
        return RecoverySettings(self.cfg.deploy.max_resumes, self.cfg.backends.isolation == "none")

    def _begin_probation(self, ctx: DeployContext, result: dict[str, Any]) -> bool:
        if self.cfg.deploy.probation_s <= 0 or ctx.previous is None or ctx.manifest is None:
            return False
        self.supervisor.begin(ctx.job_id, ctx.model, ctx.manifest.version, ctx.previous, result)
        return True

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        bad = self.trust.writable_paths()
        if bad:
            raise errors.AgentError(errors.UNSAFE_TRUST, f"trust folder {self.cfg.trust.keys_dir} is writable by others than "
                                                    f"its owner: {describe_writable(bad)}")
        if not len(self.trust):
            log.warning("%s: every signed command and bundle will be refused", self.trust.no_keys_message())
        if self.cfg.trust.decryption_keys:  # refused now, with the fix, rather than at the first encrypted deploy
            from agent.bundles.sealed import load_identities

            load_identities(self.cfg.trust.decryption_keys)
        clock = check_clock(self.db, self.cfg.trust.max_clock_skew_s)
        if clock:
            log.warning("installs and other state-changing commands are refused until the clock is fixed: %s", clock)
        self.control = ControlServer(self.cfg.api.control_socket, self.cfg.api.control_group, self.cfg.api.admin_group)
        self._control_handlers(self.control)
        self.control.start()  # first: it also refuses a second daemon on the same socket
        resumed = self.recovery.run()
        if not resumed:
            freed = self.runner.sweep()  # what a crash left behind: partial downloads, half-made folders
            if freed:
                log.info("removed %d bytes of files no version references", freed)
        for ctx in resumed:
            self.deploys.submit(ctx)
        self.supervisor.start()
        if self.cfg.api.listen:
            from agent.serving.kserve import KServeServer, api_options, parse_listen

            host, port = parse_listen(self.cfg.api.listen)
            self.kserve = KServeServer(self.registry, host, port, ready_fn=lambda: not self.stopping.is_set(),
                                       metrics_fn=self.metrics.render, **api_options(self.cfg.api))
            self.kserve.start()
        self.telemetry.report_recoveries()  # a corrupt outbox replaced at open: say so
        self.mqtt.start()
        self.deploys.start()
        for target, name in ((self._heartbeat_loop, "heartbeat"),
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
        self.deploys.stop()  # the running deploy canceled; the queued ones resume at the next start
        if self.kserve is not None:
            self.kserve.stop(timeout_s=max(0.5, deadline - time.monotonic() - 2))
        if self.control is not None:
            self.control.stop()
        self.deploys.join(max(0.0, min(1.0, deadline - time.monotonic() - 1.5)))
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
        self.recovery.stopped_cleanly()
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


def _parser() -> argparse.ArgumentParser:
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
    from agent.bundles.sealed import identity_problem

    problem = folder_problem(Path(cfg.trust.keys_dir)) or next(
        filter(None, map(identity_problem, cfg.trust.decryption_keys)), None)  # no_decryption_key at start
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
