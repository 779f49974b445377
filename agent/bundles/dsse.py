"""DSSE envelopes (in-toto / Sigstore signing envelope) with Ed25519 and a k-of-n threshold.

Invariants:
- A signature is checked over PAE(payloadType, payload bytes), never over the JSON text.
- Each trusted key counts once, however many signatures name it; signatures by unknown keys and
  invalid extra signatures are ignored as long as the threshold of distinct valid keys is met.
- The payload is returned only after the threshold is met; callers never parse unverified bytes
  except to address an error reply.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from agent import errors
from agent.bundles.trust import HEX_ID_RE, TrustStore, describe_ids, key_id

if TYPE_CHECKING:  # signing needs cryptography; checking does not (agent/bundles/trust.py)
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

COMMAND_TYPE = "application/vnd.edge-agent.command+json"
MANIFEST_TYPE = "application/vnd.edge-agent.manifest+json"
MAX_SIGNATURES = 32  # more than any sane threshold; bounds the verification work per envelope


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE pre-authentication encoding: what is actually signed."""
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def sign(payload_type: str, payload: bytes, keys: Iterable[Ed25519PrivateKey]) -> dict[str, Any]:
    """A DSSE envelope over ``payload`` signed by every key in ``keys``."""
    msg = pae(payload_type, payload)
    sigs = []
    for k in keys:
        sigs.append({"keyid": key_id(k.public_key()), "sig": base64.b64encode(k.sign(msg)).decode()})
    return {"payloadType": payload_type, "payload": base64.b64encode(payload).decode(),
            "signatures": sigs}


def parse_envelope(raw: bytes | str | dict[str, Any]) -> dict[str, Any]:
    """Decode an envelope's JSON shape (not its signatures); ``invalid_command`` if malformed."""
    if isinstance(raw, dict):
        env = raw
    else:
        try:
            env = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise errors.RejectError(errors.INVALID_COMMAND, f"envelope is not valid JSON: {e}") from e
    if not isinstance(env, dict):
        raise errors.RejectError(errors.INVALID_COMMAND, "envelope is not a JSON object")
    for field, kind in (("payloadType", str), ("payload", str), ("signatures", list)):
        if not isinstance(env.get(field), kind):
            raise errors.RejectError(errors.INVALID_COMMAND,
                                     f"envelope field {field!r} missing or not a {kind.__name__}")
    return env


def payload_bytes(env: dict[str, Any]) -> bytes:
    """The base64-decoded payload (unverified)."""
    try:
        return base64.b64decode(env["payload"], validate=True)
    except (binascii.Error, ValueError) as e:
        raise errors.RejectError(errors.INVALID_COMMAND, "envelope payload is not valid base64") from e


def verify(env: dict[str, Any], expected_type: str, trust: TrustStore, threshold: int,
           what: str = "envelope") -> bytes:
    """Return the payload bytes once ``threshold`` distinct trusted keys have signed them.

    Raises RejectError: ``invalid_command`` (shape, payload type), ``untrusted_key`` (no signature
    by a trusted key), ``bad_signature`` (trusted keys signed but no signature verifies),
    ``threshold_not_met`` (fewer distinct valid trusted keys than the threshold).
    """
    if env.get("payloadType") != expected_type:
        raise errors.RejectError(errors.INVALID_COMMAND,
                                 f"{what}: payloadType {env.get('payloadType')!r}, expected {expected_type!r}")
    payload = payload_bytes(env)
    msg = pae(expected_type, payload)
    sigs = env["signatures"][:MAX_SIGNATURES]
    valid: set[str] = set()
    known_seen = 0
    bad_known = 0
    for s in sigs:
        if not isinstance(s, dict):
            continue
        try:
            sig = base64.b64decode(str(s.get("sig", "")), validate=True)
        except (binascii.Error, ValueError):
            sig = b""
        kid = s.get("keyid") or ""
        candidates = [kid] if kid else list(trust.key_ids())
        for cand in candidates:
            ok = trust.check(cand, sig, msg)
            if ok is None:
                continue
            known_seen += 1
            if not ok:
                bad_known += 1
                continue
            valid.add(cand)
            break
    if len(valid) >= threshold:
        return payload
    if known_seen == 0:
        raise untrusted(what, sigs, trust)
    if not valid:
        raise errors.RejectError(errors.BAD_SIGNATURE,
                                 f"{what}: signature does not verify (payload altered or wrong key)")
    raise errors.RejectError(errors.THRESHOLD_NOT_MET,
                             f"{what}: {len(valid)} distinct trusted key(s) signed, threshold is {threshold}")


def untrusted(what: str, sigs: list[Any], trust: TrustStore) -> errors.RejectError:
    """``untrusted_key`` naming the signers' key ids, the trusted ones and where a public key goes.

    The signers' ids are the sender's text: only hex ids are shown (shortened), and at most a few.
    """
    signers = sorted({s["keyid"] for s in sigs if isinstance(s, dict) and isinstance(s.get("keyid"), str) and s["keyid"]})
    hex_signers = [k.lower() for k in signers if HEX_ID_RE.match(k)]
    where = trust.where()
    if not len(trust):
        return errors.RejectError(errors.UNTRUSTED_KEY, f"{what}: {trust.no_keys_message()}",
                                  signer_key_ids=hex_signers, trusted_key_ids=[])
    trusted = list(trust.key_ids())
    fix = f"copy the signer's public key (.pub.pem) into {where}"
    if not sigs:
        head, fix = f"{what}: carries no signature", f"sign it with a key whose public key is in {where}"
    elif not signers:
        head = f"{what}: signed without a key id, by no key in {where}"
    elif len(signers) == 1:
        head = f"{what}: signed by key id {describe_ids(signers)} which is not in {where}"
    else:
        head = f"{what}: signed by key ids {describe_ids(signers)}, none of which is in {where}"
    return errors.RejectError(errors.UNTRUSTED_KEY, f"{head} (trusted: {describe_ids(trusted)}); {fix}",
                              signer_key_ids=hex_signers, trusted_key_ids=trusted)
