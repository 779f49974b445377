"""Trust store: the Ed25519 public keys a device accepts, named by key id.

Key id = hex sha256 of the raw 32-byte public key (BUNDLE.md). Keys are PEM files in the trust
folder; the daemon learns new keys only through the signed ``trust`` command.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent import errors
from agent.fsutil import atomic_write

log = logging.getLogger(__name__)
MAX_KEY_FILE_BYTES = 16 * 1024


def key_id(pub: Ed25519PublicKey) -> str:
    """Hex sha256 of the raw public key bytes."""
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def load_public_pem(data: bytes, name: str = "key") -> Ed25519PublicKey:
    """Parse an Ed25519 public key PEM; RejectError naming ``name`` otherwise."""
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        raise errors.RejectError(errors.INVALID_COMMAND, f"{name}: not a PEM public key: {e}") from e
    if not isinstance(key, Ed25519PublicKey):
        raise errors.RejectError(errors.INVALID_COMMAND, f"{name}: not an Ed25519 public key")
    return key


def public_pem(pub: Ed25519PublicKey) -> bytes:
    return pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Load an Ed25519 private key PEM (fleet side)."""
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key")
    return key


class TrustStore:
    """The trusted keys, loaded from a folder of ``*.pem`` files."""

    def __init__(self, keys: dict[str, Ed25519PublicKey] | None = None,
                 folder: Path | None = None) -> None:
        self._keys: dict[str, Ed25519PublicKey] = dict(keys or {})
        self.folder = folder

    @classmethod
    def load(cls, folder: Path) -> TrustStore:
        """Read every ``*.pem`` in ``folder``; a bad file is logged and skipped."""
        folder = Path(folder)
        keys: dict[str, Ed25519PublicKey] = {}
        if folder.is_dir():
            for p in sorted(folder.glob("*.pem")):
                try:
                    if p.stat().st_size > MAX_KEY_FILE_BYTES:
                        raise errors.RejectError(errors.INVALID_COMMAND, f"{p}: larger than {MAX_KEY_FILE_BYTES} bytes")
                    pub = load_public_pem(p.read_bytes(), str(p))
                except (OSError, errors.AgentError) as e:
                    log.warning("trust: skipping %s: %s", p, e)
                    continue
                keys[key_id(pub)] = pub
        return cls(keys, folder)

    def __len__(self) -> int:
        return len(self._keys)

    def key_ids(self) -> Iterator[str]:
        return iter(sorted(self._keys))

    def get(self, kid: str) -> Ed25519PublicKey | None:
        return self._keys.get(kid)

    def writable_by_others(self) -> list[str]:
        """Paths in the trust folder that group or others can write (a takeover risk)."""
        bad: list[str] = []
        if self.folder is None or not self.folder.exists():
            return bad
        for p in [self.folder, *self.folder.glob("*.pem")]:
            st = p.stat()
            if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
                bad.append(str(p))
        return bad

    def apply(self, add: list[Ed25519PublicKey], remove: list[str]) -> list[str]:
        """Add and remove keys, persisting to the folder; returns the key ids now trusted."""
        new = dict(self._keys)
        for kid in remove:
            new.pop(kid, None)
        for pub in add:
            new[key_id(pub)] = pub
        if not new:
            raise errors.RejectError(errors.INVALID_COMMAND, "trust: refusing to remove every trusted key")
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            for kid, pub in new.items():
                path = self.folder / f"{kid[:16]}.pem"
                if not path.exists():
                    atomic_write(path, public_pem(pub), mode=0o644)
            for p in self.folder.glob("*.pem"):
                try:
                    kid = key_id(load_public_pem(p.read_bytes(), str(p)))
                except (OSError, errors.AgentError):
                    continue
                if kid not in new:
                    os.unlink(p)
        self._keys = new
        return sorted(new)
