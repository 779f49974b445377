"""agent.toml: loading, defaults and validation (SURFACE.md).

Every key has a safe default; an unknown key or a bad value is an error that names the key.
Search order: ``--config PATH``, then ``$EDGE_AGENT_CONFIG``, then /etc/edge-agent/agent.toml
(absent default file → defaults).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from agent.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_CONFIG_PATH = Path("/etc/edge-agent/agent.toml")
ENV_CONFIG = "EDGE_AGENT_CONFIG"
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass
class MqttConfig:
    url: str = "mqtt://127.0.0.1:1883"
    topic_prefix: str = "edge"
    client_id: str = ""
    username: str = ""
    password_file: str = ""
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    keepalive_s: int = 60
    session_expiry_s: int = 7 * 24 * 3600  # broker keeps our subscriptions and QoS1 backlog this long
    protocol: str = "auto"  # "auto" (MQTT 5, falling back to 3.1.1), "5" or "3.1.1"


@dataclass
class TrustConfig:
    keys_dir: str = "/etc/edge-agent/trust"
    threshold: int = 1
    require_signed_commands: bool = True
    max_clock_skew_s: int = 300
    # age identity files (AGE-SECRET-KEY-1…) that open encrypted bundles; each 0400/0600, owned by
    # root or the agent's user (docs/security.md). With systemd: ${CREDENTIALS_DIRECTORY}/NAME.
    decryption_keys: list[str] = field(default_factory=list)


@dataclass
class TelemetryConfig:
    # float literals: _coerce checks a value against the default's type, so an int default
    # would refuse fractional values such as window_s = 0.5 that the ranges allow.
    heartbeat_s: float = 60.0
    window_s: float = 60.0
    outbox_max_mb: float = 64.0
    # Daily byte budget (docs/telemetry.md): heartbeats and telemetry thin to one per
    # thin_period_s while the day's usage runs ahead of it; jobs and events are never thinned.
    daily_budget_mb: float = 1.0  # 0: no budget
    thin_period_s: float = 900.0
    drain_rate_per_s: float = 50.0  # outbox backlog messages per second after an outage
    # Event thresholds (0 turns a check off); latency also uses a manifest's validation.max_p95_ms.
    disk_low_mb: float = 256.0
    memory_pressure_pct: float = 90.0
    error_rate_pct: float = 5.0
    slo_p99_ms: float = 0.0


@dataclass
class ApiConfig:
    listen: str = "127.0.0.1:8470"
    control_socket: str = "/run/edge-agent/control.sock"
    control_group: str = "edge-agent"
    admin_group: str = "edge-agent-admin"  # may use the mutating control calls (install, rollback, config, remove)
    # The local inference API's callers (docs/security.md, "Local threat model").
    max_connections: int = 256  # served at once; fewer where RLIMIT_NOFILE is tight
    max_body_inflight_mb: int = 256  # request bodies read or held at once, per process (daemon, each worker)
    allowed_hosts: list[str] = field(default_factory=list)  # Host names beside loopback names and IP literals
    allowed_origins: list[str] = field(default_factory=list)  # browser Origins allowed ("*": any); none by default
    token_file: str = ""  # a bearer token every request but the health checks must carry; empty: none
    unix_socket: str = ""  # also listen on this Unix socket (mode 0660, the agent's group); empty: no


@dataclass
class HardwareConfig:
    profile: str = "auto"
    profiles_dirs: list[str] = field(default_factory=lambda: [
        "/etc/edge-agent/hw-profiles", "/usr/share/edge-agent/hw-profiles"])


@dataclass
class BackendsConfig:
    prefer: list[str] = field(default_factory=list)
    autotune: bool = True
    autotune_objective: str = "latency"  # "latency": lowest single-call median; "throughput": most requests/s
    autotune_concurrency: int = 4  # callers at once when measuring throughput (the expected load)
    threads: int = 0  # 0: the runtime's default
    allow_spinning: bool = False  # onnxruntime busy-wait pools burn a core; off by default
    isolation: str = "process"  # "process": a runtime crash or hang cannot take the daemon down; "none": in-process
    infer_timeout_s: float = 30.0  # a call slower than this counts as a hung worker (killed; rollback in probation)
    # Per-model admission (agent/serving/admission.py): what callers may push into a model.
    max_batch: int = 64  # rows on a dynamic batch dimension; sets the largest request (413 too_large)
    max_inflight: int = 4  # runtime calls of one model at once ...
    max_queue: int = 64  # ... and calls waiting for one (beyond, or waiting past infer_timeout_s: 503 busy)
    worker_memory_max_mb: float = 2048.0  # a worker above this RSS is replaced between requests; 0: off


@dataclass
class ServingConfig:
    # Dynamic batching (agent/serving/batcher.py), for models whose inputs and outputs have a dynamic
    # first dimension; a manifest's "serving" object may set both per model.
    max_batch: int = 1  # rows per runtime call of concurrent requests run together; ≤ 1: off
    max_queue_delay_us: int = 500  # how long the first request of a batch waits for more


@dataclass
class StorageConfig:
    max_disk_mb: float = 4096.0
    keep_versions: int = 2


@dataclass
class DownloadsConfig:
    # Bundle downloads (BUNDLE.md "How a device handles it"); defaults in agent.bundles.fetch.
    ca_file: str = ""  # PEM CA bundle for https:// sources; empty: the system's CAs
    read_timeout_s: float = 30.0  # one read may stall this long
    min_rate_bps: float = 32768.0  # each file's deadline: deadline_base_s + size / min_rate_bps
    deadline_base_s: float = 60.0
    max_attempts: int = 5  # transport failures retried with jittered back-off, this many tries in all


@dataclass
class DeployConfig:
    probation_s: float = 60.0  # after replacing a version: crash, hang or errors here roll back
    probation_max_errors: int = 5
    probation_max_error_ratio: float = 0.5
    max_resumes: int = 3  # a deploy interrupted by restarts this often fails instead of looping
    download_timeout_s: float = 3600.0  # each deploy step's deadline: past it the job ends TIMED_OUT
    load_timeout_s: float = 300.0  # ... (the step is cut off; what served keeps serving)
    validate_timeout_s: float = 300.0


@dataclass
class RetentionConfig:
    # What the agent remembers, swept on a timer (agent/retention.py, docs/deployments.md "Retention").
    sweep_interval_s: float = 300.0
    jobs_max: int = 10000  # finished jobs kept whose commands expired (plus the skew); the oldest go first
    jobs_keep_s: float = 7 * 86400.0  # ... and none longer than this after the expiry
    reported_max: int = 10000  # final job updates remembered by the outbox (restart reconciliation)
    reported_keep_s: float = 86400.0


@dataclass
class Config:
    device_id: str = ""
    groups: list[str] = field(default_factory=list)
    state_dir: str = "/var/lib/edge-agent"
    log_format: str = "text"  # "json": one JSON object per line for log shippers (agent/logs.py)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    trust: TrustConfig = field(default_factory=TrustConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    backends: BackendsConfig = field(default_factory=BackendsConfig)
    serving: ServingConfig = field(default_factory=ServingConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    downloads: DownloadsConfig = field(default_factory=DownloadsConfig)
    deploy: DeployConfig = field(default_factory=DeployConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    source: str = "defaults"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("source", None)
        return d


AUTOTUNE_OBJECTIVES = ("latency", "throughput")  # agent/backends/autotune.py
MAX_AUTOTUNE_CONCURRENCY = 64  # measuring threads in a model's worker

# Keys a signed remote ``config`` command may change; everything else needs local access.
REMOTE_SETTABLE = {
    "telemetry.heartbeat_s", "telemetry.window_s", "telemetry.outbox_max_mb",
    "telemetry.daily_budget_mb", "telemetry.thin_period_s", "telemetry.drain_rate_per_s",
    "telemetry.disk_low_mb", "telemetry.memory_pressure_pct", "telemetry.error_rate_pct",
    "telemetry.slo_p99_ms",
    "backends.prefer", "backends.autotune", "backends.autotune_objective",
    "backends.autotune_concurrency", "backends.threads", "backends.allow_spinning",
    "storage.keep_versions", "storage.max_disk_mb", "groups",
    "deploy.probation_s", "deploy.probation_max_errors", "deploy.probation_max_error_ratio",
}

_SECTIONS: dict[str, type] = {
    "mqtt": MqttConfig, "trust": TrustConfig, "telemetry": TelemetryConfig, "api": ApiConfig,
    "hardware": HardwareConfig, "backends": BackendsConfig, "serving": ServingConfig, "storage": StorageConfig,
    "downloads": DownloadsConfig, "deploy": DeployConfig, "retention": RetentionConfig,
}


TOP_LEVEL_KEYS = ("device_id", "groups", "state_dir", "log_format")


def _closest(word: str, choices: list[str], fmt: str = "{}") -> str:
    """`` (did you mean X?)`` for the closest of ``choices`` (difflib), or an empty string."""
    match = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean {fmt.format(match[0])}?)" if match else ""


def unknown_top_level_message(key: str, is_table: bool) -> str:
    """An unknown ``[section]`` (or top-level key): the known ones and the closest."""
    sections = ", ".join(f"[{n}]" for n in _SECTIONS)
    if is_table:
        return f"unknown section [{key}]{_closest(key, list(_SECTIONS), '[{}]')}; known sections: {sections}"
    return (f"{key}: unknown key{_closest(key, [*TOP_LEVEL_KEYS, *_SECTIONS])}; known top-level keys: "
            f"{', '.join(TOP_LEVEL_KEYS)}; known sections: {sections}")


def unknown_key_message(section: str, key: str) -> str:
    """An unknown key inside ``[section]``: the section's keys and the closest."""
    names = [f.name for f in dataclasses.fields(_SECTIONS[section])]
    return f"{section}.{key}: unknown key in [{section}]{_closest(key, names)}; known keys: {', '.join(names)}"


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Check ``value`` has the default's type (ints accepted for floats); error names ``key``."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if isinstance(default, list):
        if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
            raise ConfigError(f"{key}: expected a list of strings, got {value!r}")
        return list(value)
    raise ConfigError(f"{key}: unsupported value {value!r}")


