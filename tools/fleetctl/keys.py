"""Fleet signing keys: Ed25519 key pairs on disk, and loading them for signing.

Invariants:
- A private key file is created with mode 0600 from the first byte (``os.open`` with the mode,
  never chmod after writing), and an existing key is never overwritten unless asked.
- The key id printed and recorded is ``agent.bundles.trust.key_id`` of the public key, the same
  id devices compute from their trust folder.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.bundles.trust import key_id, load_private_key, public_pem
from agent.fsutil import fsync_dir

PRIVATE_KEY_MODE = 0o600
PUBLIC_KEY_MODE = 0o644
DEFAULT_KEY_NAME = "fleet"
PRIVATE_SUFFIX = ".key"
PUBLIC_SUFFIX = ".pub.pem"


class KeyFileError(ValueError):
    """A key file is missing, unreadable or not an Ed25519 private key."""


@dataclass(frozen=True)
class KeyPair:
    """Where a generated key pair was written and its key id."""

    private_path: Path
    public_path: Path
    key_id: str


def _write_new(path: Path, data: bytes, mode: int, overwrite: bool) -> None:
    """Create ``path`` with ``mode`` and write ``data``, fsynced; refuse to clobber unless asked."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError as e:
        raise KeyFileError(f"{path} already exists (use --force to replace it)") from e
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    os.chmod(path, mode)  # O_TRUNC on an existing file keeps its old mode


def generate_keypair(out_dir: Path, name: str = DEFAULT_KEY_NAME, *, overwrite: bool = False) -> KeyPair:
    """Write ``out_dir/NAME.key`` (private PEM, 0600) and ``out_dir/NAME.pub.pem``."""
    if not name or "/" in name or name.startswith("."):
        raise KeyFileError(f"bad key name {name!r}: a plain file name is expected")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    priv_path = out_dir / f"{name}{PRIVATE_SUFFIX}"
    pub_path = out_dir / f"{name}{PUBLIC_SUFFIX}"
    if not overwrite:
        for p in (priv_path, pub_path):
            if p.exists():
                raise KeyFileError(f"{p} already exists (use --force to replace it)")
    _write_new(priv_path, priv, PRIVATE_KEY_MODE, overwrite)
    _write_new(pub_path, public_pem(key.public_key()), PUBLIC_KEY_MODE, overwrite)
    fsync_dir(out_dir)
    return KeyPair(priv_path, pub_path, key_id(key.public_key()))


def load_signing_key(path: Path | str) -> Ed25519PrivateKey:
    """Load one Ed25519 private key PEM with an error naming the file."""
    p = Path(path)
    try:
        return load_private_key(p)
    except FileNotFoundError as e:
        raise KeyFileError(f"signing key {p}: no such file") from e
    except OSError as e:
        raise KeyFileError(f"signing key {p}: {e.strerror or e}") from e
    except (ValueError, TypeError) as e:
        raise KeyFileError(f"signing key {p}: not an unencrypted Ed25519 private key PEM ({e})") from e


def load_signing_keys(paths: Sequence[Path | str]) -> list[Ed25519PrivateKey]:
    """Load every key in ``paths``; at least one is required, and each distinct key once."""
    if not paths:
        raise KeyFileError("no signing key given (--key KEY.key, or $FLEETCTL_KEY)")
    keys: list[Ed25519PrivateKey] = []
    seen: set[str] = set()
    for p in paths:
        k = load_signing_key(p)
        kid = key_id(k.public_key())
        if kid not in seen:  # a duplicate signature would count once on the device anyway
            seen.add(kid)
            keys.append(k)
    return keys
