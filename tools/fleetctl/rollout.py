"""Staged rollouts: canary devices first, then waves; abort (and optionally roll back) on failures.

Invariants:
- The plan and every device's progress live in one JSON state file, written atomically (temp +
  fsync + rename) before any command is sent and after results arrive, so ``fleetctl rollout
  --resume STATE`` continues after Ctrl-C, a crash or SIGKILL.
- Command ids are deterministic (``{rollout}-w{wave}``, ``{rollout}-rollback``). A resumed
  rollout re-sends unfinished devices the *same* id: a device that already has it answers
  ``replayed`` with the recorded outcome and does not execute it again (PROTOCOL.md), so no
  device ever deploys twice; a device that never got it executes it now.
- A wave starts only when the previous one ended (every device terminal or timed out) and the
  failure count is within the threshold. Failures are counted over the whole rollout: FAILED,
  REJECTED, CANCELED, TIMED_OUT, or no final update within ``job_timeout_s``.
- Crossing the threshold (or any canary failure beyond ``canary_max_failures``) aborts: no
  further wave starts; devices already sent are still awaited (their outcome decides what to
  roll back); with ``rollback_on_abort`` every device this rollout upgraded gets a ``rollback``.
- Every wait has a deadline; the broker connection is the caller's.
"""

from __future__ import annotations

import argparse
import json
import math
import queue
import secrets
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import errors
from agent.fsutil import atomic_write
from fleetctl import commands, mqttc

STATE_VERSION = 1
TERMINAL = commands.TERMINAL_STATES
DEFAULT_JOB_TIMEOUT_S = 600.0  # one device's deploy, download included
DEFAULT_DISCOVER_S = 5.0  # how long --group waits for members to answer a ping
GROUP_QUIET_S = 2.0  # a group wait ends this long after the last new device, once all seen are final
SAVE_MIN_INTERVAL_S = 0.5  # results are saved at most this often (a lost one is re-asked, replay-safe)
EXIT_OK, EXIT_ABORTED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

Event = dict[str, Any]
EventSink = Callable[[Event], None]


class GroupWatcher:
    """Job updates for one command id from any device (``{prefix}/+/jobs/{id}``), optionally filtered."""

    def __init__(self, client: mqtt.Client, prefix: str, command_id: str, devices: Sequence[str] | None = None) -> None:
        self.client = client
        self.topic = f"{commands.check_prefix(prefix)}/+/jobs/{command_id}"
        self.command_id = command_id
        self.devices = set(devices) if devices is not None else None
        self._q: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        parts = msg.topic.split("/")
        device = parts[-3] if len(parts) >= 3 else ""
        if self.devices is not None and device not in self.devices:
            return
        try:
            doc = json.loads(msg.payload)
        except (ValueError, UnicodeDecodeError):
            return
        if isinstance(doc, dict) and doc.get("job", self.command_id) == self.command_id:
            self._q.put((device, doc))

    def __enter__(self) -> GroupWatcher:
        self.client.message_callback_add(self.topic, self._on_message)
        mqttc.subscribe(self.client, [self.topic], qos=1)
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.message_callback_remove(self.topic)
        mqttc.unsubscribe(self.client, [self.topic])

    def next(self, timeout_s: float) -> tuple[str, dict[str, Any]] | None:
        try:
            return self._q.get(timeout=max(0.0, timeout_s))
        except queue.Empty:
            return None


def effective(update: dict[str, Any]) -> dict[str, Any]:
    """A ``replayed`` refusal stands for the recorded outcome of the original job."""
    err = update.get("error")
    if update.get("state") == "REJECTED" and isinstance(err, dict) and err.get("code") == errors.REPLAYED:
        raw = update.get("recorded")
        rec: dict[str, Any] = raw if isinstance(raw, dict) else {}
        return {**update, "state": rec.get("state") or "IN_PROGRESS", "error": rec.get("error"),
                "result": rec.get("result"), "replayed": True}
    return update


