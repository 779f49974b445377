"""HTTP/1.1 framing of one connection, parsed by llhttp (httptools): request heads, bodies, replies.

Why a maintained parser: request smuggling lives in the corners of framing (chunk sizes such as
``1_0`` or ``0x10``, Content-Length beside Transfer-Encoding, repeated lengths, obs-fold). llhttp,
the parser of Node.js and uvicorn, refuses all of them; this module only decides what to read
and when, and bounds it.

Invariants:
- Bytes are fed to the parser so that no feed spans the end of a message: a head is fed up to its
  blank line, a Content-Length body is read (not fed) to its exact length, and a chunked body is
  fed in pieces cut after every CRLF CRLF (a chunked message can only end there), holding back the
  last three bytes of an unfinished piece. So what follows a request stays raw in ``unread()``,
  ready to be handed over to another process or back.
- A head is bounded (``MAX_HEAD_BYTES``, ``MAX_HEADERS``: 431) and must arrive within
  ``HEAD_TIMEOUT_S`` of its first byte (or of the connection's start); a body within
  ``body_deadline_s(n)``. A missed deadline ends the connection (``ReadTimeout``).
- A body over ``max_body`` is refused (413) before it is buffered.
- In non-blocking mode (``nonblocking``; agent/serving/connpool.py) a read that would wait raises
  ``NeedMore`` instead, keeping what was parsed and the deadline: calling ``read_head`` or
  ``read_body`` again when more bytes arrived goes on where it stopped. A reply the socket does
  not take at once waits in ``outbuf`` (``flush``), and a refused body not there yet is dropped
  later (``discard_pending``).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Sequence
from http import HTTPStatus
from typing import cast

import httptools

from agent import errors

MAX_HEAD_BYTES = 64 * 1024  # request line and headers together (431 above)
MAX_HEADERS = 100  # header fields per request, trailers included (431 above)
HEAD_TIMEOUT_S = 10.0  # a request head must be complete this long after its first byte
BODY_BASE_S = 10.0  # a body of n bytes must arrive within BODY_BASE_S + n / BODY_MIN_RATE_BPS
BODY_MIN_RATE_BPS = 1024 * 1024
RECV_BYTES = 64 * 1024  # one recv's worth
CHUNKED_OVERHEAD_BYTES = 1024 * 1024  # chunk headers and trailers allowed beyond the body limit
CRLF2 = b"\r\n\r\n"
VERSIONS = ("1.0", "1.1")
_METHODS = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH")}

_PARSER_ERRORS = (httptools.HttpParserError, httptools.HttpParserUpgrade)
REASONS = {s.value: s.phrase for s in HTTPStatus}
Headers = Sequence[tuple[str, str]]


def body_deadline_s(n: int) -> float:
    """How long a body of ``n`` bytes may take to arrive."""
    return BODY_BASE_S + n / BODY_MIN_RATE_BPS


class HttpFail(errors.RejectError):
    """A request refused at the HTTP layer: its status, stable code and message. ``close``: the
    connection cannot go on (its framing is lost). A refusal of bad input like any other
    (``RejectError``: never retried); the HTTP handlers catch it first, for its status and
    framing."""

    def __init__(self, status: int, code: str, message: str, close: bool = True,
                 headers: Headers = ()) -> None:
        super().__init__(code, message)
        self.status = status
        self.close = close
        self.headers = headers


class ReadTimeout(Exception):
    """A head or body missed its deadline: the connection is dropped without a reply."""


class NeedMore(BlockingIOError):
    """Non-blocking mode: the message is not complete yet; call again when the socket is readable."""


class Request:
    """One parsed request head; ``headers`` keyed by lower-case name (repeats joined by ", ")."""

    __slots__ = ("headers", "method", "raw_head", "target", "version")

    def __init__(self, method: str, target: str, version: str, headers: dict[str, str],
                 raw_head: bytes) -> None:
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.raw_head = raw_head

    @property
    def keep_alive(self) -> bool:
        conn = self.headers.get("connection", "").lower()
        if "close" in conn:
            return False
        return self.version == "1.1" or "keep-alive" in conn


class _Events:
    """httptools' callbacks: collects one message."""

    __slots__ = ("body", "body_len", "cap", "complete", "fail", "headers", "headers_done", "messages",
                 "n_headers", "url")

    def __init__(self) -> None:
        self.reset(0)

    def reset(self, cap: int) -> None:
        self.url = b""
        self.headers: dict[str, str] = {}
        self.n_headers = 0
        self.headers_done = False
        self.complete = False
        self.body: list[bytes] = []
        self.body_len = 0
        self.cap = cap
        self.messages = 0
        self.fail: HttpFail | None = None

    def on_message_begin(self) -> None:
        self.messages += 1

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.n_headers += 1
        if self.n_headers > MAX_HEADERS:
            self.fail = HttpFail(431, errors.TOO_LARGE, f"more than {MAX_HEADERS} header fields")
            raise self.fail
        if self.headers_done:
            return  # a trailer: read and dropped
        key = str(name, "latin-1").lower()
        val = str(value, "latin-1").strip()
        old = self.headers.get(key)
        self.headers[key] = val if old is None else f"{old}, {val}"

    def on_headers_complete(self) -> None:
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        self.body_len += len(body)
        if self.body_len > self.cap:
            self.fail = HttpFail(413, errors.TOO_LARGE, f"chunked request body exceeds the limit of {self.cap} bytes")
            raise self.fail
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.complete = True


