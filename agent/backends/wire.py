"""The wire between the daemon and a model's worker (agent/backends/isolated.py,
agent/serving/adopted.py): length-prefixed pickles on stream sockets, control messages with
descriptors on a SOCK_SEQPACKET socket, and the slot table both sides map.

Every message is a typed record below (a frozen dataclass, pickled as its class and fields), so
each side reads fields by name and mypy checks both ends. The one exception is the hottest: an
inference request on a pipe is the dict of input arrays itself, and ``None`` asks a worker to stop.

Why its own module: both processes use it, and neither needs the other's machinery for it.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import pickle
import select
import socket
import struct
import time
from array import array
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from agent import errors

CTL_MAX_BYTES = 256 * 1024  # largest control message: a request head and the bytes read ahead
# Slot states of an adopted connection (SlotTable). QUEUED: a request read in full, waiting for a
# free thread of the worker (agent/serving/connpool.py); the worker answers it ``busy`` itself
# after the model's ``queue_wait_s``.
FREE, PENDING, IDLE, READING, INFER, WRITING, BACK, QUEUED = range(8)
DEFAULT_QUEUE_WAIT_S = 10.0  # a QUEUED request's wait when the serving limits do not say (admission.py's default)
_SLOT = struct.Struct("=iiq")
_LEN = struct.Struct("!Q")
SMALL_MESSAGE_BYTES = 64 * 1024  # messages up to this size go out in one send with their length
MAX_MESSAGE_BYTES = 1 << 31  # a longer claimed length means a broken (or hostile) worker
_SLOT_BYTES = 16  # state (int32), padding, since (int64 CLOCK_MONOTONIC ns)


class DeathReason(str, Enum):
    """Why a worker's connections and calls end: read from this, never from the message text."""

    HUNG = "hung"  # a call or request got no answer within the deadline; the worker was killed
    CRASHED = "crashed"  # the worker exited on its own (a runtime crash, an OOM kill)
    RETIRED = "retired"  # the daemon closed the version with a request still in flight

    @property
    def code(self) -> errors.Code:
        """The error code a call or request cut short by this ends with."""
        return {DeathReason.HUNG: errors.WORKER_HUNG, DeathReason.CRASHED: errors.WORKER_CRASHED,
                DeathReason.RETIRED: errors.TIMEOUT}[self]


class _Record:
    """Base of the wire records: pickled as (class, fields), so frozen slotted dataclasses
    round-trip on every supported Python (3.10 cannot unpickle them by default)."""

    __slots__ = ()
    __match_args__: tuple[str, ...] = ()

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return type(self), tuple([getattr(self, f) for f in self.__match_args__])


# -- on the pipes (Channel): loading, calls through the daemon, golden samples -------------------
@dataclass(frozen=True, slots=True)
class Preload(_Record):
    """Sent to a worker started ahead of its model: import ``runtime`` while the bundle downloads."""

    runtime: str


@dataclass(frozen=True, slots=True)
class Load(_Record):
    """Load the model at ``path`` on ``runtime:target``; answered with Ready or Err."""

    runtime: str
    target: str
    path: str
    threads: int
    allow_spinning: bool
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Ready(_Record):
    """The model is loaded: its backend and tensors, and the worker's process id."""

    backend_id: str
    inputs: tuple[Any, ...]
    outputs: tuple[Any, ...]
    pid: int
    details: dict[str, Any] = field(default_factory=dict)  # the loaded model's own (LoadedModel.details)


@dataclass(frozen=True, slots=True)
class Golden(_Record):
    """Run the golden-sample check and timings inside the worker (agent/deploy/golden.py)."""

    inputs: str
    expected: str
    rtol: float
    atol: float
    plan: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Ok(_Record):
    """A call's result: the output arrays, or the golden check's figures."""

    result: Any


@dataclass(frozen=True, slots=True)
class Err(_Record):
    """A call or load that failed, with its stable code."""

    code: str
    message: str


# -- on the control socket: connections handed over and back ------------------------------------
@dataclass(frozen=True, slots=True)
class Serve(_Record):
    """The first control message (with the slot table's descriptor): what the worker serves."""

    name: str
    version: int
    n_slots: int
    max_body: int
    server_name: str
    server_version: str
    policy: Any  # agent.serving.guard.ApiPolicy (the backends layer does not import serving)
    serving: dict[str, Any] = field(default_factory=dict)  # admission limits and known shapes


@dataclass(frozen=True, slots=True)
class Adopt(_Record):
    """A connection (its descriptor rides along) whose next request begins with ``prefix``."""

    slot: int
    prefix: bytes


@dataclass(frozen=True, slots=True)
class Retire(_Record):
    """A newer version serves: give every connection back at its next request boundary."""


