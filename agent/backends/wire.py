"""The wire between the daemon and a model's worker (agent/backends/isolated.py,
agent/serving/adopted.py): length-prefixed pickles on stream sockets, control messages with
descriptors on a SOCK_SEQPACKET socket, and the slot table both sides map.

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
from typing import Any

CTL_MAX_BYTES = 256 * 1024  # largest control message: a request head and the bytes read ahead
# Slot states of an adopted connection (SlotTable).
FREE, PENDING, IDLE, READING, INFER, WRITING, BACK = range(7)
_SLOT = struct.Struct("=iiq")
_LEN = struct.Struct("!Q")
SMALL_MESSAGE_BYTES = 64 * 1024  # messages up to this size go out in one send with their length
MAX_MESSAGE_BYTES = 1 << 31  # a longer claimed length means a broken (or hostile) worker
_SLOT_BYTES = 16  # state (int32), padding, since (int64 CLOCK_MONOTONIC ns)


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


def send_ctl(sock: socket.socket, msg: tuple[Any, ...], fd: int | None = None) -> None:
    """One control message (SOCK_SEQPACKET keeps it whole), optionally with a descriptor."""
    data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    if len(data) > CTL_MAX_BYTES:
        raise OSError(errno.EMSGSIZE, f"control message of {len(data)} bytes")
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array("i", [fd]).tobytes())] if fd is not None else []
    sock.sendmsg([data], anc)


def recv_ctl(sock: socket.socket) -> tuple[tuple[Any, ...] | None, list[int]]:
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
    msg: tuple[Any, ...] = pickle.loads(data)  # from our own parent or child process
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