def collect_group(client: mqtt.Client, prefix: str, group: str, req: commands.CommandRequest,
                  keys: Sequence[Ed25519PrivateKey], timeout_s: float,
                  on_update: Callable[[str, dict[str, Any]], None] | None = None,
                  quiet_s: float = GROUP_QUIET_S) -> commands.JobOutcome:
    """Send one group command and follow whichever devices answer.

    Ends at ``timeout_s``, or ``quiet_s`` after the last update once every device seen so far
    reached a final state (fleetctl cannot know a group's members in advance).
    """
    outcome = commands.JobOutcome(req.id, {})
    with GroupWatcher(client, prefix, req.id) as w:
        commands.send_command(client, prefix, [commands.group_target(group)], req, keys)
        deadline = time.monotonic() + timeout_s
        last = time.monotonic()
        while True:
            now = time.monotonic()
            if now >= deadline:
                break
            if outcome.last and not outcome.pending and now - last >= quiet_s:
                break
            got = w.next(min(deadline - now, quiet_s / 4))
            if got is None:
                continue
            device, update = got
            prev = outcome.last.get(device)
            if prev is not None and prev.get("state") in TERMINAL:
                continue
            outcome.last[device] = effective(update)
            last = time.monotonic()
            if on_update is not None:
                on_update(device, update)
    return outcome


def discover_group(client: mqtt.Client, prefix: str, group: str, keys: Sequence[Ed25519PrivateKey],
                   timeout_s: float = DEFAULT_DISCOVER_S) -> list[str]:
    """The group's devices that answer a ping within ``timeout_s`` (sorted)."""
    req = commands.CommandRequest("ping", {}, ttl_s=max(60.0, timeout_s * 2))
    out = collect_group(client, prefix, group, req, keys, timeout_s)
    return sorted(d for d, u in out.last.items() if u and u.get("state") == "SUCCEEDED")


# -- plan -----------------------------------------------------------------------------------------


def parse_threshold(text: str, total: int) -> int:
    """``N`` (failures allowed) or ``P%`` (of all devices in the rollout, rounded down)."""
    t = text.strip()
    try:
        if t.endswith("%"):
            pct = float(t[:-1])
            if not 0 <= pct <= 100:
                raise ValueError
            return math.floor(total * pct / 100.0 + 1e-9)
        n = int(t)
        if n < 0:
            raise ValueError
        return n
    except ValueError as e:
        raise ValueError(f"threshold {text!r}: expected a count (3) or a percentage (10%)") from e


def plan_waves(devices: Sequence[str], canary: int | Sequence[str], waves: Sequence[str] | None = None,
               wave_size: int | None = None) -> list[list[str]]:
    """Canary first, then waves by size or by cumulative percentages of the rest (the last takes the rest)."""
    order = list(dict.fromkeys(devices))  # first occurrence of each, in order
    seen = set(order)
    if isinstance(canary, int):
        if canary < 0:
            raise ValueError("canary count must not be negative")
        first, rest = order[:canary], order[canary:]
    else:
        unknown = [d for d in canary if d not in seen]
        if unknown:
            raise ValueError(f"canary devices not in the rollout: {', '.join(unknown)}")
        first = list(dict.fromkeys(canary))
        rest = [d for d in order if d not in set(first)]
    out = [first] if first else []
    if not rest:
        return out
    if wave_size:
        if wave_size < 1:
            raise ValueError("wave size must be at least 1")
        out += [rest[i:i + wave_size] for i in range(0, len(rest), wave_size)]
        return out
    cuts: list[int] = []
    for w in waves or ("25%", "50%", "100%"):
        w = w.strip()
        if w.endswith("%"):
            cut = math.ceil(len(rest) * float(w[:-1]) / 100.0)
        else:
            cut = (cuts[-1] if cuts else 0) + int(w)
        cuts.append(max(0, min(len(rest), cut)))
    if not cuts or cuts[-1] < len(rest):
        cuts.append(len(rest))
    prev = 0
    for c in cuts:
        if c > prev:
            out.append(rest[prev:c])
            prev = c
    return out


@dataclass
class Plan:
    model: str
    manifest_url: str
    waves: list[list[str]]
    max_failures: int
    canary_max_failures: int = 0
    canary: bool = True  # the first wave is a canary wave
    rollback_on_abort: bool = False
    job_timeout_s: float = DEFAULT_JOB_TIMEOUT_S
    ttl_s: float = commands.DEFAULT_TTL_S
    wave_pause_s: float = 0.0
    manifest_sha256: str | None = None
    backend: str | None = None

    def params(self) -> dict[str, Any]:
        return commands.deploy_params(self.model, self.manifest_url, self.manifest_sha256, self.backend)


