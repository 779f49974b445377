"""Offline bundles on the device: ``agentctl verify BUNDLE`` and ``agentctl install BUNDLE``.

Invariants:
- ``verify`` writes nothing and needs no daemon: the trust folder and threshold come from the
  config (or are given), and a bundle passes only as a device would accept it.
- ``install`` goes through the daemon's deploy queue (agent/deploy/offline.py); this module
  only reads bundles and imports nothing of deploy.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent import errors
from agent.bundles import dsse
from agent.bundles.archive import MANIFEST_NAME, verify_archive
from agent.bundles.manifest import MAX_MANIFEST_BYTES, FileEntry, Manifest, verify_manifest
from agent.bundles.trust import TrustStore

HASH_CHUNK_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Verified:
    manifest: Manifest
    files: tuple[FileEntry, ...]
    encryption: dict[str, Any] | None = None  # an encrypted bundle: its recipients, and this device's check

    def describe(self) -> str:
        m = self.manifest
        variants = ", ".join(f"{v.id} ({v.format}/{v.precision})" for v in m.variants)
        enc = self.encryption
        sealed = "" if enc is None else (
            f"; {enc['files']} file(s) encrypted (age-v1) to {len(enc['recipients'])} recipient(s), "
            + ("this device is one of them" if enc["recipient_checked"] else
               "recipient not checked (no decryption identity given)"))
        return (f"OK {m.name} v{m.version}: variants {variants}; {len(self.files)} files OK "
                f"({sum(f.size for f in self.files)} bytes, sizes and sha256 match){sealed}; expires {m.expires_at}")


def verify_path(path: Path | str, trust: TrustStore, threshold: int, now: float | None = None,
                identities: list[str] | None = None) -> Verified:
    """Verify a bundle archive or folder as this device would accept it; writes nothing.

    An encrypted bundle's encryption must be one this agent opens, and with ``identities`` (the
    device's ``trust.decryption_keys``) the device must be one of its recipients
    (agent/bundles/sealed.py); ``None``: the recipient is not checked."""
    p = Path(path)
    if not p.exists():
        raise errors.RejectError(errors.INVALID_BUNDLE, f"{p}: no such file or folder")
    if not p.is_dir():
        rep = verify_archive(p, trust, threshold, now)
        return Verified(rep.manifest, rep.files, _encryption(rep.manifest, identities))
    try:
        with open(p / MANIFEST_NAME, "rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as e:
        raise errors.RejectError(errors.INVALID_BUNDLE, f"{p / MANIFEST_NAME}: {e.strerror or e}") from e
    if len(trust) == 0:
        raise errors.RejectError(errors.UNTRUSTED_KEY, trust.no_keys_message())
    m = verify_manifest(raw, trust, threshold)
    if m.is_expired(now):
        raise errors.RejectError(errors.EXPIRED, f"{m.name} v{m.version}: expired at {m.expires_at}")
    listed = {f.path: f for f in (*m.files, *(f for v in m.variants for f in v.files))}
    root = p.resolve()
    for entry in listed.values():
        _check_file(p, root, entry)
    return Verified(m, tuple(listed.values()), _encryption(m, identities))


def _encryption(m: Manifest, identities: list[str] | None) -> dict[str, Any] | None:
    from agent.bundles import sealed

    files = sealed.encrypted_files(m.raw)
    if not files:
        return None
    if identities is not None:
        sealed.check_recipient(m.raw, identities)
    return {"format": sealed.AGE_V1, "files": len(files), "recipients": sealed.recipients(m.raw),
            "recipient_checked": identities is not None}


def _check_file(folder: Path, root: Path, entry: FileEntry) -> None:
    f = folder / entry.path
    if f.is_symlink() or not f.resolve().is_relative_to(root) or not f.is_file():
        raise errors.RejectError(errors.INVALID_BUNDLE, f"{entry.path}: missing, a link, or not a regular file")
    h = hashlib.sha256()
    n = 0
    with open(f, "rb") as fh:
        while n <= entry.size and (chunk := fh.read(min(HASH_CHUNK_BYTES, entry.size + 1 - n))):
            h.update(chunk)
            n += len(chunk)
    if n > entry.size:
        raise errors.RejectError(errors.SIZE_EXCEEDED, f"{entry.path}: longer than its listed {entry.size} bytes")
    if n < entry.size or h.hexdigest() != entry.sha256:
        raise errors.RejectError(errors.HASH_MISMATCH, f"{entry.path}: size or sha256 differs from the manifest")


def peek_name(raw: bytes) -> str:
    """The (unverified) model name, only to name the job; the verified one must equal it."""
    try:
        doc = json.loads(dsse.payload_bytes(dsse.parse_envelope(raw)))
    except (ValueError, errors.AgentError):
        return "unknown"
    name = doc.get("name") if isinstance(doc, dict) else None
    return name if isinstance(name, str) and name else "unknown"
