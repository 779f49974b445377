"""Local inference API: KServe v2 / Open Inference Protocol over HTTP/1.1 — the server and its routes.

Endpoints (SURFACE.md, "Local inference API"): ``GET /v2/health/live``, ``GET /v2/health/ready``,
``GET /v2``, ``GET /v2/models/{name}[/versions/{v}]``, ``GET /v2/models/{name}[/versions/{v}]/ready``,
``POST /v2/models/{name}[/versions/{v}]/infer`` (JSON tensors and the binary tensor extension,
``Inference-Header-Content-Length``) and ``GET /metrics``.

The parts: HTTP framing in agent/serving/httpconn.py (llhttp through httptools), the connection
loop in agent/serving/handler.py, who may call and body encodings in agent/serving/guard.py,
tensors in agent/serving/tensors.py. This module owns the listeners, the connection table and
the routes.

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
import errno
import logging
import os
import resource
import socket
import socketserver
import stat
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import agent
from agent import errors
from agent.serving import guard
from agent.serving.admission import RETRY_AFTER_S, BodyBudget
from agent.serving.guard import ApiPolicy, LogGate
from agent.serving.handler import IDLE_TIMEOUT_S, Handler, Response, error_response
from agent.serving.httpconn import (
    HttpFail,
    Request,
    reply_head,
    status_of,
)
from agent.serving.tensors import (
    HEADER_LENGTH,
    decode_request,
    encode_response,
    kserve_dtype,
    to_json,
)

if TYPE_CHECKING:
    from agent.serving.registry import Registry, ServingVersion

__all__ = ["HEADER_LENGTH", "IDLE_TIMEOUT_S", "ApiPolicy", "KServeServer", "ListenAddressError",
           "infer_target", "parse_listen"]

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8470
MAX_BODY_BYTES = 64 * 1024 * 1024  # largest request body accepted, after decoding (413 above)
MAX_CONNECTIONS = 256  # connections served at once, unless the descriptor limit allows fewer
MIN_CONNECTIONS = 16
FD_RESERVE = 256  # descriptors kept for everything but the API (MQTT, control socket, store, workers)
POLL_INTERVAL_S = 0.2  # accept loop's shutdown check period; bounds how long stop() waits for it
ACCEPT_BACKOFF_S = 0.1  # pause after an accept that failed for want of descriptors or memory
REQUEST_QUEUE_SIZE = 128  # listen() backlog
BUSY_SEND_TIMEOUT_S = 0.0  # the 503 to a connection over the cap is sent without waiting
UNIX_SOCKET_MODE = 0o660
MIN_TOKEN_BYTES = 16  # a shorter api.token_file token is a config error
EXTENSIONS = ("binary_tensor_data",)
_ACCEPT_SCARCE = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class ListenAddressError(errors.ConfigError, ValueError):
    """A listen address that does not parse; both a ConfigError and a ValueError."""


def parse_listen(s: str) -> tuple[str, int]:
    """``"127.0.0.1:8470"``, ``"[::1]:8470"``, ``"localhost:0"`` → ``(host, port)``."""
    text = s.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or not text[end + 1:].startswith(":"):
            raise ListenAddressError(f"listen address {s!r}: expected [IPv6]:port")
        host, port_s = text[1:end], text[end + 2:]
    else:
        host, sep, port_s = text.rpartition(":")
        if not sep:
            raise ListenAddressError(f"listen address {s!r}: expected host:port")
        if ":" in host:
            raise ListenAddressError(f"listen address {s!r}: an IPv6 host needs brackets, e.g. [::1]:8470")
    if not host:
        raise ListenAddressError(f"listen address {s!r}: the host is empty")
    if not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise ListenAddressError(f"listen address {s!r}: port must be 0-65535")
    return host, int(port_s)


def infer_target(target: str) -> tuple[str, str | None] | None:
    """``/v2/models/{name}[/versions/{v}]/infer`` → ``(name, v)``; None for any other path."""
    path = target.split("?", 1)[0]
    if len(path) > 1 and path.endswith("/"):
        path = path[:-1]
    parts = path.split("/")
    if "%" in path:
        parts = [unquote(p) for p in parts]
    n = len(parts)
    if n == 5 and parts[4] == "infer" and parts[1] == "v2" and parts[2] == "models" and parts[3]:
        return parts[3], None
    if (n == 7 and parts[6] == "infer" and parts[1] == "v2" and parts[2] == "models" and parts[3]
            and parts[4] == "versions"):
        return parts[3], parts[5]
    return None


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


def connection_cap(configured: int = MAX_CONNECTIONS) -> int:
    """Connections the API may hold: ``configured``, less where ``RLIMIT_NOFILE`` is tight."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return configured
    return min(configured, max(MIN_CONNECTIONS, (soft - FD_RESERVE) // 2))


class ConnSlot:
    """A tracked connection: whether a request is in flight on it, and since when it is not."""

    __slots__ = ("busy", "since")

    def __init__(self) -> None:
        self.busy = False
        self.since = time.monotonic()


class _Serving:
    """What both listeners share (TCP and Unix): admission, descriptor back-off, hand-over."""

    app: KServeServer
    socket: socket.socket

    def get_request(self) -> tuple[Any, Any]:
        try:
            return self.socket.accept()
        except OSError as e:
            if e.errno in _ACCEPT_SCARCE:  # the listening socket stays readable: do not spin
                self.app.gate.log(log, logging.WARNING, "accept", "inference API: accept failed: %s; "
                                  "backing off", e)
                time.sleep(ACCEPT_BACKOFF_S)
            raise

    def verify_request(self, request: Any, client_address: Any) -> bool:
        return self.app._admit(request)

    def shutdown_request(self, request: Any) -> None:
        # A connection handed to a worker lives on there: no shutdown(), which would end it for
        # both; the worker's model (IsolatedModel) holds the daemon's copy of the socket.
        if self.app._handed.pop(request, False):
            return
        socketserver.TCPServer.shutdown_request(self, request)  # type: ignore[arg-type]

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):  # resets, broken pipes, timeouts: the client went away
            log.debug("kserve: connection %s: %s", client_address, exc)
        else:
            self.app.gate.log(log, logging.WARNING, "conn", "kserve: connection %s failed", client_address,
                              exc_info=True)


class _HTTPServer(_Serving, socketserver.ThreadingMixIn, socketserver.TCPServer):
    """A thread per connection (the stdlib's ThreadingHTTPServer without http.server's imports)."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = REQUEST_QUEUE_SIZE

    def server_bind(self) -> None:
        # (http.server's HTTPServer.server_bind calls getfqdn(), a reverse DNS lookup that can hang.)
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)


class _HTTPServer6(_HTTPServer):
    address_family = socket.AF_INET6


class _UnixServer(_Serving, socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    request_queue_size = REQUEST_QUEUE_SIZE

    def server_bind(self) -> None:
        path = Path(str(self.server_address))
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise errors.ConfigError(f"api.unix_socket: {path} exists and is not a socket")
            path.unlink()  # a stale socket of an earlier run
        old = os.umask(0o117)
        try:
            socketserver.UnixStreamServer.server_bind(self)
        finally:
            os.umask(old)
        os.chmod(path, UNIX_SOCKET_MODE)


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
        self._ready_fn = ready_fn
        self._metrics_fn = metrics_fn
        self._httpd: _HTTPServer | None = None
        self._unixd: _UnixServer | None = None
        self._threads: list[threading.Thread] = []
        self.stopping = False
        self._cv = threading.Condition()
        self._inflight = 0
        self._conns: dict[socket.socket, ConnSlot] = {}
        self.refused = 0  # connections turned away at the cap (a 503)
        self.evicted = 0  # idle connections closed for a new one at the cap
        self._prefixes: dict[socket.socket, bytes] = {}  # resumed connections → bytes already read
        self._handed: dict[socket.socket, bool] = {}  # connections now served by a worker
        self._meta_cache: dict[str, tuple[weakref.ref[ServingVersion], bytes]] = {}
        self._server_meta = to_json({"name": server_name, "version": server_version,
                                     "extensions": list(EXTENSIONS)})

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
        cls = _HTTPServer6 if ":" in self.host else _HTTPServer
        try:
            httpd = cls((self.host, self._port), Handler)
        except OSError as e:
            raise errors.ConfigError(f"inference API: cannot listen on {self.host}:{self._port}: {e}") from e
        httpd.app = self
        servers: list[Any] = [httpd]
        if self.unix_socket:
            try:
                unixd = _UnixServer(self.unix_socket, Handler)
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

    # -- routing

    def respond(self, req: Request, body: bytes) -> Response:
        """One request → one response; never raises."""
        try:
            return self._route(req, body)
        except HttpFail as e:
            return error_response(e.status, e.code, e.message, e.headers)
        except errors.AgentError as e:
            retry = (("Retry-After", str(RETRY_AFTER_S)),) if e.code == errors.BUSY else ()
            return error_response(status_of(e.code), e.code, e.message, retry)
        except (RecursionError, MemoryError) as e:
            self.gate.log(log, logging.WARNING, "input", "inference API: %s %s: %s", req.method,
                          req.target[:100], type(e).__name__)
            return error_response(400, errors.INVALID_INPUT, f"request too complex to decode: {type(e).__name__}")
        except Exception as e:
            self.gate.log(log, logging.ERROR, "internal", "inference API: %s %s failed", req.method,
                          req.target[:100], exc_info=True)
            return error_response(500, errors.INTERNAL, f"internal error: {type(e).__name__}: {e}")

    def _route(self, req: Request, body: bytes) -> Response:
        method = req.method
        path = req.target.split("?", 1)[0]
        if len(path) > 1 and path.endswith("/"):
            path = path[:-1]
        parts = path.split("/")[1:] if path.startswith("/") else [""]  # "*", absolute-form: 404
        if "%" in path:
            parts = [unquote(p) for p in parts]
        n = len(parts)
        get = method in ("GET", "HEAD")

        if parts[0] == "v2":
            if n == 1:
                self._allow(get, "GET")
                return Response(200, self._server_meta)
            if parts[1] == "health" and n == 3:
                if parts[2] == "live":
                    self._allow(get, "GET")
                    return Response(200, b'{"live":true}')
                if parts[2] == "ready":
                    self._allow(get, "GET")
                    if self._ready():
                        return Response(200, b'{"ready":true}')
                    return Response(503, b'{"ready":false}')
            if parts[1] == "models" and n >= 3 and parts[2]:
                name = parts[2]
                rest = parts[3:]
                version: str | None = None
                if len(rest) >= 2 and rest[0] == "versions":
                    version, rest = rest[1], rest[2:]
                if not rest:
                    self._allow(get, "GET")
                    return Response(200, self._metadata(self._serving(name, version)))
                if len(rest) == 1 and rest[0] == "ready":
                    self._allow(get, "GET")
                    sv = self._serving(name, version)
                    return Response(200, to_json({"name": sv.name, "ready": True}))
                if len(rest) == 1 and rest[0] == "infer":
                    self._allow(method == "POST", "POST")
                    with self.registry.admit(name):  # decoding and answering count in the model's bound
                        return self._infer(name, self._version(name, version), req, body)
        elif parts[0] == "metrics" and n == 1:
            self._allow(get, "GET")
            if self._metrics_fn is None:
                raise HttpFail(404, errors.NOT_FOUND, "metrics are not enabled", close=False)
            data, ctype = self._metrics_fn()
            return Response(200, data, ctype)
        raise HttpFail(404, errors.NOT_FOUND, f"no such endpoint: {path[:200]}", close=False)

    @staticmethod
    def _allow(ok: bool, allowed: str) -> None:
        if not ok:
            allow = "GET, HEAD" if allowed == "GET" else allowed
            raise HttpFail(405, errors.METHOD_NOT_ALLOWED, f"method not allowed; use {allowed}", close=False,
                           headers=(("Allow", allow),))

    def _ready(self) -> bool:
        if self._ready_fn is None:
            return True
        try:
            return bool(self._ready_fn())
        except Exception:
            log.warning("inference API: ready_fn failed", exc_info=True)
            return False

    @staticmethod
    def _version(name: str, version: str | None) -> int | None:
        if version is None:
            return None
        if not version.isdigit():
            raise errors.RejectError(errors.UNKNOWN_MODEL, f"model {name!r} version {version!r} is not serving")
        return int(version)

    def _serving(self, name: str, version: str | None) -> ServingVersion:
        sv = self.registry.get(name)
        if sv is None:
            raise errors.RejectError(errors.UNKNOWN_MODEL, f"model {name!r} is not serving")
        v = self._version(name, version)
        if v is not None and v != sv.version:
            raise errors.RejectError(errors.UNKNOWN_MODEL,
                                     f"model {name!r} version {v} is not serving (serving: {sv.version})")
        return sv

    def _metadata(self, sv: ServingVersion) -> bytes:
        cached = self._meta_cache.get(sv.name)
        if cached is not None and cached[0]() is sv:
            return cached[1]

        def tensors(specs: Iterable[Any]) -> list[dict[str, Any]]:
            return [{"name": t.name, "datatype": kserve_dtype(t.dtype),
                     "shape": [-1 if d is None else d for d in t.shape]} for t in specs]

        data = to_json({"name": sv.name, "versions": [str(sv.version)], "platform": sv.backend,
                      "inputs": tensors(sv.model.inputs), "outputs": tensors(sv.model.outputs)})
        self._meta_cache[sv.name] = (weakref.ref(sv), data)
        return data

    def _infer(self, name: str, version: int | None, req: Request, body: bytes) -> Response:
        guard.check_infer_type(req)
        body = guard.decode_body(req, body, self.registry.body_limit(name, self.max_body_bytes))
        ir = decode_request(req.headers, body)
        sv, results = self.registry.infer(name, ir.feed, version)
        data, ctype, headers = encode_response(sv, results, ir)
        return Response(200, data, ctype, headers)
