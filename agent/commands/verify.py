"""Command checks (PROTOCOL.md "Commands"): envelope, signatures, version, target, time.

Order of checks, each a RejectError with its stable code and nothing executed:
``authenticate`` (size, JSON shape, payload type, signatures/threshold) → ``check`` (document
schema and ``v``, target, lifetime) → ``check_time`` (``expires_at``, ``issued_at`` not too far
ahead). Nothing in a message that fails ``authenticate`` is believed, its id included. The
replay and clock rules (durable state) are the caller's (agent/commands/intake.py).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

from agent import errors
from agent.bundles import dsse
from agent.bundles.trust import TrustStore
from agent.timeutil import parse_rfc3339

MAX_COMMAND_BYTES = 256 * 1024
ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
COMMAND_TYPES = ("deploy", "rollback", "remove", "cancel", "config", "trust", "status", "bench", "ping")
SUPPORTED_MAJOR = 1
MAX_LIFETIME_S = 30 * 86400  # a command valid for longer than this is refused: ids must be forgettable


@dataclass
class Command:
    id: str
    type: str
    target: dict[str, str]
    issued_at: float
    expires_at: float
    params: dict[str, Any]
    signed: bool = True
    doc: dict[str, Any] = field(default_factory=dict)


def peek_id(raw: bytes) -> str | None:
    """Best-effort id of a (possibly bad) command, only to address the error reply."""
    try:
        env = json.loads(raw)
        doc = env
        if isinstance(env, dict) and isinstance(env.get("payload"), str):
            doc = json.loads(dsse.payload_bytes(env))
        cid = doc.get("id") if isinstance(doc, dict) else None
    except (ValueError, errors.AgentError, UnicodeDecodeError):
        return None
    return cid if isinstance(cid, str) and ID_RE.match(cid) else None


class CommandVerifier:
    def __init__(self, trust: TrustStore, threshold: int, device_id: str, groups: list[str],
                 max_clock_skew_s: float, require_signed: bool = True) -> None:
        self.trust = trust
        self.threshold = threshold
        self.device_id = device_id
        self.groups = groups
        self.max_clock_skew_s = max_clock_skew_s
        self.require_signed = require_signed

    def verify(self, raw: bytes, now: float | None = None) -> Command:
        """Every check in order (authenticate, then the document, then its times)."""
        doc, signed = self.authenticate(raw)
        cmd = self.check(doc, signed)
        self.check_time(cmd, time.time() if now is None else now)
        return cmd

    def authenticate(self, raw: bytes) -> tuple[Any, bool]:
        """Size, JSON, envelope and signatures: the checks before anything in the message can be
        believed. Returns (the document, whether it was signed)."""
        if len(raw) > MAX_COMMAND_BYTES:
            raise errors.RejectError(errors.INVALID_COMMAND, f"command is {len(raw)} bytes, the cap is {MAX_COMMAND_BYTES}")
        try:
            top = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise errors.RejectError(errors.INVALID_COMMAND, f"command is not valid JSON: {e}") from e
        if isinstance(top, dict) and "payloadType" in top:
            env = dsse.parse_envelope(top)
            payload = dsse.verify(env, dsse.COMMAND_TYPE, self.trust, self.threshold, what="command")
            try:
                return json.loads(payload), True
            except (ValueError, UnicodeDecodeError) as e:
                raise errors.RejectError(errors.INVALID_COMMAND, f"command payload is not valid JSON: {e}") from e
        if self.require_signed:
            raise errors.RejectError(errors.UNSIGNED_COMMAND,
                                     "unsigned command refused (trust.require_signed_commands = true)")
        return top, False

    def check(self, doc: Any, signed: bool = True) -> Command:
        """The document's schema, version, type, target and lifetime (its times are parsed here
        and judged against the clock by ``check_time``)."""
        if not isinstance(doc, dict):
            raise errors.RejectError(errors.INVALID_COMMAND, "command document is not a JSON object")
        v = doc.get("v")
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise errors.RejectError(errors.INVALID_COMMAND, f"command v {v!r} is not a positive integer")
        if v > SUPPORTED_MAJOR:
            raise errors.RejectError(errors.UNSUPPORTED_VERSION,
                                     f"command v {v} is newer than this agent understands ({SUPPORTED_MAJOR})")
        cid = doc.get("id")
        if not isinstance(cid, str) or not ID_RE.match(cid):
            raise errors.RejectError(errors.INVALID_COMMAND, f"command id {cid!r} must match [A-Za-z0-9_.:-]{{1,128}}")
        ctype = doc.get("type")
        if ctype not in COMMAND_TYPES:
            raise errors.RejectError(errors.UNKNOWN_COMMAND, f"command type {ctype!r} is not one of {', '.join(COMMAND_TYPES)}")
        params = doc.get("params", {})
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise errors.RejectError(errors.INVALID_COMMAND, "command params is not an object")
        target = doc.get("target")
        if not isinstance(target, dict) or len(target) != 1 or not all(isinstance(x, str) for x in target.values()):
            raise errors.RejectError(errors.INVALID_COMMAND, 'command target must be {"device": ID} or {"group": NAME}')
        if target.get("device") is not None:
            if target["device"] != self.device_id:
                raise errors.RejectError(errors.WRONG_TARGET, f"command is for device {target['device']!r}, this is {self.device_id!r}")
        elif target.get("group") is not None:
            if target["group"] not in self.groups:
                raise errors.RejectError(errors.WRONG_TARGET, f"command is for group {target['group']!r}; this device is in {self.groups}")
        else:
            raise errors.RejectError(errors.INVALID_COMMAND, 'command target must be {"device": ID} or {"group": NAME}')
        try:
            expires = parse_rfc3339(doc["expires_at"])
            issued = parse_rfc3339(doc["issued_at"])
        except KeyError as e:
            raise errors.RejectError(errors.INVALID_COMMAND, f"command lacks {e.args[0]}") from e
        except ValueError as e:
            raise errors.RejectError(errors.INVALID_COMMAND, f"command time: {e}") from e
        if expires - issued > MAX_LIFETIME_S:
            raise errors.RejectError(errors.INVALID_COMMAND,
                                     f"command {cid} is valid for more than {MAX_LIFETIME_S // 86400} days")
        return Command(cid, ctype, target, issued, expires, params, signed, doc)

    def check_time(self, cmd: Command, now: float) -> None:
        """``expires_at`` passed or ``issued_at`` too far ahead of ``now`` (both with the skew)."""
        if cmd.expires_at + self.max_clock_skew_s <= now:
            raise errors.RejectError(errors.EXPIRED, f"command {cmd.id} expired at {cmd.doc.get('expires_at')}")
        if cmd.issued_at - self.max_clock_skew_s > now:
            raise errors.RejectError(errors.NOT_YET_VALID, f"command {cmd.id} issued_at {cmd.doc.get('issued_at')} "
                                     f"is more than {self.max_clock_skew_s:.0f} s in the future")