@dataclass(frozen=True, slots=True)
class Retired(_Record):
    """The worker took note of Retire (and flushed its statistics first)."""


@dataclass(frozen=True, slots=True)
class Back(_Record):
    """A connection given back to the daemon (a fresh descriptor rides along) with bytes read ahead."""

    slot: int
    unread: bytes


@dataclass(frozen=True, slots=True)
class Done(_Record):
    """The worker closed the connection in ``slot``."""

    slot: int


@dataclass(frozen=True, slots=True)
class Stats(_Record):
    """Calls and errors since the last report, latencies (packed doubles) and new input shapes."""

    calls: int
    errors: int
    ok: bytes
    bad: bytes
    shapes: tuple[Any, ...] = ()


PipeMessage = Preload | Load | Ready | Golden | Ok | Err
CtlMessage = Serve | Adopt | Retire | Retired | Back | Done | Stats


class SlotTable:
    """Per-connection state shared by the daemon and a worker (a memfd mapped by both)."""

    def __init__(self, fd: int, n: int) -> None:
        self.n = n
        self._mm = mmap.mmap(fd, n * _SLOT_BYTES)

    @classmethod
    def create(cls, n: int) -> tuple[SlotTable, int]:
        fd = os.memfd_create("edge-agent-slots", os.MFD_CLOEXEC)
        os.ftruncate(fd, n * _SLOT_BYTES)
        return cls(fd, n), fd

    def set(self, i: int, state: int) -> None:
        # One write of state and time. A reader may see it torn (the new state with the old
        # time): the daemon acts on a hung state only when it reads the same time twice.
        _SLOT.pack_into(self._mm, i * _SLOT_BYTES, state, 0, time.monotonic_ns())

    def get(self, i: int) -> tuple[int, int]:
        state, _, since = _SLOT.unpack_from(self._mm, i * _SLOT_BYTES)
        return state, since

    def close(self) -> None:
        with contextlib.suppress(BufferError, ValueError):
            self._mm.close()


def queue_wait_s(serving: dict[str, Any]) -> float:
    """How long a worker lets a request wait for one of its threads: the model's limits as the
    daemon sent them (``Serve.serving``), else the default."""
    wait = (serving.get("limits") or {}).get("queue_wait_s")
    return float(wait) if isinstance(wait, (int, float)) else DEFAULT_QUEUE_WAIT_S


def send_ctl(sock: socket.socket, msg: CtlMessage, fd: int | None = None) -> None:
    """One control message (SOCK_SEQPACKET keeps it whole), optionally with a descriptor."""
    data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    if len(data) > CTL_MAX_BYTES:
        raise OSError(errno.EMSGSIZE, f"control message of {len(data)} bytes")
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array("i", [fd]).tobytes())] if fd is not None else []
    sock.sendmsg([data], anc)


def recv_ctl(sock: socket.socket) -> tuple[CtlMessage | None, list[int]]:
    """The next control message and the descriptors it carries; (None, []) at EOF."""
    data, anc, _flags, _ = sock.recvmsg(CTL_MAX_BYTES, socket.CMSG_SPACE(4 * array("i").itemsize))
    fds: list[int] = []
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            a = array("i")
            a.frombytes(payload[: len(payload) - len(payload) % a.itemsize])
            fds.extend(a)
    if not data:
        for fd in fds:
            os.close(fd)
        return None, []
    msg: CtlMessage = pickle.loads(data)  # from our own parent or child process
    return msg, fds


class Channel:
    """Pickled messages over a stream socket, each after its length: what multiprocessing's
    Connection does, without importing multiprocessing (≈ 1.7 MB of RSS in the daemon and in
    every worker). EOFError at end of stream, OSError on a broken one."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, obj: Any) -> None:
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        head = _LEN.pack(len(data))
        if len(data) <= SMALL_MESSAGE_BYTES:
            self.sock.sendall(head + data)
        else:  # no copy of a large payload just to prepend eight bytes
            self.sock.sendall(head)
            self.sock.sendall(data)

    def recv(self) -> Any:
        n = _LEN.unpack(self._exact(_LEN.size))[0]
        if n > MAX_MESSAGE_BYTES:
            raise OSError(errno.EMSGSIZE, f"message of {n} bytes from the other process")
        return pickle.loads(self._exact(n))  # from our own parent or child process

    def _exact(self, n: int) -> bytearray:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self.sock.recv_into(view[got:])
            if k == 0:
                raise EOFError("the other process closed the channel")
            got += k
        return buf

    def poll(self, timeout_s: float) -> bool:
        """Whether a message (or the end of the stream) is there within ``timeout_s``."""
        po = select.poll()
        po.register(self.sock, select.POLLIN | select.POLLHUP | select.POLLERR)
        return bool(po.poll(timeout_s * 1000))

    def close(self) -> None:
        self.sock.close()
