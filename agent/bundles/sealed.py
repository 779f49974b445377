"""Encrypted bundles (docs/security.md "Confidential models"): model files sealed with age.

A manifest file entry may carry ``"encryption": {"format": "age-v1", "plaintext_sha256": …,
"plaintext_size": …}``: its ``sha256``/``size`` are then the ciphertext's (checked while it
downloads, like any file), and the manifest's ``recipients`` lists the age X25519 public keys
(``age1…``) it was encrypted to. Decryption goes through pyrage (the maintained bindings to the
rust ``age`` crate); nothing here is hand-written crypto.

Invariants:
- The store keeps ciphertext only. Plaintext exists in the memory of the process that loads the
  model (the worker, with the default ``backends.isolation = "process"``), never in a file: the
  runtimes load from bytes (``LoadOptions.contents``, through agent/backends/unseal.py).
- A process that decrypts is made non-dumpable (no core file, no ptrace by other users) first.
- Encrypted models load without compiled-model caches (OpenVINO blobs, TensorRT engines hold
  the weights and would be written to disk).
- Identity files are refused unless 0400/0600 and owned by root or the agent's user
  (``no_decryption_key``, with the fix).
- Refusals: ``unsupported_encryption`` (unknown format), ``no_decryption_key`` (no usable
  identity), ``not_a_recipient`` (naming the device's recipients), ``decrypt_mismatch`` (the
  plaintext's size or sha256 is not the listed one, or the age file does not open).

pyrage is imported where it is used: a device without encrypted bundles never loads it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import resource
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent import errors

log = logging.getLogger(__name__)

AGE_V1 = "age-v1"
FORMATS = (AGE_V1,)
RECIPIENT_RE = re.compile(r"^age1[02-9ac-hj-np-z]{58}$")  # bech32, an X25519 public key
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
MAX_RECIPIENTS = 64
MAX_IDENTITY_BYTES = 64 * 1024  # an identity file holds a few keys and comments
IDENTITY_PREFIX = "AGE-SECRET-KEY-1"
SPEC_KEY = "sealed"  # LoadOptions.extra[SPEC_KEY]: what a loader decrypts (survives the worker pipe)
PR_SET_DUMPABLE = 4  # <linux/prctl.h>
CODES = frozenset({errors.NOT_A_RECIPIENT, errors.DECRYPT_MISMATCH, errors.UNSUPPORTED_ENCRYPTION,
                   errors.NO_DECRYPTION_KEY})  # no other backend or variant does better: not a fallback


@dataclass(frozen=True)
class Encryption:
    """How one bundle file is sealed, and what its plaintext must be."""

    format: str
    plaintext_sha256: str
    plaintext_size: int

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "plaintext_sha256": self.plaintext_sha256,
                "plaintext_size": self.plaintext_size}


def _bad(msg: str) -> errors.RejectError:
    return errors.RejectError(errors.INVALID_MANIFEST, msg)


def _encryption(d: Any, where: str) -> Encryption:
    if not isinstance(d, dict):
        raise _bad(f"{where}.encryption: not an object")
    fmt = d.get("format")
    if fmt not in FORMATS:
        raise errors.RejectError(errors.UNSUPPORTED_ENCRYPTION,
                                 f"{where}.encryption.format {fmt!r}: this agent opens {', '.join(FORMATS)}")
    sha = d.get("plaintext_sha256")
    if not isinstance(sha, str) or not SHA256_RE.match(sha):
        raise _bad(f"{where}.encryption.plaintext_sha256: not 64 lowercase hex digits")
    size = d.get("plaintext_size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise _bad(f"{where}.encryption.plaintext_size: {size!r} is not a size")
    return Encryption(fmt, sha, size)


def encrypted_files(doc: dict[str, Any]) -> dict[str, Encryption]:
    """Bundle path → Encryption for every encrypted file of a (schema-checked) manifest document;
    empty for a plain bundle. ``unsupported_encryption`` / ``invalid_manifest`` on a bad entry."""
    out: dict[str, Encryption] = {}
    listed = [(f"variants[{i}].files[{j}]", f) for i, v in enumerate(doc.get("variants") or [])
              for j, f in enumerate(v.get("files") or [])]
    listed += [(f"files[{j}]", f) for j, f in enumerate(doc.get("files") or [])]
    for where, f in listed:
        if isinstance(f, dict) and "encryption" in f:
            out[str(f.get("path"))] = _encryption(f["encryption"], where)
    if out:
        validation = doc.get("validation") or {}
        for key in ("inputs", "expected"):
            if validation.get(key) in out:
                raise _bad(f"validation.{key}: golden samples are not encrypted (docs/security.md)")
    return out


def recipients(doc: dict[str, Any]) -> list[str]:
    """The ``recipients`` the manifest says its files are encrypted to (public keys)."""
    rs = doc.get("recipients", [])
    if not isinstance(rs, list) or len(rs) > MAX_RECIPIENTS:
        raise _bad(f"recipients: not a list of at most {MAX_RECIPIENTS} age recipients")
    for r in rs:
        if not isinstance(r, str) or not RECIPIENT_RE.match(r):
            raise _bad(f"recipients: {str(r)[:80]!r} is not an age X25519 recipient (age1…)")
    return list(rs)


# -- identities ---------------------------------------------------------------------------------
def identity_problem(path: str | Path, agent_uid: int | None = None) -> str | None:
    """Why the agent must not use ``path`` as an identity file, with the fix; None when it may.
    ``agent_uid``: the agent's user when another user (``agentctl doctor`` as root) asks."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        return (f"decryption identity {p} does not exist (trust.decryption_keys); create it with "
                f"`fleetctl keygen --age` and install it with mode 0600")
    except OSError as e:
        return f"decryption identity {p}: cannot stat: {e.strerror or e}"
    if not stat.S_ISREG(st.st_mode):
        return f"decryption identity {p} is not a regular file (trust.decryption_keys)"
    if st.st_mode & 0o177 and not _systemd_credential(p):
        return (f"decryption identity {p} has mode {stat.S_IMODE(st.st_mode):04o}; "
                f"fix: chmod 0600 {p} (only its owner may read it)")
    agent = os.geteuid() if agent_uid is None else agent_uid
    if st.st_uid not in (0, agent):
        return (f"decryption identity {p} is owned by uid {st.st_uid}, not root or the agent's user "
                f"(uid {agent}); fix: chown root {p}")
    return None