class HttpConn:
    """One HTTP/1.1 connection: ``read_head`` then ``read_body`` per request, ``send`` replies."""

    def __init__(self, sock: socket.socket, prefix: bytes = b"", max_body: int = 0) -> None:
        self.sock = sock
        self.buf = bytearray(prefix)
        self.max_body = max_body
        self.eof = False
        self._ev = _Events()
        self._parser: httptools.HttpRequestParser | None = None
        self.body_left = 0  # bytes of a refused body still on the wire
        self._timeout: float | None = None  # the socket's timeout as last set (settimeout is a syscall)
        self.nonblocking = False  # a read that would wait raises NeedMore (the socket has a timeout set)
        self._head: list[object] | None = None  # a head being parsed: parser, raw pieces, size, scan start
        self._body_deadline: float | None = None  # of the body being read
        self._fed = 0  # chunked bytes fed so far
        self.discarding = 0  # bytes of a refused body still to drop (non-blocking mode)
        self.outbuf: list[bytes] = []  # reply bytes the socket did not take yet (non-blocking mode)
        self._discard_deadline = 0.0

    # -- reading ----------------------------------------------------------------------------------
    def unread(self) -> bytes:
        """Bytes read from the socket and not consumed (the start of a next request), with the
        pieces of a head whose parsing is under way."""
        if self._head is not None:
            raw = cast(list[bytes], self._head[1])
            return b"".join(raw) + bytes(self.buf)
        return bytes(self.buf)

    @property
    def in_message(self) -> bool:
        """Whether part of a request was read (a head under way, or bytes buffered)."""
        return self._head is not None or bool(self.buf)

    def _recv(self, deadline: float) -> bool:
        """Read more into ``buf`` before ``deadline``; False at end of stream."""
        if self.nonblocking:
            return self._recv_now(deadline)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ReadTimeout("deadline passed")
            if self._timeout is None or self._timeout > left:
                self._timeout = left
                self.sock.settimeout(left)
            try:
                data = self.sock.recv(RECV_BYTES)
                break
            except TimeoutError:
                continue  # an earlier, shorter timeout: the deadline decides
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def _recv_now(self, deadline: float) -> bool:
        """Non-blocking ``_recv``: NeedMore when nothing is there yet."""
        if time.monotonic() > deadline:
            raise ReadTimeout("deadline passed")
        try:
            data = os.read(self.sock.fileno(), RECV_BYTES)  # the descriptor is O_NONBLOCK (a timeout is set)
        except BlockingIOError:
            raise NeedMore from None
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def wait_request(self, idle_s: float) -> bool:
        """Wait up to ``idle_s`` for a next request's first byte; False on close or timeout."""
        if self.buf:
            return True
        try:
            return self._recv(time.monotonic() + idle_s)
        except ReadTimeout:
            return False

    def _feed(self, data: bytes | memoryview) -> None:
        assert self._parser is not None
        try:
            self._parser.feed_data(data)
        except _PARSER_ERRORS as e:
            self._refuse(e)

    def _refuse(self, e: Exception) -> None:
        """What a parser error means for the client (raises), or nothing for an Upgrade."""
        if isinstance(e, httptools.HttpParserUpgrade):
            return  # Upgrade/CONNECT: never honoured; the request is answered as a plain one
        if isinstance(e, httptools.HttpParserInvalidMethodError):
            raise HttpFail(405, errors.METHOD_NOT_ALLOWED, f"unknown method: {e}") from e
        if self._ev.fail is not None:
            raise self._ev.fail from e
        if "HTTP version" in str(e):
            raise HttpFail(505, errors.INVALID_INPUT, f"{e}; use HTTP/1.1") from e
        raise HttpFail(400, errors.INVALID_INPUT, f"malformed request: {e}") from e

    def read_head(self, deadline: float) -> Request | None:
        """The next request's head, read before ``deadline``; None if the peer closed first."""
        ev = self._ev
        st = self._head
        if st is None:
            ev.reset(self.max_body)
            st = self._head = [httptools.HttpRequestParser(ev), [], 0, 0]
        try:
            req = self._parse_head(st, deadline)
        except NeedMore:
            raise
        except BaseException:
            self._head = None
            raise
        self._head = None
        return req

    def _parse_head(self, st: list[object], deadline: float) -> Request | None:
        ev = self._ev
        parser = cast(httptools.HttpRequestParser, st[0])
        raw = cast(list[bytes], st[1])
        while not ev.headers_done:
            size, start = cast(int, st[2]), cast(int, st[3])
            end = self.buf.find(CRLF2, start)
            if end < 0:
                if size + len(self.buf) > MAX_HEAD_BYTES:
                    raise HttpFail(431, errors.TOO_LARGE, f"request head exceeds {MAX_HEAD_BYTES} bytes")
                st[3] = max(0, len(self.buf) - 3)
                if not self._recv(deadline):
                    if size or self.buf:
                        raise HttpFail(400, errors.INVALID_INPUT, "connection closed within a request head")
                    return None
                continue
            piece = bytes(self.buf[:end + 4])
            del self.buf[:end + 4]
            st[3] = 0
            size += len(piece)
            st[2] = size
            if size > MAX_HEAD_BYTES:
                raise HttpFail(431, errors.TOO_LARGE, f"request head exceeds {MAX_HEAD_BYTES} bytes")
            raw.append(piece)
            try:
                parser.feed_data(piece)
            except _PARSER_ERRORS as e:
                self._refuse(e)
        if ev.complete and "transfer-encoding" in ev.headers:  # Upgrade made llhttp skip the body
            raise HttpFail(400, errors.INVALID_INPUT, "Upgrade is not supported with a chunked body")
        version = parser.get_http_version()
        if version == "0.9":
            raise HttpFail(400, errors.INVALID_INPUT, "request line without an HTTP version; use HTTP/1.1")
        if version not in VERSIONS:
            raise HttpFail(505, errors.INVALID_INPUT, f"HTTP version {version} is not supported; use HTTP/1.1")
        m = parser.get_method()
        method = _METHODS.get(m) or str(m, "latin-1")
        target = str(ev.url, "latin-1")
        if target.startswith("//"):
            target = "/" + target.lstrip("/")
        self._parser = parser
        return Request(method, target, version, ev.headers, raw[0] if len(raw) == 1 else b"".join(raw))

    def read_body(self, req: Request, limit: int | None = None) -> bytes:
        """The body of ``req`` (after ``read_head``), bounded by ``limit`` (default ``max_body``)
        and its deadline."""
        try:
            body = self._read_body(req, limit)
        except NeedMore:
            raise
        except BaseException:
            self._body_deadline = None
            raise
        self._body_deadline = None
        return body

    def _deadline(self, n: int) -> float:
        """The body's deadline, fixed when its reading began."""
        if self._body_deadline is None:
            self._body_deadline = time.monotonic() + body_deadline_s(n)
            self._fed = 0
        return self._body_deadline

    def _read_body(self, req: Request, limit: int | None) -> bytes:
        cap = self.max_body if limit is None else min(limit, self.max_body)
        h = req.headers
        te = h.get("transfer-encoding")
        if te is not None:
            if te.lower() != "chunked":
                raise HttpFail(501, errors.INVALID_INPUT, f"Transfer-Encoding {te!r} is not supported; use chunked")
            return self._read_chunked(cap)
        cl = h.get("content-length")
        n = int(cl) if cl else 0  # llhttp accepted it: digits only, never repeated
        if n > cap:
            self.body_left = n
            raise HttpFail(413, errors.TOO_LARGE, f"request body is {n} bytes; the limit is {cap}")
        if len(self.buf) < n:
            deadline = self._deadline(n)
            while len(self.buf) < n:
                if not self._recv(deadline):
                    raise HttpFail(400, errors.INVALID_INPUT, f"request body ended after {len(self.buf)} of {n} bytes")
        body = bytes(self.buf[:n]) if len(self.buf) != n else bytes(self.buf)
        del self.buf[:n]
        return body

    def _read_chunked(self, cap: int) -> bytes:
        ev = self._ev
        ev.cap = cap
        deadline = self._deadline(cap)
        while not ev.complete:
            end = self.buf.find(CRLF2)
            if end >= 0:
                cut = end + 4
            elif len(self.buf) > 3:
                cut = len(self.buf) - 3  # the end's CRLF CRLF may straddle the next read
            else:
                cut = 0
            if cut:
                piece = bytes(self.buf[:cut])
                del self.buf[:cut]
                self._fed += len(piece)
                if self._fed > 2 * cap + CHUNKED_OVERHEAD_BYTES:
                    raise HttpFail(413, errors.TOO_LARGE, "chunked request body exceeds its framing limit")
                self._feed(piece)
                if ev.messages > 1:  # cannot happen with the cut rule; never serve half a message
                    raise HttpFail(400, errors.INVALID_INPUT, "chunked body not followed by a message boundary")
                continue
            if not self._recv(deadline):
                raise HttpFail(400, errors.INVALID_INPUT, "connection closed within a chunked body")
        return b"".join(ev.body)

    @property
    def body_deadline(self) -> float | None:
        """The deadline of a body being read (None when none is)."""
        return self._body_deadline

    def discard_body(self, limit: int) -> bool:
        """Read and drop a refused body of up to ``limit`` bytes so keep-alive survives. In
        non-blocking mode what has not arrived yet is left to ``discard_pending``."""
        n, self.body_left = self.body_left, 0
        if n > limit:
            return False
        self.discarding = n
        self._discard_deadline = time.monotonic() + body_deadline_s(n)
        try:
            return self.discard_pending()
        except NeedMore:
            return True
        except (ReadTimeout, OSError):
            self.discarding = 0
            return False

    @property
    def discard_deadline(self) -> float:
        return self._discard_deadline

    def linger(self, limit: int, timeout_s: float) -> None:
        """After a reply that closes with a body still on its way (non-blocking mode): drop up to
        ``limit`` more bytes for ``timeout_s`` through ``discard_pending``, so that the client sees
        the reply and the close rather than a reset."""
        self.buf.clear()
        self.body_left = 0
        self.discarding = limit
        self._discard_deadline = time.monotonic() + timeout_s

    def discard_pending(self) -> bool:
        """Go on dropping a refused body (``discarding`` bytes left); False at end of stream.
        Raises NeedMore (non-blocking mode) or ReadTimeout."""
        while len(self.buf) < self.discarding:
            self.discarding -= len(self.buf)
            self.buf.clear()
            if not self._recv(self._discard_deadline):
                self.discarding = 0
                return False
        del self.buf[:self.discarding]
        self.discarding = 0
        return True

    # -- writing ----------------------------------------------------------------------------------
    def send(self, data: bytes) -> None:
        """Send ``data`` in full (within ``SEND_TIMEOUT_S``); in non-blocking mode what the socket
        does not take now stays in ``outbuf`` for ``flush``."""
        if self.nonblocking:
            if not self.outbuf:
                try:
                    n = os.write(self.sock.fileno(), data)
                except BlockingIOError:
                    n = 0
                if n == len(data):
                    return
                data = data[n:]
            self.outbuf.append(data)
            return
        if self._timeout != SEND_TIMEOUT_S:
            self._timeout = SEND_TIMEOUT_S
            self.sock.settimeout(SEND_TIMEOUT_S)
        self.sock.sendall(data)

    def flush(self) -> bool:
        """Send what ``outbuf`` holds without blocking; whether all of it went out."""
        out = self.outbuf
        while out:
            try:
                n = os.write(self.sock.fileno(), out[0])
            except BlockingIOError:
                return False
            if n < len(out[0]):
                out[0] = out[0][n:]
                return False
            out.pop(0)
        return True


