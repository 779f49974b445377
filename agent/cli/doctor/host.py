"""This device's own state: the config, the daemon (over its control socket), the clock against
the last trusted time (state database, read-only) and NTP, free disk, the trust folder and the
decryption identities."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from agent import config, errors
from agent.cli.doctor.report import FAIL, PASS, WARN, Check

DAEMON_TIMEOUT_S = 5.0  # the control socket answers status in milliseconds when healthy
TIMEDATECTL_TIMEOUT_S = 3.0
DISK_FAIL_MB = 256  # below this a deploy will fail with disk_full
DISK_WARN_MB = 1024
DISK_WARN_FRACTION = 0.10
# The clock cannot be earlier than this build: a device that boots without RTC and NTP often says 1970.
MIN_PLAUSIBLE_TIME = datetime(2025, 1, 1, tzinfo=timezone.utc).timestamp()


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