def _systemd_credential(p: Path) -> bool:
    """A file in this unit's ``$CREDENTIALS_DIRECTORY``: systemd made it readable to the agent's
    user alone (through an ACL, which shows as group bits in the mode), on non-swappable memory."""
    d = os.environ.get("CREDENTIALS_DIRECTORY")
    return d is not None and d != "" and p.resolve().is_relative_to(Path(d).resolve())


def load_identities(paths: list[str] | tuple[str, ...], agent_uid: int | None = None) -> list[Any]:
    """The age identities in ``paths`` (pyrage x25519 Identities); ``no_decryption_key`` for none,
    a missing or unsafe file, or one that holds no identity."""
    if not paths:
        raise errors.RejectError(errors.NO_DECRYPTION_KEY,
                                 "this bundle is encrypted and trust.decryption_keys lists no identity file")
    x25519 = _pyrage().x25519
    out = []
    for path in paths:
        problem = identity_problem(path, agent_uid)
        if problem:
            raise errors.RejectError(errors.NO_DECRYPTION_KEY, problem)
        try:
            with open(path, "rb") as f:
                text = f.read(MAX_IDENTITY_BYTES + 1).decode("ascii")
        except (OSError, UnicodeDecodeError) as e:
            raise errors.RejectError(errors.NO_DECRYPTION_KEY, f"decryption identity {path}: cannot read: {e}") from e
        found = 0
        for line in text.splitlines():
            line = line.strip()
            if line.startswith(IDENTITY_PREFIX):
                try:
                    out.append(x25519.Identity.from_str(line))
                except Exception as e:  # pyrage.IdentityError
                    raise errors.RejectError(errors.NO_DECRYPTION_KEY,
                                             f"decryption identity {path}: not an age identity ({e})") from e
                found += 1
        if not found:
            raise errors.RejectError(errors.NO_DECRYPTION_KEY,
                                     f"decryption identity {path} holds no {IDENTITY_PREFIX}… line")
    return out


