"""Command intake: one MQTT message to a recorded job, or a refusal (PROTOCOL.md "Commands").

Invariants:
- A message that fails before its signatures check (size, JSON, envelope, signatures,
  threshold) is not believed, its id included: no job update goes out under it. It is counted
  by code (``refused``: `agentctl status`, /metrics) and reported by one ``commands_refused``
  event per ``EVENT_INTERVAL_S`` at most; its log line is rate-limited too. A flood costs the
  sender, not the fleet's byte budget or the log.
- ``handle`` returns True once the message may be acknowledged to the broker: the command is
  recorded (or answered for good). When recording fails for a lack of room (``disk_full``,
  ``resource_exhausted``) it returns False: the message stays unacknowledged and is offered
  again, and the fleet is told once that it waits (a ``QUEUED`` update with ``delayed``).
- Any other failure while handling ends in a job update (``FAILED`` with the classified code),
  never silence.
- A signed command resent under an id already recorded (a replay) is answered ``replayed`` at
  most once per ``REPLAY_ANSWER_S`` per id, so a captured command resent in a loop cannot make
  the device publish in a loop either.
- Time only moves forward: every verified ``issued_at`` raises the durable last trusted time;
  while the clock is behind it (beyond the skew) every state-changing command is refused
  ``clock_untrusted``. A command refused as ``expired`` is recorded under its id and stays
  refused whatever the clock says later.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent import errors
from agent.commands.verify import ID_RE, Command, CommandVerifier
from agent.deploy.jobs import JobReporter
from agent.deploy.runner import CLOCK_UNTRUSTED_KEY, check_clock
from agent.logs import RateLimit
from agent.state import StateDB
from agent.timeutil import now_rfc3339

log = logging.getLogger(__name__)

READ_ONLY_TYPES = ("ping", "status", "bench")  # allowed while the clock is behind the trusted time
LOG_INTERVAL_S = 10.0  # per-message log lines: at most one per interval and kind
EVENT_INTERVAL_S = 60.0  # at most one commands_refused event per interval
REFUSED_EVENT = "commands_refused"
LAST_MESSAGE_MAX = 300  # the event carries the refusal's message (e.g. which key signed) up to this long
ROOM_CODES = (errors.DISK_FULL, errors.RESOURCE_EXHAUSTED)  # waiting for room: keep unacknowledged
DELAYED_TOLD_MAX = 1024  # ids already told they wait (bounded; forgotten oldest first)
REPLAY_ANSWER_S = 60.0  # a replayed id is answered at most once per this (a captured command resent in a loop)
REPLAY_IDS_MAX = 1024  # ids whose last replay answer is remembered (bounded; oldest forgotten)

PublishNow = Callable[[str, dict[str, Any]], bool]  # (topic, doc) -> sent, outside the outbox


@dataclass
class _Progress:
    """How far one message got: what a failure must answer and whether it may be acknowledged."""

    cid: str | None = None
    type: str = "unknown"
    recorded: bool = False


class CommandIntake:
    """Verifies, records and routes commands; runs on the MQTT command worker only."""

    def __init__(self, verifier: CommandVerifier, db: StateDB, reporter: JobReporter,
                 route: Callable[[Command], None], publish_now: PublishNow,
                 clock_flag_changed: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.verifier = verifier
        self.db = db
        self.reporter = reporter
        self._route = route
        self._publish_now = publish_now
        self._clock_flag_changed = clock_flag_changed  # e.g. publish the status ("clock": "untrusted")
        self._clock = clock
        self._lock = threading.Lock()
        self._refused: dict[str, int] = {}  # code -> messages refused before their signatures checked
        self._reported: dict[str, int] = {}  # the counts the last event carried
        self._refused_log = RateLimit(LOG_INTERVAL_S)
        self._refused_event = RateLimit(EVENT_INTERVAL_S)
        self._failed_log = RateLimit(LOG_INTERVAL_S)
        self._told: dict[str, None] = {}  # insertion-ordered set of ids told they wait
        self._signed_log = RateLimit(LOG_INTERVAL_S)  # refusals of signed commands (replays can repeat)
        self._replay_answered: dict[str, float] = {}  # id -> when its last replay was answered

    # -- counters ----------------------------------------------------------------------------
    def refused(self) -> dict[str, int]:
        """Messages refused before their signatures checked, by code, since start."""
        with self._lock:
            return dict(self._refused)

    def _unauthenticated(self, topic: str, e: errors.AgentError) -> None:
        with self._lock:
            self._refused[e.code] = self._refused.get(e.code, 0) + 1
        self._refused_log.log(log, logging.WARNING, "message on %s refused before any id was believed: %s", topic, e)
        if self._refused_event.allow() is not None:
            last = {"code": e.code, "message": e.message[:LAST_MESSAGE_MAX]}
            with self._lock:
                total = dict(self._refused)
                since = {k: n - self._reported.get(k, 0) for k, n in total.items() if n != self._reported.get(k, 0)}
                self._reported = total
            try:
                self.reporter.event(REFUSED_EVENT, since_last=since, total=total, interval_s=EVENT_INTERVAL_S, last=last)
            except Exception as ex:  # a full disk must not turn a refusal into a crash
                self._failed_log.log(log, logging.WARNING, "event %s not queued: %s", REFUSED_EVENT, ex)

    # -- one message -------------------------------------------------------------------------
    def handle(self, topic: str, raw: bytes, dup: bool = False) -> bool:
        """Handle one message; True when it may be acknowledged (see the module's invariants)."""
        try:
            doc, signed = self.verifier.authenticate(raw)
        except errors.AgentError as e:
            self._unauthenticated(topic, e)
            return True
        except Exception as e:  # a parser bug: still nothing believed, counted, never a traceback per message
            self._unauthenticated(topic, errors.classify(e))
            return True
        p = _Progress()
        try:
            return self._accept(doc, signed, dup, p)
        except Exception as e:  # every failure ends in an update or a redelivery
            return self._failed(p, e)

    def _accept(self, doc: Any, signed: bool, dup: bool, p: _Progress) -> bool:
        cid = doc.get("id") if isinstance(doc, dict) else None
        p.cid = cid if isinstance(cid, str) and ID_RE.match(cid) else None
        try:
            cmd = self.verifier.check(doc, signed)
        except errors.RejectError as e:
            self._signed_log.log(log, logging.WARNING, "command %s refused: %s", p.cid, e)
            if p.cid is not None and not self.db.job(p.cid):  # never overwrite a recorded job's story
                self.reporter.update(p.cid, "unknown", "REJECTED", error=e, persist=False)
            return True
        p.type = cmd.type
        try:
            self._check_time(cmd, self._clock())
        except errors.RejectError as e:
            self._signed_log.log(log, logging.WARNING, "command %s refused: %s", cmd.id, e)
            if e.code == errors.EXPIRED and not self.db.record_refusal(cmd.id, cmd.type, cmd.params,
                                                                       cmd.expires_at, e.to_dict()):
                return self._replayed(cmd, self.db.job(cmd.id) or {}, dup)
            self.reporter.update(cmd.id, cmd.type, "REJECTED", error=e, persist=False)
            return True
        model = cmd.params.get("model") if isinstance(cmd.params.get("model"), str) else None
        if not self.db.create_job(cmd.id, cmd.type, model, cmd.params, cmd.expires_at):
            return self._replayed(cmd, self.db.job(cmd.id) or {}, dup)
        p.recorded = True
        self._told.pop(cmd.id, None)
        self.reporter.update(cmd.id, cmd.type, "QUEUED", persist=False)
        try:
            self._route(cmd)
        except errors.AgentError as e:
            self.reporter.update(cmd.id, cmd.type, "REJECTED" if isinstance(e, errors.RejectError) else "FAILED", error=e)
        return True

    def _check_time(self, cmd: Command, now: float) -> None:
        """Raise the trusted time with a verified ``issued_at``; refuse state changes while the
        clock is behind it; then the command's own validity window."""
        skew = self.verifier.max_clock_skew_s
        if cmd.signed and cmd.issued_at <= now + skew:
            self.db.raise_trusted_time(cmd.issued_at)
        flag = self.db.get(CLOCK_UNTRUSTED_KEY) or None
        behind = check_clock(self.db, skew, now)  # also the status document's "clock" flag
        if behind != flag and self._clock_flag_changed is not None:
            self._clock_flag_changed()
        if behind and cmd.type not in READ_ONLY_TYPES:
            trusted = self.db.trusted_time()
            raise errors.RejectError(errors.CLOCK_UNTRUSTED,
                                     f"device clock {now_rfc3339(now)} is earlier than the last trusted time "
                                     f"{now_rfc3339(trusted)} (beyond the {skew:.0f} s skew); {cmd.type} waits "
                                     "until the clock is fixed (NTP)")
        self.verifier.check_time(cmd, now)

    def _replayed(self, cmd: Command, prior: dict[str, Any], dup: bool) -> bool:
        if dup:  # the broker's redelivery of a command recorded before a crash: handled already
            log.info("command %s redelivered by the broker; already recorded (%s)", cmd.id, prior.get("state"))
            return True
        now = time.monotonic()
        last = self._replay_answered.pop(cmd.id, None)
        if last is not None and now - last < REPLAY_ANSWER_S:  # answered moments ago: a resend loop
            self._replay_answered[cmd.id] = last
            self._signed_log.log(log, logging.WARNING, "command %s replayed again; answered within %.0f s already",
                                 cmd.id, REPLAY_ANSWER_S)
            return True
        self._replay_answered[cmd.id] = now
        while len(self._replay_answered) > REPLAY_IDS_MAX:
            self._replay_answered.pop(next(iter(self._replay_answered)))
        prior_err = prior.get("error") or {}
        if prior.get("state") == "REJECTED" and prior_err.get("code") == errors.EXPIRED:
            err = errors.RejectError(errors.EXPIRED, f"command {cmd.id} was refused as expired before; "
                                     "a clock change does not revive it")
            self.reporter.update(cmd.id, cmd.type, "REJECTED", error=err, persist=False)
            return True
        err = errors.RejectError(errors.REPLAYED, f"command {cmd.id} was already received "
                                 f"(state {prior.get('state')}); not executed again")
        self.reporter.update(cmd.id, cmd.type, "REJECTED", error=err, persist=False,
                             extra={"recorded": {"state": prior.get("state"), "error": prior.get("error"),
                                                 "result": prior.get("result")}})
        return True

    # -- failures ----------------------------------------------------------------------------
    def _failed(self, p: _Progress, e: BaseException) -> bool:
        """An unexpected failure: end the job, or keep the message for later when room lacks."""
        err = errors.classify(e)
        if err.code == errors.INTERNAL:
            if self._failed_log.allow() is not None:
                log.error("command %s: %s", p.cid, err.message, exc_info=e)
        else:
            self._failed_log.log(log, logging.WARNING, "command %s: %s", p.cid, err)
        if p.recorded and p.cid is not None:
            try:
                self.reporter.update(p.cid, p.type, "FAILED", error=err)
            except Exception as ex:  # the outbox and the direct path both failed
                self._failed_log.log(log, logging.WARNING, "job update for %s not sent: %s", p.cid, ex)
            return True
        if err.code in ROOM_CODES:
            if p.cid is not None and p.cid not in self._told:
                self._tell(p, "QUEUED", {"delayed": {**err.to_dict(), "message": (
                    f"{err.message}; the command is not recorded yet and is tried again when there is room")}})
                self._told[p.cid] = None
                while len(self._told) > DELAYED_TOLD_MAX:
                    self._told.pop(next(iter(self._told)))
            return False
        if p.cid is not None:
            self._tell(p, "FAILED", {"error": err.to_dict()})
        return True

    def _tell(self, p: _Progress, state: str, fields: dict[str, Any]) -> None:
        """A job update sent past the outbox (which may be what failed); best effort."""
        assert p.cid is not None
        doc = {"v": 1, "device": self.reporter.topics.device, "job": p.cid, "type": p.type, "state": state,
               "ts": now_rfc3339(), **fields}
        try:
            if not self._publish_now(self.reporter.topics.job(p.cid), doc):
                self._failed_log.log(log, logging.WARNING, "job update for %s not sent: not connected", p.cid)
        except Exception as ex:
            self._failed_log.log(log, logging.WARNING, "job update for %s not sent: %s", p.cid, ex)
