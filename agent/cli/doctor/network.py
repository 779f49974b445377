"""The broker and the files the MQTT session needs: TCP and TLS to the broker (bounded by a
timeout), its login as the daemon last saw it, certificates read with ``cryptography``, the
device key and the password file (that they exist, match and are not readable by others)."""

from __future__ import annotations

import os
import socket
import ssl
import stat
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from agent import config
from agent.cli.doctor.report import FAIL, PASS, WARN, Check

NETWORK_TIMEOUT_S = 5.0  # TCP connect and TLS handshake to the broker
CERT_WARN_DAYS = 30  # a certificate expiring sooner than this is a WARN
MQTT_PORTS = {"mqtt": 1883, "mqtts": 8883}


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
