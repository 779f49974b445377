"""DSSE envelopes with Ed25519 k-of-n, and the trust store (BUNDLE.md "Trust")."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import errors
from agent.bundles import dsse
from agent.bundles.trust import TrustStore, key_id, load_public_pem, public_pem

PAYLOAD = b'{"v":1,"id":"c1","type":"ping"}'


def _store(*keys: Ed25519PrivateKey) -> TrustStore:
    return TrustStore({key_id(k.public_key()): k.public_key() for k in keys})


def _code(env: dict[str, Any], trust: TrustStore, threshold: int = 1,
          expected: str = dsse.COMMAND_TYPE) -> str:
    with pytest.raises(errors.RejectError) as ei:
        dsse.verify(env, expected, trust, threshold)
    return ei.value.code


def test_pae_matches_dsse_spec_example() -> None:
    # The example of the DSSE protocol document.
    assert dsse.pae("http://example.com/HelloWorld", b"hello world") == \
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"


def test_pae_lengths_are_byte_lengths() -> None:
    t = dsse.COMMAND_TYPE
    body = "h\u00e9".encode()  # 3 bytes, 2 characters
    assert dsse.pae(t, body) == b"DSSEv1 %d %s 3 h\xc3\xa9" % (len(t), t.encode())


def test_sign_verify_round_trip_and_signature_is_over_pae() -> None:
    k = Ed25519PrivateKey.generate()
    env = dsse.sign(dsse.COMMAND_TYPE, PAYLOAD, [k])
    assert env["payloadType"] == dsse.COMMAND_TYPE
    assert base64.b64decode(env["payload"]) == PAYLOAD
    assert env["signatures"][0]["keyid"] == key_id(k.public_key())
    # The signature is over PAE(type, payload), not over the JSON or the raw payload.
    k.public_key().verify(base64.b64decode(env["signatures"][0]["sig"]), dsse.pae(dsse.COMMAND_TYPE, PAYLOAD))
    # Through JSON and back, as it travels.
    parsed = dsse.parse_envelope(json.dumps(env).encode())
    assert dsse.verify(parsed, dsse.COMMAND_TYPE, _store(k), 1) == PAYLOAD


def test_altered_payload_is_bad_signature() -> None:
    k = Ed25519PrivateKey.generate()
    env = dsse.sign(dsse.COMMAND_TYPE, PAYLOAD, [k])
    env["payload"] = base64.b64encode(PAYLOAD.replace(b"ping", b"pong")).decode()
    assert _code(env, _store(k)) == errors.BAD_SIGNATURE


def test_garbage_signature_by_trusted_key_is_bad_signature() -> None:
    k = Ed25519PrivateKey.generate()
    env = dsse.sign(dsse.COMMAND_TYPE, PAYLOAD, [k])
    env["signatures"][0]["sig"] = "not base64!!"
    assert _code(env, _store(k)) == errors.BAD_SIGNATURE


def test_unknown_key_is_untrusted_key() -> None:
    trusted, stranger = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    env = dsse.sign(dsse.COMMAND_TYPE, PAYLOAD, [stranger])
    assert _code(env, _store(trusted)) == errors.UNTRUSTED_KEY


def test_no_signatures_is_untrusted_key() -> None:
    k = Ed25519PrivateKey.generate()
    env = dsse.sign(dsse.COMMAND_TYPE, PAYLOAD, [])
    assert _code(env, _store(k)) == errors.UNTRUSTED_KEY


def test_threshold_two_with_one_key_not_met() -> None:
    a, b = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    env = dsse.sign(dsse.COMMAND_TYPE, PAYLOAD, [a])
    assert _code(env, _store(a, b), threshold=2) == errors.THRESHOLD_NOT_MET


def test_threshold_two_with_two_keys_met() -> None:
    a, b = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    env = dsse.sign(dsse.COMMAND_TYPE, PAYLOAD, [a, b])
    assert dsse.verify(env, dsse.COMMAND_TYPE, _store(a, b), 2) == PAYLOAD


def test_same_key_twice_counts_once() -> None:
    a, b = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    env = dsse.sign(dsse.COMMAND_TYPE, PAYLOAD, [a, a])
    assert len(env["signatures"]) == 2
    assert _code(env, _store(a, b), threshold=2) == errors.THRESHOLD_NOT_MET
    # Also when the duplicate omits its keyid and is matched by trying every trusted key.
    env["signatures"][1]["keyid"] = ""
    assert _code(env, _store(a, b), threshold=2) == errors.THRESHOLD_NOT_MET


def test_extra_invalid_and_unknown_signatures_do_not_fail_when_threshold_met() -> None:
    a, b = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    stranger = Ed25519PrivateKey.generate()
    env = dsse.sign(dsse.COMMAND_TYPE, PAYLOAD, [a, b, stranger])
    # An invalid extra signature naming a trusted key (signed over something else).
    env["signatures"].insert(0, {"keyid": key_id(a.public_key()),
                                 "sig": base64.b64encode(a.sign(b"other")).decode()})
    env["signatures"].append("not an object")
    assert dsse.verify(env, dsse.COMMAND_TYPE, _store(a, b), 2) == PAYLOAD


def test_signature_without_keyid_matches_a_trusted_key() -> None:
    a, b = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    env = dsse.sign(dsse.COMMAND_TYPE, PAYLOAD, [b])
    del env["signatures"][0]["keyid"]
    assert dsse.verify(env, dsse.COMMAND_TYPE, _store(a, b), 1) == PAYLOAD


def test_wrong_payload_type_is_invalid_command() -> None:
    k = Ed25519PrivateKey.generate()
    env = dsse.sign(dsse.MANIFEST_TYPE, PAYLOAD, [k])
    assert _code(env, _store(k), expected=dsse.COMMAND_TYPE) == errors.INVALID_COMMAND


def test_signature_for_one_type_does_not_verify_as_another() -> None:
    k = Ed25519PrivateKey.generate()
    env = dsse.sign(dsse.MANIFEST_TYPE, PAYLOAD, [k])
    env["payloadType"] = dsse.COMMAND_TYPE  # relabelled: the PAE differs, so the signature fails
    assert _code(env, _store(k)) == errors.BAD_SIGNATURE


@pytest.mark.parametrize("raw", [b"not json", b"[1,2]",
                                 b'{"payloadType":"t","payload":"eA==","signatures":{}}',
                                 b'{"payload":"eA==","signatures":[]}'])
def test_parse_envelope_rejects_bad_shapes(raw: bytes) -> None:
    with pytest.raises(errors.RejectError) as ei:
        dsse.parse_envelope(raw)
    assert ei.value.code == errors.INVALID_COMMAND


def test_key_id_is_sha256_of_raw_public_key() -> None:
    k = Ed25519PrivateKey.generate()
    raw = k.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert len(raw) == 32
    assert key_id(k.public_key()) == hashlib.sha256(raw).hexdigest()
    assert key_id(load_public_pem(public_pem(k.public_key()))) == key_id(k.public_key())


def _write_key(folder: Path, name: str, k: Ed25519PrivateKey) -> Path:
    p = folder / name
    p.write_bytes(public_pem(k.public_key()))
    os.chmod(p, 0o644)
    return p


def test_trust_store_load_skips_bad_pem(tmp_path: Path) -> None:
    good = Ed25519PrivateKey.generate()
    _write_key(tmp_path, "good.pem", good)
    (tmp_path / "garbage.pem").write_bytes(b"-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n")
    # A valid PEM of the wrong key type is skipped too.
    from cryptography.hazmat.primitives.asymmetric import ec
    ecpub = ec.generate_private_key(ec.SECP256R1()).public_key()
    (tmp_path / "ec.pem").write_bytes(ecpub.public_bytes(serialization.Encoding.PEM,
                                                         serialization.PublicFormat.SubjectPublicKeyInfo))
    (tmp_path / "notes.txt").write_text("ignored: not *.pem")
    store = TrustStore.load(tmp_path)
    assert list(store.key_ids()) == [key_id(good.public_key())]
    assert len(store) == 1


def test_trust_store_load_missing_folder_is_empty(tmp_path: Path) -> None:
    assert len(TrustStore.load(tmp_path / "absent")) == 0


def test_writable_by_others_detects_0666_key(tmp_path: Path) -> None:
    folder = tmp_path / "trust"
    folder.mkdir()
    os.chmod(folder, 0o755)
    safe = _write_key(folder, "a.pem", Ed25519PrivateKey.generate())
    store = TrustStore.load(folder)
    assert store.writable_by_others() == []
    loose = _write_key(folder, "b.pem", Ed25519PrivateKey.generate())
    os.chmod(loose, 0o666)
    bad = store.writable_by_others()
    assert str(loose) in bad
    assert str(safe) not in bad
    os.chmod(folder, 0o777)
    assert str(folder) in store.writable_by_others()


def test_apply_add_remove_persists(tmp_path: Path) -> None:
    folder = tmp_path / "trust"
    folder.mkdir()
    a, b = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    _write_key(folder, "ops.pem", a)
    store = TrustStore.load(folder)
    ka, kb = key_id(a.public_key()), key_id(b.public_key())

    now = store.apply([b.public_key()], [])
    assert now == sorted([ka, kb])
    assert sorted(TrustStore.load(folder).key_ids()) == sorted([ka, kb])

    now = store.apply([], [ka])
    assert now == [kb]
    assert store.get(ka) is None
    assert list(TrustStore.load(folder).key_ids()) == [kb]
    assert not (folder / "ops.pem").exists()


def test_apply_refuses_removing_every_key(tmp_path: Path) -> None:
    folder = tmp_path / "trust"
    folder.mkdir()
    a = Ed25519PrivateKey.generate()
    _write_key(folder, "ops.pem", a)
    store = TrustStore.load(folder)
    with pytest.raises(errors.RejectError) as ei:
        store.apply([], [key_id(a.public_key())])
    assert ei.value.code == errors.INVALID_COMMAND
    assert list(store.key_ids()) == [key_id(a.public_key())]
    assert list(TrustStore.load(folder).key_ids()) == [key_id(a.public_key())]
