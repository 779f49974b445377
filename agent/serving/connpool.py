"""A worker's connections served by a bounded set of threads: one reads, the others answer.

Why: a thread per connection made the threads of many clients contend for the interpreter lock
(at 8 clients throughput varied two-fold between runs); a slow sender held its thread for as long
as its body took. Here a worker runs ``threads`` threads whatever the number of connections
(agent/serving/adopted.py: ``backends.max_inflight`` + 1).

Design (leader/followers on epoll):
- One thread at a time, the leader, waits in ``epoll`` on every connection not being answered
  (each armed once, ``EPOLLONESHOT``) and reads what arrived without blocking into the
  connection's parser (agent/serving/httpconn.py, non-blocking mode): a slow sender costs a read
  per arrival, never a thread.
- A request read in full (head and body) is a job. When another thread waits, the leader hands
  it the polling and answers the job itself: no hand-over between threads on a request's way, so
  one client is served as fast as by a thread of its own (and when it is the only connection, the
  leader keeps the reading role while it answers: no thread wakes at all). Otherwise the job waits in the queue
  (slot state ``QUEUED``) for the next thread that finishes while the leader goes on reading: at
  most ``threads - 1`` requests are answered at once, and there is always a reader.
- The queue holds at most ``max_queue`` jobs, each for at most ``queue_wait_s`` (the model's
  ``backends.max_queue`` and ``queue_wait_s``): beyond either the request is answered 503
  ``busy`` with Retry-After, and the connection goes on.
- Nothing a client does holds a thread: a refused body still arriving is dropped by the leader
  as it comes (after the answer), as is what a client still sends after a refusal that closes
  (the lingering close, ``_linger``), and a reply the socket does not take at once is sent on by
  the leader as the client reads (``HttpConn.outbuf``). Deadlines (head, body, idle, send) are those
  of the thread-per-connection handler, checked every ``SWEEP_INTERVAL_S`` by the leader.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import threading
import time
from collections import deque
from types import SimpleNamespace
from typing import Any, Protocol

from agent import errors
from agent.backends.wire import IDLE, QUEUED, READING, WRITING, SlotTable
from agent.serving import guard
from agent.serving.admission import RETRY_AFTER_S
from agent.serving.handler import (
    IDLE_TIMEOUT_S,
    LINGER_MAX_BYTES,
    LINGER_TIMEOUT_S,
    Handler,
    error_response,
)
from agent.serving.httpconn import (
    HEAD_TIMEOUT_S,
    SEND_TIMEOUT_S,
    HttpFail,
    NeedMore,
    ReadTimeout,
    reply_head,
)
from agent.serving.routes import infer_target

log = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 0.1  # how often the leader checks deadlines and the queue's waiting time
MIN_THREADS = 2  # one reads, one answers
_ARM = select.EPOLLIN | select.EPOLLONESHOT
_SERVE, _REFUSE, _HEAD_FAIL, _BODY_FAIL, _LATE = range(5)  # what a job is


class Owner(Protocol):
    """What the pool needs of the worker that owns the connections (agent/serving/adopted.py)."""

    app: Any  # the KServeServer whose routes answer
    slots: SlotTable | None
    local: threading.local  # ``slot``: the slot of the request the thread answers
    retiring: bool

    def serves(self, name: str, version: str | None) -> bool: ...

    def give_back(self, slot: int, sock: socket.socket, unread: bytes) -> bool: ...

    def done(self, slot: int) -> None: ...


class _Handler(Handler):
    """The daemon's handler code for one connection; made without running its blocking loop."""

    def __init__(self, sock: socket.socket, app: Any) -> None:  # not BaseRequestHandler's
        self.request = sock
        self.client_address = ("", 0)
        self.server = SimpleNamespace(app=app)  # type: ignore[assignment]
        self.setup()

    def _linger(self) -> None:
        pass  # no thread waits on a client: the leader lingers once the reply is out (ConnPool._linger)


