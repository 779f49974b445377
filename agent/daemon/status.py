"""The status documents and the telemetry timers."""

# mypy: disable-error-code="misc"
# (the methods here annotate ``self: Agent``: the class they are mixed into, not a supertype of this one)

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from agent import __version__
from agent.state import MODEL_DOWN
from agent.timeutil import now_rfc3339

if TYPE_CHECKING:
    from agent.daemon import Agent

log = logging.getLogger("agent.daemon")


class StatusReports:
    """Methods of `Agent` (agent/daemon/__init__.py): the status documents and the telemetry timers."""

    # -- status ------------------------------------------------------------------------------
    def models_status(self: Agent) -> list[dict[str, Any]]:
        out = []
        for rec in self.db.models():
            sv = self.registry.get(rec["name"])
            if sv is None and rec["state"] == "removed":
                continue  # its row stays only for the version high-water mark
            state = rec["state"] if sv is not None or rec["state"] == MODEL_DOWN else "not_loaded"
            entry: dict[str, Any] = {"name": rec["name"], "version": rec["serving"], "state": state,
                                     "previous": rec["previous"]}
            if sv is not None:
                entry.update(variant=sv.variant, backend=sv.backend)
                if self.supervisor.in_probation(rec["name"]):
                    entry["state"] = "probation"
            out.append(entry)
        return out

    def status_doc(self: Agent, online: bool, reason: str = "") -> dict[str, Any]:
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

    def publish_status(self: Agent) -> None:
        self.mqtt.publish_status(self.status_doc(True))

    def full_status(self: Agent) -> dict[str, Any]:
        """What `agentctl status` and the `status` command report."""
        return {"device": self.cfg.device_id, "agent": __version__, "boot_id": self.boot_id,
                "uptime_s": round(time.time() - self.started, 1), "profile": self.profile,
                "groups": self.cfg.groups, "mqtt": self.mqtt.state.to_dict(), "outbox": self.outbox.stats(),
                "budget": self.telemetry.budget_status(),
                "commands": {"refused_unauthenticated": self.intake.refused()},
                "retention": self.sweeper.status(),
                "models": self.models_status(), "config": self.cfg.source,
                "api": self.kserve.address if self.kserve else None,
                "deploying": self.deploys.running()}

    # -- telemetry ---------------------------------------------------------------------------
    def _heartbeat_loop(self: Agent) -> None:
        while not self.stopping.wait(self.cfg.telemetry.heartbeat_s):
            try:
                self.telemetry.heartbeat()
            except Exception as e:  # e.g. a full disk: said once per interval, not every tick
                if self._tick_log.allow() is not None:
                    log.error("heartbeat failed: %s", e, exc_info=e)

    def _window_loop(self: Agent) -> None:
        while not self.stopping.wait(self.cfg.telemetry.window_s):
            self._flush_window()

    def _flush_window(self: Agent, final: bool = False) -> None:
        try:
            self.telemetry.window(final=final)
        except Exception as e:
            if self._tick_log.allow() is not None:
                log.error("telemetry window failed: %s", e, exc_info=e)

    def _watchdog_loop(self: Agent) -> None:
        interval = self.notifier.watchdog_s / 2
        while not self.stopping.wait(interval):
            self.notifier.watchdog()
