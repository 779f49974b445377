"""Two pieces of every download (agent/bundles/fetch.py): the sha256 computed while the bytes
stream (on a helper thread for large files), and the per-file deadline whose watchdog shuts
the attempt's sockets down when it passes."""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agent import errors

CHUNK_BYTES = 1024 * 1024  # hashing and local copies
HASH_THREAD_MIN_BYTES = 8 * 1024 * 1024  # smaller files are hashed inline: a thread costs more than it saves
HASH_BATCH_BYTES = 1024 * 1024  # bytes handed to the hashing thread at once
HASH_QUEUE_BATCHES = 16  # at most this many batches wait for the hasher (bounded memory)


class StreamHash:
    """sha256 of a part file: the ``have`` bytes it already holds (read once, for a resume),
    then every chunk appended to it, in order.

    For files of ``HASH_THREAD_MIN_BYTES`` or more the chunks are hashed on a helper thread
    (hashlib releases the GIL), so hashing runs beside the socket reads and file writes instead
    of after them; the queue between them is bounded. ``close`` must follow (``digest`` does it).
    """

    def __init__(self, part: Path | None = None, have: int = 0, size: int = 0) -> None:
        self._h = hashlib.sha256()
        self.n = 0
        if part is not None and have > 0:
            with open(part, "rb") as f:
                while self.n < have and (chunk := f.read(min(CHUNK_BYTES, have - self.n))):
                    self._h.update(chunk)
                    self.n += len(chunk)
            if self.n != have:
                raise errors.RetryableError(errors.DOWNLOAD_FAILED, f"{part.name}: shorter than the {have} bytes it held")
        self._batch: list[bytes] = []
        self._batch_bytes = 0
        self._q: queue.Queue[list[bytes] | None] | None = None
        self._thread: threading.Thread | None = None
        if size - have >= HASH_THREAD_MIN_BYTES:
            self._q = queue.Queue(HASH_QUEUE_BATCHES)
            self._thread = threading.Thread(target=self._run, name="sha256", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        assert self._q is not None
        while (batch := self._q.get()) is not None:
            for chunk in batch:
                self._h.update(chunk)

    def update(self, chunk: bytes) -> None:
        self.n += len(chunk)
        if self._q is None:
            self._h.update(chunk)
            return
        self._batch.append(chunk)
        self._batch_bytes += len(chunk)
        if self._batch_bytes >= HASH_BATCH_BYTES:
            self._q.put(self._batch)
            self._batch, self._batch_bytes = [], 0

    def close(self) -> None:
        """Hash what is pending and stop the helper thread (also after a failed transfer)."""
        if self._q is not None and self._thread is not None:
            if self._batch:
                self._q.put(self._batch)
                self._batch, self._batch_bytes = [], 0
            self._q.put(None)
            self._thread.join()
            self._q = None

    def digest(self) -> tuple[int, str]:
        """(bytes hashed, hex sha256)."""
        self.close()
        return self.n, self._h.hexdigest()


Digest = tuple[int, str]  # (size, sha256 hex) of a part file, known from the stream


class Deadline:
    """One file's deadline, enforced by a watchdog.

    Sockets registered with ``track`` are shut down (through a dup of their descriptor, so a
    recycled descriptor number can never be hit) when the deadline passes: a read blocked in
    the headers, a TLS record or an FTP reply returns at once.
    """

    def __init__(self, seconds: float) -> None:
        self.at = time.monotonic() + seconds
        self.seconds = seconds
        self.fired = False
        self._lock = threading.Lock()
        self._dups: list[socket.socket] = []
        self._timer: threading.Timer | None = None

    def passed(self) -> bool:
        return self.fired or time.monotonic() >= self.at

    def left(self) -> float:
        return max(0.0, self.at - time.monotonic())

    @contextlib.contextmanager
    def watching(self) -> Iterator[Deadline]:
        """Arm the watchdog for one attempt; disarm it and drop the dups after."""
        self._timer = threading.Timer(self.left(), self._fire)
        self._timer.daemon = True
        self._timer.start()
        prev = getattr(_watch, "deadline", None)
        _watch.deadline = self
        try:
            yield self
        finally:
            _watch.deadline = prev
            with self._lock:
                self._timer.cancel()
                for d in self._dups:
                    d.close()
                self._dups.clear()

    def track(self, sock: Any) -> None:
        """Shut ``sock`` down when the deadline passes (now, if it already has)."""
        try:
            fd = sock.fileno()
            if fd < 0:
                return
            dup = socket.socket(fileno=os.dup(fd))
        except (OSError, AttributeError, ValueError):
            return
        with self._lock:
            self._dups.append(dup)
            if self.fired:
                with contextlib.suppress(OSError):
                    dup.shutdown(socket.SHUT_RDWR)

    def _fire(self) -> None:
        with self._lock:
            self.fired = True
            for d in self._dups:
                with contextlib.suppress(OSError):
                    d.shutdown(socket.SHUT_RDWR)


_watch = threading.local()  # the Deadline of the attempt running on this thread, if any