class _Conn:
    __slots__ = ("armed", "body", "deadline", "err", "fd", "h", "kind", "limit", "lingering", "need", "queued_at",
                 "req", "since", "slot", "sock")

    def __init__(self, sock: socket.socket, slot: int, h: _Handler) -> None:
        self.sock, self.slot, self.h = sock, slot, h
        self.fd = sock.fileno()
        self.armed = False  # waiting in epoll (only the leader touches it then)
        self.lingering = False  # answered and closing: what the client still sends is dropped
        self.req: Any = None  # the request whose body is being read or that is a job
        self.body = b""
        self.limit = self.need = 0  # body limit; bytes reserved in the body budget
        self.err: HttpFail | None = None
        self.kind = _SERVE
        self.deadline = 0.0  # of the head being read
        self.since = time.monotonic()  # idle since
        self.queued_at = 0.0


class ConnPool:
    """``threads`` threads serving every connection ``add``-ed, leader/followers style."""

    def __init__(self, owner: Owner, threads: int, max_queue: int, queue_wait_s: float, wake_fd: int) -> None:
        self._owner = owner
        self.max_queue = max_queue
        self.queue_wait_s = queue_wait_s
        self._ep = select.epoll()
        self._wake = wake_fd  # readable once the worker retires
        self._ep.register(wake_fd, _ARM)
        self._conns: dict[int, _Conn] = {}
        self._cv = threading.Condition(threading.Lock())
        self._queue: deque[_Conn] = deque()
        self._leader = False
        self._waiting = 0  # threads with nothing to do
        self._inline = False  # the leader answers the only connection and goes on reading after
        self._next_sweep = 0.0
        self.threads = [threading.Thread(target=self._run, name=f"http-{i}", daemon=True)
                        for i in range(max(MIN_THREADS, threads))]
        for t in self.threads:
            t.start()

    def add(self, sock: socket.socket, slot: int, prefix: bytes) -> None:
        """Serve a connection whose next request begins with ``prefix`` (from the control thread)."""
        sock.settimeout(SEND_TIMEOUT_S)  # O_NONBLOCK underneath: the leader's reads never wait
        h = _Handler(sock, self._owner.app)
        h.conn.buf += prefix
        h.conn.nonblocking = True
        c = _Conn(sock, slot, h)
        self._conns[c.fd] = c
        self._ep.register(c.fd, 0)  # disarmed until _arm
        self._wake_reader()
        c.deadline = time.monotonic() + HEAD_TIMEOUT_S
        self._set(c, READING)  # taken: no longer the daemon's PENDING
        if self._step(c):
            self._submit([c])

    # -- threads -------------------------------------------------------------------------------
    def _run(self) -> None:
        lead = False  # still the reader after answering alone
        while True:
            job: _Conn | None = None
            if not lead:
                with self._cv:
                    while self._leader and not self._queue:
                        self._waiting += 1
                        self._cv.wait()
                        self._waiting -= 1
                    if not self._leader:
                        self._leader = True
                    else:
                        job = self._queue.popleft()
            if job is None:
                job = self._lead()
            while job is not None:
                job = self._serve_safely(job)
            with self._cv:
                lead, self._inline = self._inline, False

    def _lead(self) -> _Conn:
        """Read until a job is ready and another thread can take over the reading (or there is
        nothing else to read); that job."""
        while True:
            ready = self._poll()
            if not ready:
                continue
            with self._cv:
                if len(ready) == 1 and not self._queue and len(self._conns) == 1:
                    self._inline = True  # the only connection: answer it and keep reading after (``add`` ends this)
                    return ready[0]
                if self._waiting:
                    self._leader = False
                    job = ready.pop(0)
                    over = self._enqueue(ready, self._waiting - 1)  # one of them reads next
                    self._cv.notify(len(ready) + 1)  # one reads next, the others take jobs
                else:
                    job = None
                    over = self._enqueue(ready, 0)
            for c in over:
                self._busy(c, f"{self.max_queue} requests already wait for this model's worker; retry")
            if job is not None:
                return job

    def _wake_reader(self) -> None:
        """A new connection: the leader answering the only other one alone hands the reading on."""
        with self._cv:
            if self._inline:
                self._inline = False
                self._leader = False
                self._cv.notify()

    def _enqueue(self, jobs: list[_Conn], free: int) -> list[_Conn]:
        """Queue ``jobs`` (under the lock) for ``free`` threads about to take them and ``max_queue``
        more; those beyond are returned."""
        room = max(0, self.max_queue + free - len(self._queue))
        for c in jobs[:room]:
            if c.kind == _SERVE:
                self._set(c, QUEUED)  # its own hung rule in the daemon (agent/backends/isolated.py)
            self._queue.append(c)
        return jobs[room:]

    def _submit(self, jobs: list[_Conn]) -> None:
        with self._cv:
            over = self._enqueue(jobs, self._waiting)
            self._cv.notify(len(jobs))
        for c in over:
            self._busy(c, f"{self.max_queue} requests already wait for this model's worker; retry")

    def _poll(self) -> list[_Conn]:
        events = self._ep.poll(max(0.0, self._next_sweep - time.monotonic()))
        ready = []
        for fd, _ in events:
            if fd == self._wake:
                self._next_sweep = 0.0  # a retire: give idle connections back now
                continue
            c = self._conns.get(fd)
            if c is None or not c.armed:
                continue
            c.armed = False
            try:
                if self._step(c):
                    ready.append(c)
            except Exception:
                self._owner.app.gate.log(log, logging.ERROR, "conn", "worker: connection %d failed", c.slot,
                                         exc_info=True)
                self._close(c)
        now = time.monotonic()
        if now >= self._next_sweep:
            self._next_sweep = now + SWEEP_INTERVAL_S
            ready.extend(self._sweep(now))
        return ready

    # -- reading (the leader, or a thread with a pipelined request) ----------------------------
    def _step(self, c: _Conn) -> bool:
        """Read what arrived without blocking; True when ``c`` now holds a job."""
        owner, h = self._owner, c.h
        conn = h.conn
        try:
            if conn.outbuf:  # the rest of a reply
                if not conn.flush():
                    self._arm(c, select.EPOLLOUT)
                    return False
                return self._after_reply(c)
            if conn.discarding:  # a refused body, after its answer
                self._set(c, READING)
                if not conn.discard_pending() or c.lingering:
                    self._close(c)
                    return False
                if not conn.buf:
                    self._idle(c)
                    return False
            if c.req is None:
                if not conn.in_message:  # the first bytes of a request (or the end of the connection)
                    c.deadline = time.monotonic() + HEAD_TIMEOUT_S
                    self._set(c, READING)
                req = conn.read_head(c.deadline)
                if req is None:
                    self._close(c)
                    return False
                h.close_connection = not req.keep_alive
                t = infer_target(req.target) if req.method == "POST" else None
                if t is None or owner.retiring or not owner.serves(*t) or "expect" in req.headers:
                    self._give_back(c, req.raw_head + conn.unread())
                    return False
                c.req = req
                got = h.reserve(req)
                if got is None:
                    return self._job(c, _REFUSE)
                c.limit, c.need = got
            c.body = conn.read_body(c.req, c.limit)
            return self._job(c, _SERVE)
        except NeedMore:
            self._arm(c)
            return False
        except HttpFail as e:
            c.err = e
            return self._job(c, _HEAD_FAIL if c.req is None else _BODY_FAIL)
        except ReadTimeout:
            if c.req is None:  # a head that missed its deadline: dropped without a reply
                self._close(c)
                return False
            return self._job(c, _LATE)
        except OSError:
            self._close(c)
            return False

    def _job(self, c: _Conn, kind: int) -> bool:
        c.kind = kind
        c.queued_at = time.monotonic()
        return True

    def _sweep(self, now: float) -> list[_Conn]:
        """Deadlines of connections waiting in epoll, retire, and jobs queued too long."""
        ready = []
        retiring = self._owner.retiring
        for c in list(self._conns.values()):
            if not c.armed:
                continue
            conn = c.h.conn
            if conn.outbuf:  # a reply going out
                if now > c.deadline:
                    c.armed = False
                    self._close(c)
            elif conn.discarding:  # a refused body still arriving: not yet at a request boundary
                if now > conn.discard_deadline:
                    c.armed = False
                    self._close(c)
            elif c.req is None:
                if retiring:  # at a request boundary: back to the daemon with what was read
                    c.armed = False
                    self._give_back(c, conn.unread())
                elif now > c.deadline if conn.in_message else now - c.since > IDLE_TIMEOUT_S:
                    c.armed = False
                    self._close(c)
            else:
                bd = conn.body_deadline
                if bd is not None and now > bd:
                    c.armed = False
                    self._job(c, _LATE)
                    ready.append(c)
        stale = []
        with self._cv:
            while self._queue and now - self._queue[0].queued_at > self.queue_wait_s:
                stale.append(self._queue.popleft())
        for c in stale:
            self._late_job(c)
        return ready

    # -- answering -----------------------------------------------------------------------------
    def _serve_safely(self, c: _Conn) -> _Conn | None:
        try:
            return self._serve(c)
        except Exception:
            self._owner.app.gate.log(log, logging.ERROR, "conn", "worker: connection %d failed", c.slot,
                                     exc_info=True)
            self._close(c)
            return None

    def _serve(self, c: _Conn) -> _Conn | None:
        """Answer the job on ``c``; the connection's next job when one is already read in full."""
        owner, h = self._owner, c.h
        if time.monotonic() - c.queued_at > self.queue_wait_s:
            self._late_job(c)
            return None
        req = c.req
        owner.local.slot = c.slot  # its runtime call marks the slot INFER (adopted.py)
        if c.kind == _HEAD_FAIL:
            assert c.err is not None
            h.close_connection = True
            h._write(error_response(c.err.status, c.err.code, c.err.message, c.err.headers), close=True)
            return self._next(c)
        if c.kind == _SERVE:
            self._set(c, READING)  # (QUEUED if it waited for this thread)
        try:
            resp = h._app.respond(req, c.body) if c.kind == _SERVE else self._refusal(c)
        finally:
            self._release(c)
        self._set(c, WRITING)
        h.send_reply(req, resp)
        return self._next(c)

    def _refusal(self, c: _Conn) -> Any:
        """The answer to a request refused before or while its body was read; a body still on
        its way is dropped afterwards by the leader (``HttpConn.discarding``), never waited for."""
        h, req, e = c.h, c.req, c.err
        if c.kind == _REFUSE:  # the checks of Handler.serve, without its blocking read
            try:
                guard.check(h._app.policy, req, req.target.split("?", 1)[0], h.local_socket)
                h._app.body_limit(req.method, req.target)
            except HttpFail as refused:
                e = refused
            else:
                return h._over_budget(req)  # what reserve() found
        if c.kind == _LATE or e is None:
            h.close_connection = True
            return error_response(408, errors.TIMEOUT, "request body did not arrive within its deadline")
        h._skip_body(req, e)
        return error_response(e.status, e.code, e.message, e.headers)

    def _next(self, c: _Conn) -> _Conn | None:
        c.req, c.body, c.err = None, b"", None
        return c if self._after_reply(c) else None

    def _after_reply(self, c: _Conn) -> bool:
        """Once a reply is out: close, give back, go on with a pipelined request (True when it
        is a job now), or wait in epoll. A reply the client does not take at once is sent on by
        the leader as the socket takes it (``SEND_TIMEOUT_S`` in all), never waited for."""
        h = c.h
        if h.conn.outbuf:
            self._set(c, WRITING)
            c.deadline = time.monotonic() + SEND_TIMEOUT_S
            self._arm(c, select.EPOLLOUT)
            return False
        if h.body_unread:
            self._linger(c)
            return False
        if h.close_connection:
            self._close(c)
            return False
        if self._owner.retiring:
            self._give_back(c, h.conn.unread())
            return False
        if h.conn.buf or h.conn.discarding:  # the next request is here already, or a body to drop
            return self._step(c)
        self._idle(c)  # (a retire racing this is caught by the leader's next sweep)
        return False

    def _linger(self, c: _Conn) -> None:
        """After a refusal that closes with the body unread: end our side, then let the leader drop
        what the client still sends (``LINGER_MAX_BYTES``, ``LINGER_TIMEOUT_S``) and close at its
        end or at the deadline (``_sweep``), so the client sees the reply rather than a reset."""
        h = c.h
        h.body_unread = False
        h.close_connection = True
        c.lingering = True
        with contextlib.suppress(OSError):
            c.sock.shutdown(socket.SHUT_WR)
        h.conn.linger(LINGER_MAX_BYTES, LINGER_TIMEOUT_S)
        self._set(c, READING)
        self._arm(c)

    def _late_job(self, c: _Conn) -> None:
        if c.kind == _SERVE:
            self._busy(c, f"no thread of this model's worker was free within {self.queue_wait_s:g} s; retry")
        else:
            self._close(c)

    def _busy(self, c: _Conn, why: str) -> None:
        """503 ``busy`` without blocking (the request was read in full); the connection goes on."""
        h, req = c.h, c.req
        self._release(c)
        resp = error_response(503, errors.BUSY, why, (("Retry-After", str(RETRY_AFTER_S)),))
        body = resp.body if isinstance(resp.body, bytes) else b"".join(resp.body)
        close = h.close_connection or bool(h.conn.buf)
        data = reply_head(503, h._app.server_header, resp.content_type, len(body), resp.headers, close,
                          req is not None and req.version == "1.0" and not close) + body
        try:
            sent = os.write(c.fd, data)
        except OSError:
            sent = -1
        if sent != len(data) or close:
            self._close(c)
            return
        c.req, c.body = None, b""
        self._idle(c)

    # -- connection table ----------------------------------------------------------------------
    def _set(self, c: _Conn, state: int) -> None:
        slots = self._owner.slots
        if slots is not None:
            slots.set(c.slot, state)

    def _idle(self, c: _Conn) -> None:
        """Between requests, answered in full (a crash from here on loses nothing): into epoll."""
        self._set(c, IDLE)
        c.since = time.monotonic()
        self._arm(c)

    def _arm(self, c: _Conn, event: int = select.EPOLLIN) -> None:
        c.armed = True
        with contextlib.suppress(OSError, ValueError):
            self._ep.modify(c.fd, event | select.EPOLLONESHOT)

    def _release(self, c: _Conn) -> None:
        if c.need:
            self._owner.app.body_budget.release(c.need)
            c.need = 0

    def _forget(self, c: _Conn) -> None:
        c.armed = False
        self._release(c)
        self._conns.pop(c.fd, None)
        with contextlib.suppress(OSError, ValueError):
            self._ep.unregister(c.fd)  # before close: the daemon's copy keeps the description open

    def _close(self, c: _Conn) -> None:
        self._forget(c)
        with contextlib.suppress(OSError):
            c.sock.shutdown(socket.SHUT_WR)
        with contextlib.suppress(OSError):
            self._owner.done(c.slot)
        c.sock.close()

    def _give_back(self, c: _Conn, unread: bytes) -> None:
        self._forget(c)
        if self._owner.give_back(c.slot, c.sock, unread):
            c.sock.close()
        else:
            self._close(c)

