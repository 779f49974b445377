"""Ed25519 signature checks through the OpenSSL ``libcrypto`` the interpreter already has loaded.

Why: every command and manifest is checked with Ed25519. ``cryptography`` does that with its own
statically linked OpenSSL, and importing it costs the daemon ≈ 9 MB of RSS for good (its Rust
extension is 14 MB). Python's ``hashlib``/``ssl`` already map an OpenSSL ``libcrypto`` (3.x or
1.1.1, both have Ed25519 through the EVP interface): calling its ``EVP_DigestVerify`` costs
≈ 0.3 MB (ctypes). The primitive is OpenSSL's either way; only the binding differs. Where that
library cannot be found or lacks Ed25519, ``available()`` is False and callers use
``cryptography`` (agent/bundles/trust.py).

Invariants: a key must be 32 bytes and a signature 64; anything else is "does not verify", never
an exception. Nothing here signs: signing (fleetctl) stays with ``cryptography``.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any

NID_ED25519 = 1087  # OpenSSL's EVP_PKEY_ED25519
KEY_BYTES = 32
SIG_BYTES = 64

_lock = threading.Lock()
_lib: Any = None
_tried = False


def _loaded_libcrypto() -> str | None:
    """Path of the libcrypto this process has mapped (through ``_hashlib``), if any."""
    import _hashlib  # noqa: F401  (maps libcrypto; hashlib imports it anyway)

    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            for line in f:
                path = line.rstrip("\n").split(" ", 5)[-1].strip()
                name = path.rsplit("/", 1)[-1]
                if name.startswith("libcrypto.so") and path.startswith("/"):
                    return path
    except OSError:
        return None
    return None


def _load() -> Any:
    global _lib, _tried
    with _lock:
        if _tried:
            return _lib
        _tried = True
        path = _loaded_libcrypto()
        if path is None:
            return None
        try:
            lib = ctypes.CDLL(path)
            lib.EVP_PKEY_new_raw_public_key.restype = ctypes.c_void_p
            lib.EVP_PKEY_new_raw_public_key.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
            lib.EVP_PKEY_free.restype = None
            lib.EVP_PKEY_free.argtypes = [ctypes.c_void_p]
            lib.EVP_MD_CTX_new.restype = ctypes.c_void_p
            lib.EVP_MD_CTX_new.argtypes = []
            lib.EVP_MD_CTX_free.restype = None
            lib.EVP_MD_CTX_free.argtypes = [ctypes.c_void_p]
            lib.EVP_DigestVerifyInit.restype = ctypes.c_int
            lib.EVP_DigestVerifyInit.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                                 ctypes.c_void_p, ctypes.c_void_p]
            lib.EVP_DigestVerify.restype = ctypes.c_int
            lib.EVP_DigestVerify.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t,
                                             ctypes.c_char_p, ctypes.c_size_t]
            lib.ERR_clear_error.restype = None
            lib.ERR_clear_error.argtypes = []
        except (OSError, AttributeError):
            return None
        if _self_test(lib):  # a library that gets the RFC 8032 vector wrong is not used
            _lib = lib
        return _lib


def available() -> bool:
    """Whether signatures can be checked without ``cryptography``."""
    return _load() is not None


def verify(key: bytes, sig: bytes, msg: bytes) -> bool:
    """True when ``sig`` is a valid Ed25519 signature of ``msg`` by the raw public ``key``."""
    lib = _load()
    if lib is None:
        raise RuntimeError("no usable libcrypto with Ed25519 in this process")
    return _verify(lib, key, sig, msg)


def _verify(lib: Any, key: bytes, sig: bytes, msg: bytes) -> bool:
    if len(key) != KEY_BYTES or len(sig) != SIG_BYTES:
        return False
    pkey = lib.EVP_PKEY_new_raw_public_key(NID_ED25519, None, key, KEY_BYTES)
    if not pkey:
        lib.ERR_clear_error()
        return False
    ctx = lib.EVP_MD_CTX_new()
    try:
        if not ctx or lib.EVP_DigestVerifyInit(ctx, None, None, None, pkey) != 1:
            return False
        return bool(lib.EVP_DigestVerify(ctx, sig, SIG_BYTES, msg, len(msg)) == 1)
    finally:
        lib.ERR_clear_error()  # a failed check leaves an entry on OpenSSL's per-thread error queue
        if ctx:
            lib.EVP_MD_CTX_free(ctx)
        lib.EVP_PKEY_free(pkey)


# RFC 8032 section 7.1, TEST 2 (one-byte message).
_T_KEY = bytes.fromhex("3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c")
_T_MSG = bytes.fromhex("72")
_T_SIG = bytes.fromhex("92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da"
                       "085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00")


def _self_test(lib: Any) -> bool:
    bad = bytes([_T_SIG[0] ^ 1]) + _T_SIG[1:]
    try:
        return _verify(lib, _T_KEY, _T_SIG, _T_MSG) and not _verify(lib, _T_KEY, bad, _T_MSG) \
            and not _verify(lib, _T_KEY, _T_SIG, b"\x73")
    except Exception:
        return False