class Rollout:
    """One rollout's state, persisted in ``path``; ``run`` drives it to completed or aborted."""

    def __init__(self, path: Path, doc: dict[str, Any]) -> None:
        self.path = path
        self.doc = doc
        self._saved_at = 0.0

    # -- state file ---------------------------------------------------------------------------
    @classmethod
    def create(cls, path: Path, plan: Plan, connection: dict[str, Any], rollout_id: str | None = None) -> Rollout:
        rid = rollout_id or f"ro-{secrets.token_hex(4)}"
        commands.check_name(rid, "rollout id")
        devices = {d: {"wave": i, "state": "pending"} for i, w in enumerate(plan.waves) for d in w}
        if not devices:
            raise ValueError("a rollout needs at least one device")
        doc = {"v": STATE_VERSION, "id": rid, "created": time.time(), "status": "running", "abort_reason": "",
               "plan": {**plan.__dict__}, "connection": connection, "devices": devices,
               "waves": [{"index": i, "status": "pending", "size": len(w)} for i, w in enumerate(plan.waves)]}
        r = cls(path, doc)
        r.save(force=True)
        return r

    @classmethod
    def load(cls, path: Path) -> Rollout:
        doc = json.loads(Path(path).read_text())
        if not isinstance(doc, dict) or doc.get("v") != STATE_VERSION or "plan" not in doc:
            raise ValueError(f"{path}: not a rollout state file (v{STATE_VERSION})")
        return cls(Path(path), doc)

    def save(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._saved_at < SAVE_MIN_INTERVAL_S:
            return
        self.doc["updated"] = time.time()
        atomic_write(self.path, json.dumps(self.doc, indent=1, sort_keys=True).encode(), mode=0o600)
        self._saved_at = now

    @property
    def id(self) -> str:
        return str(self.doc["id"])

    @property
    def plan(self) -> Plan:
        return Plan(**self.doc["plan"])

    @property
    def devices(self) -> dict[str, dict[str, Any]]:
        return self.doc["devices"]

    @property
    def status(self) -> str:
        return str(self.doc["status"])

    def failures(self, wave: int | None = None) -> int:
        return sum(1 for d in self.devices.values()
                   if d["state"] in TERMINAL and d["state"] != "SUCCEEDED" and (wave is None or d["wave"] == wave))

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for d in self.devices.values():
            out[d["state"]] = out.get(d["state"], 0) + 1
        return out

    def summary(self) -> dict[str, Any]:
        rb = [d for d in self.devices.values() if "rollback" in d]
        return {"rollout": self.id, "status": self.status, "abort_reason": self.doc["abort_reason"],
                "devices": len(self.devices), "states": self.counts(), "failures": self.failures(),
                "max_failures": self.plan.max_failures,
                "rolled_back": sum(1 for d in rb if d["rollback"] == "SUCCEEDED"),
                "rollback_failed": sum(1 for d in rb if d["rollback"] in TERMINAL and d["rollback"] != "SUCCEEDED"),
                "state_file": str(self.path)}

    # -- running ------------------------------------------------------------------------------
    def _abort(self, reason: str, emit: EventSink) -> None:
        if self.status != "aborted":
            self.doc["status"] = "aborted"
            self.doc["abort_reason"] = reason
            self.save(force=True)
            emit({"event": "abort", "reason": reason})

    def _check(self, wave: int, emit: EventSink) -> None:
        plan = self.plan
        if plan.canary and wave == 0 and len(plan.waves) > 1 and self.failures(0) > plan.canary_max_failures:
            self._abort(f"{self.failures(0)} canary failure(s) > {plan.canary_max_failures} allowed", emit)
        elif self.failures() > plan.max_failures:
            self._abort(f"{self.failures()} failure(s) > {plan.max_failures} allowed", emit)

    def _follow(self, client: mqtt.Client, keys: Sequence[Ed25519PrivateKey], prefix: str, command_id: str,
                ctype: str, params: dict[str, Any], targets: list[str], field: str, emit: EventSink,
                wave: int | None) -> None:
        """Send one command id to ``targets`` (marked sent first) and record each device's outcome in ``field``."""
        plan = self.plan
        now = time.time()
        for d in targets:
            dev = self.devices[d]
            dev[field] = "sent"
            dev.setdefault(f"{field}_sent_at" if field != "state" else "sent_at", now)
            dev["job" if field == "state" else "rollback_job"] = command_id
        self.save(force=True)  # before anything leaves: a resume knows these may have been received
        pending = set(targets)
        with GroupWatcher(client, prefix, command_id, targets) as w:
            req = commands.CommandRequest(ctype, params, plan.ttl_s, command_id)
            commands.send_command(client, prefix, [commands.device_target(d) for d in targets], req, keys)
            emit({"event": "sent", "command": command_id, "type": ctype, "wave": wave, "devices": len(targets)})
            deadline = time.monotonic() + plan.job_timeout_s
            while pending:
                got = w.next(deadline - time.monotonic())
                if got is None:
                    break
                device, update = got
                if device not in pending:
                    continue
                u = effective(update)
                state = u.get("state")
                if state not in TERMINAL:
                    if u.get("step") or u.get("replayed"):
                        emit({"event": "progress", "device": device, "type": ctype, "state": state, "step": u.get("step"),
                              "replayed": bool(u.get("replayed"))})
                    continue
                pending.discard(device)
                dev = self.devices[device]
                dev[field] = state
                if field == "state":
                    dev["done_at"] = time.time()
                    raw_res = u.get("result")
                    res: dict[str, Any] = raw_res if isinstance(raw_res, dict) else {}
                    if res.get("version") is not None:
                        dev["version"] = res["version"]
                    if u.get("error"):
                        dev["error"] = u["error"]
                elif u.get("error"):
                    dev["rollback_error"] = u["error"]
                emit({"event": "result", "device": device, "type": ctype, "state": state, "wave": wave,
                      "error": u.get("error"), "result": u.get("result"), "replayed": bool(u.get("replayed"))})
                self.save()
                if wave is not None:
                    self._check(wave, emit)
        for d in sorted(pending):
            dev = self.devices[d]
            dev[field] = "TIMED_OUT"
            err = {"code": errors.TIMEOUT, "message": f"no final job update within {plan.job_timeout_s:g} s"}
            dev["error" if field == "state" else "rollback_error"] = err
            emit({"event": "result", "device": d, "type": ctype, "state": "TIMED_OUT", "wave": wave, "error": err})
        self.save(force=True)
        if wave is not None:
            self._check(wave, emit)

    def run(self, client: mqtt.Client, keys: Sequence[Ed25519PrivateKey], emit: EventSink) -> int:
        """Drive the rollout to its end; returns EXIT_OK (completed) or EXIT_ABORTED."""
        plan = self.plan
        prefix = str(self.doc["connection"].get("prefix", commands.DEFAULT_PREFIX))
        if self.status == "interrupted":
            self.doc["status"] = "running"
        runs = int(self.doc.get("runs", 0))
        self.doc["runs"] = runs + 1
        emit({"event": "start", "rollout": self.id, "model": plan.model, "devices": len(self.devices),
              "waves": [len(w) for w in plan.waves], "max_failures": plan.max_failures, "resumed": runs > 0})
        for wi, wave in enumerate(plan.waves):
            if self.status == "aborted":
                break
            todo = [d for d in wave if self.devices[d]["state"] not in TERMINAL]
            winfo = self.doc["waves"][wi]
            if todo:
                winfo["status"] = "running"
                winfo.setdefault("started", time.time())
                emit({"event": "wave", "wave": wi, "canary": plan.canary and wi == 0 and len(plan.waves) > 1,
                      "devices": len(wave), "todo": len(todo)})
                self._follow(client, keys, prefix, f"{self.id}-w{wi}", "deploy", plan.params(), todo, "state", emit, wi)
            self._check(wi, emit)
            winfo["status"] = "done"
            winfo.setdefault("finished", time.time())
            self.save(force=True)
            if todo:  # a wave finished before a resume is not reported again
                emit({"event": "wave_done", "wave": wi, "succeeded": sum(self.devices[d]["state"] == "SUCCEEDED" for d in wave),
                      "failed": self.failures(wi), "failures_total": self.failures(), "max_failures": plan.max_failures})
            if self.status != "aborted" and plan.wave_pause_s and wi < len(plan.waves) - 1:
                time.sleep(plan.wave_pause_s)
        if self.status == "aborted":
            if plan.rollback_on_abort:
                done = [d for d, v in self.devices.items() if v["state"] == "SUCCEEDED" and v.get("rollback") not in TERMINAL]
                if done:
                    emit({"event": "rollback", "devices": len(done)})
                    self._follow(client, keys, prefix, f"{self.id}-rollback", "rollback", {"model": plan.model}, done,
                                 "rollback", emit, None)
            emit({"event": "end", **self.summary()})
            self.save(force=True)
            return EXIT_ABORTED
        self.doc["status"] = "completed"
        self.save(force=True)
        emit({"event": "end", **self.summary()})
        return EXIT_OK


# -- CLI -----------------------------------------------------------------------------------------


def human(event: Event) -> str | None:
    """The line a person reads for one rollout event (None: nothing to show)."""
    e = event.get("event")
    if e == "start":
        return (f"rollout {event['rollout']}: {event['model']} to {event['devices']} devices in waves "
                f"{'+'.join(map(str, event['waves']))} (abort above {event['max_failures']} failures)"
                + (" — resumed" if event.get("resumed") else ""))
    if e == "wave":
        what = "canary" if event.get("canary") else f"wave {event['wave']}"
        left = f", {event['todo']} to do" if event["todo"] != event["devices"] else ""
        return f"{what}: {event['devices']} device{'' if event['devices'] == 1 else 's'}{left}"
    if e == "result":
        raw_err, raw_res = event.get("error"), event.get("result")
        err: dict[str, Any] | None = raw_err if isinstance(raw_err, dict) else None
        res: dict[str, Any] = raw_res if isinstance(raw_res, dict) else {}
        detail = f"{err.get('code')}: {err.get('message')}" if err else \
            (f"v{res.get('version')} on {res.get('backend')}" if res.get("version") is not None else "")
        again = " (already done: replayed)" if event.get("replayed") else ""
        kind = "" if event.get("type") == "deploy" else f"{event.get('type')} "
        return f"  {event['device']:<20} {kind}{event['state']:<10} {detail}{again}".rstrip()
    if e == "wave_done":
        return (f"  → {event['succeeded']} succeeded, {event['failed']} failed; "
                f"{event['failures_total']} of {event['max_failures']} allowed failures used")
    if e == "abort":
        return f"ABORT: {event['reason']}; no further waves"
    if e == "rollback":
        return f"rolling back {event['devices']} devices this rollout upgraded"
    if e == "end":
        states = ", ".join(f"{k} {v}" for k, v in sorted(event["states"].items()))
        rb = f"; rolled back {event['rolled_back']}" + (f", rollback failed {event['rollback_failed']}" if event["rollback_failed"] else "") \
            if event["rolled_back"] or event["rollback_failed"] else ""
        return f"rollout {event['rollout']} {event['status'].upper()}: {states}{rb} (state {event['state_file']})"
    return None


def add_arguments(p: argparse.ArgumentParser, duration: Callable[[str], float]) -> None:
    p.add_argument("--resume", metavar="STATE", help="continue the rollout recorded in STATE (other plan options are ignored)")
    p.add_argument("--model", help="model name")
    p.add_argument("--manifest-url", metavar="URL")
    p.add_argument("--manifest-sha256", metavar="HEX")
    p.add_argument("--backend", metavar="PIN", help="e.g. onnxruntime:CPUExecutionProvider")
    p.add_argument("--devices", action="append", metavar="ID[,ID...]", help="target devices; repeatable")
    p.add_argument("--devices-file", metavar="FILE", help="one device id per line")
    p.add_argument("--group", help="every device of this group that answers a ping (see --discover-timeout)")
    p.add_argument("--discover-timeout", type=duration, default=DEFAULT_DISCOVER_S, metavar="DURATION")
    p.add_argument("--canary", type=int, default=1, metavar="N", help="first N devices form the canary wave (default 1)")
    p.add_argument("--canary-devices", metavar="ID[,ID...]", help="these devices are the canary wave")
    p.add_argument("--canary-max-failures", type=int, default=0, metavar="N", help="canary failures tolerated (default 0)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--waves", metavar="LIST", help="after the canary: cumulative %% or counts, e.g. 10%%,50%%,100%% (default 25%%,50%%,100%%)")
    g.add_argument("--wave-size", type=int, metavar="N", help="after the canary: waves of N devices")
    p.add_argument("--max-failures", default="0", metavar="N|P%",
                   help="abort when more devices than this fail, over the whole rollout (default 0)")
    p.add_argument("--rollback-on-abort", action="store_true", help="on abort, roll back every device this rollout upgraded")
    p.add_argument("--job-timeout", type=duration, default=DEFAULT_JOB_TIMEOUT_S, metavar="DURATION",
                   help="a device without a final job update after this counts as failed (default 10m)")
    p.add_argument("--wave-pause", type=duration, default=0.0, metavar="DURATION", help="wait between waves (bake time)")
    p.add_argument("--state", metavar="FILE", help="state file (default ./rollout-ID.json)")
    p.add_argument("--id", help="rollout id (default ro-<8 hex>)")
    p.add_argument("--key", action="append", metavar="KEY.key", help="Ed25519 signing key; repeat for a threshold")
    p.add_argument("--ttl", type=duration, default=commands.DEFAULT_TTL_S, metavar="DURATION", help="command lifetime (default 1h)")
    p.add_argument("--json", action="store_true", help="one JSON event per line")


def _device_list(a: argparse.Namespace) -> list[str]:
    out: list[str] = []
    for chunk in a.devices or []:
        out += [commands.check_name(d.strip(), "device") for d in chunk.split(",") if d.strip()]
    if a.devices_file:
        for line in Path(a.devices_file).read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                out.append(commands.check_name(line, "device"))
    return out


def run_cli(a: argparse.Namespace, connect: Callable[[argparse.Namespace], mqtt.Client],
            signing_keys: Callable[[list[str]], list[Ed25519PrivateKey]], default_keys: Callable[[], list[str]]) -> int:
    """``fleetctl rollout``: plan (or resume) and run; exit 0 completed, 1 aborted, 130 interrupted."""
    def emit(event: Event) -> None:
        if a.json:
            print(json.dumps(event, separators=(",", ":"), default=str), flush=True)
        else:
            line = human(event)
            if line is not None:
                print(line, flush=True)

    if a.resume:
        r = Rollout.load(Path(a.resume))
        conn = r.doc["connection"]
        key_paths = a.key or conn.get("keys") or default_keys()
        if a.broker == mqttc.DEFAULT_BROKER and conn.get("broker"):
            a.broker = conn["broker"]
        if r.status in ("completed", "aborted") and not (r.status == "aborted" and r.plan.rollback_on_abort):
            emit({"event": "end", **r.summary()})
            return EXIT_OK if r.status == "completed" else EXIT_ABORTED
    else:
        if not a.model or not a.manifest_url:
            raise ValueError("rollout needs --model and --manifest-url (or --resume STATE)")
        key_paths = a.key or default_keys()
        keys = signing_keys(key_paths)
        devices = _device_list(a)
        if a.group:
            client = connect(a)
            try:
                devices += [d for d in discover_group(client, a.prefix, a.group, keys, a.discover_timeout) if d not in devices]
            finally:
                mqttc.disconnect(client)
        if not devices:
            raise ValueError("no devices: give --devices, --devices-file or --group")
        canary: int | list[str] = a.canary
        if a.canary_devices:
            canary = [d.strip() for d in a.canary_devices.split(",") if d.strip()]
        waves = plan_waves(devices, canary, a.waves.split(",") if a.waves else None, a.wave_size)
        total = sum(len(w) for w in waves)
        plan = Plan(model=commands.check_name(a.model, "model"), manifest_url=a.manifest_url, waves=waves,
                    max_failures=parse_threshold(a.max_failures, total), canary_max_failures=a.canary_max_failures,
                    canary=bool(canary), rollback_on_abort=a.rollback_on_abort, job_timeout_s=a.job_timeout,
                    ttl_s=a.ttl, wave_pause_s=a.wave_pause, manifest_sha256=a.manifest_sha256, backend=a.backend)
        plan.params()  # validate the deploy params before anything is written
        rid = a.id or f"ro-{secrets.token_hex(4)}"
        path = Path(a.state or f"rollout-{rid}.json")
        if path.exists():
            raise ValueError(f"{path} exists: resume it with --resume {path}, or pick another --state")
        r = Rollout.create(path, plan, {"broker": a.broker, "prefix": a.prefix,
                                        "keys": [str(Path(k).resolve()) for k in key_paths]}, rid)
    keys = signing_keys(key_paths)
    client = connect(a)
    try:
        return r.run(client, keys, emit)
    except KeyboardInterrupt:
        r.doc["status"] = "interrupted"
        r.save(force=True)
        print(f"fleetctl: interrupted; resume with: fleetctl rollout --resume {r.path}", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    finally:
        mqttc.disconnect(client)
