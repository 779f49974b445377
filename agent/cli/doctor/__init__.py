"""``agentctl doctor``: is this device able to do its job, and if not, what to do about it.

Every check ends PASS, WARN or FAIL with a detail line, and WARN/FAIL carry a hint that says how
to fix it. Works without the daemon (the daemon check then WARNs): it reads the config, opens
TCP + TLS to the broker itself (bounded by a timeout), reads certificates with ``cryptography``,
the last trusted time from the state database (read-only), and loads a tiny model built here,
byte by byte, on every usable backend (no ``onnx`` package needed at run time).

Invariants: a check never raises (an unexpected error is that check's FAIL); every network wait
and every smoke inference has a timeout; nothing is written anywhere.

Modules by concern: ``report`` (Check, Report), ``host`` (config, daemon, clock, disk, trust,
decryption keys), ``network`` (broker, certificates, device key), ``smoke`` (runtimes and the
smoke inference); this one runs them in order.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from agent.cli.doctor.host import (
    DAEMON_TIMEOUT_S,
    DISK_FAIL_MB,
    DISK_WARN_FRACTION,
    DISK_WARN_MB,
    MIN_PLAUSIBLE_TIME,
    TIMEDATECTL_TIMEOUT_S,
    check_clock,
    check_config,
    check_daemon,
    check_decryption,
    check_disk,
    check_trust,
)
from agent.cli.doctor.network import (
    CERT_WARN_DAYS,
    MQTT_PORTS,
    NETWORK_TIMEOUT_S,
    check_broker,
    check_certificates,
)
from agent.cli.doctor.report import FAIL, PASS, WARN, Check, Report, guard
from agent.cli.doctor.smoke import (
    SMOKE_INPUT,
    SMOKE_OUTPUT,
    SMOKE_SHAPE,
    SMOKE_TIMEOUT_S,
    check_runtimes,
    check_smoke,
    smoke_model_bytes,
    smoke_tflite_bytes,
)

__all__ = [
    "CERT_WARN_DAYS", "DAEMON_TIMEOUT_S", "DISK_FAIL_MB", "DISK_WARN_FRACTION", "DISK_WARN_MB", "FAIL",
    "MIN_PLAUSIBLE_TIME", "MQTT_PORTS", "NETWORK_TIMEOUT_S", "PASS", "SMOKE_INPUT", "SMOKE_OUTPUT",
    "SMOKE_SHAPE", "SMOKE_TIMEOUT_S", "TIMEDATECTL_TIMEOUT_S", "WARN", "Check", "Report", "check_broker",
    "check_certificates", "check_clock", "check_config", "check_daemon", "check_decryption", "check_disk",
    "check_runtimes", "check_smoke", "check_trust", "run", "smoke_model_bytes", "smoke_tflite_bytes",
]

SYSTEMD_CREDENTIALS_DIR = "/run/credentials/edge-agent.service"  # while the unit runs (root and the agent only)
CREDENTIALS_SOURCE_DIR = "/etc/edge-agent/credentials"  # what systemd/edge-agent.service loads them from


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
        checks += guard("broker", lambda: check_broker(c, timeout_s, status))
        checks += guard("certificates", lambda: check_certificates(c))
        checks += guard("clock", lambda: check_clock(c))
        checks += guard("disk", lambda: check_disk(c))
        checks += guard("trust", lambda: check_trust(c))
        checks += guard("decryption keys", lambda: check_decryption(c))
    checks += guard("runtimes", check_runtimes)
    if smoke:
        checks += guard("smoke", check_smoke)
    return Report(checks, cfg.to_dict() if cfg else None, cfg.source if cfg else "unreadable")
