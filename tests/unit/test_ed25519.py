"""Ed25519 checks through the process's own libcrypto (agent/bundles/ed25519.py) agree with
RFC 8032 and with ``cryptography`` on valid, altered and malformed signatures."""

from __future__ import annotations

import base64
import json
import os
import random
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


# "Taming the many EdDSAs" (Chalkias, Garillot, Nikolaenko, SSR 2020): the edge-case vectors of
# https://github.com/novifinancial/ed25519-speccheck, cases.json, cases 0-9 as (message, key,
# signature): small-order A and R, mixed-order A and R, non-canonical R, cofactored-only
# equations. Implementations differ on some of them; the check here must say what
# ``cryptography`` says on each.
SPECCHECK = [
    ("8c93255d71dcab10e8f379c26200f3c7bd5f09d9bc3068d3ef4edeb4853022b6",
     "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",
     "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a"
     "0000000000000000000000000000000000000000000000000000000000000000"),
    ("9bd9f44f4dcc75bd531b56b2cd280b0bb38fc1cd6d1230e14861d861de092e79",
     "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",
     "f7badec5b8abeaf699583992219b7b223f1df3fbbea919844e3f7c554a43dd43"
     "a5bb704786be79fc476f91d3f3f89b03984d8068dcf1bb7dfc6637b45450ac04"),
    ("aebf3f2601a0c8c5d39cc7d8911642f740b78168218da8471772b35f9d35b9ab",
     "f7badec5b8abeaf699583992219b7b223f1df3fbbea919844e3f7c554a43dd43",
     "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa"
     "8c4bd45aecaca5b24fb97bc10ac27ac8751a7dfe1baff8b953ec9f5833ca260e"),
    ("9bd9f44f4dcc75bd531b56b2cd280b0bb38fc1cd6d1230e14861d861de092e79",
     "cdb267ce40c5cd45306fa5d2f29731459387dbf9eb933b7bd5aed9a765b88d4d",
     "9046a64750444938de19f227bb80485e92b83fdb4b6506c160484c016cc1852f"
     "87909e14428a7a1d62e9f22f3d3ad7802db02eb2e688b6c52fcd6648a98bd009"),
    ("e47d62c63f830dc7a6851a0b1f33ae4bb2f507fb6cffec4011eaccd55b53f56c",
     "cdb267ce40c5cd45306fa5d2f29731459387dbf9eb933b7bd5aed9a765b88d4d",
     "160a1cb0dc9c0258cd0a7d23e94d8fa878bcb1925f2c64246b2dee1796bed512"
     "5ec6bc982a269b723e0668e540911a9a6a58921d6925e434ab10aa7940551a09"),
    ("e47d62c63f830dc7a6851a0b1f33ae4bb2f507fb6cffec4011eaccd55b53f56c",
     "cdb267ce40c5cd45306fa5d2f29731459387dbf9eb933b7bd5aed9a765b88d4d",
     "21122a84e0b5fca4052f5b1235c80a537878b38f3142356b2c2384ebad4668b7"
     "e40bc836dac0f71076f9abe3a53f9c03c1ceeeddb658d0030494ace586687405"),
    ("85e241a07d148b41e47d62c63f830dc7a6851a0b1f33ae4bb2f507fb6cffec40",
     "442aad9f089ad9e14647b1ef9099a1ff4798d78589e66f28eca69c11f582a623",
     "e96f66be976d82e60150baecff9906684aebb1ef181f67a7189ac78ea23b6c0e"
     "547f7690a0e2ddcd04d87dbc3490dc19b3b3052f7ff0538cb68afb369ba3a514"),
    ("85e241a07d148b41e47d62c63f830dc7a6851a0b1f33ae4bb2f507fb6cffec40",
     "442aad9f089ad9e14647b1ef9099a1ff4798d78589e66f28eca69c11f582a623",
     "8ce5b96c8f26d0ab6c47958c9e68b937104cd36e13c33566acd2fe8d38aa1942"
     "7e71f98a473474f2f13f06f97c20d58cc3f54b8bd0d272f42b695dd7e89a8c22"),
    ("fdaebc429f4a735932a160da1301080c13280eea8bc280d1b392c6b9e6ba3a5a",
     "f7badec5b8abeaf699583992219b7b223f1df3fbbea919844e3f7c554a43dd43",
     "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"
     "454d370c8d9fc323a41450f8d513eafeb5b0697390c1e505a0d4ddc71f566607"),
    ("84b698d39be126ff55fe45079e6c8bf64a0d7db6994560b4e96b7021eb39c1a1",
     "f7badec5b8abeaf699583992219b7b223f1df3fbbea919844e3f7c554a43dd43",
     "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"
     "084d5b99c2a9463d9c8bd5026916996984eeec87ddf1d3be329006ace1b37b09"),
]

