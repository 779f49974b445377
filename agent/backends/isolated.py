"""A LoadedModel that runs in its own worker process (backends.isolation = "process").

Invariants:
- A crash of the native runtime ends the worker, never the daemon: calls in flight fail with
  ``worker_crashed`` and the model reports ``alive == False``.
- A call that does not answer within ``infer_timeout_s`` kills the worker (``worker_hung``):
  a hung runtime holds no daemon thread for longer than that.
- At most ``channels`` calls run at once; more wait for a free channel (bounded by the timeout).
- The worker dies with the daemon (pipe EOF, and a parent watch for stuck calls): no orphans after a SIGKILL.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import queue
import select
import sys
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import errors
from agent.backends.base import LoadOptions, check_inputs

if TYPE_CHECKING:
    import numpy as np

    from agent.bundles.manifest import TensorSpec

log = logging.getLogger(__name__)

START_TIMEOUT_S = 120.0  # interpreter start + runtime import + model load (TensorRT builds take long)
DEFAULT_INFER_TIMEOUT_S = 30.0
DEFAULT_CHANNELS = 2
KILL_WAIT_S = 2.0
WORKER_CRASHED = errors.WORKER_CRASHED
WORKER_HUNG = errors.WORKER_HUNG


_MAIN_SWAP = threading.Lock()


@contextlib.contextmanager
def _bare_main() -> Iterator[None]:
    """While a worker is spawned, ``__main__`` is a bare module.

    "spawn" re-runs the parent's main module in the child: for the ``edge-agent`` script (or
    ``python -m agent``) that imports the daemon's whole stack (paho, cryptography, SQLite,
    prometheus-client), ~12 MB of RSS in every worker that only needs its runtime.
    """
    with _MAIN_SWAP:
        main = sys.modules["__main__"]
        sys.modules["__main__"] = types.ModuleType("__main__")
        try:
            yield
        finally:
            sys.modules["__main__"] = main


class IsolatedModel:
    """Proxy to a model loaded in a child process."""

    def __init__(self, runtime: str, target: str, path: Path, options: LoadOptions,
                 channels: int = DEFAULT_CHANNELS, infer_timeout_s: float = DEFAULT_INFER_TIMEOUT_S,
                 start_timeout_s: float = START_TIMEOUT_S) -> None:
        from agent.serving.worker import worker_main

        ctx = multiprocessing.get_context("spawn")
        pairs = [ctx.Pipe(duplex=True) for _ in range(max(1, channels))]
        self.infer_timeout_s = infer_timeout_s
        self.death: str = ""
        self._lock = threading.Lock()
        self._proc = ctx.Process(target=worker_main, name=f"edge-agent-worker:{path.name}",
                                 args=([c for _, c in pairs], runtime, target, str(path), options.threads,
                                       options.allow_spinning, options.extra), daemon=True)
        t0 = time.monotonic()
        with _bare_main():
            self._proc.start()
        for _, child in pairs:
            child.close()
        self._conns = [p for p, _ in pairs]
        # One poll object per channel, made once: Connection.poll() builds a selector on every
        # call, ~65 µs of a ~160 µs round trip on a 2-core VM (docs/benchmarks.md).
        self._pollers: dict[int, Any] = {}
        for c in self._conns:
            po = select.poll()
            po.register(c.fileno(), select.POLLIN | select.POLLHUP | select.POLLERR)
            self._pollers[id(c)] = po
        first = self._conns[0]
        try:
            if not first.poll(start_timeout_s):
                self._kill()
                raise errors.RejectError(errors.LOAD_FAILED, f"{path.name}: worker did not load the model within {start_timeout_s:.0f} s")
            hello = first.recv()
        except (EOFError, OSError) as e:
            self._proc.join(KILL_WAIT_S)
            raise errors.RejectError(errors.LOAD_FAILED,
                                     f"{path.name}: worker died while loading (exit code {self._proc.exitcode})") from e
        if hello[0] != "ready":
            self._kill()
            raise errors.RejectError(hello[1], hello[2])
        _, self.backend_id, inputs, outputs, self.pid = hello
        self.inputs: tuple[TensorSpec, ...] = inputs
        self.outputs: tuple[TensorSpec, ...] = outputs
        self.start_s = time.monotonic() - t0
        self._free: queue.Queue[Any] = queue.Queue()
        for c in self._conns:
            self._free.put(c)

    @property
    def alive(self) -> bool:
        return not self.death and self._proc.is_alive()

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = check_inputs(self.inputs, inputs)
        if self.death:
            raise errors.RetryableError(WORKER_CRASHED if "crash" in self.death else WORKER_HUNG, self.death)
        try:
            conn = self._free.get(timeout=self.infer_timeout_s)
        except queue.Empty as e:
            raise errors.RetryableError(errors.TIMEOUT, f"no free worker channel within {self.infer_timeout_s:.0f} s") from e
        healthy = False
        try:
            conn.send(feed)
            if not self._pollers[id(conn)].poll(self.infer_timeout_s * 1000):
                self._mark_dead(f"worker {self.pid} hung: no answer within {self.infer_timeout_s:.1f} s; killed")
                raise errors.RetryableError(WORKER_HUNG, self.death)
            reply = conn.recv()
            healthy = True
        except (EOFError, OSError, BrokenPipeError) as e:
            self._proc.join(0.2)
            self._mark_dead(f"worker {self.pid} crashed (exit code {self._proc.exitcode})")
            raise errors.RetryableError(WORKER_CRASHED, self.death) from e
        finally:
            if healthy:
                self._free.put(conn)
        if reply[0] == "ok":
            out: dict[str, np.ndarray] = reply[1]
            return out
        if reply[1] == errors.INVALID_INPUT:
            raise errors.RejectError(reply[1], reply[2])
        raise errors.RetryableError(reply[1], reply[2])

    def _mark_dead(self, why: str) -> None:
        with self._lock:
            if not self.death:
                self.death = why
                log.error("%s (%s)", why, self.backend_id)
        self._kill()

    def _kill(self) -> None:
        if self._proc.is_alive():
            self._proc.kill()
        self._proc.join(KILL_WAIT_S)

    def close(self) -> None:
        for c in self._conns:
            with contextlib.suppress(OSError, ValueError):
                c.send(None)
            c.close()
        self._proc.join(KILL_WAIT_S)
        if self._proc.is_alive():
            self._kill()
