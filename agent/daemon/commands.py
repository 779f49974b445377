"""Commands routed to their handlers; settings changed remotely passed to the parts that hold them."""

# mypy: disable-error-code="misc"
# (the methods here annotate ``self: Agent``: the class they are mixed into, not a supertype of this one)

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from agent import __version__, errors
from agent.commands.verify import Command
from agent.deploy.runner import DeployContext
from agent.timeutil import now_rfc3339

if TYPE_CHECKING:
    from agent.daemon import Agent

log = logging.getLogger("agent.daemon")

IMMEDIATE = ("config", "trust", "cancel")  # answered on the command worker
OPS = ("rollback", "remove", "bench")  # run in order on the ops worker


class CommandRouting:
    """Methods of `Agent` (agent/daemon/__init__.py): commands routed to the handlers it wired."""

    def on_command(self: Agent, topic: str, raw: bytes, dup: bool = False) -> bool:
        """Verify, record and route one command (on the command worker, never the network
        thread). True once it may be acknowledged to the broker (agent/commands/intake.py)."""
        return self.intake.handle(topic, raw, dup)

    def _route(self: Agent, cmd: Command) -> None:
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
            self.deploys.submit(DeployContext(cmd.id, model, url, sha if isinstance(sha, str) else None,
                                              pin if isinstance(pin, str) else None))
        elif cmd.type in IMMEDIATE:
            result = self.handlers[cmd.type](p)
            self.reporter.update(cmd.id, cmd.type, "SUCCEEDED", result=result)
        elif cmd.type in OPS:
            self.reporter.update(cmd.id, cmd.type, "IN_PROGRESS")
            self._ops.submit(self._run_op, cmd)
        else:  # the verifier knows every type; this is a bug guard
            raise errors.RejectError(errors.UNKNOWN_COMMAND, f"command type {cmd.type!r} is not supported by agent {__version__}")

    def _run_op(self: Agent, cmd: Command) -> None:
        try:
            result = self.handlers[cmd.type](cmd.params)
        except errors.AgentError as e:
            self.reporter.update(cmd.id, cmd.type, "REJECTED" if isinstance(e, errors.RejectError) else "FAILED", error=e)
        except Exception as e:
            log.exception("%s %s failed", cmd.type, cmd.id)
            self.reporter.update(cmd.id, cmd.type, "FAILED", error=errors.AgentError(errors.INTERNAL, f"{type(e).__name__}: {e}"))
        else:
            self.reporter.update(cmd.id, cmd.type, "SUCCEEDED", result=result)

    def config_changed(self: Agent, keys: set[str]) -> None:
        """Apply remotely changed settings that live parts hold copies of."""
        if "groups" in keys:
            self.verifier.groups = self.cfg.groups
            self.mqtt.set_subscriptions([self.topics.cmd] + [self.topics.group_cmd(g) for g in self.cfg.groups])
        if "telemetry.outbox_max_mb" in keys:
            self.outbox.max_bytes = int(self.cfg.telemetry.outbox_max_mb * 2**20)
        if "telemetry.drain_rate_per_s" in keys:
            self.mqtt.drain_rate_per_s = self.cfg.telemetry.drain_rate_per_s