def from_dict(data: dict[str, Any], source: str = "dict") -> Config:
    """Build and validate a Config from a TOML-shaped dict."""
    cfg = Config(source=source)
    for key, value in data.items():
        if key in _SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"[{key}]: expected a table")
            section = getattr(cfg, key)
            names = [f.name for f in dataclasses.fields(section)]
            for sub, v in value.items():
                if sub not in names:
                    raise ConfigError(unknown_key_message(key, sub))
                setattr(section, sub, _coerce(f"{key}.{sub}", v, getattr(section, sub)))
        elif key in TOP_LEVEL_KEYS:
            setattr(cfg, key, _coerce(key, value, getattr(cfg, key)))
        else:
            raise ConfigError(unknown_top_level_message(key, isinstance(value, dict)))
    if not cfg.device_id:
        cfg.device_id = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:64] or "device"
    validate(cfg)
    return cfg


def set_dotted(cfg: Config, key: str, value: Any) -> None:
    """Set ``section.key`` (or a top-level key) on ``cfg`` with type checks; validates after."""
    parts = key.split(".")
    if len(parts) == 1:
        if key not in TOP_LEVEL_KEYS:
            raise ConfigError(unknown_top_level_message(key, False))
        setattr(cfg, key, _coerce(key, value, getattr(cfg, key)))
    elif len(parts) == 2 and parts[0] in _SECTIONS:
        section = getattr(cfg, parts[0])
        if parts[1] not in {f.name for f in dataclasses.fields(section)}:
            raise ConfigError(unknown_key_message(parts[0], parts[1]))
        setattr(section, parts[1], _coerce(key, value, getattr(section, parts[1])))
    else:
        raise ConfigError(f"{key}: unknown key{_closest(parts[0], list(_SECTIONS)) if len(parts) == 2 else ''}; "
                          f"keys are {', '.join(TOP_LEVEL_KEYS)} or SECTION.KEY with SECTION one of {', '.join(_SECTIONS)}")
    validate(cfg)


