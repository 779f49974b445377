"""Worker side of process isolation's direct path: infer requests answered inside the worker.

Why: with the model in a worker process, a request that the daemon answers through the worker's
pipe pays two cross-process wake-ups and a pickle each way (≈ 0.2 ms on a 2-core board, more than
the whole HTTP exchange). Instead the daemon parses a request's head, sees an infer for a model
that runs in a worker, and hands the connection over (its descriptor over the worker's control
socket, with the bytes already read). The worker answers that request and the ones that follow on
the connection with the daemon's own handler and routes (agent/serving/handler.py, routes.py), in one process, on
a bounded set of threads whatever the number of connections (agent/serving/connpool.py).

Invariants:
- The worker serves only ``POST …/infer`` of its own model and version; any other request is
  given back to the daemon unparsed (the raw head and any bytes read ahead), as is every
  connection when the daemon retires the worker (a swap): at a request boundary, so a request
  is answered by exactly one version and never cut.
- Each connection has a slot in a table shared with the daemon (agent/backends/isolated.py) that
  says whether a request is in flight and since when: if the worker dies or hangs, the daemon
  takes idle connections over untouched and answers in-flight ones with an error. A request read
  in full and waiting for a thread is ``QUEUED``: the worker answers it 503 ``busy`` itself after
  the model's ``queue_wait_s``, so the daemon's hung rule for it allows that much more.
- Calls, errors and latencies reach the daemon's probation and telemetry every
  ``STATS_INTERVAL_S``, before the worker acknowledges a retire, and once more when it exits, so a
  stop or swap right after a call still counts it; the sample buffer is bounded.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from array import array
from typing import TYPE_CHECKING, Any

from agent.backends.base import LoadedModel
from agent.backends.wire import (
    BACK,
    CTL_MAX_BYTES,
    INFER,
    READING,
    Adopt,
    Back,
    CtlMessage,
    Done,
    Retire,
    Retired,
    Serve,
    SlotTable,
    Stats,
    recv_ctl,
    send_ctl,
)
from agent.serving.connpool import ConnPool
from agent.serving.guard import ApiPolicy
from agent.serving.kserve import KServeServer

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

STATS_INTERVAL_S = 0.25  # how often calls/errors/latencies go to the daemon
MAX_STATS_SAMPLES = 16384  # latency samples kept per interval; more are counted, not timed
MAX_STATS_SHAPES = 64  # newly computable input shapes reported per interval (the rest are dropped)
MAX_ANSWERING_THREADS = 32  # threads answering requests at once per worker, whatever backends.max_inflight says


class _SlotMarking:
    """The model, with each runtime call marked INFER in the connection's slot: the daemon's
    hung-worker deadline covers the runtime call only, not reading or decoding the request."""

    def __init__(self, model: LoadedModel, owner: Adopted) -> None:
        self._model = model
        self._owner = owner
        self.backend_id = model.backend_id
        self.inputs = model.inputs
        self.outputs = model.outputs
        self.details = model.details
        self.known_shapes = model.known_shapes

    def close(self) -> None:
        self._model.close()

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        owner = self._owner
        slot = getattr(owner.local, "slot", None)
        slots = owner.slots
        if slot is None or slots is None:
            return self._model.infer(inputs)
        slots.set(slot, INFER)
        try:
            return self._model.infer(inputs)
        finally:
            slots.set(slot, READING)


class Adopted:
    """Connections the daemon handed to this worker, and the control channel they come on."""

    def __init__(self, model: LoadedModel, ctl: socket.socket) -> None:
        self.model = model
        self.ctl = ctl
        self.slots: SlotTable | None = None
        self.app: KServeServer | None = None
        self.pool: ConnPool | None = None
        self.name = ""
        self.version = ""
        self.retiring = False
        self._sv: Any = None
        self._reg: Any = None
        self.local = threading.local()  # the slot of the request this thread serves
        self._wake_r, self._wake_w = os.pipe()
        self._lock = threading.Lock()
        self._ok = array("d")
        self._bad = array("d")
        self._untimed = 0
        self._sent = (0, 0)
        self._flush_lock = threading.Lock()  # the periodic flush, a retire and the exit send in turn

    # -- control channel (one thread) ------------------------------------------------------------
    def run(self) -> None:
        """Serve control messages until the daemon closes the channel."""
        while True:
            try:
                msg, fds = recv_ctl(self.ctl)
            except OSError:
                return
            if msg is None:
                return
            self.handle(msg, fds)

    def handle(self, msg: CtlMessage, fds: list[int]) -> None:
        if isinstance(msg, Serve):
            self._start_serving(msg, fds.pop(0))
        elif isinstance(msg, Adopt):
            sock = socket.socket(fileno=fds.pop(0))
            if self.pool is None:
                sock.close()
            else:
                self.pool.add(sock, msg.slot, msg.prefix)
        elif isinstance(msg, Retire):
            self.retiring = True
            os.write(self._wake_w, b"r")  # never drained: the pool gives idle connections back
            self.flush_stats()  # before the acknowledgement: the daemon has every call answered so far
            send_ctl(self.ctl, Retired())
        for fd in fds:
            os.close(fd)

    def _start_serving(self, msg: Serve, slots_fd: int) -> None:
        from agent.serving.admission import Limits
        from agent.serving.registry import Registry, ServingVersion

        name, version, serving = msg.name, msg.version, msg.serving
        policy = msg.policy if isinstance(msg.policy, ApiPolicy) else ApiPolicy()
        self.slots = SlotTable(slots_fd, msg.n_slots)
        os.close(slots_fd)
        limits = Limits(**serving.get("limits", {}))
        reg = Registry(observer=self._observe, limits=limits)
        reg.shapes.add(name, serving.get("shapes", ()))  # computable shapes the daemon knows of
        self._sv = ServingVersion(name, int(version), "", _SlotMarking(self.model, self))
        self._reg = reg
        reg.activate(self._sv)
        self.app = KServeServer(reg, max_body_bytes=msg.max_body, server_name=msg.server_name,
                                server_version=msg.server_version, policy=policy)
        self.name, self.version = name, str(version)
        # One thread reads, the others answer: as many as the model's calls in flight (admission
        # would hold back any more), so that concurrent requests still share a dynamic batch.
        answering = max(1, min(limits.max_inflight, MAX_ANSWERING_THREADS))
        self.pool = ConnPool(self, answering + 1, limits.max_queue, limits.queue_wait_s, self._wake_r)
        threading.Thread(target=self._flush_loop, name="stats", daemon=True).start()

    def serves(self, name: str, version: str | None) -> bool:
        return name == self.name and (version is None or version == self.version)

    # -- connections (agent/serving/connpool.py calls these) ----------------------------------
    def give_back(self, slot: int, sock: socket.socket, unread: bytes) -> bool:
        assert self.slots is not None
        if len(unread) > CTL_MAX_BYTES - 1024:
            return False  # too much read ahead to send back: the connection closes instead
        self.slots.set(slot, BACK)
        try:
            send_ctl(self.ctl, Back(slot, unread), sock.fileno())
        except OSError:
            return False
        return True

    def done(self, slot: int) -> None:
        """The worker closed the connection in ``slot``."""
        send_ctl(self.ctl, Done(slot))

    # -- statistics ----------------------------------------------------------------------------
    def _observe(self, name: str, version: int, backend: str, latency_s: float, ok: bool) -> None:
        with self._lock:
            buf = self._ok if ok else self._bad
            if len(self._ok) + len(self._bad) < MAX_STATS_SAMPLES:
                buf.append(latency_s)
            else:
                self._untimed += 1

    def _flush_loop(self) -> None:
        while True:
            time.sleep(STATS_INTERVAL_S)
            try:
                self.flush_stats()
            except OSError:
                return

    def flush_stats(self) -> None:
        """Send the calls, errors and latencies since the last flush to the daemon (if any)."""
        sv = self._sv
        if sv is None:
            return
        with self._flush_lock:
            with self._lock:
                ok, bad, self._ok, self._bad = self._ok, self._bad, array("d"), array("d")
                self._untimed = 0
            calls, errs = sv.calls, sv.errors
            dc, de = calls - self._sent[0], errs - self._sent[1]
            shapes = [k for _, k in self._reg.shapes.fresh()][:MAX_STATS_SHAPES]
            if not (dc or de or ok or bad or shapes):
                return
            self._sent = (calls, errs)
            send_ctl(self.ctl, Stats(dc, de, ok.tobytes(), bad.tobytes(), tuple(shapes)))


def serve_adopted(model: LoadedModel, ctl: socket.socket, first: CtlMessage, fds: list[int],
                  owners: list[Adopted]) -> None:
    """Take over a worker's control socket at its first message (agent/serving/worker.py); the
    owner goes into ``owners`` so that the worker can flush its statistics when it exits."""
    owner = Adopted(model, ctl)
    owners.append(owner)
    owner.handle(first, fds)
    owner.run()
