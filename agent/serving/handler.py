"""One HTTP connection of the local inference API: its request loop, replies and refusals.

The same handler runs in the daemon (a thread per accepted connection) and, driven by
agent/serving/connpool.py without its blocking loop (``reserve``, ``serve``, ``send_reply``),
inside a model's worker process for the connections handed to it.

Invariants:
- A fresh connection must send its first head within ``HEAD_TIMEOUT_S``; between requests it
  may idle ``IDLE_TIMEOUT_S``; a head must complete ``HEAD_TIMEOUT_S`` after its first byte and a
  body within its deadline (agent/serving/httpconn.py). A missed deadline drops the connection.
- Every reply carries ``Content-Length``; one send per reply where it is small (Nagle is off:
  FIELD-NOTES, ~44 ms per keep-alive request otherwise).
- A refused body is read and dropped (up to ``DISCARD_MAX_BYTES``) so keep-alive survives, or the
  connection closes after lingering briefly, so the client sees the reply rather than a reset.
- A body is read only once its bytes are reserved in the process's body budget
  (agent/serving/admission.py ``BodyBudget``), released when the request is answered; otherwise
  503 ``busy`` with Retry-After, the body unread.
- The connection's tracking slot says "busy" from a complete head to the end of its reply; only
  a connection that is not busy may be evicted for a new one (agent/serving/kserve.py).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import socketserver
import time
from typing import TYPE_CHECKING, Any

from agent import errors
from agent.serving import guard
from agent.serving.admission import RETRY_AFTER_S
from agent.serving.httpconn import (
    HEAD_TIMEOUT_S,
    HttpConn,
    HttpFail,
    ReadTimeout,
    Request,
    reply_head,
)
from agent.serving.tensors import JSON_TYPE, to_json

if TYPE_CHECKING:
    from agent.serving.kserve import KServeServer
    from agent.serving.listeners import ConnSlot

log = logging.getLogger(__name__)

IDLE_TIMEOUT_S = 120.0  # a keep-alive connection idle this long is closed
DISCARD_MAX_BYTES = 8 * 1024 * 1024  # a refused body up to this size is read and dropped; keep-alive survives
LINGER_MAX_BYTES = 8 * 1024 * 1024  # after a refusal that closes, read at most this much before closing
LINGER_TIMEOUT_S = 1.0  # ... and for at most this long
WRITE_JOIN_MAX_BYTES = 64 * 1024  # bodies up to this size go out in the same send as the headers


def body_need(req: Request, limit: int) -> int:
    """Body bytes to reserve before reading: the declared length (at most ``limit``), or
    ``limit`` for a chunked body (its length is unknown until read)."""
    if "transfer-encoding" in req.headers:
        return limit
    cl = req.headers.get("content-length")
    return min(int(cl), limit) if cl else 0


class Response:
    __slots__ = ("body", "content_type", "headers", "status")

    def __init__(self, status: int, body: bytes | list[bytes], content_type: str = JSON_TYPE,
                 headers: tuple[tuple[str, str], ...] = ()) -> None:
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers


def error_response(status: int, code: str, message: str, headers: Any = ()) -> Response:
    return Response(status, to_json({"error": message, "code": code}), JSON_TYPE, tuple(headers))


class Handler(socketserver.BaseRequestHandler):
    """Serves one connection: heads, bodies and replies through ``HttpConn``."""

    _app: KServeServer
    conn: HttpConn
    slot: ConnSlot | None
    close_connection: bool
    local_socket: bool

    def setup(self) -> None:
        sock: socket.socket = self.request
        self._app = app = self.server.app  # type: ignore[attr-defined]
        self.local_socket = sock.family == socket.AF_UNIX
        if not self.local_socket:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        prefix = app.take_prefix(sock)
        self.resumed = prefix is not None
        self.conn = HttpConn(sock, prefix or b"", app.max_body_bytes)
        self.close_connection = True
        self.handed = False  # the connection now belongs to a model's worker: not ours to close
        self.body_unread = False  # the last request's body was not read in full
        self.slot = app.track_conn(sock)

    def finish(self) -> None:
        self._app.untrack_conn(self.request)

    def handle(self) -> None:
        first = not self.resumed
        while True:
            if not first and not self.conn.wait_request(IDLE_TIMEOUT_S):
                return
            first = False
            if not self.handle_one_request(time.monotonic() + HEAD_TIMEOUT_S):
                return

    def handle_one_request(self, deadline: float) -> bool:
        """Read one head and dispatch it; whether the connection goes on here."""
        try:
            req = self.conn.read_head(deadline)
        except HttpFail as e:
            self._app.gate.log(log, logging.DEBUG, "head", "inference API: refused a request head: %s", e.message)
            self._write(error_response(e.status, e.code, e.message, e.headers), close=True)
            return False
        except (ReadTimeout, OSError):
            return False
        if req is None:
            return False
        self.close_connection = not req.keep_alive
        self._busy(True)
        try:
            self.dispatch(req)
        finally:
            self._busy(False)
        return not (self.close_connection or self.handed)

    def _busy(self, busy: bool) -> None:
        if self.slot is not None:
            self._app.mark_busy(self.slot, busy)

    def dispatch(self, req: Request) -> None:
        """Answer one request whose head was read (the hook a worker's handler overrides:
        agent/serving/adopted.py). Sets ``handed`` when the connection went to another process."""
        app = self._app
        if req.method == "POST" and "expect" not in req.headers and app.hand_off(self, req):
            return
        app.enter_request()
        try:
            resp = self.serve(req)
            if app.stopping:
                self.close_connection = True
            self.send_reply(req, resp)
        finally:
            app.leave_request()

    def serve(self, req: Request) -> Response:
        """Check, read the body, answer; every refusal is a reply, never an exception."""
        app = self._app
        path = req.target.split("?", 1)[0]
        try:
            guard.check(app.policy, req, path, self.local_socket)
            limit = app.body_limit(req.method, req.target)  # a model's own bound, if it has one
        except HttpFail as e:
            self._skip_body(req, e)
            return error_response(e.status, e.code, e.message, e.headers)
        need = body_need(req, limit)
        if not app.body_budget.reserve(need):  # before a byte of the body is read
            return self._over_budget(req)
        try:
            return self._read_and_respond(req, limit)
        finally:
            app.body_budget.release(need)

    def reserve(self, req: Request) -> tuple[int, int] | None:
        """For a reader that reads bodies without blocking (agent/serving/connpool.py): the body
        limit and the bytes reserved for the body in the budget, when the request passes the
        checks; None (nothing reserved) when it is refused: ``serve`` then answers it."""
        app = self._app
        try:
            guard.check(app.policy, req, req.target.split("?", 1)[0], self.local_socket)
            limit = app.body_limit(req.method, req.target)
        except HttpFail:
            return None
        need = body_need(req, limit)
        if not app.body_budget.reserve(need):
            return None
        return limit, need

    def _read_and_respond(self, req: Request, limit: int) -> Response:
        app = self._app
        try:
            if req.version == "1.1" and req.headers.get("expect", "").lower() == "100-continue":
                cl = req.headers.get("content-length")
                if cl and int(cl) > limit:
                    self.conn.body_left = int(cl)
                    self.close_connection = True  # the client may send it anyway: do not parse it
                    self.body_unread = True
                    return app.too_large(int(cl), limit)
                self.conn.send(b"HTTP/1.1 100 Continue\r\n\r\n")
            body = self.conn.read_body(req, limit)
        except HttpFail as e:
            self._skip_body(req, e)
            return error_response(e.status, e.code, e.message, e.headers)
        except ReadTimeout:
            self.close_connection = True
            return error_response(408, errors.TIMEOUT, "request body did not arrive within its deadline")
        return app.respond(req, body)

    def _over_budget(self, req: Request) -> Response:
        """503 ``busy`` without reading the body: dropped unread when small, else the connection closes."""
        app = self._app
        app.gate.log(log, logging.WARNING, "body_budget", "inference API: request bodies in flight are at "
                     "the limit of %d bytes (api.max_body_inflight_mb); refusing (503)", app.body_budget.limit)
        cl = req.headers.get("content-length")
        if "expect" in req.headers or "transfer-encoding" in req.headers or not cl:
            self.close_connection = True  # an Expect client waits for a 100; a chunked body is not skipped
            self.body_unread = "expect" not in req.headers
        else:
            self.conn.body_left = int(cl)
            if not self.conn.discard_body(DISCARD_MAX_BYTES):
                self.close_connection = True
                self.body_unread = True
        return error_response(503, errors.BUSY, f"request bodies in flight are at this process's limit of "
                              f"{app.body_budget.limit} bytes; retry", (("Retry-After", str(RETRY_AFTER_S)),))

    def _skip_body(self, req: Request, e: HttpFail) -> None:
        """After a refusal: drop the body so the connection can go on, or close it."""
        if (e.close and e.status != 413) or "expect" in req.headers:
            self.close_connection = True  # (an Expect client sends its body only after a 100)
            return
        if "transfer-encoding" in req.headers:
            self.close_connection = True
            self.body_unread = True
            return
        if e.status != 413:
            cl = req.headers.get("content-length")
            self.conn.body_left = int(cl) if cl else 0
            if self.conn.body_left == 0:
                return  # nothing unread: keep-alive goes on (a decoding refusal read it already)
        if not self.conn.discard_body(DISCARD_MAX_BYTES):
            self.close_connection = True
            self.body_unread = True

    def send_reply(self, req: Request | None, resp: Response) -> None:
        self._write(resp, self.close_connection, req is not None and req.method == "HEAD",
                    req is not None and req.version == "1.0")
        if self.body_unread:
            self._linger()

    def _write(self, resp: Response, close: bool, head_only: bool = False, http10: bool = False) -> None:
        body = resp.body
        parts = [body] if isinstance(body, bytes) else body
        length = sum(len(p) for p in parts)
        head = reply_head(resp.status, self._app.server_header, resp.content_type, length, resp.headers,
                          close, http10 and not close)
        try:
            if head_only:
                self.conn.send(head)
            elif length <= WRITE_JOIN_MAX_BYTES:
                self.conn.send(b"".join([head, *parts]))
            else:
                self.conn.send(head)
                for p in parts:
                    self.conn.send(p)
        except OSError:
            self.close_connection = True

    def _linger(self) -> None:
        """After a refusal that closes: read what the client still sends so it sees the reply."""
        sock = self.conn.sock
        try:
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(LINGER_TIMEOUT_S)
            deadline = time.monotonic() + LINGER_TIMEOUT_S
            got = 0
            while got < LINGER_MAX_BYTES and time.monotonic() < deadline:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                got += len(chunk)
        except OSError:
            pass
