"""Trust store: the Ed25519 public keys a device accepts, named by key id.

Key id = hex sha256 of the raw 32-byte public key (BUNDLE.md). Keys are PEM files in the trust
folder; the daemon learns new keys only through the signed ``trust`` command.

``cryptography`` (≈ 9 MB of RSS) stays out of the daemon: a key file in the standard form (PEM
SubjectPublicKeyInfo of one Ed25519 key) is read as its raw 32 bytes, and signatures by such keys
are checked through the OpenSSL libcrypto the interpreter already maps (agent/bundles/ed25519.py).
Any other key file, and the rare ``trust`` command, go through ``cryptography``, which accepts or
refuses them exactly as before; so do signatures when that libcrypto has no Ed25519.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import re
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from agent import errors
from agent.fsutil import atomic_write

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

log = logging.getLogger(__name__)
MAX_KEY_FILE_BYTES = 16 * 1024
ED25519_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")  # SEQUENCE{SEQUENCE{OID 1.3.101.112}, BIT STRING(32 bytes)}
PEM_BEGIN, PEM_END = "-----BEGIN PUBLIC KEY-----", "-----END PUBLIC KEY-----"
KEY_ID_SHOWN = 16  # hex digits of a key id in messages; trust files written by `apply` use as many
MAX_IDS_SHOWN = 4  # key ids listed in one message, then "and N more"
HEX_ID_RE = re.compile(r"^[0-9a-fA-F]{1,128}$")


def short_id(kid: object) -> str:
    """A key id as messages show it: its first hex digits with an ellipsis; anything that is not
    hex (the ``keyid`` of an envelope is the sender's text) is named as such, never echoed."""
    if not isinstance(kid, str) or not HEX_ID_RE.match(kid):
        return "(not a hex key id)"
    kid = kid.lower()
    return kid if len(kid) <= KEY_ID_SHOWN else kid[:KEY_ID_SHOWN] + "…"


def describe_ids(ids: Iterable[object]) -> str:
    """``ab12…, cd34…`` (at most MAX_IDS_SHOWN, then "and N more"); ``none`` when empty."""
    shown = [short_id(k) for k in ids]
    if not shown:
        return "none"
    more = len(shown) - MAX_IDS_SHOWN
    return ", ".join(shown[:MAX_IDS_SHOWN]) + (f" and {more} more" if more > 0 else "")


def writable_kind(mode: int) -> str | None:
    """``world-writable``, ``group-writable`` or None for a file mode; world wins when both."""
    if mode & stat.S_IWOTH:
        return "world-writable"
    if mode & stat.S_IWGRP:
        return "group-writable"
    return None


def key_id(pub: Ed25519PublicKey) -> str:
    """Hex sha256 of the raw public key bytes."""
    from cryptography.hazmat.primitives import serialization

    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def raw_ed25519_pem(data: bytes) -> bytes | None:
    """The raw 32-byte key of a standard Ed25519 public key PEM, read without ``cryptography``;
    None for anything else (the caller then lets ``cryptography`` decide)."""
    try:
        lines = [line.strip() for line in data.decode("ascii").strip().splitlines()]
        if len(lines) < 3 or lines[0] != PEM_BEGIN or lines[-1] != PEM_END:
            return None
        der = base64.b64decode("".join(lines[1:-1]), validate=True)
    except (UnicodeDecodeError, binascii.Error, ValueError):
        return None
    if len(der) != len(ED25519_SPKI_PREFIX) + 32 or not der.startswith(ED25519_SPKI_PREFIX):
        return None
    return der[len(ED25519_SPKI_PREFIX):]


def load_public_pem(data: bytes, name: str = "key") -> Ed25519PublicKey:
    """Parse an Ed25519 public key PEM; RejectError naming ``name`` otherwise."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        raise errors.RejectError(errors.INVALID_COMMAND, f"{name}: not a PEM public key: {e}") from e
    if not isinstance(key, Ed25519PublicKey):
        raise errors.RejectError(errors.INVALID_COMMAND, f"{name}: not an Ed25519 public key")
    return key


def public_pem(pub: Ed25519PublicKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Load an Ed25519 private key PEM (fleet side)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key")
    return key


class TrustStore:
    """The trusted keys, loaded from a folder of ``*.pem`` files."""

    def __init__(self, keys: dict[str, Ed25519PublicKey | bytes] | None = None,
                 folder: Path | None = None) -> None:
        self._keys: dict[str, Ed25519PublicKey | bytes] = dict(keys or {})  # bytes: raw, made on first use
        self.folder = folder

    @classmethod
    def load(cls, folder: Path) -> TrustStore:
        """Read every ``*.pem`` in ``folder``; a bad file is logged and skipped."""
        folder = Path(folder)
        keys: dict[str, Ed25519PublicKey | bytes] = {}
        if folder.is_dir():
            for p in sorted(folder.glob("*.pem")):
                try:
                    if p.stat().st_size > MAX_KEY_FILE_BYTES:
                        raise errors.RejectError(errors.INVALID_COMMAND, f"{p}: larger than {MAX_KEY_FILE_BYTES} bytes")
                    data = p.read_bytes()
                    raw = raw_ed25519_pem(data)
                    if raw is not None:
                        keys[hashlib.sha256(raw).hexdigest()] = raw
                        continue
                    pub = load_public_pem(data, str(p))
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
        key = self._keys.get(kid)
        if isinstance(key, bytes):
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

            key = self._keys[kid] = Ed25519PublicKey.from_public_bytes(key)
        return key

    def check(self, kid: str, sig: bytes, msg: bytes) -> bool | None:
        """Whether ``sig`` is a valid signature of ``msg`` by trusted key ``kid``; None when no
        such key is trusted."""
        key = self._keys.get(kid)
        if key is None:
            return None
        if isinstance(key, bytes):
            from agent.bundles import ed25519

            if ed25519.available():
                return ed25519.verify(key, sig, msg)
        pub = self.get(kid)
        if pub is None:
            return None
        from cryptography.exceptions import InvalidSignature

        try:
            pub.verify(sig, msg)
        except InvalidSignature:
            return False
        return True

    def where(self) -> str:
        """The trust folder for messages (``the trust store`` when keys were given in memory)."""
        return str(self.folder) if self.folder is not None else "the trust store"

    def no_keys_message(self) -> str:
        """Why nothing can verify when the store is empty, and the fix."""
        if self.folder is not None and not self.folder.is_dir():
            return (f"the trust folder {self.folder} does not exist; create it (install -d -m 0755 {self.folder}) "
                    "and copy the signer's public key (.pub.pem) there")
        return (f"the trust folder {self.where()} holds no Ed25519 public key (*.pem); "
                "copy the signer's public key (.pub.pem) there")

    def writable_by_others(self) -> list[str]:
        """Paths in the trust folder that group or others can write (a takeover risk)."""
        return [p for p, _ in self.writable_paths()]

    def writable_paths(self) -> list[tuple[str, str]]:
        """(path, ``group-writable`` or ``world-writable``) for each path of the trust folder that
        someone other than its owner can write."""
        return writable_paths(self.folder) if self.folder is not None else []

    def apply(self, add: list[Ed25519PublicKey], remove: list[str]) -> list[str]:
        """Add and remove keys, persisting to the folder; returns the key ids now trusted."""
        new: dict[str, Ed25519PublicKey] = {kid: pub for kid in list(self._keys) if (pub := self.get(kid)) is not None}
        for kid in remove:
            new.pop(kid, None)
        for pub in add:
            new[key_id(pub)] = pub
        if not new:
            raise errors.RejectError(errors.INVALID_COMMAND, "trust: refusing to remove every trusted key")
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            for kid, pub in new.items():
                path = self.folder / f"{kid[:KEY_ID_SHOWN]}.pem"
                if not path.exists():
                    atomic_write(path, public_pem(pub), mode=0o644)
            for p in self.folder.glob("*.pem"):
                try:
                    kid = key_id(load_public_pem(p.read_bytes(), str(p)))
                except (OSError, errors.AgentError):
                    continue
                if kid not in new:
                    os.unlink(p)
        self._keys = {kid: pub for kid, pub in new.items()}
        return sorted(new)


def describe_writable(bad: list[tuple[str, str]]) -> str:
    """``/x is group-writable, /x/k.pem is world-writable; fix: chmod go-w /x /x/k.pem``."""
    what = ", ".join(f"{p} is {kind}" for p, kind in bad)
    return f"{what}; fix: chmod go-w {' '.join(p for p, _ in bad)}"


def writable_paths(folder: Path) -> list[tuple[str, str]]:
    """(path, ``group-writable`` or ``world-writable``) for ``folder`` and each ``*.pem`` in it
    that someone other than its owner can write (a takeover risk)."""
    bad: list[tuple[str, str]] = []
    if not folder.exists():
        return bad
    for p in [folder, *folder.glob("*.pem")]:
        kind = writable_kind(p.stat().st_mode)
        if kind:
            bad.append((str(p), kind))
    return bad


def folder_problem(folder: Path) -> str | None:
    """Why the daemon cannot use ``folder`` as its trust folder, with the fix; None when it can."""
    if not folder.exists():
        return (f"trust folder {folder} does not exist (trust.keys_dir); create it with "
                f"`install -d -m 0755 {folder}` and copy the fleet's public key (.pub.pem) into it")
    if not folder.is_dir():
        return f"trust folder {folder} is not a folder (trust.keys_dir); point trust.keys_dir at a folder of *.pem keys"
    bad = writable_paths(folder)
    if bad:
        return f"trust folder {folder} is writable by others than its owner: {describe_writable(bad)}"
    return None