SEND_TIMEOUT_S = 60.0  # a reply must be taken by the client within this


def http_date(_cache: list[object] = [0, ""]) -> str:  # noqa: B006 - a per-second cache
    """IMF-fixdate (RFC 9110), cached per second."""
    now = int(time.time())
    if _cache[0] != now:
        _cache[1] = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now))
        _cache[0] = now
    return cast(str, _cache[1])


def reply_head(status: int, server: str, content_type: str, length: int, headers: Headers = (),
               close: bool = False, http10_keep_alive: bool = False) -> bytes:
    """The status line and headers of a reply."""
    head = [f"HTTP/1.1 {status} {REASONS.get(status, '')}\r\nServer: {server}\r\nDate: {http_date()}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {length}\r\n"]
    for k, v in headers:
        head.append(f"{k}: {v}\r\n")
    if close:
        head.append("Connection: close\r\n")
    elif http10_keep_alive:
        head.append("Connection: keep-alive\r\n")
    head.append("\r\n")
    return "".join(head).encode("latin-1")


def status_of(code: str) -> int:
    """The HTTP status of an error code."""
    return STATUS_BY_CODE.get(code, 500)


STATUS_BY_CODE: dict[str, int] = {errors.INVALID_INPUT: 400, errors.UNAUTHORIZED: 401, errors.ORIGIN_NOT_ALLOWED: 403,
                                  errors.UNKNOWN_MODEL: 404, errors.NOT_FOUND: 404, errors.METHOD_NOT_ALLOWED: 405,
                                  errors.TOO_LARGE: 413, errors.SIZE_EXCEEDED: 413, errors.UNSUPPORTED_MEDIA_TYPE: 415,
                                  errors.HOST_NOT_ALLOWED: 421, errors.BUSY: 503, errors.NOT_READY: 503}
