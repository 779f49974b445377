"""A LoadedModel that runs in its own worker process (backends.isolation = "process").

Invariants:
- A crash of the native runtime ends the worker, never the daemon: calls in flight fail with
  ``worker_crashed`` and the model reports ``alive == False``.
- A call that does not answer within ``infer_timeout_s`` kills the worker (``worker_hung``):
  a hung runtime holds no daemon thread for longer than that.
- At most ``channels`` pipe calls run at once; more wait for a free channel (bounded by the timeout).
- HTTP connections handed to the worker (``adopt``; agent/serving/adopted.py) are at most
  ``MAX_ADOPTED``. The daemon keeps its copy of each socket and a shared slot table says what
  each connection is doing: when the worker dies or hangs (a request pending or in the runtime
  longer than ``infer_timeout_s``, or queued for a worker thread longer than the model's
  ``queue_wait_s`` plus that), idle connections go back to the daemon untouched and the ones
  with a request in flight are answered with the error.
- The worker dies with the daemon (pipe EOF, and a parent watch for stuck calls): no orphans after
  a SIGKILL. It is a plain child process on socket pairs, not ``multiprocessing``: no resource
  tracker process rides along (≈ 15 MB RSS).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import queue
import select
import socket
import subprocess
import sys
import threading
import time
from array import array
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import errors
from agent.backends.base import LoadOptions, Sink, check_inputs
from agent.backends.wire import (  # noqa: F401 (the worker side imports these from here)
    BACK,
    CTL_MAX_BYTES,
    FREE,
    IDLE,
    INFER,
    PENDING,
    QUEUED,
    READING,
    WRITING,
    Adopt,
    Back,
    Channel,
    CtlMessage,
    DeathReason,
    Done,
    Err,
    Golden,
    Load,
    Ok,
    Preload,
    Ready,
    Retire,
    Retired,
    Serve,
    SlotTable,
    Stats,
    queue_wait_s,
    recv_ctl,
    send_ctl,
)

if TYPE_CHECKING:
    import numpy as np

    from agent.bundles.manifest import TensorSpec

log = logging.getLogger(__name__)

START_TIMEOUT_S = 120.0  # interpreter start + runtime import + model load (TensorRT builds take long)
DEFAULT_INFER_TIMEOUT_S = 30.0
DEFAULT_CHANNELS = 2
KILL_WAIT_S = 2.0
MONITOR_TICK_S = 0.1  # how often adopted connections are checked for a hung request
MAX_ADOPTED = 128  # connections one worker serves itself; beyond that the daemon relays by pipe
CTL_SNDBUF_BYTES = 1024 * 1024
CTL_SEND_TIMEOUT_S = 1.0  # a worker that does not take a message within this is not handed more
WORKER_CRASHED = errors.WORKER_CRASHED
WORKER_HUNG = errors.WORKER_HUNG


def _unsent(sock: socket.socket) -> int:
    """Bytes written to a TCP socket and not yet acknowledged by the peer (-1 if unknown)."""
    import fcntl
    import termios

    try:
        buf = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except (OSError, ValueError):
        return -1
    return int.from_bytes(buf, sys.byteorder, signed=True)


def _worker_command(fds: list[int]) -> list[str]:
    """The worker imports the very ``agent`` package the daemon runs, whatever the cwd or path."""
    import agent

    root = str(Path(agent.__file__).resolve().parent.parent)
    code = "import sys; sys.path.insert(0, sys.argv[1]); from agent.serving.worker import main; main(sys.argv[2])"
    return [sys.executable, "-c", code, root, ",".join(map(str, fds))]


_CLAIM_LOCK = threading.Lock()


class Spare:
    """A worker started ahead of its model: the interpreter is up and the runtime imported while
    the bundle still downloads (``IsolatedModel(..., spare=)`` then only loads). ``close()`` ends
    it when it is not used."""

    def __init__(self, runtime: str, channels: int = DEFAULT_CHANNELS) -> None:
        self.runtime = runtime
        pairs = [socket.socketpair() for _ in range(max(1, channels))]
        ctl, ctl_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for s in (ctl, ctl_child):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, CTL_SNDBUF_BYTES)
        child_fds = [child.fileno() for _, child in pairs] + [ctl_child.fileno()]
        self.t0 = time.monotonic()
        try:
            self.proc = subprocess.Popen(_worker_command(child_fds), pass_fds=child_fds,
                                         stdin=subprocess.DEVNULL, close_fds=True)
        except OSError:
            for p, _ in pairs:
                p.close()
            ctl.close()
            raise
        finally:
            for _, child in pairs:
                child.close()
            ctl_child.close()
        self.conns = [Channel(p) for p, _ in pairs]
        self.ctl = ctl
        self.claimed = False  # promised to one load (claim())
        self.owned = False  # its process and sockets belong to a model, or are closed

    def preload(self) -> Spare:
        with contextlib.suppress(OSError):
            self.conns[0].send(Preload(self.runtime))
        return self

    def claim(self) -> bool:
        """Reserve this worker for one load; False when another load has it."""
        with _CLAIM_LOCK:
            if self.claimed:
                return False
            self.claimed = True
            return True

    def kill(self) -> None:
        """Kill the worker now, claimed or not: a load into it that outlived its deploy step's
        deadline then fails at once (the step ends ``TIMED_OUT``)."""
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.proc.kill()

    def close(self) -> None:
        """End the worker unless a model took it over."""
        if self.owned:
            return
        self.owned = True
        for c in self.conns:
            with contextlib.suppress(OSError, ValueError):
                c.send(None)
            c.close()
        self.ctl.close()
        try:
            self.proc.wait(KILL_WAIT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(KILL_WAIT_S)


def prestart(runtime: str) -> Spare | None:
    """Start a worker for ``runtime`` now, to load a model into later; None if it cannot start."""
    try:
        return Spare(runtime).preload()
    except OSError as e:
        log.debug("cannot start a worker ahead: %s", e)
        return None


class IsolatedModel:
    """Proxy to a model loaded in a child process."""

    def __init__(self, runtime: str, target: str, path: Path, options: LoadOptions,
                 channels: int = DEFAULT_CHANNELS, infer_timeout_s: float = DEFAULT_INFER_TIMEOUT_S,
                 start_timeout_s: float = START_TIMEOUT_S, spare: Spare | None = None) -> None:
        self.infer_timeout_s = infer_timeout_s
        self.backend_id: str = f"{runtime}:{target}"  # the worker's own word once it has loaded
        self.death: str = ""  # what happened, for logs and events ("" while the worker lives)
        self.death_reason: DeathReason | None = None  # why: what calls and connections end with
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        if spare is not None and (spare.owned or spare.runtime != runtime or spare.proc.poll() is not None
                                  or len(spare.conns) != max(1, channels)):
            spare.close()
            spare = None
        if spare is None:
            try:
                spare = Spare(runtime, channels)
            except OSError as e:
                raise errors.RejectError(errors.LOAD_FAILED, f"{path.name}: cannot start a worker: {e}") from e
        spare.owned = True
        t0 = spare.t0
        self._proc = spare.proc
        ctl = spare.ctl
        self.pid: int = self._proc.pid
        self._conns = spare.conns
        self._ctl = ctl
        # One poll object per channel, made once (a poll object per call costs a few µs).
        self._pollers: dict[int, Any] = {}
        for c in self._conns:
            po = select.poll()
            po.register(c.fileno(), select.POLLIN | select.POLLHUP | select.POLLERR)
            self._pollers[id(c)] = po
        first = self._conns[0]
        try:
            first.send(Load(runtime, target, str(path), options.threads, options.allow_spinning, options.extra))
            if not first.poll(start_timeout_s):
                self._kill()
                raise errors.RejectError(errors.LOAD_FAILED, f"{path.name}: worker did not load the model within {start_timeout_s:.0f} s")
            hello = first.recv()
        except (EOFError, OSError) as e:
            self._wait(KILL_WAIT_S)
            self._close_channels()
            raise errors.RejectError(errors.LOAD_FAILED,
                                     f"{path.name}: worker died while loading (exit code {self._proc.returncode})") from e
        if not isinstance(hello, Ready):
            self._kill()
            self._close_channels()
            if isinstance(hello, Err):
                raise errors.RejectError(hello.code, hello.message)
            raise errors.RejectError(errors.LOAD_FAILED, f"{path.name}: worker answered {type(hello).__name__}")
        self.backend_id = hello.backend_id
        self.details: dict[str, Any] = dict(hello.details)
        self.inputs: tuple[TensorSpec, ...] = hello.inputs
        self.outputs: tuple[TensorSpec, ...] = hello.outputs
        self.start_s = time.monotonic() - t0
        self._free: queue.Queue[Any] = queue.Queue()
        for c in self._conns:
            self._free.put(c)
        # adopted connections
        ctl.settimeout(CTL_SEND_TIMEOUT_S)
        self._slots, self._slots_fd = SlotTable.create(MAX_ADOPTED)
        self._held: dict[int, tuple[socket.socket, bytes, Any]] = {}
        self._free_slots = list(range(MAX_ADOPTED - 1, -1, -1))
        self._bound: tuple[str, int, Sink, dict[str, Any]] | None = None
        self.known_shapes: list[Any] = []  # input shapes its golden samples ran with
        self._serving_sent = False
        self._closing = False  # no more adoptions
        self._retired = False
        self._closed = False
        self._retire_ack = threading.Event()
        try:  # readable when the worker exits (Linux 5.3+); older kernels: polled every tick
            self._pidfd = os.pidfd_open(self.pid)
        except (OSError, AttributeError):
            self._pidfd = -1
        self._monitor = threading.Thread(target=self._watch, name=f"worker-{self.pid}", daemon=True)
        self._monitor.start()

    @property
    def alive(self) -> bool:
        return not self.death and self._proc.poll() is None

    def rss_bytes(self) -> int:
        """The worker's resident memory (0 when unknown): its memory ceiling is checked on this."""
        import psutil  # here: the daemon asks, the worker (which imports this module) never does

        try:
            return int(psutil.Process(self.pid).memory_info().rss)
        except (psutil.Error, OSError):
            return 0

    # -- calls through the pipe (validation, agentctl, requests the daemon answers itself) -------
    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = check_inputs(self.inputs, inputs)
        reply = self._call(feed, self.infer_timeout_s)
        if isinstance(reply, Ok):
            out: dict[str, np.ndarray] = reply.result
            return out
        if reply.code == errors.INVALID_INPUT:
            raise errors.RejectError(reply.code, reply.message)
        raise errors.RetryableError(reply.code, reply.message)

    def golden(self, inputs: Path, expected: Path, rtol: float, atol: float, plan: Any) -> dict[str, Any]:
        """Golden-sample check and timings run inside the worker (agent/backends/golden.py): the
        samples never enter the daemon. Bounded by ``plan.bound_s(infer_timeout_s)``."""
        reply = self._call(Golden(str(inputs), str(expected), rtol, atol, plan.to_dict()),
                           plan.bound_s(self.infer_timeout_s))
        if isinstance(reply, Ok):
            result: dict[str, Any] = reply.result
            self.known_shapes = result.get("input_shapes", [])  # agent/serving/admission.py
            return result
        if reply.code in (errors.VALIDATION_FAILED, errors.INVALID_INPUT):
            raise errors.RejectError(reply.code, reply.message)
        raise errors.RetryableError(reply.code, reply.message)

    def _call(self, msg: Any, timeout_s: float) -> Ok | Err:
        """One request on a free pipe; a worker that does not answer within ``timeout_s`` is hung."""
        reason = self.death_reason
        if reason is not None:
            raise errors.RetryableError(reason.code, self.death)
        try:
            conn = self._free.get(timeout=self.infer_timeout_s)
        except queue.Empty as e:
            raise errors.RetryableError(errors.TIMEOUT, f"no free worker channel within {self.infer_timeout_s:.0f} s") from e
        healthy = False
        try:
            conn.send(msg)
            if not self._pollers[id(conn)].poll(timeout_s * 1000):
                self._mark_dead(DeathReason.HUNG, f"worker {self.pid} hung: no answer within {timeout_s:.1f} s; killed")
                raise errors.RetryableError(WORKER_HUNG, self.death)
            reply: Ok | Err = conn.recv()
            healthy = True
        except (EOFError, OSError, BrokenPipeError) as e:
            self._wait(0.2)
            self._mark_dead(DeathReason.CRASHED, f"worker {self.pid} crashed (exit code {self._proc.returncode})")
            raise errors.RetryableError(WORKER_CRASHED, self.death) from e
        finally:
            if healthy:
                self._free.put(conn)
        return reply

    # -- connections the worker serves itself ---------------------------------------------------
    def bind(self, name: str, version: int, sink: Sink, serving: dict[str, Any] | None = None) -> None:
        """Called when this version serves: what it is called, where its statistics go, and
        ``serving``: its admission limits and known shapes (agent/serving/admission.py)."""
        self._bound = (name, version, sink, serving or {})

    def adopt(self, sock: socket.socket, prefix: bytes, host: Any) -> bool:
        """Hand an HTTP connection whose next request (``prefix``: its head, read already) is an
        infer for this model to the worker. ``host`` (the KServe server) gets it back later:
        ``resume_connection`` / ``fail_connection``. False when the worker cannot take it."""
        if len(prefix) > CTL_MAX_BYTES - 1024:
            return False
        with self._lock:
            if self.death or self._closing or self._bound is None or not self._free_slots:
                return False
            slot = self._free_slots.pop()
            self._slots.set(slot, PENDING)
            self._held[slot] = (sock, prefix, host)
        try:
            with self._send_lock:
                if not self._serving_sent:
                    name, version, _, serving = self._bound
                    send_ctl(self._ctl, Serve(name, version, MAX_ADOPTED, host.max_body_bytes,
                                              host.server_name, host.server_version, host.policy, serving),
                             self._slots_fd)
                    self._serving_sent = True
                send_ctl(self._ctl, Adopt(slot, prefix), sock.fileno())
        except OSError as e:
            log.debug("worker %d: cannot hand a connection over: %s", self.pid, e)
            self._release(slot)
            return False
        return True

    def _release(self, slot: int) -> tuple[socket.socket, bytes, Any] | None:
        with self._lock:
            entry = self._held.pop(slot, None)
            if entry is not None:
                self._slots.set(slot, FREE)
                self._free_slots.append(slot)
            if not self._held:
                self._idle.notify_all()
        return entry

    def _watch(self) -> None:
        """Monitor thread: control messages from the worker, hung requests, the worker's exit."""
        po = select.poll()
        po.register(self._ctl, select.POLLIN)
        if self._pidfd >= 0:
            po.register(self._pidfd, select.POLLIN)
        suspect: dict[int, tuple[socket.socket, int, int]] = {}
        while True:
            events = po.poll(MONITOR_TICK_S * 1000)
            if self._pidfd < 0 and self._proc.poll() is not None:
                events = [*events, (self._pidfd, select.POLLIN)]
            for fd, ev in events:
                if fd == self._pidfd:
                    self._on_exit()
                    return
                if ev & select.POLLIN:
                    self._read_ctl()
                else:  # the worker closed its end: it is on its way out
                    po.unregister(self._ctl)
            if self._held and not self.death:
                self._check_hung(suspect)

    def _read_ctl(self) -> None:
        try:
            got = recv_ctl(self._ctl)
        except (OSError, pickle.PickleError, EOFError):
            return
        self._on_ctl(*got)

    def _on_ctl(self, msg: CtlMessage | None, fds: list[int]) -> None:
        if isinstance(msg, Stats):
            bound = self._bound
            if bound is not None:
                ok, bad = array("d"), array("d")
                ok.frombytes(msg.ok)
                bad.frombytes(msg.bad)
                bound[2](msg.calls, msg.errors, ok, bad, msg.shapes)
        elif isinstance(msg, Retired):
            self._retire_ack.set()
        elif isinstance(msg, (Back, Done)):
            entry = self._release(msg.slot)
            if entry is not None:
                entry[0].close()  # the daemon's copy; a given-back connection comes with a fresh one
                if isinstance(msg, Back) and fds:
                    entry[2].resume_connection(socket.socket(fileno=fds.pop(0)), msg.unread)
        for fd in fds:
            os.close(fd)

    def _check_hung(self, suspect: dict[int, tuple[socket.socket, int, int]]) -> None:
        """A request pending, in the runtime, or waiting unread on an idle connection for longer
        than ``infer_timeout_s`` means a hung worker (each seen twice, so no torn read counts).

        ``suspect`` holds, per slot, the connection, the slot's own time stamp when last seen and
        since when it is suspect: key ``i`` for a request pending or in the runtime, ``-1 - i`` for
        bytes waiting unread. An entry counts only for the very connection it was made for, and
        only while the worker has not moved the slot on: slots are reused (last freed, first
        taken), and a stamp left by an earlier connection or request would make a new one look
        hung at once."""
        limit_ns = int(self.infer_timeout_s * 1e9)
        queued_ns = limit_ns + int(queue_wait_s(self._bound[3] if self._bound else {}) * 1e9)  # ``busy`` before
        now = time.monotonic_ns()
        with self._lock:
            held = {slot: entry[0] for slot, entry in self._held.items()}
        for k in [k for k, (sock, _, _) in suspect.items() if held.get(k if k >= 0 else -1 - k) is not sock]:
            del suspect[k]  # released, or the slot serves another connection now
        idle: dict[int, int] = {}
        for slot, sock in held.items():
            state, since = self._slots.get(slot)
            if state == IDLE or (state == WRITING and _unsent(sock) == 0):
                with contextlib.suppress(OSError, ValueError):  # nothing for the worker to wait on
                    idle[sock.fileno()] = slot
                suspect.pop(slot, None)
                continue
            suspect.pop(-1 - slot, None)  # the worker is at it: nothing waits unread
            if state not in (PENDING, INFER, QUEUED):
                suspect.pop(slot, None)
                continue
            if now - since > (queued_ns if state == QUEUED else limit_ns) and suspect.get(slot) == (sock, since, since):
                what = {PENDING: "a handed-over request was not taken", QUEUED: "a queued request was not answered"
                        }.get(state, "a request got no answer")
                self._mark_dead(DeathReason.HUNG,
                                f"worker {self.pid} hung: {what} within {self.infer_timeout_s:.1f} s; killed")
                return
            suspect[slot] = (sock, since, since)
        if idle:  # bytes waiting on a connection the worker should be reading
            po = select.poll()
            for fd in idle:
                po.register(fd, select.POLLIN)
            waiting = {idle[fd] for fd, _ in po.poll(0)}
            for slot in idle.values():
                key = -1 - slot  # its own entry: since when bytes wait unread
                since = self._slots.get(slot)[1]
                seen = suspect.get(key)
                if slot not in waiting:
                    suspect.pop(key, None)
                elif seen is None or seen[1] != since:  # new, or the worker moved on in between
                    suspect[key] = (held[slot], since, now)
                elif now - seen[2] > limit_ns:
                    self._mark_dead(DeathReason.HUNG, f"worker {self.pid} hung: a request waited unread for "
                                                      f"{self.infer_timeout_s:.1f} s; killed")
                    return

    def _on_exit(self) -> None:
        """The worker is gone: settle every connection it held."""
        with contextlib.suppress(OSError):
            self._ctl.setblocking(False)
            while True:  # what it sent before it went (given-back connections, statistics)
                try:
                    msg, fds = recv_ctl(self._ctl)
                except (BlockingIOError, pickle.PickleError, EOFError):
                    break
                if msg is None:
                    break
                self._on_ctl(msg, fds)
        self._wait(KILL_WAIT_S)
        if not self._closed:
            self._mark_dead(DeathReason.CRASHED, f"worker {self.pid} crashed (exit code {self._proc.returncode})")
        why = self.death or "model version retired with a request in flight"
        code = (self.death_reason or DeathReason.RETIRED).code
        with self._lock:
            held = list(self._held)
        for slot in held:
            state, _ = self._slots.get(slot)
            entry = self._release(slot)
            if entry is None:
                continue
            sock, prefix, host = entry
            try:
                if state == PENDING:  # the worker never touched it: the request goes on in the daemon
                    host.resume_connection(sock.dup(), prefix)
                elif state == IDLE:  # between requests: the daemon takes the connection over
                    host.resume_connection(sock.dup(), b"")
                elif state in (READING, INFER, QUEUED):
                    host.fail_connection(sock.dup(), code, why)
                else:  # part of a response may be out: end the connection
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            finally:
                sock.close()

    # -- lifecycle ------------------------------------------------------------------------------
    def _mark_dead(self, reason: DeathReason, why: str) -> None:
        with self._lock:
            if self.death_reason is None:
                self.death_reason = reason
                self.death = why
                log.error("%s (%s)", why, self.backend_id)
        self._kill()

    def kill(self, why: str) -> None:
        """Kill the worker now (a call in flight fails at once): a validation that outlived its
        deploy step's deadline. Counted as hung."""
        self._mark_dead(DeathReason.HUNG, why)

    def _wait(self, timeout_s: float) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout_s)

    def _kill(self) -> None:
        if self._proc.poll() is None:
            with contextlib.suppress(OSError):
                self._proc.kill()
        self._wait(KILL_WAIT_S)

    def _close_channels(self) -> None:
        for c in self._conns:
            with contextlib.suppress(OSError, ValueError):
                c.send(None)
            c.close()
        self._ctl.close()

    def retire(self) -> None:
        """Stop serving connections (a newer version serves now): the worker gives each back at
        its next request boundary. Returns once the worker has taken note (bounded), so that a
        request sent after a swap reaches the new version."""
        with self._lock:
            if self._retired or self.death:
                return
            self._retired = True
            self._closing = True  # no more adoptions
            send = self._serving_sent
        if not send:
            return
        try:
            with self._send_lock:
                send_ctl(self._ctl, Retire())
        except OSError:
            return
        self._retire_ack.wait(CTL_SEND_TIMEOUT_S)

    def close(self) -> None:
        """Retire, wait for the connections to go back to the daemon (bounded by the call
        timeout), then end the worker (killed after ``KILL_WAIT_S``)."""
        self.retire()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._idle.wait_for(lambda: not self._held or bool(self.death),
                                timeout=self.infer_timeout_s + KILL_WAIT_S)
        for c in self._conns:
            with contextlib.suppress(OSError, ValueError):
                c.send(None)
        self._wait(KILL_WAIT_S)
        if self._proc.poll() is None:
            self._kill()
        self._monitor.join(KILL_WAIT_S + MONITOR_TICK_S)
        for c in self._conns:
            c.close()
        self._ctl.close()
        if self._pidfd >= 0:
            os.close(self._pidfd)
        os.close(self._slots_fd)
        self._slots.close()


if TYPE_CHECKING:
    from agent.backends.base import IsolatedCapable

    def _declares(m: IsolatedModel) -> IsolatedCapable:
        """mypy checks here that IsolatedModel offers every capability the protocol declares."""
        return m
