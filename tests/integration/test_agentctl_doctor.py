"""agentctl doctor's checks against real things: a Mosquitto TLS listener with certificates made
here (a CA, the broker's certificate, device certificates that expire soon or already did), the
state database's last trusted time, and a trust folder with bad permissions. Each problem must be
a WARN or FAIL that names it, with a hint that says how to fix it."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port, mosquitto_binary, wait_port
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent import config
from agent.cli import doctor
from agent.state import StateDB

BROKER_START_TIMEOUT_S = 10.0
DAY = dt.timedelta(days=1)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
          days: float, *, ca: bool = False, server: bool = False, start_days_ago: float = 1) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    b = (x509.CertificateBuilder().subject_name(name)
         .issuer_name(issuer[0].subject if issuer else name)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - start_days_ago * DAY).not_valid_after(now + days * DAY)
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                         x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return b.sign(issuer[1] if issuer else key, hashes.SHA256())


def _write(path: Path, obj: x509.Certificate | ec.EllipticCurvePrivateKey, mode: int = 0o644) -> Path:
    if isinstance(obj, x509.Certificate):
        data = obj.public_bytes(serialization.Encoding.PEM)
    else:
        data = obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path.write_bytes(data)
    path.chmod(mode)
    return path


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    d = tmp_path / "pki"
    d.mkdir()
    ca_key = _key()
    ca = _cert("test CA", ca_key, None, 365, ca=True)
    other_key = _key()
    other_ca = _cert("another CA", other_key, None, 365, ca=True)
    server_key = _key()
    dev_key = _key()
    return {
        "ca": _write(d / "ca.pem", ca),
        "other_ca": _write(d / "other-ca.pem", other_ca),
        "server": _write(d / "server.pem", _cert("localhost", server_key, (ca, ca_key), 365, server=True)),
        "server_key": _write(d / "server.key", server_key, 0o600),
        "device_soon": _write(d / "device-soon.crt", _cert("pi-0042", dev_key, (ca, ca_key), 10)),
        "device_expired": _write(d / "device-expired.crt", _cert("pi-0042", dev_key, (ca, ca_key), -1, start_days_ago=30)),
        "device_key": _write(d / "device.key", dev_key, 0o600),
        "stranger_key": _write(d / "stranger.key", _key(), 0o600),
    }


@pytest.fixture
def tls_broker(tmp_path: Path, pki: dict[str, Path]) -> Iterator[int]:
    binary = mosquitto_binary()
    if binary is None:
        pytest.fail("mosquitto is not installed (apt-get install -y mosquitto); .ci/run installs it")
    port = free_port()
    conf = tmp_path / "mosquitto-tls.conf"
    # As root, mosquitto would switch to its own user, who cannot read pytest's 0700 folders.
    user = "user root\n" if os.geteuid() == 0 else ""
    conf.write_text(f"{user}listener {port} 127.0.0.1\nallow_anonymous true\ncafile {pki['ca']}\n"
                    f"certfile {pki['server']}\nkeyfile {pki['server_key']}\nrequire_certificate false\n")
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port("127.0.0.1", port, BROKER_START_TIMEOUT_S)
        yield port
    finally:
        proc.terminate()
        proc.wait(5)


def _config(tmp_path: Path, port: int, **mqtt: str) -> config.Config:
    (tmp_path / "trust").mkdir(exist_ok=True, mode=0o755)
    lines = [f'url = "mqtts://localhost:{port}"'] + [f'{k} = "{v}"' for k, v in mqtt.items()]
    path = tmp_path / "agent.toml"
    path.write_text('device_id = "pi-0042"\nstate_dir = "state"\n[mqtt]\n' + "\n".join(lines) + '\n[trust]\nkeys_dir = "trust"\n')
    return config.load(str(path))


def _by_name(checks: list[doctor.Check]) -> dict[str, doctor.Check]:
    return {c.name: c for c in checks}


def test_tls_handshake_and_certificate_dates(tmp_path: Path, pki: dict[str, Path], tls_broker: int) -> None:
    cfg = _config(tmp_path, tls_broker, ca_file=str(pki["ca"]), cert_file=str(pki["device_soon"]), key_file=str(pki["device_key"]))
    broker = doctor.check_broker(cfg, doctor.NETWORK_TIMEOUT_S, None)
    assert broker[0].status == doctor.PASS and "handshake OK" in broker[0].detail, broker
    certs = _by_name(doctor.check_certificates(cfg))
    assert certs["cert ca"].status == doctor.PASS and "test CA" in certs["cert ca"].detail
    soon = certs["cert device certificate"]
    assert soon.status == doctor.WARN and "expires" in soon.detail and "renew" in soon.hint
    assert certs["device key"].status == doctor.PASS and "matches the certificate" in certs["device key"].detail

    # The wrong CA: the handshake fails and the hint names the setting.
    cfg = _config(tmp_path, tls_broker, ca_file=str(pki["other_ca"]))
    broker = doctor.check_broker(cfg, doctor.NETWORK_TIMEOUT_S, None)
    assert broker[0].status == doctor.FAIL and "certificate verify failed" in broker[0].detail
    assert "mqtt.ca_file" in broker[0].hint

    # An expired device certificate, a key that belongs to another certificate, a key others can read.
    cfg = _config(tmp_path, tls_broker, ca_file=str(pki["ca"]), cert_file=str(pki["device_expired"]),
                  key_file=str(pki["stranger_key"]))
    certs = _by_name(doctor.check_certificates(cfg))
    assert certs["cert device certificate"].status == doctor.FAIL and "expired" in certs["cert device certificate"].detail
    assert certs["device key"].status == doctor.FAIL and "does not belong" in certs["device key"].detail
    assert doctor.check_broker(cfg, doctor.NETWORK_TIMEOUT_S, None)[0].status == doctor.FAIL
    pki["device_key"].chmod(0o644)
    cfg = _config(tmp_path, tls_broker, key_file=str(pki["device_key"]))
    key = _by_name(doctor.check_certificates(cfg))["device key"]
    assert key.status == doctor.WARN and "chmod 600" in key.hint

    # Plain MQTT to a TLS port: the handshake never happens; a closed port is refused.
    cfg = _config(tmp_path, free_port())
    broker = doctor.check_broker(cfg, doctor.NETWORK_TIMEOUT_S, None)
    assert broker[0].status == doctor.FAIL and "refused" in broker[0].detail and broker[0].hint


def test_clock_behind_the_last_trusted_time_and_trust_folder(tmp_path: Path) -> None:
    cfg = _config(tmp_path, free_port())
    (tmp_path / "state").mkdir()
    db = StateDB(tmp_path / "state" / "state.db")
    db.put("last_trusted_time", time.time() - 3600)
    db.close()
    clock = doctor.check_clock(cfg)[0]
    assert clock.status in (doctor.PASS, doctor.WARN) and "after the last trusted time" in clock.detail
    db = StateDB(tmp_path / "state" / "state.db")
    db.put("last_trusted_time", time.time() + 2 * 86400)
    db.close()
    clock = doctor.check_clock(cfg)[0]
    assert clock.status == doctor.FAIL and "earlier than the last trusted time" in clock.detail and "NTP" in clock.hint

    trust = doctor.check_trust(cfg)[0]
    assert trust.status == doctor.FAIL and "0 key(s)" in trust.detail and "copy the fleet's public key" in trust.hint
    os.chmod(tmp_path / "trust", 0o775)
    trust = doctor.check_trust(cfg)[0]
    assert trust.status == doctor.FAIL and trust.hint.startswith("chmod go-w")


def test_decryption_identities(tmp_path: Path) -> None:
    from fleetctl.sealing import generate_identity

    cfg = _config(tmp_path, free_port())
    none = doctor.check_decryption(cfg)[0]
    assert none.status == doctor.PASS and "none configured" in none.detail
    (tmp_path / "state").mkdir()
    os.chown(tmp_path / "state", 4321, 4321)  # the agent's user owns its state folder, and may own the identity
    ident = generate_identity(tmp_path / "keys", "dev1")
    os.chown(ident.identity_path, 4321, 4321)
    cfg.trust.decryption_keys = [str(ident.identity_path)]
    ok = doctor.check_decryption(cfg)[0]
    assert ok.status == doctor.PASS and ident.recipient in ok.detail
    os.chmod(ident.identity_path, 0o644)
    bad = doctor.check_decryption(cfg)[0]
    assert bad.status == doctor.FAIL and "no_decryption_key" in bad.detail and f"chmod 0600 {ident.identity_path}" in bad.detail


def test_smoke_models_run_on_every_usable_backend() -> None:
    checks = doctor.check_smoke()
    assert checks and all(c.name.startswith("smoke") for c in checks)
    assert any(c.name == "smoke onnxruntime:CPUExecutionProvider" and c.status == doctor.PASS for c in checks)
    assert all(c.status == doctor.PASS for c in checks), json.dumps([c.to_dict() for c in checks], indent=1)
