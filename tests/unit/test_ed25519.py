"""Ed25519 checks through the process's own libcrypto (agent/bundles/ed25519.py) agree with
RFC 8032 and with ``cryptography`` on valid, altered and malformed signatures."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.bundles import ed25519

# RFC 8032 section 7.1: TEST 1 (empty message) and TEST 3 (two bytes); TEST 2 is the module's
# own self-test.
VECTORS = [
    ("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a", "",
     "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"),
    ("fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025", "af82",
     "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a"),
]
L = 2**252 + 27742317777372353535851937790883648493  # the group order


def _raw(pub: Ed25519PublicKey) -> bytes:
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _crypto_ok(key: bytes, sig: bytes, msg: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(key).verify(sig, msg)
        return True
    except (InvalidSignature, ValueError):
        return False


@pytest.fixture(autouse=True)
def _need_libcrypto() -> None:
    assert ed25519.available(), "this interpreter's hashlib maps an OpenSSL libcrypto with Ed25519"


@pytest.mark.parametrize(("key", "msg", "sig"), VECTORS)
def test_rfc8032_vectors(key: str, msg: str, sig: str) -> None:
    k, m, s = bytes.fromhex(key), bytes.fromhex(msg), bytes.fromhex(sig)
    assert ed25519.verify(k, s, m)
    assert not ed25519.verify(k, s, m + b"\0")
    assert not ed25519.verify(k, s[:-1] + bytes([s[-1] ^ 0x01]), m)


def test_agrees_with_cryptography_on_random_and_altered_inputs() -> None:
    for i in range(40):
        priv = Ed25519PrivateKey.generate()
        key = _raw(priv.public_key())
        msg = os.urandom(i * 7)
        sig = priv.sign(msg)
        other = _raw(Ed25519PrivateKey.generate().public_key())
        cases = [(key, sig, msg), (other, sig, msg), (key, sig, msg + b"x"),
                 (key, bytes([sig[0] ^ 0x80]) + sig[1:], msg), (key, sig[:32] + bytes(32), msg)]
        for k, s, m in cases:
            assert ed25519.verify(k, s, m) == _crypto_ok(k, s, m)


def test_non_canonical_s_and_bad_lengths_do_not_verify() -> None:
    priv = Ed25519PrivateKey.generate()
    key, msg = _raw(priv.public_key()), b"deploy"
    sig = priv.sign(msg)
    s = int.from_bytes(sig[32:], "little")
    malleated = sig[:32] + (s + L).to_bytes(32, "little")  # same point equation, S out of range
    assert not ed25519.verify(key, malleated, msg)
    assert not _crypto_ok(key, malleated, msg)
    assert not ed25519.verify(key[:31], sig, msg)
    assert not ed25519.verify(key, sig[:63], msg)
    assert not ed25519.verify(key, sig + b"\0", msg)
    assert not ed25519.verify(b"\xff" * 32, sig, msg)  # not a point on the curve


def test_checking_signatures_does_not_load_cryptography() -> None:
    code = ("import sys\nfrom agent.bundles import ed25519\n"
            f"ok = ed25519.verify(bytes.fromhex('{VECTORS[0][0]}'), bytes.fromhex('{VECTORS[0][2]}'), b'')\n"
            "print(ok, any(m.startswith('cryptography') for m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["True", "False"]


def test_dsse_verify_of_a_signed_envelope_stays_without_cryptography(tmp_path: Path) -> None:
    """What the daemon does for every command and manifest, in a fresh interpreter."""
    from agent.bundles import dsse, trust

    priv = Ed25519PrivateKey.generate()
    folder = tmp_path / "trust"
    folder.mkdir()
    (folder / "fleet.pem").write_bytes(trust.public_pem(priv.public_key()))
    env = dsse.sign(dsse.COMMAND_TYPE, b'{"cmd": "status"}', [priv])
    (tmp_path / "env.json").write_text(json.dumps(env))
    env["payload"] = base64.b64encode(b'{"cmd": "remove"}').decode()  # a payload the key never signed
    (tmp_path / "bad.json").write_text(json.dumps(env))
    code = ("import json, sys\nfrom pathlib import Path\nfrom agent import errors\nfrom agent.bundles import dsse, trust\n"
            "store = trust.TrustStore.load(Path(sys.argv[1]))\n"
            "print(dsse.verify(json.loads(Path(sys.argv[2]).read_text()), dsse.COMMAND_TYPE, store, 1).decode())\n"
            "try:\n    dsse.verify(json.loads(Path(sys.argv[3]).read_text()), dsse.COMMAND_TYPE, store, 1)\n"
            "except errors.RejectError as e:\n    print(e.code)\n"
            "print(any(m.startswith('cryptography') for m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code, str(folder), str(tmp_path / "env.json"), str(tmp_path / "bad.json")],
                         capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.splitlines() == ['{"cmd": "status"}', "bad_signature", "False"], out.stderr
