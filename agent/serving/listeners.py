"""The local inference API's listening sockets: TCP (IPv4 or IPv6) and an optional Unix socket.

Each listener accepts on its own thread and runs a connection on a thread of its own
(socketserver's ThreadingMixIn). Admission to the connection table and the hand-over of a
connection to a model's worker are the server's (agent/serving/kserve.py).

Invariants:
- A listen address is ``host:port`` or ``[IPv6]:port``; anything else is a ``ConfigError``.
- The connection cap leaves ``FD_RESERVE`` descriptors for the rest of the daemon and halves
  what remains, since a connection handed to a worker holds a descriptor in each process.
- An accept that fails for want of descriptors or memory backs off ``ACCEPT_BACKOFF_S``: the
  listening socket stays readable, and retrying at once would spin a core.
- The Unix socket is created with mode ``UNIX_SOCKET_MODE`` (no window with a wider one); a
  path that exists and is not a socket is refused, a stale socket replaced.
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
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import errors

if TYPE_CHECKING:
    from agent.serving.kserve import KServeServer

__all__ = ["FD_RESERVE", "MAX_CONNECTIONS", "MIN_CONNECTIONS", "ConnSlot", "HTTPServer", "HTTPServer6",
           "ListenAddressError", "UnixServer", "connection_cap", "parse_listen"]

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 256  # connections served at once, unless the descriptor limit allows fewer
MIN_CONNECTIONS = 16
FD_RESERVE = 256  # descriptors kept for everything but the API (MQTT, control socket, store, workers)
POLL_INTERVAL_S = 0.2  # accept loop's shutdown check period; bounds how long stop() waits for it
ACCEPT_BACKOFF_S = 0.1  # pause after an accept that failed for want of descriptors or memory
REQUEST_QUEUE_SIZE = 128  # listen() backlog
UNIX_SOCKET_MODE = 0o660
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
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):  # resets, broken pipes, timeouts: the client went away
            log.debug("kserve: connection %s: %s", client_address, exc)
        else:
            self.app.gate.log(log, logging.WARNING, "conn", "kserve: connection %s failed", client_address,
                              exc_info=True)


class HTTPServer(_Serving, socketserver.ThreadingMixIn, socketserver.TCPServer):
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


class HTTPServer6(HTTPServer):
    address_family = socket.AF_INET6


class UnixServer(_Serving, socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
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
