"""One error tree for the agent, split by what the caller should do.

- ``RejectError``: the input is bad (signature, schema, hash, policy). Never retried; the job
  ends REJECTED or FAILED with the error's stable ``code``.
- ``RetryableError``: the transport failed (network, server, timeout). Retried with capped,
  jittered back-off; once the retries are spent it becomes a FAILED job with its code.

Every error carries a stable ``code`` from PROTOCOL.md and a message naming the thing at fault.
Foreign exceptions are wrapped at the boundary with ``raise ... from e``.
"""

from __future__ import annotations

from enum import Enum
from typing import Any


class Code(str, Enum):
    """Stable error codes (PROTOCOL.md, BUNDLE.md, plus the additions documented in
    docs/protocol.md). Each member *is* its wire string: JSON, SQLite, pickles and comparisons
    with plain strings see the value. Nothing else in agent/ or tools/ writes a code as a literal
    (tests/unit/test_error_codes.py)."""

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
    SERVING_MOVED = "serving_moved"  # a change of what serves named a version that no longer serves (agent/deploy/owner.py)
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
    INVALID_CONFIG = "invalid_config"
    UNSAFE_TRUST = "unsafe_trust"  # the trust folder is writable by others: the daemon will not start
    UNKNOWN_JOB = "unknown_job"
    # agentctl's control socket (agent/serving/control.py)
    UNSAFE_SOCKET = "unsafe_socket"
    ALREADY_RUNNING = "already_running"
    INVALID_REQUEST = "invalid_request"
    UNKNOWN_OP = "unknown_op"
    PERMISSION_DENIED = "permission_denied"
    # the inference API's HTTP layer (agent/serving/httpconn.py)
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    NOT_READY = "not_ready"

    def __str__(self) -> str:  # the wire value, also under f-strings and format()
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


# The codes as module names (``errors.BAD_SIGNATURE``), as every caller writes them.
INVALID_COMMAND = Code.INVALID_COMMAND
BAD_SIGNATURE = Code.BAD_SIGNATURE
UNTRUSTED_KEY = Code.UNTRUSTED_KEY
THRESHOLD_NOT_MET = Code.THRESHOLD_NOT_MET
EXPIRED = Code.EXPIRED
NOT_YET_VALID = Code.NOT_YET_VALID
REPLAYED = Code.REPLAYED
WRONG_TARGET = Code.WRONG_TARGET
UNSUPPORTED_VERSION = Code.UNSUPPORTED_VERSION
UNSIGNED_COMMAND = Code.UNSIGNED_COMMAND
ROLLBACK_REFUSED = Code.ROLLBACK_REFUSED
HASH_MISMATCH = Code.HASH_MISMATCH
SIZE_EXCEEDED = Code.SIZE_EXCEEDED
DOWNLOAD_FAILED = Code.DOWNLOAD_FAILED
INVALID_MANIFEST = Code.INVALID_MANIFEST
INVALID_BUNDLE = Code.INVALID_BUNDLE
NO_COMPATIBLE_BACKEND = Code.NO_COMPATIBLE_BACKEND
LOAD_FAILED = Code.LOAD_FAILED
VALIDATION_FAILED = Code.VALIDATION_FAILED
SLO_FAILED = Code.SLO_FAILED
DISK_FULL = Code.DISK_FULL
INSUFFICIENT_MEMORY = Code.INSUFFICIENT_MEMORY
UNKNOWN_MODEL = Code.UNKNOWN_MODEL
UNKNOWN_COMMAND = Code.UNKNOWN_COMMAND
SUPERSEDED = Code.SUPERSEDED
SERVING_MOVED = Code.SERVING_MOVED
CANCELED = Code.CANCELED
TIMEOUT = Code.TIMEOUT
CLOCK_UNTRUSTED = Code.CLOCK_UNTRUSTED
INVALID_INPUT = Code.INVALID_INPUT
WORKER_CRASHED = Code.WORKER_CRASHED
WORKER_HUNG = Code.WORKER_HUNG
PROBATION_FAILED = Code.PROBATION_FAILED
INTERRUPTED = Code.INTERRUPTED
NOT_A_RECIPIENT = Code.NOT_A_RECIPIENT
DECRYPT_MISMATCH = Code.DECRYPT_MISMATCH
UNSUPPORTED_ENCRYPTION = Code.UNSUPPORTED_ENCRYPTION
NO_DECRYPTION_KEY = Code.NO_DECRYPTION_KEY
INTERNAL = Code.INTERNAL
RESOURCE_EXHAUSTED = Code.RESOURCE_EXHAUSTED
INFERENCE_FAILED = Code.INFERENCE_FAILED
TOO_LARGE = Code.TOO_LARGE
BUSY = Code.BUSY
UNAUTHORIZED = Code.UNAUTHORIZED
HOST_NOT_ALLOWED = Code.HOST_NOT_ALLOWED
ORIGIN_NOT_ALLOWED = Code.ORIGIN_NOT_ALLOWED
UNSUPPORTED_MEDIA_TYPE = Code.UNSUPPORTED_MEDIA_TYPE
INVALID_CONFIG = Code.INVALID_CONFIG
UNSAFE_TRUST = Code.UNSAFE_TRUST
UNKNOWN_JOB = Code.UNKNOWN_JOB
UNSAFE_SOCKET = Code.UNSAFE_SOCKET
ALREADY_RUNNING = Code.ALREADY_RUNNING
INVALID_REQUEST = Code.INVALID_REQUEST
UNKNOWN_OP = Code.UNKNOWN_OP
PERMISSION_DENIED = Code.PERMISSION_DENIED
NOT_FOUND = Code.NOT_FOUND
METHOD_NOT_ALLOWED = Code.METHOD_NOT_ALLOWED
NOT_READY = Code.NOT_READY

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
        out: dict[str, Any] = {"code": str(self.code), "message": self.message}  # the plain wire string
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
        super().__init__(INVALID_CONFIG, message)


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
