"""agent/bundles/sealed.py without a daemon: identity files, manifest encryption entries, the
decrypt-and-check step, and the config key (real pyrage, real files)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest

from agent import config, errors
from agent.backends import unseal
from agent.bundles import sealed
from fleetctl.sealing import generate_identity, parse_recipients

PLAIN = b"weights " * 100


def _doc(enc: dict[str, Any], recipients: list[str]) -> dict[str, Any]:
    return {"name": "lin", "version": 1, "recipients": recipients,
            "variants": [{"files": [{"path": "model.onnx", "size": 1, "sha256": "0" * 64, "encryption": enc}]}],
            "files": [{"path": "samples/input.npz", "size": 1, "sha256": "0" * 64}],
            "validation": {"inputs": "samples/input.npz", "expected": "samples/expected.npz"}}


def _enc(plain: bytes = PLAIN) -> dict[str, Any]:
    return {"format": "age-v1", "plaintext_sha256": hashlib.sha256(plain).hexdigest(), "plaintext_size": len(plain)}


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o700])
def test_identity_readable_by_others_or_executable_is_refused_with_the_fix(tmp_path: Path, mode: int) -> None:
    ident = generate_identity(tmp_path, "dev")
    os.chmod(ident.identity_path, mode)
    with pytest.raises(errors.RejectError) as e:
        sealed.load_identities([str(ident.identity_path)])
    assert e.value.code == errors.NO_DECRYPTION_KEY and f"chmod 0600 {ident.identity_path}" in e.value.message


def test_identity_modes_0400_and_0600_load(tmp_path: Path) -> None:
    ident = generate_identity(tmp_path, "dev")
    for mode in (0o400, 0o600):
        os.chmod(ident.identity_path, mode)
        ids = sealed.load_identities([str(ident.identity_path)])
        assert sealed.device_recipients(ids) == [ident.recipient]


def test_identity_of_another_owner_missing_or_empty_is_refused(tmp_path: Path) -> None:
    ident = generate_identity(tmp_path, "dev")
    os.chown(ident.identity_path, 4242, 4242)  # the tests run as root: any uid is possible
    problem = sealed.identity_problem(ident.identity_path)
    assert problem is not None and "uid 4242" in problem and "chown root" in problem
    empty = tmp_path / "empty.agekey"
    empty.touch(mode=0o600)
    for p in (empty, tmp_path / "missing.agekey"):
        with pytest.raises(errors.RejectError) as e:
            sealed.load_identities([str(p)])
        assert e.value.code == errors.NO_DECRYPTION_KEY and str(p) in e.value.message
    with pytest.raises(errors.RejectError) as e:
        sealed.load_identities([])
    assert e.value.code == errors.NO_DECRYPTION_KEY


def test_manifest_entries_recipients_and_the_device_check(tmp_path: Path) -> None:
    mine, other = generate_identity(tmp_path, "dev"), generate_identity(tmp_path, "other")
    assert sealed.check_recipient(_doc(_enc(), [mine.recipient]), [str(mine.identity_path)])["model.onnx"].plaintext_size == len(PLAIN)
    with pytest.raises(errors.RejectError) as e:
        sealed.check_recipient(_doc(_enc(), [other.recipient]), [str(mine.identity_path)])
    assert e.value.code == errors.NOT_A_RECIPIENT and mine.recipient in e.value.message
    with pytest.raises(errors.RejectError) as e:
        sealed.encrypted_files(_doc({**_enc(), "format": "rot13"}, []))
    assert e.value.code == errors.UNSUPPORTED_ENCRYPTION
    for bad in ({**_enc(), "plaintext_size": -1}, {**_enc(), "plaintext_sha256": "X"}, "age-v1"):
        with pytest.raises(errors.RejectError) as e:
            sealed.encrypted_files(_doc(bad, []))  # type: ignore[arg-type]
        assert e.value.code == errors.INVALID_MANIFEST
    with pytest.raises(errors.RejectError) as e:
        sealed.recipients(_doc(_enc(), ["age1notakey"]))
    assert e.value.code == errors.INVALID_MANIFEST
    assert sealed.encrypted_files({"variants": [{"files": [{"path": "m.onnx"}]}]}) == {}  # a plain bundle


def test_decrypt_checks_plaintext_size_and_hash(tmp_path: Path) -> None:
    import pyrage

    mine, other = generate_identity(tmp_path, "dev"), generate_identity(tmp_path, "other")
    f = tmp_path / "model.onnx"
    f.write_bytes(pyrage.encrypt(PLAIN, [pyrage.x25519.Recipient.from_str(mine.recipient)]))
    ids = sealed.load_identities([str(mine.identity_path)])
    assert sealed.decrypt_file(f, sealed.Encryption(**_enc()), ids) == PLAIN
    for enc in (_enc(PLAIN + b"x"), {**_enc(), "plaintext_sha256": "0" * 64}):
        with pytest.raises(errors.RejectError) as e:
            sealed.decrypt_file(f, sealed.Encryption(**enc), ids)
        assert e.value.code == errors.DECRYPT_MISMATCH
    with pytest.raises(errors.RejectError) as e:
        sealed.decrypt_file(f, sealed.Encryption(**_enc()), sealed.load_identities([str(other.identity_path)]))
    assert e.value.code == errors.NOT_A_RECIPIENT and other.recipient in e.value.message


def test_recipient_arguments_and_the_config_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = generate_identity(tmp_path, "a"), generate_identity(tmp_path, "b")
    listing = tmp_path / "group.txt"
    listing.write_text(f"# the cams group\n{a.recipient}\n{b.recipient}\n")
    assert parse_recipients([a.recipient, str(listing)]) == [a.recipient, b.recipient]
    with pytest.raises(ValueError, match="not an age X25519 recipient"):
        parse_recipients(["age1" + "q" * 58])
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", "/run/credentials/edge-agent.service")
    toml = tmp_path / "agent.toml"
    toml.write_text('[trust]\ndecryption_keys = ["${CREDENTIALS_DIRECTORY}/device.agekey", "keys/spare.agekey"]\n')
    cfg = config.load(str(toml))
    assert cfg.trust.decryption_keys == ["/run/credentials/edge-agent.service/device.agekey",
                                         str(tmp_path / "keys" / "spare.agekey")]


def test_load_decrypts_into_memory_without_a_compiled_model_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The seam hands the runtime the plaintext and no cache folder (a compiled blob holds the
    weights); a recording backend stands in for the runtime here, the daemon tests use real ones
    (and check the worker's hardening, left out here so the test process keeps its core limit)."""
    import pyrage

    hardened: list[bool] = []
    monkeypatch.setattr(unseal, "harden", lambda: hardened.append(True))
    from agent.backends.base import LoadOptions

    mine = generate_identity(tmp_path, "dev")
    f = tmp_path / "model.onnx"
    f.write_bytes(pyrage.encrypt(PLAIN, [pyrage.x25519.Recipient.from_str(mine.recipient)]))
    seen: dict[str, Any] = {}

    class Recorder:
        runtime = "recorder"

        def load(self, model_path: Path, target: str, options: LoadOptions) -> Any:
            seen.update(plain=options.content(model_path), cache=options.cache_path, extra=dict(options.extra))
            return object()

    spec = sealed.load_spec(_doc(_enc(), [mine.recipient]) | {"variants": [{"files": [
        {"path": "model.onnx", "encryption": _enc()}]}]}, tmp_path, ["model.onnx"], [str(mine.identity_path)])
    opts = LoadOptions(cache_dir=tmp_path / "cache", extra={"cache_dir": str(tmp_path / "cache"), sealed.SPEC_KEY: spec})
    unseal.load(Recorder(), f, "cpu", opts)  # type: ignore[arg-type]
    assert seen["plain"] == PLAIN and seen["cache"] is None and sealed.SPEC_KEY not in seen["extra"]
    assert hardened == [True]
