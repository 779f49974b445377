"""The control socket agentctl talks to: newline-delimited JSON over a Unix socket.

Wire format: the client sends one request line ``{"op": NAME, "params": {...}}``; the server
answers zero or more progress lines ``{"progress": {...}}`` (long operations only) and then one
final line ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": {"code", "message"}}``.

Invariants:
- The socket lives in a folder the agent owns; an existing path that is a symlink is refused, and
  so is a folder that others may write to without the sticky bit.
- One daemon per socket: an exclusive ``flock`` on ``<socket>.lock`` is held for the server's
  life, so a second instance refuses to start (no race between two starting daemons), and only
  the lock holder may remove a stale socket left by a crash.
- Who may do what is decided from the peer's kernel credentials (SO_PEERCRED for uid/gid,
  SO_PEERGROUPS for the supplementary groups, both captured at connect), never from anything the
  peer says. Read-only calls: root, the daemon's own user, members of the control group or of the
  admin group (with no control group configured, whoever can open the socket: it is mode 0660).
  Mutating calls: root, the daemon's own user (which can rewrite the state folder anyway), or
  members of the admin group.
- One bad request gets one error reply; it never takes the server down. Connections are bounded.
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import json
import logging
import os
import pwd
import socket
import stat
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent import __version__, errors

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 64 * 1024 * 1024
CLIENT_TIMEOUT_S = 300.0  # long calls (bench, install) answer within this
ACCEPT_POLL_S = 0.5
PROBE_TIMEOUT_S = 1.0  # connecting to an existing socket to see whether a daemon serves it
MAX_CONNECTIONS = 32  # concurrent agentctl clients; more are answered "busy"
SOCKET_UMASK = 0o117  # socket file mode 0660: owner and group only
LISTEN_BACKLOG = 16
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13; 59 on every Linux arch
PEER_GROUPS_MAX = 4096  # buffer for SO_PEERGROUPS; a peer in more groups falls back to the group database

Emit = Callable[[dict[str, Any]], None]
Handler = Callable[..., Any]  # handler(params) or, registered with streaming=True, handler(params, emit)
MutatingRule = bool | Callable[[dict[str, Any]], bool]


@dataclass(frozen=True)
class Peer:
    """The kernel's word on who is on the other end of a connection."""

    pid: int
    uid: int
    gid: int
    groups: frozenset[int]

    @property
    def all_groups(self) -> frozenset[int]:
        return self.groups | {self.gid}


def peer_credentials(conn: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process on the other end."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    return pid, uid, gid


def peer_groups(conn: socket.socket, uid: int, gid: int) -> frozenset[int]:
    """Supplementary groups of the peer at connect time (SO_PEERGROUPS), else from the group database."""
    try:
        raw = conn.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * PEER_GROUPS_MAX)
        return frozenset(struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4]))
    except OSError:
        pass
    try:
        return frozenset(os.getgrouplist(pwd.getpwuid(uid).pw_name, gid))
    except (KeyError, OSError):
        return frozenset({gid})


def read_peer(conn: socket.socket) -> Peer:
    pid, uid, gid = peer_credentials(conn)
    return Peer(pid, uid, gid, peer_groups(conn, uid, gid))


def _gid(name: str) -> int | None:
    if not name:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def stderr_target() -> str | None:
    """Where this process's stderr goes (a log file path, ``socket:[…]`` for journald, a tty)."""
    try:
        return os.readlink("/proc/self/fd/2")
    except OSError:
        return None