def _validate_retention(r: RetentionConfig) -> None:
    if not 0.05 <= r.sweep_interval_s <= 86400:
        raise ConfigError(f"retention.sweep_interval_s: {r.sweep_interval_s} not in 0.05..86400")
    for key in ("jobs_max", "reported_max"):
        if not 1 <= getattr(r, key) <= 10_000_000:
            raise ConfigError(f"retention.{key}: {getattr(r, key)} not in 1..10000000")
    for key in ("jobs_keep_s", "reported_keep_s"):
        if not 0 <= getattr(r, key) <= 365 * 86400:
            raise ConfigError(f"retention.{key}: {getattr(r, key)} not in 0..31536000")


def validate(cfg: Config) -> None:
    """Range and format checks, section by section; each error names the key."""
    _validate_identity(cfg)
    _validate_mqtt(cfg.mqtt)
    _validate_trust(cfg.trust)
    _validate_retention(cfg.retention)
    _validate_telemetry(cfg.telemetry)
    _validate_api(cfg.api)
    if cfg.hardware.profile != "auto" and not NAME_RE.match(cfg.hardware.profile):
        raise ConfigError(f"hardware.profile: {cfg.hardware.profile!r} is not a profile name")
    _validate_backends(cfg.backends)
    _validate_serving(cfg.serving, cfg.backends)
    _validate_storage(cfg.storage)
    _validate_downloads(cfg.downloads)
    _validate_deploy(cfg.deploy)
    if not cfg.state_dir:
        raise ConfigError("state_dir: must not be empty")
    if cfg.log_format not in ("text", "json"):
        raise ConfigError(f"log_format: {cfg.log_format!r}: expected \"text\" or \"json\"")


