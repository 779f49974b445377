"""Who may use the local inference API, and what a request body may be: checks before any work.

Why: the API listens on loopback, where every local program and every web page open in a browser
on the device can reach it (docs/security.md, "Local threat model"). A page cannot read replies
cross-origin, but it can send "simple" requests (form posts, ``text/plain``) and rebind a DNS name
to 127.0.0.1. So: a Host that is not a loopback name, an IP literal or a configured name is
refused (421 ``host_not_allowed``: DNS rebinding); an ``Origin`` not configured is refused (403
``origin_not_allowed``: browsers send it on every cross-origin request); an infer body must be
JSON or octet-stream (415 ``unsupported_media_type``); with ``api.token_file`` every request but
the health checks needs ``Authorization: Bearer`` (401 ``unauthorized``, compared in constant
time). The Unix-socket listener is gated by its file permissions instead: no Host or token check.

Request bodies may be gzip or deflate (``Content-Encoding``, as tritonclient's
``request_compression_algorithm`` sends them); they are inflated step by step and never past the
body limit (413 ``too_large``). Other encodings get 415 with the ones accepted.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from agent import errors
from agent.serving.admission import DEFAULT_BODY_INFLIGHT_BYTES
from agent.serving.httpconn import HttpFail, Request

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})
HEALTH_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})
INFER_TYPES = frozenset({"application/json", "application/octet-stream"})
ENCODINGS = {"gzip": 16 + 15, "x-gzip": 16 + 15, "deflate": 15}  # zlib window bits (gzip header: +16)
INFLATE_STEP_BYTES = 1024 * 1024  # output produced per decompress call (the bound is checked between)
HOST_CACHE_SIZE = 256  # Host header values remembered as allowed or not
LOG_INTERVAL_S = 60.0  # one line per kind of event per interval; the rest are counted


@dataclass(frozen=True)
class ApiPolicy:
    """What the API accepts; travels to model workers with the connections they serve."""

    allowed_hosts: frozenset[str] = frozenset()  # names beside loopback names and IP literals
    allowed_origins: frozenset[str] = frozenset()  # exact origins; "*" allows any
    token: bytes | None = field(default=None, repr=False)
    body_inflight_bytes: int = DEFAULT_BODY_INFLIGHT_BYTES  # request bodies held at once per process
    hosts_seen: dict[str, bool] = field(default_factory=dict, compare=False, hash=False, repr=False)


def host_name(value: str) -> str:
    """``Host`` header → lower-case name without port or trailing dot (``[::1]:80`` → ``::1``)."""
    v = value.strip().lower()
    if v.startswith("["):
        return v[1:v.find("]")] if "]" in v else v
    if v.count(":") == 1:
        v = v.rpartition(":")[0]
    return v.rstrip(".")


def _host_allowed(value: str, policy: ApiPolicy) -> bool:
    """Whether a ``Host`` header value names this API (remembered: clients repeat theirs)."""
    known = policy.hosts_seen.get(value)
    if known is None:
        known = _host_ok(host_name(value), policy)
        if len(policy.hosts_seen) >= HOST_CACHE_SIZE:
            policy.hosts_seen.clear()
        policy.hosts_seen[value] = known
    return known


def _host_ok(name: str, policy: ApiPolicy) -> bool:
    if name in LOOPBACK_NAMES or name in policy.allowed_hosts or name.endswith(".localhost"):
        return True
    import ipaddress  # only for a Host not seen before

    try:
        ipaddress.ip_address(name)  # an IP literal cannot be rebound by DNS
    except ValueError:
        return False
    return True


def check(policy: ApiPolicy, req: Request, path: str, local_socket: bool) -> None:
    """Refuse a request the policy does not allow (``HttpFail``); infer POSTs also by type."""
    h = req.headers
    if not local_socket:
        host = h.get("host")
        if host is not None and not _host_allowed(host, policy):
            raise HttpFail(421, errors.HOST_NOT_ALLOWED,
                           f"Host {host[:100]!r} is not an allowed name for this API; add it to "
                           "api.allowed_hosts", close=False)
    origin = h.get("origin")
    if origin is not None and origin not in policy.allowed_origins and "*" not in policy.allowed_origins:
        raise HttpFail(403, errors.ORIGIN_NOT_ALLOWED,
                       f"requests from Origin {origin[:100]!r} are not allowed; add it to api.allowed_origins",
                       close=False)
    if policy.token is not None and not local_socket and path not in HEALTH_PATHS:
        import hmac  # (hashlib's OpenSSL costs a worker ≈ 3 MB: only where a token is set)

        auth = h.get("authorization", "")
        scheme, _, given = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode("latin-1"), policy.token):
            raise HttpFail(401, errors.UNAUTHORIZED, "this API needs Authorization: Bearer <token> "
                           "(the token in api.token_file)", close=False,
                           headers=(("WWW-Authenticate", 'Bearer realm="edge-agent"'),))


def check_infer_type(req: Request) -> None:
    """An infer POST is JSON or octet-stream (no header: a program, not a browser form)."""
    ctype = req.headers.get("content-type")
    if ctype is None:
        return
    main = ctype.partition(";")[0].strip().lower()
    if main not in INFER_TYPES:
        raise HttpFail(415, errors.UNSUPPORTED_MEDIA_TYPE,
                       f"Content-Type {ctype[:100]!r} is not accepted for inference; send "
                       "application/json (or application/octet-stream with binary tensors)", close=False)


def decode_body(req: Request, body: bytes, cap: int) -> bytes:
    """The body with its ``Content-Encoding`` undone, never larger than ``cap``."""
    enc = req.headers.get("content-encoding")
    if enc is None:
        return body
    codings = [c.strip().lower() for c in enc.split(",") if c.strip()]
    for c in reversed(codings):
        if c == "identity":
            continue
        wbits = ENCODINGS.get(c)
        if wbits is None:
            raise HttpFail(415, errors.UNSUPPORTED_MEDIA_TYPE,
                           f"Content-Encoding {c[:50]!r} is not supported; send gzip, deflate or identity",
                           close=False, headers=(("Accept-Encoding", "gzip, deflate"),))
        body = _inflate(body, wbits, cap, c)
    return body


def _inflate(data: bytes, wbits: int, cap: int, coding: str) -> bytes:
    import zlib

    d = zlib.decompressobj(wbits)
    out: list[bytes] = []
    total = 0
    buf = data
    try:
        while True:
            chunk = d.decompress(buf, INFLATE_STEP_BYTES)
            total += len(chunk)
            if total > cap:
                raise HttpFail(413, errors.TOO_LARGE,
                               f"{coding} request body inflates past the limit of {cap} bytes", close=False)
            out.append(chunk)
            buf = d.unconsumed_tail
            if d.eof or (not buf and len(chunk) < INFLATE_STEP_BYTES):
                break
    except zlib.error as e:
        raise HttpFail(400, errors.INVALID_INPUT, f"request body is not valid {coding}: {e}", close=False) from e
    if not d.eof:
        raise HttpFail(400, errors.INVALID_INPUT, f"{coding} request body is truncated", close=False)
    if d.unused_data:
        raise HttpFail(400, errors.INVALID_INPUT, f"bytes after the end of the {coding} request body",
                       close=False)
    return b"".join(out)


class LogGate:
    """Rate-limits log lines per kind: the first in each ``LOG_INTERVAL_S`` goes out, with the
    number held back since (per-request events must never flood the log)."""

    def __init__(self, interval_s: float = LOG_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def log(self, logger: logging.Logger, level: int, kind: str, msg: str, *args: object,
            exc_info: bool = False) -> None:
        now = time.monotonic()
        with self._lock:
            last = self._last.get(kind)
            if last is not None and now - last < self.interval_s:
                self._held[kind] = self._held.get(kind, 0) + 1
                return
            if len(self._last) > 64:
                self._last.clear()
            self._last[kind] = now
            held = self._held.pop(kind, 0)
        if held:
            msg += " (%d more like it in the last %.0f s)"
            args = (*args, held, self.interval_s)
        logger.log(level, msg, *args, exc_info=exc_info)
