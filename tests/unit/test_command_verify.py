"""Command checks (PROTOCOL.md "Commands"): signatures, version, target, time, shape."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import errors
from agent.bundles import dsse
from agent.bundles.trust import TrustStore, key_id
from agent.commands.verify import MAX_COMMAND_BYTES, CommandVerifier, peek_id
from agent.timeutil import now_rfc3339

NOW = 1_800_000_000.0  # a fixed "now" so every time check is exact
SKEW = 300


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def verifier(key: Ed25519PrivateKey) -> CommandVerifier:
    trust = TrustStore({key_id(key.public_key()): key.public_key()})
    return CommandVerifier(trust, 1, "pi-0042", ["cameras", "lab"], SKEW, require_signed=True)


def doc(**over: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"v": 1, "id": "cmd-1", "type": "ping", "target": {"device": "pi-0042"},
                         "issued_at": now_rfc3339(NOW - 10), "expires_at": now_rfc3339(NOW + 600),
                         "params": {}}
    d.update(over)
    return d


def signed(d: dict[str, Any], key: Ed25519PrivateKey) -> bytes:
    payload = json.dumps(d).encode()
    return json.dumps(dsse.sign(dsse.COMMAND_TYPE, payload, [key])).encode()


def _code(v: CommandVerifier, raw: bytes, now: float = NOW) -> str:
    with pytest.raises(errors.RejectError) as ei:
        v.verify(raw, now=now)
    return ei.value.code


def test_happy_path_device_target(verifier: CommandVerifier, key: Ed25519PrivateKey) -> None:
    c = verifier.verify(signed(doc(type="deploy", params={"model": "m"}), key), now=NOW)
    assert (c.id, c.type, c.target, c.signed) == ("cmd-1", "deploy", {"device": "pi-0042"}, True)
    assert c.params == {"model": "m"}
    assert c.expires_at == pytest.approx(NOW + 600, abs=0.001)
    assert c.issued_at == pytest.approx(NOW - 10, abs=0.001)


def test_happy_path_group_target(verifier: CommandVerifier, key: Ed25519PrivateKey) -> None:
    c = verifier.verify(signed(doc(target={"group": "lab"}), key), now=NOW)
    assert c.target == {"group": "lab"}


def test_unknown_fields_are_ignored(verifier: CommandVerifier, key: Ed25519PrivateKey) -> None:
    c = verifier.verify(signed(doc(future_field={"x": 1}), key), now=NOW)
    assert c.id == "cmd-1"


@pytest.mark.parametrize("target", [{"device": "pi-0043"}, {"group": "doors"}])
def test_wrong_target(verifier: CommandVerifier, key: Ed25519PrivateKey, target: dict[str, str]) -> None:
    assert _code(verifier, signed(doc(target=target), key)) == errors.WRONG_TARGET


@pytest.mark.parametrize("target", [{}, {"device": "pi-0042", "group": "lab"}, {"host": "x"},
                                    {"device": 42}, "pi-0042"])
def test_malformed_target(verifier: CommandVerifier, key: Ed25519PrivateKey, target: Any) -> None:
    assert _code(verifier, signed(doc(target=target), key)) == errors.INVALID_COMMAND


def test_expired_beyond_skew(verifier: CommandVerifier, key: Ed25519PrivateKey) -> None:
    d = doc(issued_at=now_rfc3339(NOW - 3600), expires_at=now_rfc3339(NOW - SKEW - 1))
    assert _code(verifier, signed(d, key)) == errors.EXPIRED


def test_expired_within_skew_accepted(verifier: CommandVerifier, key: Ed25519PrivateKey) -> None:
    d = doc(issued_at=now_rfc3339(NOW - 3600), expires_at=now_rfc3339(NOW - SKEW + 5))
    assert verifier.verify(signed(d, key), now=NOW).id == "cmd-1"


def test_issued_too_far_ahead(verifier: CommandVerifier, key: Ed25519PrivateKey) -> None:
    d = doc(issued_at=now_rfc3339(NOW + SKEW + 60), expires_at=now_rfc3339(NOW + 3600))
    assert _code(verifier, signed(d, key)) == errors.NOT_YET_VALID


def test_issued_ahead_within_skew_accepted(verifier: CommandVerifier, key: Ed25519PrivateKey) -> None:
    d = doc(issued_at=now_rfc3339(NOW + SKEW - 5), expires_at=now_rfc3339(NOW + 3600))
    assert verifier.verify(signed(d, key), now=NOW).id == "cmd-1"


@pytest.mark.parametrize("missing", ["expires_at", "issued_at"])
def test_missing_time_is_invalid(verifier: CommandVerifier, key: Ed25519PrivateKey, missing: str) -> None:
    d = doc()
    del d[missing]
    assert _code(verifier, signed(d, key)) == errors.INVALID_COMMAND


def test_bad_time_text_is_invalid(verifier: CommandVerifier, key: Ed25519PrivateKey) -> None:
    assert _code(verifier, signed(doc(expires_at="soon"), key)) == errors.INVALID_COMMAND


def test_lifetime_too_long_is_invalid(verifier: CommandVerifier, key: Ed25519PrivateKey) -> None:
    d = doc(expires_at=now_rfc3339(NOW + 60 * 86400))
    assert _code(verifier, signed(d, key)) == errors.INVALID_COMMAND


def test_unknown_type(verifier: CommandVerifier, key: Ed25519PrivateKey) -> None:
    assert _code(verifier, signed(doc(type="format_disk"), key)) == errors.UNKNOWN_COMMAND


def test_newer_major_version(verifier: CommandVerifier, key: Ed25519PrivateKey) -> None:
    assert _code(verifier, signed(doc(v=2), key)) == errors.UNSUPPORTED_VERSION


@pytest.mark.parametrize("v", [0, "1", True, None])
def test_bad_v(verifier: CommandVerifier, key: Ed25519PrivateKey, v: Any) -> None:
    assert _code(verifier, signed(doc(v=v), key)) == errors.INVALID_COMMAND


@pytest.mark.parametrize("cid", ["has space", "a/b", "x#", "", "x" * 129, 7])
def test_bad_id_charset(verifier: CommandVerifier, key: Ed25519PrivateKey, cid: Any) -> None:
    assert _code(verifier, signed(doc(id=cid), key)) == errors.INVALID_COMMAND


def test_params_not_object(verifier: CommandVerifier, key: Ed25519PrivateKey) -> None:
    assert _code(verifier, signed(doc(params=[1]), key)) == errors.INVALID_COMMAND


def test_signature_errors_surface(verifier: CommandVerifier, key: Ed25519PrivateKey) -> None:
    stranger = Ed25519PrivateKey.generate()
    assert _code(verifier, signed(doc(), stranger)) == errors.UNTRUSTED_KEY
    env = json.loads(signed(doc(), key))
    env["payload"] = base64.b64encode(json.dumps(doc(type="status")).encode()).decode()
    assert _code(verifier, json.dumps(env).encode()) == errors.BAD_SIGNATURE


def test_unsigned_refused_when_required(verifier: CommandVerifier) -> None:
    assert _code(verifier, json.dumps(doc()).encode()) == errors.UNSIGNED_COMMAND


def test_unsigned_accepted_when_not_required(key: Ed25519PrivateKey) -> None:
    trust = TrustStore({key_id(key.public_key()): key.public_key()})
    v = CommandVerifier(trust, 1, "pi-0042", [], SKEW, require_signed=False)
    c = v.verify(json.dumps(doc()).encode(), now=NOW)
    assert c.id == "cmd-1"
    assert c.signed is False
    # The other checks still apply to unsigned commands.
    assert _code(v, json.dumps(doc(target={"device": "other"})).encode()) == errors.WRONG_TARGET
    # And a present envelope is still verified.
    assert _code(v, signed(doc(), Ed25519PrivateKey.generate())) == errors.UNTRUSTED_KEY


def test_oversize_command(verifier: CommandVerifier, key: Ed25519PrivateKey) -> None:
    raw = signed(doc(params={"pad": "x" * MAX_COMMAND_BYTES}), key)
    assert len(raw) > MAX_COMMAND_BYTES
    assert _code(verifier, raw) == errors.INVALID_COMMAND


@pytest.mark.parametrize(("raw", "code"), [
    (b"not json", errors.INVALID_COMMAND),
    (b"\xff\xfe", errors.INVALID_COMMAND),
    (b"[]", errors.UNSIGNED_COMMAND),  # valid JSON but no envelope
    (b'{"payloadType": 1}', errors.INVALID_COMMAND),  # an envelope of the wrong shape
])
def test_junk_is_refused(verifier: CommandVerifier, raw: bytes, code: str) -> None:
    assert _code(verifier, raw) == code


def test_unsigned_junk_document_is_invalid() -> None:
    v = CommandVerifier(TrustStore(), 1, "pi-0042", [], SKEW, require_signed=False)
    assert _code(v, b"[]") == errors.INVALID_COMMAND
    assert _code(v, b"null") == errors.INVALID_COMMAND


def test_peek_id_from_envelope_with_bad_signature(key: Ed25519PrivateKey) -> None:
    env = json.loads(signed(doc(id="deploy-42"), key))
    env["signatures"][0]["sig"] = base64.b64encode(b"\x00" * 64).decode()
    assert peek_id(json.dumps(env).encode()) == "deploy-42"
    assert peek_id(json.dumps(doc(id="plain-7")).encode()) == "plain-7"


@pytest.mark.parametrize("raw", [b"junk", b"", b"[1]", b'{"payload": "!!!"}',
                                 b'{"payload": "bm90IGpzb24="}', b'{"id": "bad id"}', b'{"id": 5}'])
def test_peek_id_returns_none_for_junk(raw: bytes) -> None:
    assert peek_id(raw) is None
