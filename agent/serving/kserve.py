"""Local inference API: KServe v2 / Open Inference Protocol over HTTP/1.1 — the server.

The parts: the listening sockets in agent/serving/listeners.py, HTTP framing in
agent/serving/httpconn.py (llhttp through httptools), a connection's request loop in
agent/serving/handler.py, who may call and body encodings in agent/serving/guard.py, the
endpoints in agent/serving/routes.py, tensors in agent/serving/tensors.py. This module owns the
server's lifecycle, the connection table and the hand-over of infer connections to model workers.

Invariants:
- An infer request is bound to one serving version for its whole life (``Registry.infer``); a model
  swap never fails an in-flight request.
- Errors are JSON ``{"error": message, "code": stable_code}`` with a status from the code; bad input
  is never ``internal``, and nothing is logged per request above DEBUG except rate-limited lines.
- At most ``max_connections`` connections are served at once, computed at start so that the
  daemon keeps descriptors for MQTT, the control socket, heartbeats and the watchdog
  (``RLIMIT_NOFILE`` minus ``FD_RESERVE``, halved for connections handed to model workers). A new
  connection beyond it evicts the connection idle longest (no request in flight), or else gets a
  fast 503 ``busy`` and is closed. An accept that fails for want of descriptors backs off.
- ``stop()`` stops accepting, lets in-flight requests finish within its timeout, then closes idle
  keep-alive connections; it is bounded.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import agent
from agent import errors
from agent.serving.admission import RETRY_AFTER_S, BodyBudget
from agent.serving.guard import ApiPolicy, LogGate
from agent.serving.handler import IDLE_TIMEOUT_S, Handler, Response, error_response
from agent.serving.httpconn import Request, reply_head, status_of
from agent.serving.listeners import (
    FD_RESERVE,
    MAX_CONNECTIONS,
    MIN_CONNECTIONS,
    POLL_INTERVAL_S,
    ConnSlot,
    HTTPServer,
    HTTPServer6,
    ListenAddressError,
    UnixServer,
    connection_cap,
    parse_listen,
)
from agent.serving.routes import Routes, infer_target
from agent.serving.tensors import HEADER_LENGTH

if TYPE_CHECKING:
    from agent.serving.registry import Registry

__all__ = ["FD_RESERVE", "HEADER_LENGTH", "IDLE_TIMEOUT_S", "MAX_CONNECTIONS", "MIN_CONNECTIONS", "ApiPolicy",
           "ConnSlot", "KServeServer", "ListenAddressError", "connection_cap", "infer_target", "parse_listen"]

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8470
MAX_BODY_BYTES = 64 * 1024 * 1024  # largest request body accepted, after decoding (413 above)
MIN_TOKEN_BYTES = 16  # a shorter api.token_file token is a config error


def api_options(api: Any) -> dict[str, Any]:
    """``KServeServer`` keyword arguments from the ``[api]`` config section (reads the token)."""
    token: bytes | None = None
    if api.token_file:
        try:
            token = Path(api.token_file).read_bytes().strip()
        except OSError as e:
            raise errors.ConfigError(f"api.token_file: cannot read {api.token_file}: {e.strerror or e}") from e
        if len(token) < MIN_TOKEN_BYTES:
            raise errors.ConfigError(f"api.token_file: {api.token_file} holds {len(token)} byte(s); "
                                     f"a token needs at least {MIN_TOKEN_BYTES}")
    policy = ApiPolicy(frozenset(h.lower().rstrip(".") for h in api.allowed_hosts),
                       frozenset(api.allowed_origins), token, api.max_body_inflight_mb * 1024 * 1024)
    return {"policy": policy, "max_connections": api.max_connections, "unix_socket": api.unix_socket}


class KServeServer:
    """KServe v2 HTTP front end of a Registry; ``start()`` serves on background threads."""

    def __init__(self, registry: Registry, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                 server_name: str = "edge-agent", server_version: str = agent.__version__,
                 ready_fn: Callable[[], bool] | None = None,
                 metrics_fn: Callable[[], tuple[bytes, str]] | None = None,
                 max_body_bytes: int = MAX_BODY_BYTES, policy: ApiPolicy | None = None,
                 max_connections: int = MAX_CONNECTIONS, unix_socket: str = "") -> None:
        self.registry = registry
        self.host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        self._port = port
        self.server_name = server_name
        self.server_version = server_version
        self.server_header = f"{server_name}/{server_version}"
        self.max_body_bytes = max_body_bytes
        self.policy = policy or ApiPolicy()
        self.body_budget = BodyBudget(self.policy.body_inflight_bytes)  # this process's bodies in flight
        self.max_connections = max_connections
        self.unix_socket = unix_socket
        self.gate = LogGate()
        self._httpd: HTTPServer | None = None
        self._unixd: UnixServer | None = None
        self._threads: list[threading.Thread] = []
        self.stopping = False
        self._cv = threading.Condition()
        self._inflight = 0
        self._conns: dict[socket.socket, ConnSlot] = {}
        self.refused = 0  # connections turned away at the cap (a 503)
        self.evicted = 0  # idle connections closed for a new one at the cap
        self._prefixes: dict[socket.socket, bytes] = {}  # resumed connections → bytes already read
        self._handed: dict[socket.socket, bool] = {}  # connections now served by a worker
        self.routes = Routes(registry, server_name, server_version, max_body_bytes, self.gate, ready_fn, metrics_fn)

    # -- lifecycle

    @property
    def port(self) -> int:
        """The bound port once started (port 0 picks one), else the configured one."""
        return self._httpd.server_port if self._httpd is not None else self._port

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> None:
        """Bind and listen, then serve on daemon threads; returns once the sockets listen."""
        if self._httpd is not None:
            raise RuntimeError("KServeServer already started")
        cls = HTTPServer6 if ":" in self.host else HTTPServer
        try:
            httpd = cls((self.host, self._port), Handler)
        except OSError as e:
            raise errors.ConfigError(f"inference API: cannot listen on {self.host}:{self._port}: {e}") from e
        httpd.app = self
        servers: list[Any] = [httpd]
        if self.unix_socket:
            try:
                unixd = UnixServer(self.unix_socket, Handler)
            except OSError as e:
                httpd.server_close()
                raise errors.ConfigError(f"api.unix_socket: cannot listen on {self.unix_socket}: {e}") from e
            unixd.app = self
            self._unixd = unixd
            servers.append(unixd)
        self.max_connections = connection_cap(self.max_connections)
        self.stopping = False
        self._httpd = httpd
        for s in servers:
            t = threading.Thread(target=s.serve_forever, args=(POLL_INTERVAL_S,), name="kserve-http", daemon=True)
            t.start()
            self._threads.append(t)
        log.info("inference API (KServe v2) listening on %s%s, at most %d connections", self.url,
                 f" and {self.unix_socket}" if self.unix_socket else "", self.max_connections)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop accepting, let in-flight requests finish (bounded by ``timeout_s``), close."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        deadline = time.monotonic() + timeout_s
        self.stopping = True
        servers: list[Any] = [httpd] if self._unixd is None else [httpd, self._unixd]
        for s in servers:
            s.shutdown()  # the accept loop ends within POLL_INTERVAL_S
            s.server_close()
        if self._unixd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.unix_socket)
            self._unixd = None
        with self._cv:
            if not self._cv.wait_for(lambda: self._inflight == 0,
                                     timeout=max(0.0, deadline - time.monotonic())):
                log.warning("inference API: %d request(s) still in flight after %.1f s; closing",
                            self._inflight, timeout_s)
            conns = list(self._conns)
        for c in conns:  # wakes handlers idle in keep-alive reads
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self._threads = []
        log.info("inference API stopped")

    # -- the connection table

    def _admit(self, sock: socket.socket) -> bool:
        """Track a new connection; at the cap evict the longest-idle one, or refuse with a 503."""
        victim: socket.socket | None = None
        with self._cv:
            if len(self._conns) >= self.max_connections:
                idle = [(s.since, c) for c, s in self._conns.items() if not s.busy]
                if not idle:
                    self.refused += 1
                    refuse = True
                else:
                    victim = min(idle, key=lambda x: x[0])[1]
                    del self._conns[victim]
                    self.evicted += 1
                    refuse = False
            else:
                refuse = False
            if not refuse:
                self._conns[sock] = ConnSlot()
        if victim is not None:
            with contextlib.suppress(OSError):
                victim.shutdown(socket.SHUT_RDWR)  # its handler wakes and ends
        if refuse:
            self.gate.log(log, logging.WARNING, "cap", "inference API: %d connections in use, all busy: "
                          "refusing new ones (503)", self.max_connections)
            self._busy_reply(sock)
            return False
        return True

    def _busy_reply(self, sock: socket.socket) -> None:
        resp = error_response(503, errors.BUSY, f"the inference API is at its limit of "
                              f"{self.max_connections} connections; retry", (("Retry-After", str(RETRY_AFTER_S)),))
        body = resp.body if isinstance(resp.body, bytes) else b"".join(resp.body)
        with contextlib.suppress(OSError):
            sock.setblocking(False)
            sock.send(reply_head(503, self.server_header, resp.content_type, len(body), resp.headers,
                                 close=True) + body)

    # -- the connection table as the handler sees it (agent/serving/handler.py)

    def track_conn(self, sock: socket.socket) -> ConnSlot | None:
        with self._cv:
            slot = self._conns.get(sock)
            if slot is None and self._httpd is not None:  # resumed from a worker: counted again
                slot = self._conns[sock] = ConnSlot()
            return slot

    @staticmethod
    def mark_busy(slot: ConnSlot, busy: bool) -> None:
        # No lock: two attribute stores; ``_admit`` reads them under its lock, and an eviction
        # racing a head that just completed costs that one client a reset, nothing more.
        slot.since = time.monotonic()
        slot.busy = busy

    def untrack_conn(self, sock: socket.socket) -> None:
        with self._cv:
            self._conns.pop(sock, None)

    def enter_request(self) -> None:
        with self._cv:
            self._inflight += 1

    def leave_request(self) -> None:
        with self._cv:
            self._inflight -= 1
            if self._inflight == 0:
                self._cv.notify_all()

    # -- connections served by a model's worker (process isolation)

    def hand_off(self, h: Handler, req: Request) -> bool:
        """Give the connection to the worker that runs the model it asks for: the worker answers
        this and the following infer requests itself, without a second hop through the daemon
        (agent/backends/isolated.py). False when no worker can take it: the daemon serves it."""
        t = infer_target(req.target)
        if t is None or self.stopping:
            return False
        sv = self.registry.get(t[0])
        worker = sv.worker if sv is not None else None
        if worker is None or sv is None or (t[1] is not None and t[1] != str(sv.version)):
            return False
        sock = h.conn.sock
        prefix = req.raw_head + h.conn.unread()
        self._handed[sock] = True
        if not worker.adopt(sock, prefix, self):
            self._handed.pop(sock, None)
            return False
        h.handed = True
        h.close_connection = True
        return True

    def carry_prefix(self, sock: socket.socket, prefix: bytes) -> None:
        """The bytes already read of ``sock``: its handler reads them (``take_prefix``) first."""
        self._prefixes[sock] = prefix

    def take_prefix(self, sock: socket.socket) -> bytes | None:
        return self._prefixes.pop(sock, None)

    def resume_connection(self, sock: socket.socket, prefix: bytes) -> None:
        """Serve a connection a worker gave back (a request it does not serve, a swap, its death),
        starting with the bytes it had already read."""
        httpd = self._httpd
        if httpd is None or self.stopping:
            sock.close()
            return
        self.carry_prefix(sock, prefix)
        try:
            addr = sock.getpeername()
        except OSError:
            addr = ("", 0)
        httpd.process_request(sock, addr)  # a handler thread, as for an accepted connection

    def fail_connection(self, sock: socket.socket, code: str, message: str) -> None:
        """Answer the request a dead worker left unanswered with an error, then close."""
        resp = error_response(status_of(code), code, message)
        body = resp.body if isinstance(resp.body, bytes) else b"".join(resp.body)
        head = reply_head(resp.status, self.server_header, resp.content_type, len(body), close=True)
        with contextlib.suppress(OSError):
            sock.settimeout(1.0)
            sock.sendall(head + body)
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()

    def too_large(self, length: int, limit: int | None = None) -> Response:
        if limit is not None and limit < self.max_body_bytes:  # the model's own bound (admission.py)
            return error_response(413, errors.TOO_LARGE, f"request body is {length} bytes; this model takes at most {limit}")
        return error_response(413, errors.TOO_LARGE,
                              f"request body is {length} bytes; the limit is {self.max_body_bytes}")

    def body_limit(self, method: str, target: str) -> int:
        """The largest body read for this request: an infer's model bound, else ``max_body_bytes``."""
        t = infer_target(target) if method == "POST" else None
        return self.max_body_bytes if t is None else self.registry.body_limit(t[0], self.max_body_bytes)

    def respond(self, req: Request, body: bytes) -> Response:
        """One request → one response; never raises (agent/serving/routes.py)."""
        return self.routes.respond(req, body)
