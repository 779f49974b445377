"""Signed fleet commands (PROTOCOL.md): build, sign, publish, and follow their job updates.

Invariants:
- A command document always carries ``v``, ``id``, ``type``, exactly one target (a device or a
  group), ``issued_at`` and ``expires_at``; it is signed as a DSSE envelope over its compact JSON.
- A command sent to several devices is signed once per device (each document targets one device,
  so the device's target check holds) and all copies share one id, like a group command.
- To follow a command, subscribe to its job topics *before* publishing it, so no update is missed
  (job updates are not retained); every wait has a deadline.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.bundles import dsse
from agent.timeutil import now_rfc3339
from fleetctl import mqttc

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "edge"
DEFAULT_TTL_S = 3600.0
DEFAULT_WAIT_TIMEOUT_S = 300.0
PUBACK_TIMEOUT_S = mqttc.PUBACK_TIMEOUT_S
COMMAND_ID_HEX_CHARS = 16
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # device and group names (PROTOCOL.md)
ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
TYPE_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
TERMINAL_STATES = frozenset({"SUCCEEDED", "FAILED", "REJECTED", "CANCELED", "TIMED_OUT"})
WAIT_TICK_S = 1.0  # how often a wait wakes without updates, for progress lines (on_tick)
MANIFEST_URL_SCHEMES = ("http", "https", "file")

Target = dict[str, str]


def check_name(value: str, what: str) -> str:
    """A device or group name as PROTOCOL.md allows; ValueError naming ``what`` otherwise."""
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise ValueError(f"{what} {value!r}: must match [A-Za-z0-9_.-]{{1,64}}")
    return value


def check_prefix(prefix: str) -> str:
    """A topic prefix: non-empty, no wildcards, no leading/trailing slash."""
    if (not prefix or "+" in prefix or "#" in prefix or "\x00" in prefix
            or prefix.startswith("/") or prefix.endswith("/")):
        raise ValueError(f"topic prefix {prefix!r}: non-empty, without + # or a leading/trailing /")
    return prefix


def device_target(device: str) -> Target:
    return {"device": check_name(device, "device")}


def group_target(group: str) -> Target:
    return {"group": check_name(group, "group")}


def new_command_id(command_type: str) -> str:
    """``{type}-{16 random hex chars}``, e.g. ``deploy-3f2a9c01d4e5b6a7``."""
    return f"{command_type}-{secrets.token_hex(COMMAND_ID_HEX_CHARS // 2)}"


def command_topic(prefix: str, target: Mapping[str, str]) -> str:
    """``{prefix}/{device}/cmd`` or ``{prefix}/groups/{group}/cmd``."""
    if "device" in target:
        return f"{prefix}/{target['device']}/cmd"
    return f"{prefix}/groups/{target['group']}/cmd"


def status_topic(prefix: str, device: str) -> str:
    return f"{prefix}/{device}/status"


def job_topic(prefix: str, device: str, command_id: str) -> str:
    return f"{prefix}/{device}/jobs/{command_id}"


def command_document(command_type: str, params: Mapping[str, Any], target: Mapping[str, str],
                     ttl_s: float = DEFAULT_TTL_S, command_id: str | None = None,
                     issued_at: float | None = None) -> dict[str, Any]:
    """The command document of PROTOCOL.md, checked for the shape a device requires."""
    if not TYPE_RE.match(command_type):
        raise ValueError(f"command type {command_type!r}: lowercase letters, digits and _")
    if len(target) != 1 or not ({"device", "group"} & set(target)):
        raise ValueError(f"target {dict(target)!r}: exactly one of device or group")
    kind, name = next(iter(target.items()))
    check_name(name, kind)
    if ttl_s <= 0:
        raise ValueError(f"ttl must be positive, got {ttl_s:g} s")
    cid = command_id or new_command_id(command_type)
    if not ID_RE.match(cid):
        raise ValueError(f"command id {cid!r}: must match [A-Za-z0-9_.:-]{{1,128}}")
    t = time.time() if issued_at is None else issued_at
    return {"v": 1, "id": cid, "type": command_type, "target": {kind: name},
            "issued_at": now_rfc3339(t), "expires_at": now_rfc3339(t + ttl_s),
            "params": dict(params)}


def sign_document(doc: Mapping[str, Any], keys: Sequence[Ed25519PrivateKey]) -> bytes:
    """The DSSE envelope (JSON bytes) over the compact JSON of ``doc``."""
    if not keys:
        raise ValueError("at least one signing key is required")
    payload = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
    return json.dumps(dsse.sign(dsse.COMMAND_TYPE, payload, keys), separators=(",", ":")).encode()


def make_command(type: str, params: dict[str, Any], target: dict[str, str],
                 keys: list[Ed25519PrivateKey], ttl_s: float = DEFAULT_TTL_S,
                 command_id: str | None = None, issued_at: float | None = None) -> tuple[str, bytes]:
    """Build and sign one command; returns (command id, envelope JSON bytes)."""
    doc = command_document(type, params, target, ttl_s, command_id, issued_at)
    return doc["id"], sign_document(doc, keys)


def deploy_params(model: str, manifest_url: str, manifest_sha256: str | None = None,
                  backend: str | None = None) -> dict[str, Any]:
    """``deploy`` params, checked: a model name, an http(s)/file manifest URL, a sha256 hex."""
    check_name(model, "model")
    scheme = manifest_url.split(":", 1)[0].lower() if ":" in manifest_url else ""
    if scheme not in MANIFEST_URL_SCHEMES:
        raise ValueError(f"manifest URL {manifest_url!r}: must be http://, https:// or file://")
    params: dict[str, Any] = {"model": model, "manifest_url": manifest_url}
    if manifest_sha256 is not None:
        sha = manifest_sha256.lower()
        if not SHA256_RE.match(sha):
            raise ValueError(f"manifest sha256 {manifest_sha256!r}: 64 hex digits expected")
        params["manifest_sha256"] = sha
    if backend:
        params["backend"] = backend
    return params


@dataclass(frozen=True)
class CommandRequest:
    """What to send: type, params, lifetime and the id every copy shares."""

    type: str
    params: dict[str, Any]
    ttl_s: float = DEFAULT_TTL_S
    id: str = ""

    def __post_init__(self) -> None:
        if not self.id:
            object.__setattr__(self, "id", new_command_id(self.type))


def send_command(client: mqtt.Client, prefix: str, targets: Sequence[Target], doc: CommandRequest,
                 keys: Sequence[Ed25519PrivateKey], *,
                 timeout_s: float = PUBACK_TIMEOUT_S) -> list[str]:
    """Sign ``doc`` for each target and publish it QoS 1, waiting for each PUBACK; returns the topics."""
    check_prefix(prefix)
    if not targets:
        raise ValueError("no target device or group")
    issued = time.time()
    signed = []
    for target in targets:
        d = command_document(doc.type, doc.params, target, doc.ttl_s, doc.id, issued)
        signed.append((command_topic(prefix, target), sign_document(d, keys)))
    for topic, env in signed:
        mqttc.publish(client, topic, env, qos=1, timeout_s=timeout_s)
        log.debug("sent %s to %s", doc.id, topic)
    return [t for t, _ in signed]


@dataclass
class JobOutcome:
    """The last job update per device (None: nothing heard) once waiting ended."""

    command_id: str
    last: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    status: dict[str, dict[str, Any]] | None = None  # latest status seen per device; None: not watched

    @property
    def pending(self) -> list[str]:
        """Devices with no terminal state yet."""
        return [d for d, u in self.last.items() if u is None or u.get("state") not in TERMINAL_STATES]

    @property
    def succeeded(self) -> bool:
        return bool(self.last) and all(u is not None and u.get("state") == "SUCCEEDED"
                                       for u in self.last.values())


class JobWatcher:
    """Subscribes to one command's job topics on some devices and queues their updates."""

    def __init__(self, client: mqtt.Client, prefix: str, devices: Sequence[str], command_id: str,
                 watch_status: bool = False) -> None:
        check_prefix(prefix)
        self.client = client
        self.prefix = prefix
        self.command_id = command_id
        self.devices = [check_name(d, "device") for d in devices]
        self.topics = [job_topic(prefix, d, command_id) for d in self.devices]
        self._by_topic = dict(zip(self.topics, self.devices, strict=True))
        # With watch_status, also the devices' retained status: why a device that never answers
        # is silent (offline since when, or never seen under this id). Needs a client of its own:
        # a callback on the same status topic elsewhere would be replaced.
        self.status_topics = [status_topic(prefix, d) for d in self.devices] if watch_status else []
        self._status_of = dict(zip(self.status_topics, self.devices, strict=False))
        self.status: dict[str, dict[str, Any]] = {}
        self.status_watched = False  # the broker granted the status subscription
        self._queue: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
        self._started = False

    def _on_status(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        device = self._status_of.get(msg.topic)
        try:
            doc = json.loads(msg.payload) if msg.payload else None
        except (ValueError, UnicodeDecodeError):
            doc = None
        if device is not None and isinstance(doc, dict):
            self.status[device] = doc

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        device = self._by_topic.get(msg.topic)
        if device is None:
            return
        try:
            doc = json.loads(msg.payload)
        except (ValueError, UnicodeDecodeError):
            log.warning("%s: job update is not JSON; ignored", msg.topic)
            return
        if not isinstance(doc, dict) or doc.get("job", self.command_id) != self.command_id:
            log.warning("%s: job update for another job or not an object; ignored", msg.topic)
            return
        self._queue.put((device, doc))

    def start(self, timeout_s: float = mqttc.SUBACK_TIMEOUT_S) -> JobWatcher:
        """Subscribe (waiting for the SUBACK); call before publishing the command."""
        for t in self.topics:
            self.client.message_callback_add(t, self._on_message)
        self._started = True
        mqttc.subscribe(self.client, self.topics, qos=1, timeout_s=timeout_s)
        for t in self.status_topics:
            self.client.message_callback_add(t, self._on_status)
        try:  # only to explain silence: a broker that refuses it (an ACL) costs the explanation, not the command
            mqttc.subscribe(self.client, self.status_topics, qos=1, timeout_s=timeout_s)
            self.status_watched = bool(self.status_topics)
        except (ConnectionError, TimeoutError) as e:
            log.debug("device status not available: %s", e)
        return self

    def close(self) -> None:
        if not self._started:
            return
        self._started = False
        for t in [*self.topics, *self.status_topics]:
            self.client.message_callback_remove(t)
        mqttc.unsubscribe(self.client, [*self.topics, *self.status_topics])

    def __enter__(self) -> JobWatcher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def next_update(self, timeout_s: float) -> tuple[str, dict[str, Any]] | None:
        """The next (device, update), or None after ``timeout_s``."""
        try:
            return self._queue.get(timeout=max(0.0, timeout_s))
        except queue.Empty:
            return None


UpdateCallback = Callable[[str, dict[str, Any]], None]


def wait_jobs(watcher: JobWatcher, timeout_s: float = DEFAULT_WAIT_TIMEOUT_S,
              on_update: UpdateCallback | None = None,
              on_tick: Callable[[], None] | None = None) -> JobOutcome:
    """Collect updates until every device reached a terminal state or ``timeout_s`` passed.

    Each new update is passed to ``on_update(device, update)``; a repeated ``seq`` (a QoS 1
    duplicate) and anything after a device's terminal state are skipped. ``on_tick()`` runs at
    least every WAIT_TICK_S while waiting (progress lines).
    """
    outcome = JobOutcome(watcher.command_id, {d: None for d in watcher.devices},
                         watcher.status if watcher.status_watched else None)
    seen: set[tuple[str, Any]] = set()
    deadline = time.monotonic() + timeout_s
    while outcome.pending:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        got = watcher.next_update(min(left, WAIT_TICK_S) if on_tick is not None else left)
        if on_tick is not None:
            on_tick()
        if got is None:
            if on_tick is not None:
                continue
            break
        device, update = got
        prev = outcome.last.get(device)
        if prev is not None and prev.get("state") in TERMINAL_STATES:
            continue
        seq = update.get("seq")
        if seq is not None:
            if (device, seq) in seen:
                continue
            seen.add((device, seq))
        outcome.last[device] = update
        if on_update is not None:
            on_update(device, update)
    return outcome


def run_command(client: mqtt.Client, prefix: str, targets: Sequence[Target], doc: CommandRequest,
                keys: Sequence[Ed25519PrivateKey], *, wait: bool = False,
                timeout_s: float = DEFAULT_WAIT_TIMEOUT_S, on_update: UpdateCallback | None = None,
                on_sent: Callable[[list[str]], None] | None = None, on_tick: Callable[[], None] | None = None,
                watch_status: bool = False) -> JobOutcome | None:
    """Send a command and, with ``wait``, follow its job updates (device targets only); with
    ``watch_status`` the outcome also holds each device's latest status (a client of its own)."""
    if not wait:
        topics = send_command(client, prefix, targets, doc, keys)
        if on_sent is not None:
            on_sent(topics)
        return None
    devices = [t["device"] for t in targets if "device" in t]
    if len(devices) != len(targets):
        raise ValueError("waiting for job updates needs device targets (group members are not known here)")
    with JobWatcher(client, prefix, devices, doc.id, watch_status) as watcher:
        topics = send_command(client, prefix, targets, doc, keys)
        if on_sent is not None:
            on_sent(topics)
        return wait_jobs(watcher, timeout_s, on_update, on_tick)
