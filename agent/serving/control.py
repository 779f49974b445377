"""The control socket agentctl talks to: newline-delimited JSON over a Unix socket.

Invariants:
- The socket lives in a folder the agent owns; an existing path that is a symlink is refused.
- Read-only calls are open to the socket's group; mutating calls need root or the daemon's own
  user, decided from the peer's credentials (SO_PEERCRED), never from anything the peer says.
- One bad request gets one error reply; it never takes the server down.
"""

from __future__ import annotations

import contextlib
import grp
import json
import logging
import os
import socket
import stat
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent import errors

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 64 * 1024 * 1024
CLIENT_TIMEOUT_S = 300.0  # long calls (bench, install) answer within this
ACCEPT_POLL_S = 0.5

Handler = Callable[[dict[str, Any]], Any]


def peer_credentials(conn: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process on the other end."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    return pid, uid, gid


class ControlServer:
    def __init__(self, path: str, group: str = "") -> None:
        self.path = Path(path)
        self.group = group
        self._handlers: dict[str, tuple[Handler, bool]] = {}
        self._sock: socket.socket | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def register(self, op: str, handler: Handler, mutating: bool = False) -> None:
        self._handlers[op] = (handler, mutating)

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        if self.path.is_symlink():
            raise errors.AgentError("unsafe_socket", f"{self.path} is a symlink; refusing to use it")
        if self.path.exists():
            if not stat.S_ISSOCK(self.path.stat().st_mode):
                raise errors.AgentError("unsafe_socket", f"{self.path} exists and is not a socket")
            # A live socket means another daemon; a stale one is left over from a crash.
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.settimeout(1.0)
                try:
                    probe.connect(str(self.path))
                except OSError:
                    self.path.unlink()
                else:
                    raise errors.AgentError("already_running", f"another edge-agent is serving {self.path}")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o117)
        try:
            s.bind(str(self.path))
        finally:
            os.umask(old)
        if self.group:
            with contextlib.suppress(KeyError, PermissionError):
                os.chown(self.path, -1, grp.getgrnam(self.group).gr_gid)
        s.listen(16)
        s.settimeout(ACCEPT_POLL_S)
        self._sock = s
        self._thread = threading.Thread(target=self._accept_loop, name="control", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 2.0) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout_s)
        if self._sock:
            self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                continue
            threading.Thread(target=self._serve, args=(conn,), name="control-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(CLIENT_TIMEOUT_S)
            try:
                _, uid, _ = peer_credentials(conn)
            except OSError:
                return
            f = conn.makefile("rwb")
            while not self._stop.is_set():
                try:
                    line = f.readline(MAX_REQUEST_BYTES + 1)
                except (OSError, TimeoutError):
                    return
                if not line:
                    return
                reply = self._handle(line, uid)
                try:
                    f.write(json.dumps(reply, separators=(",", ":")).encode() + b"\n")
                    f.flush()
                except OSError:
                    return

    def _handle(self, line: bytes, uid: int) -> dict[str, Any]:
        if len(line) > MAX_REQUEST_BYTES:
            return {"ok": False, "error": {"code": "invalid_request", "message": f"request over {MAX_REQUEST_BYTES} bytes"}}
        try:
            req = json.loads(line)
            op = req["op"]
            params = req.get("params") or {}
            if not isinstance(params, dict):
                raise TypeError("params is not an object")
        except (ValueError, KeyError, TypeError) as e:
            return {"ok": False, "error": {"code": "invalid_request", "message": f"bad request: {e}"}}
        entry = self._handlers.get(op)
        if entry is None:
            return {"ok": False, "error": {"code": "unknown_op", "message": f"unknown operation {op!r} (known: {', '.join(sorted(self._handlers))})"}}
        handler, mutating = entry
        if mutating and uid not in (0, os.geteuid()):
            return {"ok": False, "error": {"code": "permission_denied",
                                           "message": f"{op} changes the device: run as root or as the agent's user"}}
        try:
            return {"ok": True, "result": handler(params)}
        except errors.AgentError as e:
            return {"ok": False, "error": e.to_dict()}
        except Exception as e:
            log.exception("control: %s failed", op)
            return {"ok": False, "error": {"code": errors.INTERNAL, "message": f"{op}: {type(e).__name__}: {e}"}}


class ControlClient:
    """agentctl's side."""

    def __init__(self, path: str, timeout_s: float = CLIENT_TIMEOUT_S) -> None:
        self.path = path
        self.timeout_s = timeout_s

    def call(self, op: str, **params: Any) -> Any:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(self.timeout_s)
            s.connect(self.path)
            s.sendall(json.dumps({"op": op, "params": params}).encode() + b"\n")
            f = s.makefile("rb")
            line = f.readline(MAX_REQUEST_BYTES + 1)
        if not line:
            raise ConnectionError(f"{self.path}: the daemon closed the connection")
        reply = json.loads(line)
        if not reply.get("ok"):
            err = reply.get("error") or {}
            raise errors.AgentError(err.get("code", errors.INTERNAL), err.get("message", "failed"))
        return reply.get("result")
