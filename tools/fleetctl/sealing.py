"""Fleet side of encrypted bundles: age identities, encrypting model files, re-encrypting.

Format (docs/security.md "Confidential models"): every variant file is one standard age v1 file
(X25519 recipients, through pyrage), so ``age -d -i NAME.agekey FILE`` opens it by hand. The
manifest entry's ``sha256``/``size`` are the ciphertext's; ``encryption`` holds the plaintext's;
the signed manifest's ``recipients`` lists who can open it. Golden samples and extra common files
stay plain: they are the model's inputs and outputs, not its weights.

Invariants:
- An identity file is created 0600 from its first byte and never overwritten unless asked.
- Files are encrypted in the staging folder of a build (fleetctl/bundle.py), so a published
  bundle never holds a model file in plaintext.
- Re-encryption (rotation) decrypts each file, checks it against the plaintext sha256 and size
  the source manifest lists, and encrypts it to the new recipients: a new signed manifest over
  the same plaintext.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.bundles import sealed
from agent.fsutil import atomic_write, fsync_dir
from agent.timeutil import now_rfc3339

IDENTITY_SUFFIX = ".agekey"
RECIPIENT_SUFFIX = ".agekey.pub"
IDENTITY_MODE = 0o600
RECIPIENT_MODE = 0o644
MAX_RECIPIENT_FILE_BYTES = 256 * 1024


class SealingError(ValueError):
    """A recipient, identity or encrypted file is unusable; the message says which and why."""


@dataclass(frozen=True)
class AgeIdentity:
    """Where ``keygen --age`` wrote an identity and its public recipient."""

    identity_path: Path
    recipient_path: Path
    recipient: str


def _pyrage() -> Any:
    try:
        import pyrage
    except ImportError as e:
        raise SealingError("pyrage is not installed (pip install pyrage)") from e
    return pyrage


def generate_identity(out_dir: Path | str, name: str, *, overwrite: bool = False) -> AgeIdentity:
    """Write ``NAME.agekey`` (the private identity, 0600, age-keygen's format) and
    ``NAME.agekey.pub`` (its recipient, ``age1…``)."""
    from fleetctl.keys import KeyFileError, _write_new

    if not name or "/" in name or name.startswith("."):
        raise SealingError(f"bad identity name {name!r}: a plain file name is expected")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ident = _pyrage().x25519.Identity.generate()
    pub = str(ident.to_public())
    priv_path, pub_path = out / f"{name}{IDENTITY_SUFFIX}", out / f"{name}{RECIPIENT_SUFFIX}"
    text = f"# created: {now_rfc3339(time.time())}\n# public key: {pub}\n{ident}\n"
    try:
        if not overwrite:
            for p in (priv_path, pub_path):
                if p.exists():
                    raise KeyFileError(f"{p} already exists (use --force to replace it)")
        _write_new(priv_path, text.encode(), IDENTITY_MODE, overwrite)
        _write_new(pub_path, f"{pub}\n".encode(), RECIPIENT_MODE, overwrite)
    except KeyFileError as e:
        raise SealingError(str(e)) from e
    fsync_dir(out)
    return AgeIdentity(priv_path, pub_path, pub)


def parse_recipients(specs: Sequence[str]) -> list[str]:
    """``--encrypt-to`` values: each an ``age1…`` recipient or a file of them (one a line, ``#``
    comments). Each checked by pyrage; duplicates dropped, order kept."""
    x25519 = _pyrage().x25519
    out: list[str] = []
    for spec in specs:
        if spec.startswith("age1"):
            lines = [spec]
        else:
            try:
                with open(spec, encoding="ascii") as f:
                    text = f.read(MAX_RECIPIENT_FILE_BYTES + 1)
            except (OSError, UnicodeDecodeError) as e:
                raise SealingError(f"--encrypt-to {spec}: neither an age1… recipient nor a readable file ({e})") from e
            lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
            if not lines:
                raise SealingError(f"--encrypt-to {spec}: the file lists no recipient")
        for r in lines:
            try:
                x25519.Recipient.from_str(r)
            except Exception as e:  # pyrage.RecipientError
                raise SealingError(f"--encrypt-to {spec}: {r[:80]!r} is not an age X25519 recipient ({e})") from e
            if not sealed.RECIPIENT_RE.match(r):
                raise SealingError(f"--encrypt-to {spec}: {r[:80]!r} is not an age X25519 recipient")
            if r not in out:
                out.append(r)
    if len(out) > sealed.MAX_RECIPIENTS:
        raise SealingError(f"{len(out)} recipients; at most {sealed.MAX_RECIPIENTS}")
    return out


def _encrypt_in_place(root: Path, rel: str, plain: bytes, recipients: Sequence[str]) -> dict[str, Any]:
    """Write ``plain`` encrypted to ``root/rel``; its manifest entry."""
    pyrage = _pyrage()
    rs = [pyrage.x25519.Recipient.from_str(r) for r in recipients]
    ciphertext = pyrage.encrypt(plain, rs)
    atomic_write(root / rel, ciphertext)
    enc = sealed.Encryption(sealed.AGE_V1, hashlib.sha256(plain).hexdigest(), len(plain))
    return {"path": rel, "size": len(ciphertext), "sha256": hashlib.sha256(ciphertext).hexdigest(),
            "encryption": enc.to_dict()}


def seal_document(root: Path, doc: dict[str, Any], recipients: Sequence[str]) -> dict[str, Any]:
    """Encrypt every variant file of ``doc`` (files in ``root``, plaintext) in place; the document
    with ciphertext entries, their ``encryption`` and the ``recipients``."""
    if not recipients:
        raise SealingError("at least one recipient is required to encrypt a bundle")
    done: dict[str, dict[str, Any]] = {}
    for v in doc["variants"]:
        files = []
        for f in v["files"]:
            if f["path"] not in done:
                done[f["path"]] = _encrypt_in_place(root, f["path"], (root / f["path"]).read_bytes(), recipients)
            files.append(done[f["path"]])
        v["files"] = files
    doc["recipients"] = list(recipients)
    return doc


def reencrypt_document(src: Path, out: Path, doc: dict[str, Any], identities: Sequence[str],
                       recipients: Sequence[str]) -> dict[str, Any]:
    """Rotation: each encrypted file of ``src`` decrypted with ``identities``, checked against
    the manifest's plaintext sha256 and size, and written to ``out`` encrypted to
    ``recipients``; plain files copied. The document for ``out`` (unsigned, same version)."""
    import shutil

    from agent import errors

    if not recipients:
        raise SealingError("at least one recipient is required to re-encrypt a bundle")
    try:
        ids = sealed.load_identities(list(identities))
    except errors.AgentError as e:
        raise SealingError(e.message) from e
    encs = sealed.encrypted_files(doc)
    if not encs:
        raise SealingError(f"{src}: the bundle is not encrypted (build it with --encrypt-to)")
    new: dict[str, dict[str, Any]] = {}
    for rel, enc in encs.items():
        try:
            plain = sealed.decrypt_file(src / rel, enc, ids)
        except errors.AgentError as e:
            raise SealingError(f"{rel}: {e}") from e
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        new[rel] = _encrypt_in_place(out, rel, plain, recipients)
    for entry in [*doc.get("files", []), *(f for v in doc["variants"] for f in v["files"])]:
        if entry["path"] not in encs and not (out / entry["path"]).exists():
            (out / entry["path"]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / entry["path"], out / entry["path"])
    for v in doc["variants"]:
        v["files"] = [new.get(f["path"], f) for f in v["files"]]
    doc["files"] = [new.get(f["path"], f) for f in doc.get("files", [])]
    doc["recipients"] = list(recipients)
    for p in out.rglob("*"):
        if p.is_file():
            os.chmod(p, 0o644)
    return doc


def reencrypt_bundle(src_dir: Path | str, out_dir: Path | str, version: int, keys: Sequence[Any],
                     identities: Sequence[str], recipients: Sequence[str], *, expires_in_s: float,
                     overwrite: bool = False, now: float | None = None) -> Path:
    """Rotation: the bundle at ``src_dir`` encrypted to a new recipient set, as ``version`` (a
    new signed manifest over the same plaintext hashes) in ``out_dir``; the manifest's path."""
    from agent.bundles.manifest import sign_manifest
    from fleetctl import bundle

    src, out = Path(src_dir), Path(os.path.abspath(out_dir))
    if not keys:
        raise bundle.BuildError("at least one signing key is required")
    bundle._check_output(out, overwrite)
    doc = bundle.manifest_document(src / bundle.MANIFEST_NAME)
    t = time.time() if now is None else now
    doc.update(version=version, created_at=now_rfc3339(t), expires_at=now_rfc3339(t + expires_in_s))
    with bundle._staging(out) as tmp:
        doc = bundle.check_document(reencrypt_document(src, tmp, doc, identities, recipients))
        atomic_write(tmp / bundle.MANIFEST_NAME, sign_manifest(doc, list(keys)))
        bundle._publish(tmp, out)
    return out / bundle.MANIFEST_NAME