def _validate_identity(cfg: Config) -> None:
    if not NAME_RE.match(cfg.device_id):
        raise ConfigError(f"device_id: {cfg.device_id!r} must match [A-Za-z0-9_.-]{{1,64}}")
    for g in cfg.groups:
        if not NAME_RE.match(g):
            raise ConfigError(f"groups: {g!r} must match [A-Za-z0-9_.-]{{1,64}}")


def _validate_mqtt(m: MqttConfig) -> None:
    u = urlsplit(m.url)
    if u.scheme not in ("mqtt", "mqtts") or not u.hostname:
        raise ConfigError(f"mqtt.url: {m.url!r} must be mqtt://host[:port] or mqtts://host[:port]")
    try:
        _ = u.port
    except ValueError as e:
        raise ConfigError(f"mqtt.url: bad port in {m.url!r}") from e
    if not NAME_RE.match(m.topic_prefix):
        raise ConfigError(f"mqtt.topic_prefix: {m.topic_prefix!r} must match [A-Za-z0-9_.-]{{1,64}}")
    if not 5 <= m.keepalive_s <= 3600:
        raise ConfigError(f"mqtt.keepalive_s: {m.keepalive_s} not in 5..3600")
    if m.protocol not in ("auto", "5", "3.1.1"):
        raise ConfigError(f"mqtt.protocol: {m.protocol!r} not one of auto, 5, 3.1.1")
    if m.session_expiry_s < 0:
        raise ConfigError("mqtt.session_expiry_s: must be >= 0")