def device_recipients(identities: list[Any]) -> list[str]:
    """The public keys (``age1…``) of this device's identities."""
    return [str(i.to_public()) for i in identities]


def check_recipient(doc: dict[str, Any], identity_paths: list[str] | tuple[str, ...]) -> dict[str, Encryption]:
    """Before any download: the bundle's encryption is understood, this device has a usable
    identity and is one of the manifest's recipients. Returns ``encrypted_files(doc)``."""
    sealed = encrypted_files(doc)
    listed = recipients(doc)
    if not sealed:
        return sealed
    mine = device_recipients(load_identities(identity_paths))
    if not set(mine) & set(listed):
        raise errors.RejectError(errors.NOT_A_RECIPIENT,
                                 f"{doc.get('name')} v{doc.get('version')} is not encrypted to this device: "
                                 f"its recipients are {', '.join(listed) or 'not listed'}; this device is "
                                 f"{', '.join(mine)}")
    return sealed


# -- loading ------------------------------------------------------------------------------------
def load_spec(doc: dict[str, Any], vdir: Path, paths: list[str],
              identity_paths: list[str] | tuple[str, ...]) -> dict[str, Any] | None:
    """What a loader decrypts for the bundle ``paths`` (a variant's files) in ``vdir``:
    ``LoadOptions.extra[SPEC_KEY]``; None when none of them is encrypted."""
    sealed = encrypted_files(doc)
    files = {str(vdir / p): sealed[p].to_dict() for p in paths if p in sealed}
    if not files:
        return None
    return {"identities": list(identity_paths), "files": files}


def harden() -> None:
    """No core dumps and no ptrace by other users for this process (it holds plaintext)."""
    import ctypes  # here: an idle daemon does without it

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed")
    except (OSError, AttributeError) as e:
        raise errors.RejectError(errors.LOAD_FAILED, f"cannot make the model process non-dumpable: {e}") from e


def decrypt_file(path: Path, enc: Encryption, identities: list[Any]) -> bytes:
    """The plaintext of the ciphertext at ``path``, checked against ``enc``."""
    pyrage = _pyrage()
    try:
        with open(path, "rb") as f:
            ciphertext = f.read()
    except OSError as e:
        raise errors.RejectError(errors.LOAD_FAILED, f"{path.name}: cannot read: {e.strerror or e}") from e
    try:
        plain: bytes = pyrage.decrypt(ciphertext, identities)
    except pyrage.DecryptError as e:
        if "no matching keys" in str(e).lower():
            raise errors.RejectError(errors.NOT_A_RECIPIENT,
                                     f"{path.name} is not encrypted to this device ({', '.join(device_recipients(identities))})") from e
        raise errors.RejectError(errors.DECRYPT_MISMATCH, f"{path.name}: age decryption failed: {e}") from e
    del ciphertext
    if len(plain) != enc.plaintext_size:
        raise errors.RejectError(errors.DECRYPT_MISMATCH,
                                 f"{path.name}: decrypts to {len(plain)} bytes, the manifest lists {enc.plaintext_size}")
    digest = hashlib.sha256(plain).hexdigest()
    if digest != enc.plaintext_sha256:
        raise errors.RejectError(errors.DECRYPT_MISMATCH,
                                 f"{path.name}: plaintext sha256 {digest}, the manifest lists {enc.plaintext_sha256}")
    return plain


def _pyrage() -> Any:
    try:
        import pyrage
    except ImportError as e:
        raise errors.RejectError(errors.UNSUPPORTED_ENCRYPTION,
                                 "this bundle is encrypted and pyrage is not installed (pip install pyrage)") from e
    return pyrage
