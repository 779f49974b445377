"""``agentctl doctor``: is this device able to do its job, and if not, what to do about it.

Every check ends PASS, WARN or FAIL with a detail line, and WARN/FAIL carry a hint that says how
to fix it. Works without the daemon (the daemon check then WARNs): it reads the config, opens
TCP + TLS to the broker itself (bounded by a timeout), reads certificates with ``cryptography``,
the last trusted time from the state database (read-only), and loads a tiny model built here,
byte by byte, on every usable backend (no ``onnx`` package needed at run time).

Invariants: a check never raises (an unexpected error is that check's FAIL); every network wait
and every smoke inference has a timeout; nothing is written anywhere.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sqlite3
import ssl
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from agent import config, errors

PASS, WARN, FAIL = "PASS", "WARN", "FAIL"
NETWORK_TIMEOUT_S = 5.0  # TCP connect and TLS handshake to the broker
DAEMON_TIMEOUT_S = 5.0  # the control socket answers status in milliseconds when healthy
SMOKE_TIMEOUT_S = 60.0  # a smoke inference, model load included (a TensorRT engine build is slow)
TIMEDATECTL_TIMEOUT_S = 3.0
CERT_WARN_DAYS = 30  # a certificate expiring sooner than this is a WARN
DISK_FAIL_MB = 256  # below this a deploy will fail with disk_full
DISK_WARN_MB = 1024
DISK_WARN_FRACTION = 0.10
# The clock cannot be earlier than this build: a device that boots without RTC and NTP often says 1970.
MIN_PLAUSIBLE_TIME = datetime(2025, 1, 1, tzinfo=timezone.utc).timestamp()
SYSTEMD_CREDENTIALS_DIR = "/run/credentials/edge-agent.service"  # while the unit runs (root and the agent only)
CREDENTIALS_SOURCE_DIR = "/etc/edge-agent/credentials"  # what systemd/edge-agent.service loads them from
MQTT_PORTS = {"mqtt": 1883, "mqtts": 8883}
SMOKE_INPUT = "x"
SMOKE_OUTPUT = "y"
SMOKE_SHAPE = (1, 4)


@dataclass
class Check:
    name: str
    status: str
    detail: str
    hint: str = ""
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if not d["data"]:
            d.pop("data")
        return d


@dataclass
class Report:
    checks: list[Check]
    config: dict[str, Any] | None
    config_source: str

    @property
    def summary(self) -> dict[str, int]:
        return {s.lower(): sum(c.status == s for c in self.checks) for s in (PASS, WARN, FAIL)}

    @property
    def ok(self) -> bool:
        return not any(c.status == FAIL for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "summary": self.summary, "checks": [c.to_dict() for c in self.checks],
                "config_source": self.config_source, "config": self.config}

    def render(self) -> str:
        width = max((len(c.name) for c in self.checks), default=4)
        lines = []
        for c in self.checks:
            lines.append(f"{c.status:<4}  {c.name:<{width}}  {c.detail}")
            if c.hint and c.status != PASS:
                lines.append(f"{'':4}  {'':<{width}}  → {c.hint}")
        s = self.summary
        lines.append(f"\n{s['pass']} passed, {s['warn']} warning{'' if s['warn'] == 1 else 's'}, {s['fail']} failed"
                     f" (config: {self.config_source})")
        return "\n".join(lines)


# -- a tiny ONNX model, hand-encoded (protobuf wire format) ----------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field_varint(num: int, value: int) -> bytes:
    return _varint(num << 3) + _varint(value)


def _field_bytes(num: int, value: bytes | str) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return _varint(num << 3 | 2) + _varint(len(raw)) + raw


def _value_info(name: str, shape: tuple[int, ...]) -> bytes:
    dims = b"".join(_field_bytes(1, _field_varint(1, d)) for d in shape)  # Dimension.dim_value
    tensor_type = _field_varint(1, 1) + _field_bytes(2, dims)  # elem_type FLOAT, shape
    return _field_bytes(1, name) + _field_bytes(2, _field_bytes(1, tensor_type))  # name, TypeProto.tensor_type


def smoke_model_bytes() -> bytes:
    """ONNX ModelProto for ``y = x + x`` (float32 [1, 4]), IR 8, opset 13."""
    node = _field_bytes(1, SMOKE_INPUT) + _field_bytes(1, SMOKE_INPUT) + _field_bytes(2, SMOKE_OUTPUT) \
        + _field_bytes(3, "add") + _field_bytes(4, "Add")
    graph = _field_bytes(1, node) + _field_bytes(2, "doctor-smoke") \
        + _field_bytes(11, _value_info(SMOKE_INPUT, SMOKE_SHAPE)) + _field_bytes(12, _value_info(SMOKE_OUTPUT, SMOKE_SHAPE))
    opset = _field_bytes(1, "") + _field_varint(2, 13)
    return _field_varint(1, 8) + _field_bytes(2, "edge-agent-doctor") + _field_bytes(7, graph) + _field_bytes(8, opset)


def smoke_tflite_bytes() -> bytes | None:
    """The same ``y = x + x`` as a TFLite flatbuffer (one ADD), written with the schema ai-edge-litert ships;
    None where that schema is not installed (tflite-runtime alone)."""
    try:
        import flatbuffers
        from ai_edge_litert import schema_py_generated as s
    except ImportError:
        return None
    tensors = []
    for name in (SMOKE_INPUT, SMOKE_OUTPUT):
        t = s.TensorT()
        t.name, t.shape, t.type, t.buffer = name, list(SMOKE_SHAPE), s.TensorType.FLOAT32, 0
        tensors.append(t)
    code = s.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = s.BuiltinOperator.ADD
    code.version = 1
    op = s.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = 0, [0, 0], [1]
    op.builtinOptionsType, op.builtinOptions = s.BuiltinOptions.AddOptions, s.AddOptionsT()
    sg = s.SubGraphT()
    sg.tensors, sg.operators, sg.inputs, sg.outputs, sg.name = tensors, [op], [0], [1], "main"
    sig = s.SignatureDefT()
    sig.signatureKey, sig.subgraphIndex = "serving_default", 0
    maps = []
    for i, name in enumerate((SMOKE_INPUT, SMOKE_OUTPUT)):
        tm = s.TensorMapT()
        tm.name, tm.tensorIndex = name, i
        maps.append(tm)
    sig.inputs, sig.outputs = [maps[0]], [maps[1]]
    m = s.ModelT()
    m.version, m.description = 3, "edge-agent-doctor"
    m.operatorCodes, m.subgraphs, m.buffers, m.signatureDefs = [code], [sg], [s.BufferT()], [sig]
    b = flatbuffers.Builder(256)
    b.Finish(m.Pack(b), file_identifier=b"TFL3")
    return bytes(b.Output())


# -- checks -----------------------------------------------------------------------------------


def _guard(name: str, fn: Callable[[], list[Check]]) -> list[Check]:
    try:
        return fn()
    except Exception as e:  # a check that breaks is that check's failure, never the doctor's
        return [Check(name, FAIL, f"the check itself failed: {type(e).__name__}: {e}",
                      "report this with `agentctl doctor --json` output")]


def check_config(path: str | None) -> tuple[Check, config.Config | None]:
    try:
        cfg = config.load(path)
    except errors.ConfigError as e:
        return Check("config", FAIL, e.message, "fix the named key; `edge-agent check-config` re-checks it"), None
    where = cfg.source if cfg.source != "defaults" else "no config file, built-in defaults"
    status, hint = PASS, ""
    if cfg.source == "defaults":
        status, hint = WARN, f"write {config.DEFAULT_CONFIG_PATH} (device_id, [mqtt] url) — see docs/configuration.md"
    return Check("config", status, f"{where}; device {cfg.device_id}, groups {cfg.groups or '[]'}", hint), cfg


def check_daemon(socket_path: str) -> tuple[Check, dict[str, Any] | None]:
    from agent.serving.control import ControlClient

    client = ControlClient(socket_path, timeout_s=DAEMON_TIMEOUT_S)
    try:
        hello = client.call("hello")
        status = client.call("status")
    except FileNotFoundError:
        return Check("daemon", WARN, f"not running (no socket at {socket_path})",
                     "systemctl start edge-agent; `agentctl logs` shows why it stopped"), None
    except PermissionError:
        return Check("daemon", WARN, f"{socket_path} exists but this user may not open it",
                     "run as root, or join the control group (usermod -aG edge-agent USER) and log in again"), None
    except (ConnectionError, OSError) as e:
        return Check("daemon", WARN, f"not answering on {socket_path}: {e}",
                     "systemctl restart edge-agent; `agentctl logs` shows why"), None
    except errors.AgentError as e:
        return Check("daemon", WARN, f"refused: {e.message}", "run as root or as a member of the control group"), None
    mq = status.get("mqtt", {})
    detail = (f"agent {status.get('agent')} pid {hello.get('pid')}, up {status.get('uptime_s', 0):.0f} s, "
              f"mqtt {mq.get('state')}, {len(status.get('models', []))} model(s), you have {hello.get('access')} access")
    if mq.get("connected") is False and mq.get("state") != "connected":
        return Check("daemon", WARN, detail + (f" — {mq.get('last_error')}" if mq.get("last_error") else ""),
                     "the daemon runs but is not connected to the broker: see the broker check below"), status
    return Check("daemon", PASS, detail), status


def _tls_context(cfg: config.Config) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=cfg.mqtt.ca_file or None)
    if cfg.mqtt.cert_file:
        ctx.load_cert_chain(cfg.mqtt.cert_file, cfg.mqtt.key_file or None)
    return ctx


def check_broker(cfg: config.Config, timeout_s: float, daemon_status: dict[str, Any] | None) -> list[Check]:
    u = urlsplit(cfg.mqtt.url)
    host, port = u.hostname or "", u.port or MQTT_PORTS.get(u.scheme, 1883)
    where = f"{host}:{port}"
    t0 = time.perf_counter()
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        return [Check("broker", FAIL, f"cannot resolve {host}: {e.strerror}",
                      f"check mqtt.url ({cfg.mqtt.url}) and DNS (resolvectl query {host})")]
    try:
        sock = socket.create_connection((host, port), timeout=timeout_s)
    except TimeoutError:
        return [Check("broker", FAIL, f"no TCP answer from {where} within {timeout_s:g} s",
                      "a firewall or routing problem: check the network path to the broker (and mqtt.url)")]
    except ConnectionRefusedError:
        return [Check("broker", FAIL, f"{where} refused the connection",
                      "is the broker running and listening on that port? check mqtt.url")]
    except OSError as e:
        return [Check("broker", FAIL, f"cannot connect to {where}: {e.strerror or e}", "check mqtt.url and the network")]
    tcp_ms = (time.perf_counter() - t0) * 1000
    checks = []
    with sock:
        detail = f"tcp {where} ({infos[0][4][0]}) connected in {tcp_ms:.1f} ms"
        if u.scheme != "mqtts":
            loopback = host in ("localhost", "127.0.0.1", "::1")
            if loopback:
                checks.append(Check("broker", PASS, detail + ", plain MQTT on loopback"))
            else:
                checks.append(Check("broker", WARN, detail + ", plain MQTT: commands and telemetry are not encrypted",
                                    "use mqtts:// with mqtt.ca_file (and a device certificate for mutual TLS)"))
        else:
            try:
                ctx = _tls_context(cfg)
            except (OSError, ssl.SSLError) as e:
                return [Check("broker", FAIL, f"{detail}; cannot load the TLS files: {e}",
                              "check mqtt.ca_file, cert_file and key_file (paths, PEM format, key matches cert)")]
            sock.settimeout(timeout_s)
            try:
                with ctx.wrap_socket(sock, server_hostname=host) as tls:
                    cert = tls.getpeercert() or {}
                    checks.append(Check("broker", PASS, f"{detail}, {tls.version()} handshake OK, server certificate "
                                                        f"valid until {cert.get('notAfter', '?')}"))
            except ssl.SSLCertVerificationError as e:
                hint = ("the broker's certificate does not name " + host + ": use the name it was issued for in mqtt.url"
                        if "hostname" in str(e.verify_message or e).lower() or "match" in str(e).lower()
                        else "set mqtt.ca_file to the CA that signed the broker's certificate")
                checks.append(Check("broker", FAIL, f"{detail}; TLS certificate verify failed: {e.verify_message or e}", hint))
            except (ssl.SSLError, OSError) as e:
                checks.append(Check("broker", FAIL, f"{detail}; TLS handshake failed: {e}",
                                    "is this a TLS port? mqtts:// usually listens on 8883; check the broker's TLS settings"))
    if daemon_status is not None:
        mq = daemon_status.get("mqtt", {})
        if mq.get("state") == "refused":
            checks.append(Check("broker login", FAIL, f"the broker refused the agent's login: {mq.get('last_error')}",
                                "check mqtt.username/password_file or the device certificate against the broker's ACL"))
    return checks


def _cert_lines(path: str, now: float) -> list[tuple[str, str, str]]:
    from cryptography import x509

    data = Path(path).read_bytes()
    certs = x509.load_pem_x509_certificates(data) if b"-----BEGIN" in data else [x509.load_der_x509_certificate(data)]
    out = []
    for c in certs:
        after = c.not_valid_after_utc.timestamp()
        before = c.not_valid_before_utc.timestamp()
        subject = c.subject.rfc4514_string() or "(no subject)"
        until = c.not_valid_after_utc.strftime("%Y-%m-%d")
        days = (after - now) / 86400
        if now < before:
            out.append((FAIL, f"{subject} not valid before {c.not_valid_before_utc:%Y-%m-%d}",
                        "the device clock may be behind (see the clock check), or the certificate was issued for the future"))
        elif now > after:
            out.append((FAIL, f"{subject} expired {until}", "issue a new certificate and replace " + path))
        elif days < CERT_WARN_DAYS:
            out.append((WARN, f"{subject} expires {until} (in {days:.0f} days)", "renew it before it expires: " + path))
        else:
            out.append((PASS, f"{subject} valid until {until} ({days:.0f} days)", ""))
    return out


def check_certificates(cfg: config.Config) -> list[Check]:
    m = cfg.mqtt
    now = time.time()
    checks: list[Check] = []
    for what, path in (("ca", m.ca_file), ("device certificate", m.cert_file)):
        if not path:
            continue
        name = f"cert {what}"
        try:
            lines = _cert_lines(path, now)
        except FileNotFoundError:
            checks.append(Check(name, FAIL, f"{path} does not exist", f"put the file there or fix mqtt.{'ca_file' if what == 'ca' else 'cert_file'}"))
            continue
        except PermissionError:
            checks.append(Check(name, WARN, f"{path} is not readable by this user", "run agentctl doctor as root"))
            continue
        except ValueError as e:
            checks.append(Check(name, FAIL, f"{path} is not a PEM/DER certificate: {e}", "replace it with the PEM file you were given"))
            continue
        worst = next((s for s in (FAIL, WARN) if any(line[0] == s for line in lines)), PASS)
        shown = [line for line in lines if line[0] == worst] or lines
        checks.append(Check(name, worst, f"{Path(path).name}: " + "; ".join(line[1] for line in shown[:3])
                            + (f" (+{len(shown) - 3} more)" if len(shown) > 3 else ""),
                            next((line[2] for line in shown if line[2]), "")))
    if m.key_file:
        checks.append(_check_key(m.key_file, m.cert_file))
    if m.password_file:
        p = Path(m.password_file)
        if not p.exists():
            checks.append(Check("mqtt password", FAIL, f"{p} does not exist",
                                "create it (0600), or install it as a systemd credential in /etc/edge-agent/credentials/"))
        elif not os.access(p, os.R_OK):
            checks.append(Check("mqtt password", WARN, f"{p} is not readable by this user", "run agentctl doctor as root"))
        else:
            checks.append(_perm_check("mqtt password", p))
    if not checks:
        tls = cfg.mqtt.url.startswith("mqtts://")
        checks.append(Check("certificates", PASS, "none configured" + (" (server-authenticated TLS with the system CAs)" if tls else "")))
    return checks


def _perm_check(name: str, p: Path) -> Check:
    mode = stat.S_IMODE(p.stat().st_mode)
    if mode & (stat.S_IRWXG | stat.S_IRWXO) & ~stat.S_IRGRP or mode & stat.S_IROTH:
        return Check(name, WARN, f"{p} is mode {mode:04o}: other users can read a secret",
                     f"chmod 600 {p} (or load it as a systemd credential: LoadCredential)")
    return Check(name, PASS, f"{p} mode {mode:04o}")


def _check_key(key_file: str, cert_file: str) -> Check:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    p = Path(key_file)
    if not p.exists():
        return Check("device key", FAIL, f"{p} does not exist", "put the device's private key there or fix mqtt.key_file")
    if not os.access(p, os.R_OK):
        return Check("device key", WARN, f"{p} is not readable by this user", "run agentctl doctor as root")
    try:
        key = serialization.load_pem_private_key(p.read_bytes(), password=None)
    except (ValueError, TypeError) as e:
        return Check("device key", FAIL, f"{p}: not an unencrypted PEM private key: {e}",
                     "the agent needs the key without a passphrase (protect it with file permissions or a credential)")
    if cert_file and os.access(cert_file, os.R_OK):
        cert = x509.load_pem_x509_certificate(Path(cert_file).read_bytes())
        fmt = serialization.PublicFormat.SubjectPublicKeyInfo
        enc = serialization.Encoding.DER
        if cert.public_key().public_bytes(enc, fmt) != key.public_key().public_bytes(enc, fmt):
            return Check("device key", FAIL, f"{p.name} does not belong to {Path(cert_file).name}",
                         "install the key the certificate was issued for (or the certificate issued for this key)")
    c = _perm_check("device key", p)
    if c.status == PASS:
        c.detail += ", matches the certificate" if cert_file else ""
    return c


def _last_trusted_time(state_dir: str) -> tuple[float | None, str]:
    db = Path(state_dir) / "state.db"
    if not db.exists():
        return None, "no state database yet"
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1.0) as conn:
            row = conn.execute("SELECT value FROM kv WHERE key = 'last_trusted_time'").fetchone()
    except sqlite3.Error as e:
        return None, f"state database not readable ({e})"
    if row is None:
        return None, "no trusted time recorded yet"
    import json

    return float(json.loads(row[0])), ""


def _ntp_synchronized() -> bool | None:
    if not shutil.which("timedatectl"):
        return None
    try:
        r = subprocess.run(["timedatectl", "show", "-p", "NTPSynchronized", "--value"], capture_output=True,
                           text=True, timeout=TIMEDATECTL_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    v = r.stdout.strip()
    return {"yes": True, "no": False}.get(v)


def check_clock(cfg: config.Config) -> list[Check]:
    now = time.time()
    shown = datetime.fromtimestamp(now, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    if now < MIN_PLAUSIBLE_TIME:
        return [Check("clock", FAIL, f"{shown} is before this agent was built",
                      "set the time (timedatectl set-ntp true, or an RTC); signed commands and bundles are refused until then")]
    last, why = _last_trusted_time(cfg.state_dir)
    parts = [shown]
    if last is not None:
        if now + cfg.trust.max_clock_skew_s < last:
            when = datetime.fromtimestamp(last, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
            return [Check("clock", FAIL, f"{shown} is earlier than the last trusted time {when}",
                          "the clock went backwards: enable NTP (timedatectl set-ntp true); installs stay blocked until it is fixed")]
        parts.append(f"{(now - last) / 86400:.1f} days after the last trusted time")
    elif why:
        parts.append(why)
    synced = _ntp_synchronized()
    if synced is False:
        return [Check("clock", WARN, ", ".join([*parts, "NTP not synchronized"]),
                      "timedatectl set-ntp true (and check that the NTP servers are reachable)")]
    if synced:
        parts.append("NTP synchronized")
    return [Check("clock", PASS, ", ".join(parts))]


def _existing(path: Path) -> Path:
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def check_disk(cfg: config.Config) -> list[Check]:
    where = _existing(Path(cfg.state_dir))
    du = shutil.disk_usage(where)
    free_mb, total_mb = du.free / 2**20, du.total / 2**20
    detail = f"{free_mb:.0f} MB free of {total_mb:.0f} MB on {where} (model store budget {cfg.storage.max_disk_mb:g} MB)"
    if free_mb < DISK_FAIL_MB:
        return [Check("disk", FAIL, detail, f"free space under {where}: deploys fail with disk_full below {DISK_FAIL_MB} MB")]
    if free_mb < DISK_WARN_MB or du.free < DISK_WARN_FRACTION * du.total:
        return [Check("disk", WARN, detail, f"free space under {where}, or lower storage.max_disk_mb / storage.keep_versions")]
    return [Check("disk", PASS, detail)]


def check_trust(cfg: config.Config) -> list[Check]:
    from agent.bundles.trust import TrustStore

    folder = Path(cfg.trust.keys_dir)
    if not folder.is_dir():
        return [Check("trust", FAIL, f"{folder} does not exist" if not folder.exists() else f"{folder} is not a folder",
                      f"install -d -m 0755 {folder}, then copy the fleet's public key (.pub.pem) into it")]
    store = TrustStore.load(folder)
    bad = store.writable_paths()
    if bad:
        return [Check("trust", FAIL, ", ".join(f"{p} is {kind}" for p, kind in bad) + " — the daemon refuses to start",
                      f"chmod go-w {' '.join(p for p, _ in bad)}")]
    pems = sorted(folder.glob("*.pem"))
    skipped = len(pems) - len(store)
    n, k = len(store), cfg.trust.threshold
    detail = f"{folder}: {n} key(s), threshold {k}" + (f", {skipped} unreadable *.pem skipped" if skipped else "")
    if n < k:
        return [Check("trust", FAIL, detail + " — every signed command and bundle will be refused",
                      f"copy the fleet's public key(s) into {folder} (fleetctl keygen prints where they are)")]
    st = folder.stat()
    state = _existing(Path(cfg.state_dir))
    agent_uid = state.stat().st_uid if state != Path(state.anchor) else 0
    if st.st_uid not in (0, agent_uid):  # the agent's own user may own it: the signed `trust` command rotates keys
        return [Check("trust", WARN, detail + f"; owned by uid {st.st_uid}, neither root nor the agent's user",
                      f"chown -R edge-agent:edge-agent {folder} (or root:root): whoever owns it can add a key")]
    if skipped:
        return [Check("trust", WARN, detail, "remove or fix the unreadable *.pem files (agentctl logs names them)")]
    return [Check("trust", PASS, detail)]


def check_decryption(cfg: config.Config) -> list[Check]:
    """trust.decryption_keys: each identity safe and readable (the daemon refuses to start
    otherwise); its recipient is what bundles must be encrypted to."""
    if not cfg.trust.decryption_keys:
        return [Check("decryption keys", PASS, "none configured (encrypted bundles are refused: no_decryption_key)")]
    from agent.bundles import sealed

    state = _existing(Path(cfg.state_dir))  # its owner is the agent's user (as check_trust reads it)
    agent_uid = state.stat().st_uid if state != Path(state.anchor) else None
    try:
        mine = sealed.device_recipients(sealed.load_identities(cfg.trust.decryption_keys, agent_uid))
    except errors.AgentError as e:
        return [Check("decryption keys", FAIL, f"{e.code}: {e.message} — the daemon refuses to start",
                      "fix the identity file named (fleetctl keygen --age makes one; mode 0600, owned by root "
                      "or the agent's user), or remove it from trust.decryption_keys")]
    return [Check("decryption keys", PASS, f"{len(cfg.trust.decryption_keys)} identity file(s); this device opens "
                  f"bundles encrypted to {', '.join(mine)}")]


def check_runtimes() -> list[Check]:
    from agent.hardware.runtimes import probe_runtimes

    extras = {"onnxruntime": "onnx", "openvino": "openvino", "tflite": "tflite"}
    checks = []
    probed = probe_runtimes()
    for name, info in probed.items():
        if info.get("available"):
            checks.append(Check(f"runtime {name}", PASS, str(info.get("reason") or info.get("version"))))
        else:
            checks.append(Check(f"runtime {name}", WARN, str(info.get("reason", "not available")),
                                f"/opt/edge-agent/venv/bin/pip install 'edge-agent[{extras.get(name, name)}]' "
                                "if this device should use it"))
    if not any(i.get("available") for i in probed.values()):
        checks.append(Check("runtimes", FAIL, "no inference runtime is installed: no model can be served",
                            "/opt/edge-agent/venv/bin/pip install 'edge-agent[onnx]'"))
    return checks


def _with_timeout(fn: Callable[[], Any], timeout_s: float) -> Any:
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:
            box["error"] = e

    t = threading.Thread(target=run, name="doctor-smoke", daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        raise TimeoutError(f"did not finish within {timeout_s:g} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


@contextlib.contextmanager
def _runtime_stderr_to(path: Path) -> Iterator[None]:
    """Runtimes print from C++ straight to fd 2 (e.g. TFLite's "Created ... delegate"): keep that off the report."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(path, "wb") as sink:
            os.dup2(sink.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def check_smoke(timeout_s: float = SMOKE_TIMEOUT_S) -> list[Check]:
    """Load and run the tiny model on every usable target of the daemon's backends."""
    with tempfile.TemporaryDirectory(prefix="agentctl-doctor-") as tmp, _runtime_stderr_to(Path(tmp) / "runtime-stderr.txt"):
        return _smoke(timeout_s)


def _smoke(timeout_s: float) -> list[Check]:
    import numpy as np

    from agent.backends import available_backends
    from agent.backends.base import LoadOptions

    checks = []
    x = np.arange(1, 1 + SMOKE_SHAPE[0] * SMOKE_SHAPE[1], dtype=np.float32).reshape(SMOKE_SHAPE)
    with tempfile.TemporaryDirectory(prefix="agentctl-doctor-") as tmp:
        models: dict[str, Path] = {"onnx": Path(tmp) / "smoke.onnx"}
        models["onnx"].write_bytes(smoke_model_bytes())
        tfl = smoke_tflite_bytes()
        if tfl is not None:
            models["tflite"] = Path(tmp) / "smoke.tflite"
            models["tflite"].write_bytes(tfl)
        for backend in available_backends():  # the daemon's own backends
            for t in backend.targets():
                name = f"smoke {t.id}"
                if not t.availability.usable:
                    continue
                fmt = next((f for f in t.formats if f in models), None)
                if fmt is None:
                    checks.append(Check(name, WARN, f"no smoke model for formats {', '.join(t.formats)} here",
                                        "run `agentctl bench MODEL` on a deployed model instead"))
                    continue

                def run(backend: Any = backend, target: str = t.target, model_path: Path = models[fmt]) -> tuple[float, float, Any]:
                    t0 = time.perf_counter()
                    model = backend.load(model_path, target, LoadOptions())
                    t1 = time.perf_counter()
                    try:
                        out = model.infer({SMOKE_INPUT: x})
                    finally:
                        t2 = time.perf_counter()
                        model.close()
                    return (t1 - t0) * 1000, (t2 - t1) * 1000, out

                try:
                    load_ms, infer_ms, out = _with_timeout(run, timeout_s)
                except errors.AgentError as e:
                    checks.append(Check(name, FAIL, f"{e.code}: {e.message}",
                                        "`agentctl hw` explains this backend; check its drivers and runtime install"))
                    continue
                except Exception as e:
                    checks.append(Check(name, FAIL, f"{type(e).__name__}: {e}",
                                        "`agentctl hw` explains this backend; check its drivers and runtime install"))
                    continue
                y = out.get(SMOKE_OUTPUT)
                if y is None or not np.allclose(y, x + x):
                    checks.append(Check(name, FAIL, f"wrong answer: {y!r} for x + x",
                                        "this backend computes wrong results here: pin another one (backends.prefer)"))
                else:
                    checks.append(Check(name, PASS, f"y = x + x correct; load {load_ms:.1f} ms, inference {infer_ms:.3f} ms",
                                        data={"load_ms": round(load_ms, 3), "infer_ms": round(infer_ms, 3)}))
    if not checks:
        checks.append(Check("smoke", FAIL, "no usable backend to run a model on",
                            "`agentctl hw` lists every backend with the reason it is not usable"))
    return checks


@contextlib.contextmanager
def _credentials_env() -> Iterator[None]:
    """Outside the unit ``${CREDENTIALS_DIRECTORY}`` is unset: point it where systemd keeps the running
    service's credentials, else at their source folder (the unit loads them under the same names)."""
    if "CREDENTIALS_DIRECTORY" in os.environ:
        yield
        return
    for where in (SYSTEMD_CREDENTIALS_DIR, CREDENTIALS_SOURCE_DIR):
        if os.path.isdir(where):
            os.environ["CREDENTIALS_DIRECTORY"] = where
            try:
                yield
            finally:
                os.environ.pop("CREDENTIALS_DIRECTORY", None)
            return
    yield


def run(config_path: str | None, socket_path: str | None = None, *, timeout_s: float = NETWORK_TIMEOUT_S,
        smoke: bool = True) -> Report:
    """Every check, in the order a technician would fix things."""
    with _credentials_env():
        cfg_check, cfg = check_config(config_path)
    checks = [cfg_check]
    status = None
    if cfg is not None:
        daemon_check, status = check_daemon(socket_path or cfg.api.control_socket)
        checks.append(daemon_check)
        c = cfg
        checks += _guard("broker", lambda: check_broker(c, timeout_s, status))
        checks += _guard("certificates", lambda: check_certificates(c))
        checks += _guard("clock", lambda: check_clock(c))
        checks += _guard("disk", lambda: check_disk(c))
        checks += _guard("trust", lambda: check_trust(c))
        checks += _guard("decryption keys", lambda: check_decryption(c))
    checks += _guard("runtimes", check_runtimes)
    if smoke:
        checks += _guard("smoke", check_smoke)
    return Report(checks, cfg.to_dict() if cfg else None, cfg.source if cfg else "unreadable")