class ControlServer:
    def __init__(self, path: str, group: str = "", admin_group: str = "") -> None:
        self.path = Path(path)
        self.group = group
        self.admin_group = admin_group
        self._handlers: dict[str, tuple[Handler, MutatingRule, bool]] = {}
        self._sock: socket.socket | None = None
        self._lock_fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._group_gid: int | None = None
        self._admin_gid: int | None = None

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    def register(self, op: str, handler: Handler, mutating: MutatingRule = False, streaming: bool = False) -> None:
        """Add an operation; ``mutating`` may be a predicate on the params (e.g. config get vs set)."""
        self._handlers[op] = (handler, mutating, streaming)

    # -- access ------------------------------------------------------------------------------
    def is_admin(self, peer: Peer) -> bool:
        return peer.uid in (0, os.geteuid()) or (self._admin_gid is not None and self._admin_gid in peer.all_groups)

    def may_read(self, peer: Peer) -> bool:
        if self.is_admin(peer) or not self.group:
            return True
        return self._group_gid is not None and self._group_gid in peer.all_groups

    def hello(self, peer: Peer) -> dict[str, Any]:
        """Built-in ``hello``: who serves, with what rights for this peer, and where it logs."""
        return {"agent": __version__, "pid": os.getpid(), "uid": os.geteuid(), "log": stderr_target(),
                "access": "admin" if self.is_admin(peer) else "read",
                "control_group": self.group, "admin_group": self.admin_group}

    # -- lifecycle ---------------------------------------------------------------------------
    def _check_folder(self) -> None:
        folder = self.path.parent
        folder.mkdir(parents=True, exist_ok=True, mode=0o755)
        st = folder.stat()
        if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
            raise errors.AgentError(errors.UNSAFE_SOCKET, f"{folder} is writable by others without the sticky bit; "
                                                     "put the control socket in a folder the agent owns")

    def _take_lock(self) -> None:
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise errors.AgentError(errors.UNSAFE_SOCKET, f"cannot open lock file {self.lock_path}: {e.strerror or e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            raise errors.AgentError(errors.ALREADY_RUNNING,
                                    f"another edge-agent holds {self.lock_path} and serves {self.path}") from e
        self._lock_fd = fd

    def _clear_stale(self) -> None:
        if self.path.is_symlink():
            raise errors.AgentError(errors.UNSAFE_SOCKET, f"{self.path} is a symlink; refusing to use it")
        if not self.path.exists():
            return
        if not stat.S_ISSOCK(self.path.lstat().st_mode):
            raise errors.AgentError(errors.UNSAFE_SOCKET, f"{self.path} exists and is not a socket")
        # We hold the lock, so a live socket here is a daemon that does not use locks (an older
        # version); a dead one is left over from a crash.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(PROBE_TIMEOUT_S)
            try:
                probe.connect(str(self.path))
            except OSError:
                self.path.unlink()
            else:
                raise errors.AgentError(errors.ALREADY_RUNNING, f"another edge-agent is serving {self.path}")

    def start(self) -> None:
        if self.path.is_symlink():
            raise errors.AgentError(errors.UNSAFE_SOCKET, f"{self.path} is a symlink; refusing to use it")
        self._check_folder()
        self._take_lock()
        try:
            self._clear_stale()
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            old = os.umask(SOCKET_UMASK)
            try:
                s.bind(str(self.path))
            finally:
                os.umask(old)
        except BaseException:
            self._release_lock()
            raise
        self._group_gid = _gid(self.group)
        self._admin_gid = _gid(self.admin_group)
        if self.group:
            if self._group_gid is None:
                log.warning("control group %r does not exist: only root and the agent's user can use %s", self.group, self.path)
            else:
                try:
                    os.chown(self.path, -1, self._group_gid)
                except OSError as e:
                    log.warning("cannot give %s to group %s (%s): only root and the agent's user can use it",
                                self.path, self.group, e.strerror or e)
        if self.admin_group and self._admin_gid is None:
            log.warning("admin group %r does not exist: only root and the agent's user can change the device through %s",
                        self.admin_group, self.path)
        s.listen(LISTEN_BACKLOG)
        s.settimeout(ACCEPT_POLL_S)
        self._sock = s
        self._thread = threading.Thread(target=self._accept_loop, name="control", daemon=True)
        self._thread.start()

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = None

    def stop(self, timeout_s: float = 2.0) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout_s)
        if self._sock:
            self._sock.close()
        if self._lock_fd is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        self._release_lock()

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
            if not self._slots.acquire(blocking=False):
                with conn, contextlib.suppress(OSError):
                    conn.sendall(_line({"ok": False, "error": {"code": errors.BUSY, "message": f"more than {MAX_CONNECTIONS} agentctl clients connected"}}))
                continue
            threading.Thread(target=self._serve, args=(conn,), name="control-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn:
                conn.settimeout(CLIENT_TIMEOUT_S)
                try:
                    peer = read_peer(conn)
                except OSError:
                    return
                f = conn.makefile("rwb")
                write_lock = threading.Lock()

                def send(doc: dict[str, Any]) -> None:
                    with write_lock:
                        f.write(_line(doc))
                        f.flush()

                while not self._stop.is_set():
                    try:
                        line = f.readline(MAX_REQUEST_BYTES + 1)
                    except (OSError, TimeoutError):
                        return
                    if not line:
                        return
                    reply = self._handle(line, peer, send)
                    try:
                        send(reply)
                    except OSError:
                        return
        finally:
            self._slots.release()

    def _handle(self, line: bytes, peer: Peer, send: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        if len(line) > MAX_REQUEST_BYTES:
            return {"ok": False, "error": {"code": errors.INVALID_REQUEST, "message": f"request over {MAX_REQUEST_BYTES} bytes"}}
        try:
            req = json.loads(line)
            op = req["op"]
            params = req.get("params") or {}
            if not isinstance(params, dict):
                raise TypeError("params is not an object")
        except (ValueError, KeyError, TypeError) as e:
            return {"ok": False, "error": {"code": errors.INVALID_REQUEST, "message": f"bad request: {e}"}}
        entry = self._handlers.get(op)
        if entry is None and op != "hello":
            known = ", ".join(sorted([*self._handlers, "hello"]))
            return {"ok": False, "error": {"code": errors.UNKNOWN_OP, "message": f"unknown operation {op!r} (known: {known})"}}
        if not self.may_read(peer):
            return {"ok": False, "error": {"code": errors.PERMISSION_DENIED,
                                           "message": f"{op}: permission denied: join group {self.group!r} to read, "
                                                      f"or {self.admin_group or 'root'!r} to change the device"}}
        if entry is None:
            return {"ok": True, "result": self.hello(peer)}
        handler, mutating, streaming = entry
        try:
            changes = mutating(params) if callable(mutating) else mutating
        except Exception:
            changes = True  # a predicate that cannot decide errs on the safe side
        if changes and not self.is_admin(peer):
            who = f"a member of group {self.admin_group!r}" if self.admin_group else "the agent's user"
            return {"ok": False, "error": {"code": errors.PERMISSION_DENIED,
                                           "message": f"{op} changes the device: permission denied for uid {peer.uid}; "
                                                      f"run it as root or as {who}"}}

        def emit(progress: dict[str, Any]) -> None:
            with contextlib.suppress(OSError):
                send({"progress": progress})

        try:
            result = handler(params, emit) if streaming else handler(params)
            return {"ok": True, "result": result}
        except errors.AgentError as e:
            return {"ok": False, "error": e.to_dict()}
        except Exception as e:
            log.exception("control: %s failed", op)
            return {"ok": False, "error": {"code": errors.INTERNAL, "message": f"{op}: {type(e).__name__}: {e}"}}


def _line(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":"), default=str).encode() + b"\n"


class ControlClient:
    """agentctl's side."""

    def __init__(self, path: str, timeout_s: float = CLIENT_TIMEOUT_S) -> None:
        self.path = path
        self.timeout_s = timeout_s

    def call(self, op: str, on_progress: Emit | None = None, **params: Any) -> Any:
        """One request; progress lines go to ``on_progress``; AgentError carries a refusal's code."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(self.timeout_s)
            s.connect(self.path)
            s.sendall(json.dumps({"op": op, "params": params}).encode() + b"\n")
            f = s.makefile("rb")
            while True:
                line = f.readline(MAX_REQUEST_BYTES + 1)
                if not line:
                    raise ConnectionError(f"{self.path}: the daemon closed the connection")
                reply = json.loads(line)
                if "progress" in reply and "ok" not in reply:
                    if on_progress is not None:
                        on_progress(reply["progress"])
                    continue
                break
        if not reply.get("ok"):
            err = reply.get("error") or {}
            raise errors.AgentError(err.get("code", errors.INTERNAL), err.get("message", "failed"))
        return reply.get("result")