def _validate_trust(t: TrustConfig) -> None:
    if not 1 <= t.threshold <= 16:
        raise ConfigError(f"trust.threshold: {t.threshold} not in 1..16")
    if not 0 <= t.max_clock_skew_s <= 86400:
        raise ConfigError(f"trust.max_clock_skew_s: {t.max_clock_skew_s} not in 0..86400")


def _validate_telemetry(t: TelemetryConfig) -> None:
    if not 0.05 <= t.heartbeat_s <= 86400:
        raise ConfigError(f"telemetry.heartbeat_s: {t.heartbeat_s} not in 0.05..86400")
    if not 0.05 <= t.window_s <= 86400:
        raise ConfigError(f"telemetry.window_s: {t.window_s} not in 0.05..86400")
    if not 0.01 <= t.outbox_max_mb <= 65536:
        raise ConfigError(f"telemetry.outbox_max_mb: {t.outbox_max_mb} not in 0.01..65536")
    for key, value, lo, hi in (("daily_budget_mb", t.daily_budget_mb, 0, 1e6),
                               ("thin_period_s", t.thin_period_s, 0.05, 86400),
                               ("drain_rate_per_s", t.drain_rate_per_s, 0.1, 10000),
                               ("disk_low_mb", t.disk_low_mb, 0, 1e7),
                               ("memory_pressure_pct", t.memory_pressure_pct, 0, 100),
                               ("error_rate_pct", t.error_rate_pct, 0, 100),
                               ("slo_p99_ms", t.slo_p99_ms, 0, 1e7)):
        if not lo <= value <= hi:
            raise ConfigError(f"telemetry.{key}: {value:g} not in {lo:g}..{hi:g}")


def _validate_api(a: ApiConfig) -> None:
    if a.listen:
        host, _, port = a.listen.rpartition(":")
        if not host or not port.isdigit() or int(port) > 65535:
            raise ConfigError(f"api.listen: {a.listen!r} must be host:port (or empty to disable)")
    if not 1 <= a.max_connections <= 65536:
        raise ConfigError(f"api.max_connections: {a.max_connections} not in 1..65536")
    if not 1 <= a.max_body_inflight_mb <= 65536:
        raise ConfigError(f"api.max_body_inflight_mb: {a.max_body_inflight_mb} not in 1..65536")


def _validate_backends(b: BackendsConfig) -> None:
    for p in b.prefer:
        if ":" not in p:
            raise ConfigError(f"backends.prefer: {p!r} must be runtime:target, e.g. onnxruntime:CPUExecutionProvider")
    if b.isolation not in ("process", "none"):
        raise ConfigError(f"backends.isolation: {b.isolation!r} not one of process, none")
    if not 0.1 <= b.infer_timeout_s <= 3600:
        raise ConfigError(f"backends.infer_timeout_s: {b.infer_timeout_s} not in 0.1..3600")
    if b.autotune_objective not in AUTOTUNE_OBJECTIVES:
        raise ConfigError(f"backends.autotune_objective: {b.autotune_objective!r} not one of "
                          f"{', '.join(AUTOTUNE_OBJECTIVES)}")
    for key, ival, lo, hi in (("autotune_concurrency", b.autotune_concurrency, 1, MAX_AUTOTUNE_CONCURRENCY),
                              ("max_batch", b.max_batch, 1, 1 << 20), ("max_inflight", b.max_inflight, 1, 1024),
                              ("max_queue", b.max_queue, 0, 65536)):
        if not lo <= ival <= hi:
            raise ConfigError(f"backends.{key}: {ival} not in {lo}..{hi}")
    if not 0 <= b.worker_memory_max_mb <= 1 << 30:
        raise ConfigError(f"backends.worker_memory_max_mb: {b.worker_memory_max_mb} must be 0 (off) or positive")
    if not 0 <= b.threads <= 256:
        raise ConfigError(f"backends.threads: {b.threads} not in 0..256")