# The encodings of the eight points of small order (and non-canonical aliases of them), as in
# libsodium's ed25519 blocklist (crypto_sign/ed25519/ref10/open.c) and the speccheck paper:
# as a public key or as R they must be judged the same way by both bindings.
SMALL_ORDER = [
    "0100000000000000000000000000000000000000000000000000000000000000",  # identity, order 1
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",  # order 2
    "0000000000000000000000000000000000000000000000000000000000000000",  # order 4
    "0000000000000000000000000000000000000000000000000000000000000080",  # order 4
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",  # order 8
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",  # order 8
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",  # order 8
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85",  # order 8
    "0100000000000000000000000000000000000000000000000000000000000080",  # identity, sign bit set
    "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",  # y = p: non-canonical 0
    "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",  # y = p + 1: non-canonical 1
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",  # order 2, sign bit set
]


@pytest.mark.parametrize(("msg", "key", "sig"), SPECCHECK)
def test_agrees_with_cryptography_on_speccheck_vectors(msg: str, key: str, sig: str) -> None:
    k, s, m = bytes.fromhex(key), bytes.fromhex(sig), bytes.fromhex(msg)
    assert ed25519.verify(k, s, m) == _crypto_ok(k, s, m)


def test_agrees_with_cryptography_on_small_order_keys_and_r() -> None:
    """Small-order points as the key, as R, and both, with S = 0, S = 1 and S = L."""
    cases = 0
    for a in SMALL_ORDER:
        for r in SMALL_ORDER:
            for s in (0, 1, L):
                k, sig = bytes.fromhex(a), bytes.fromhex(r) + s.to_bytes(32, "little")
                for m in (b"", b"deploy"):
                    assert ed25519.verify(k, sig, m) == _crypto_ok(k, sig, m), (a, r, s, m)
                    cases += 1
    assert cases == len(SMALL_ORDER) ** 2 * 6


def test_agrees_with_cryptography_on_a_few_hundred_random_keys_and_messages() -> None:
    """Valid signatures, S + L and S + 2^253 (same equation, S out of range), R and A swapped,
    a flipped bit anywhere in the signature or key: each judged alike by both bindings."""
    rng = random.Random(8032)
    agree = valid = 0
    for i in range(300):
        priv = Ed25519PrivateKey.generate()
        key = _raw(priv.public_key())
        msg = rng.randbytes(rng.randrange(0, 300))
        sig = priv.sign(msg)
        s = int.from_bytes(sig[32:], "little")
        bit = rng.randrange(512)
        flipped = bytearray(sig)
        flipped[bit // 8] ^= 1 << (bit % 8)
        kbit = rng.randrange(256)
        kflip = bytearray(key)
        kflip[kbit // 8] ^= 1 << (kbit % 8)
        cases = [(key, sig, msg), (key, sig[:32] + (s + L).to_bytes(32, "little"), msg),
                 (key, sig[:32] + (s + 2**253).to_bytes(32, "little")[:32], msg),
                 (sig[:32], key + sig[32:], msg), (key, bytes(flipped), msg), (bytes(kflip), sig, msg)]
        for k, sg, m in cases:
            mine = ed25519.verify(k, sg, m)
            assert mine == _crypto_ok(k, sg, m), (i, k.hex(), sg.hex(), m.hex())
            agree += 1
            valid += mine
    assert agree == 300 * 6
    assert valid >= 300  # the genuine signatures at least
