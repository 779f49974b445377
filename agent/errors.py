"""One error tree for the agent, split by what the caller should do.

- ``RejectError``: the input is bad (signature, schema, hash, policy). Never retried; the job
  ends REJECTED or FAILED with the error's stable ``code``.
- ``RetryableError``: the transport failed (network, server, timeout). Retried with capped,
  jittered back-off; once the retries are spent it becomes a FAILED job with its code.

Every error carries a stable ``code`` from PROTOCOL.md and a message naming the thing at fault.
Foreign exceptions are wrapped at the boundary with ``raise ... from e``.
"""

from __future__ import annotations

from typing import Any

# Stable error codes (PROTOCOL.md, BUNDLE.md, plus the additions documented in docs/protocol.md).
INVALID_COMMAND = "invalid_command"
BAD_SIGNATURE = "bad_signature"
UNTRUSTED_KEY = "untrusted_key"
THRESHOLD_NOT_MET = "threshold_not_met"
EXPIRED = "expired"
NOT_YET_VALID = "not_yet_valid"
REPLAYED = "replayed"
WRONG_TARGET = "wrong_target"
UNSUPPORTED_VERSION = "unsupported_version"
UNSIGNED_COMMAND = "unsigned_command"
ROLLBACK_REFUSED = "rollback_refused"
HASH_MISMATCH = "hash_mismatch"
SIZE_EXCEEDED = "size_exceeded"
DOWNLOAD_FAILED = "download_failed"
INVALID_MANIFEST = "invalid_manifest"
INVALID_BUNDLE = "invalid_bundle"
NO_COMPATIBLE_BACKEND = "no_compatible_backend"
LOAD_FAILED = "load_failed"
VALIDATION_FAILED = "validation_failed"
SLO_FAILED = "slo_failed"
DISK_FULL = "disk_full"
INSUFFICIENT_MEMORY = "insufficient_memory"
UNKNOWN_MODEL = "unknown_model"
UNKNOWN_COMMAND = "unknown_command"
SUPERSEDED = "superseded"
CANCELED = "canceled"
TIMEOUT = "timeout"
CLOCK_UNTRUSTED = "clock_untrusted"
INVALID_INPUT = "invalid_input"
WORKER_CRASHED = "worker_crashed"
WORKER_HUNG = "worker_hung"
PROBATION_FAILED = "probation_failed"
INTERRUPTED = "interrupted"
NOT_A_RECIPIENT = "not_a_recipient"  # encrypted bundle: not encrypted to this device (docs/security.md)
DECRYPT_MISMATCH = "decrypt_mismatch"  # plaintext size or sha256 not the manifest's, or the age file does not open
UNSUPPORTED_ENCRYPTION = "unsupported_encryption"
NO_DECRYPTION_KEY = "no_decryption_key"  # trust.decryption_keys: missing, unsafe or not an identity
INTERNAL = "internal"
RESOURCE_EXHAUSTED = "resource_exhausted"  # out of descriptors, processes or memory: retry later
INFERENCE_FAILED = "inference_failed"  # the runtime failed on a request (see agent/serving/admission.py)
# The local inference API's refusals (docs/security.md, "Local threat model"); a request's own
# fault is the caller's error, never held against a model version.
TOO_LARGE = "too_large"
BUSY = "busy"
UNAUTHORIZED = "unauthorized"
HOST_NOT_ALLOWED = "host_not_allowed"
ORIGIN_NOT_ALLOWED = "origin_not_allowed"
UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"

_DISK_FULL_ERRNOS = {28, 122}  # ENOSPC, EDQUOT
_EXHAUSTED_ERRNOS = {11, 12, 23, 24}  # EAGAIN, ENOMEM, ENFILE, EMFILE


class AgentError(Exception):
    """Base of every error the agent raises on purpose: a stable code and a clear message."""

    code: str = INTERNAL

    def __init__(self, code: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        """The ``error`` object of a job update or API response."""
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            out["details"] = self.details
        return out

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class RejectError(AgentError):
    """Bad content or policy: refuse, never retry."""


class RetryableError(AgentError):
    """Transport or transient failure: may succeed when tried again."""


class ConfigError(AgentError):
    """The configuration is invalid; the message names the key."""

    def __init__(self, message: str) -> None:
        super().__init__("invalid_config", message)


def classify(e: BaseException) -> AgentError:
    """An unexpected exception as the error a job ends with: ``disk_full`` for a full disk or
    database, ``resource_exhausted`` for descriptors or memory, else ``internal``; an AgentError
    is returned as it is."""
    if isinstance(e, AgentError):
        return e
    text = f"{type(e).__name__}: {e}"
    errno = getattr(e, "errno", None)
    msg = str(e).lower()
    if errno in _DISK_FULL_ERRNOS or "disk is full" in msg or "no space left" in msg:
        return RetryableError(DISK_FULL, text)
    if (isinstance(e, MemoryError) or errno in _EXHAUSTED_ERRNOS or "too many open files" in msg
            or "unable to open database file" in msg or "out of memory" in msg):
        return RetryableError(RESOURCE_EXHAUSTED, text)
    return AgentError(INTERNAL, text)