def _validate_serving(s: ServingConfig, b: BackendsConfig) -> None:
    if not 0 <= s.max_batch <= b.max_batch:
        raise ConfigError(f"serving.max_batch: {s.max_batch} not in 0..{b.max_batch} (backends.max_batch)")
    if not 0 <= s.max_queue_delay_us <= 1_000_000:
        raise ConfigError(f"serving.max_queue_delay_us: {s.max_queue_delay_us} not in 0..1000000")


def _validate_storage(s: StorageConfig) -> None:
    if not 1 <= s.keep_versions <= 32:
        raise ConfigError(f"storage.keep_versions: {s.keep_versions} not in 1..32")
    if s.max_disk_mb <= 0:
        raise ConfigError(f"storage.max_disk_mb: {s.max_disk_mb} must be positive")


def _validate_downloads(d: DownloadsConfig) -> None:
    for key, val, lo, hi in (("read_timeout_s", d.read_timeout_s, 0.05, 3600), ("min_rate_bps", d.min_rate_bps, 1, 1e10),
                             ("deadline_base_s", d.deadline_base_s, 0, 86400), ("max_attempts", d.max_attempts, 1, 100)):
        if not lo <= val <= hi:
            raise ConfigError(f"downloads.{key}: {val} not in {lo:g}..{hi:g}")


def _validate_deploy(d: DeployConfig) -> None:
    for key in ("download_timeout_s", "load_timeout_s", "validate_timeout_s"):
        if not 0.1 <= getattr(d, key) <= 86400:
            raise ConfigError(f"deploy.{key}: {getattr(d, key)} not in 0.1..86400")
    if not 0 <= d.probation_s <= 86400:
        raise ConfigError(f"deploy.probation_s: {d.probation_s} not in 0..86400")
    if d.probation_max_errors < 1:
        raise ConfigError("deploy.probation_max_errors: must be at least 1")
    if not 0 < d.probation_max_error_ratio <= 1:
        raise ConfigError("deploy.probation_max_error_ratio: must be in (0, 1]")
    if not 1 <= d.max_resumes <= 100:
        raise ConfigError(f"deploy.max_resumes: {d.max_resumes} not in 1..100")


def config_path(explicit: str | None = None) -> Path | None:
    """The config file to read: --config, $EDGE_AGENT_CONFIG, or the default if it exists."""
    if explicit:
        return Path(explicit)
    env = os.environ.get(ENV_CONFIG)
    if env:
        return Path(env)
    return DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.exists() else None


def load(explicit: str | None = None) -> Config:
    """Load and validate the config; ConfigError names the file and the key."""
    path = config_path(explicit)
    if path is None:
        return from_dict({}, source="defaults")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e
    try:
        cfg = from_dict(data, source=str(path))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e.message}") from e
    base = path.parent
    # Relative paths in the file are relative to the file, so a config folder can be moved whole.
    for obj, attr in ((cfg, "state_dir"), (cfg.trust, "keys_dir"), (cfg.mqtt, "password_file"),
                      (cfg.mqtt, "ca_file"), (cfg.mqtt, "cert_file"), (cfg.mqtt, "key_file"),
                      (cfg.api, "control_socket"), (cfg.api, "token_file"), (cfg.api, "unix_socket"),
                      (cfg.downloads, "ca_file")):
        val = os.path.expandvars(getattr(obj, attr))  # ${CREDENTIALS_DIRECTORY}, ${RUNTIME_DIRECTORY}
        setattr(obj, attr, val)
        if val and not os.path.isabs(val):
            setattr(obj, attr, str((base / val).resolve()))
    cfg.trust.decryption_keys = [str((base / v).resolve()) if v and not os.path.isabs(v) else v
                                 for v in (os.path.expandvars(k) for k in cfg.trust.decryption_keys)]
    cfg.hardware.profiles_dirs = [d if os.path.isabs(d) else str((base / d).resolve())
                                  for d in cfg.hardware.profiles_dirs]
    return cfg
