"""Model registry: which version of each model serves, with hot swap.

Invariants:
- Each model name has at most one serving version; a request is bound to one version from start
  to end (no response mixes versions).
- A swap never fails an in-flight request: the old version is closed only after its in-flight
  calls finished (or a bounded drain timeout passed).
- The registry holds loaded models only; what is installed and kept lives in the state database.
- Each call passes the model's admission (agent/serving/admission.py): size bound, in-flight and
  queue bounds. A failure the request caused is the caller's error and never counts in
  ``ServingVersion.errors`` (what probation judges).
- One lock, the registry's, guards the table, each version's in-flight gate and each model's
  admission counts (made with that lock on activation): a call binds to its version and takes
  its slot in one critical section, and gives both back in another.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from agent import errors
from agent.backends.base import InflightGate, IsolatedCapable, LoadedModel
from agent.serving import admission
from agent.serving.admission import CALLER_CODES, Admission, Limits, ShapeBook
from agent.serving.batcher import Batcher

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)
DRAIN_TIMEOUT_S = 30.0  # an old version waits this long for in-flight calls before closing anyway

_perf = time.perf_counter

LatencyObserver = Callable[[str, int, str, float, bool], None]


@dataclass
class ServingVersion:
    """A loaded version of a model."""

    name: str
    version: int
    variant: str
    model: LoadedModel
    manifest: dict[str, Any] = field(default_factory=dict)
    loaded_at: float = field(default_factory=time.time)
    gate: InflightGate | None = field(default=None, repr=False, compare=False)  # its calls in flight (made on activation)
    calls: int = 0
    errors: int = 0  # failures of the model itself (not bad requests): probation counts these
    size_check: admission.SizeCheck | None = None  # its inputs' bound (made on activation)
    admission_gate: Admission | None = field(default=None, repr=False, compare=False)  # its name's in-flight bound
    body_bound: int | None = None  # the largest request body worth reading (made on activation)
    batcher: Batcher | None = field(default=None, repr=False, compare=False)  # dynamic batching, when on
    # The model again when it runs in a worker process (IsolatedCapable), else None: asked once
    # here, not on every request.
    worker: IsolatedCapable | None = field(init=False, default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.worker = self.model if isinstance(self.model, IsolatedCapable) else None

    @property
    def alive(self) -> bool:
        """False once an isolated worker crashed or hung; in-process models are always alive."""
        return self.worker is None or self.worker.alive

    @property
    def backend(self) -> str:
        return self.model.backend_id

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "variant": self.variant,
                "backend": self.backend,
                "inputs": [t.to_dict() for t in self.model.inputs],
                "outputs": [t.to_dict() for t in self.model.outputs]}


class _Admitted(threading.local):
    """Per thread: the model whose in-flight slot the HTTP layer holds (``Registry.admit``)."""

    admitted: str | None = None


class HttpSlot:
    """``Registry.admit``: a model's in-flight slot held by the HTTP layer for one request (no
    slot for a model not serving: its call is refused)."""

    __slots__ = ("_gate", "_local", "_name")

    def __init__(self, gate: Admission | None, local: _Admitted, name: str) -> None:
        self._gate = gate
        self._local = local
        self._name = name

    def __enter__(self) -> None:
        if self._gate is not None:
            self._gate.enter()
            self._local.admitted = self._name

    def __exit__(self, *exc: object) -> None:
        if self._gate is not None:
            self._local.admitted = None
            self._gate.leave()


class Registry:
    """name → serving version; thread-safe."""

    def __init__(self, observer: LatencyObserver | None = None, limits: Limits | None = None) -> None:
        self._lock = threading.Lock()
        self._serving: dict[str, ServingVersion] = {}
        self._observer = observer
        self._draining: list[threading.Thread] = []
        self.limits = limits or Limits()
        self.shapes = ShapeBook()  # input shapes known to be computable, per model
        self._admission: dict[str, Admission] = {}
        self._local = _Admitted()  # the model whose slot this thread holds (admit())

    def set_observer(self, observer: LatencyObserver | None) -> None:
        self._observer = observer

    def get(self, name: str) -> ServingVersion | None:
        with self._lock:
            return self._serving.get(name)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._serving)

    def all(self) -> list[ServingVersion]:
        with self._lock:
            return [self._serving[n] for n in sorted(self._serving)]

    @staticmethod
    def _not_serving(name: str, version: int | None, sv: ServingVersion | None) -> errors.RejectError:
        if sv is None:
            return errors.RejectError(errors.UNKNOWN_MODEL, f"model {name!r} is not serving")
        return errors.RejectError(errors.UNKNOWN_MODEL,
                                  f"model {name!r} version {version} is not serving (serving: {sv.version})")

    def infer(self, name: str, inputs: dict[str, Any], version: int | None = None
              ) -> tuple[ServingVersion, dict[str, np.ndarray]]:
        """Run one inference on the serving version; records latency and errors."""
        held = self._local.admitted == name  # the HTTP layer holds the model's slot (admit())
        refused: Exception | None = None
        key: admission.ShapeKey = ()
        lock = self._lock
        lock.acquire()
        try:  # bind to the version, then take a slot (a full queue: busy; a wait releases the lock)
            sv = self._serving.get(name)
            if sv is None or (version is not None and sv.version != version):
                raise self._not_serving(name, version, sv)
            gate, slot, size = sv.gate, None if held else sv.admission_gate, sv.size_check
            assert gate is not None and size is not None, "set on activation"
            gate.enter_held()
            try:
                key = size(inputs)  # refuses a request over the bound, else its shape key
                if slot is not None:
                    slot.take_held()
            except Exception as e:  # too_large, busy: counted and observed as a call, holding no slot
                refused, slot = e, None
            except BaseException:
                gate.leave_held()
                raise
        finally:
            lock.release()
        t0 = _perf()
        ok = False
        try:
            if refused is not None:
                raise refused
            try:
                b = sv.batcher
                out = sv.model.infer(inputs) if b is None else b.infer(inputs)
            except errors.AgentError as e:  # on shapes not known to be computable: the caller's invalid_input
                if e.code == errors.INFERENCE_FAILED and not self.shapes.knows(name, key):
                    raise admission.runtime_failure(name, inputs, e) from e
                raise
            if not self.shapes.knows(name, key):
                self.shapes.add(name, (key,), report=True)
            ok = True
            return sv, out
        except errors.AgentError as e:
            if e.code not in CALLER_CODES:
                sv.errors += 1
            raise
        except Exception:
            sv.errors += 1
            raise
        finally:
            sv.calls += 1
            lock.acquire()
            try:
                if slot is not None:
                    slot.give_held()
                gate.leave_held()
            finally:
                lock.release()
            obs = self._observer
            if obs is not None:
                obs(name, sv.version, sv.model.backend_id, _perf() - t0, ok)

    def admit(self, name: str) -> HttpSlot:
        """Hold one of ``name``'s in-flight slots (``busy`` when none frees up in time): the HTTP
        layer holds it from decoding a request to encoding its answer, so that decoding, too, is
        bounded per model (and cannot starve the runtime calls of the worker's interpreter)."""
        sv = self.get(name)
        if sv is None:  # not serving: the call is refused (no table entry per name asked)
            return HttpSlot(None, self._local, name)
        return HttpSlot(sv.admission_gate or self._gate(name), self._local, name)

    def _gate(self, name: str) -> Admission:
        """``name``'s admission (a serving model's: made on its first call)."""
        gate = self._admission.get(name)
        if gate is None:
            gate = self._admission.setdefault(name, Admission(name, self.limits, self._lock))
        return gate

    def body_limit(self, name: str, cap: int) -> int:
        """The largest request body worth reading for ``name`` (its admission bound), at most ``cap``."""
        sv = self.get(name)
        if sv is None:
            return cap
        bound = sv.body_bound
        if bound is None:  # a version not activated here
            bound = sv.body_bound = admission.body_bound(sv.model.inputs, self.limits.max_batch, 1 << 62)
        return min(cap, bound)

    def _model_limits(self, sv: ServingVersion) -> Limits:
        """The config's limits with the manifest's ``serving.max_batch`` / ``max_queue_delay_us``
        (a worker gets these, so both isolation modes batch alike)."""
        raw = sv.manifest.get("serving")
        rows, delay_us = admission.batch_settings(raw if isinstance(raw, dict) else {}, self.limits)
        return dataclasses.replace(self.limits, batch_rows=rows, batch_delay_us=delay_us)

    @staticmethod
    def _batcher(sv: ServingVersion, lim: Limits) -> Batcher | None:
        """A batch queue when batching is on and every input and output has a dynamic first dimension."""
        specs = (*sv.model.inputs, *sv.model.outputs)
        if lim.batch_rows <= 1 or not specs or not all(s.shape and (s.shape[0] is None or s.shape[0] < 0)
                                                        for s in specs):
            return None
        return Batcher(sv.model.infer, min(lim.batch_rows, lim.max_batch), lim.batch_delay_us / 1e6, lim.queue_wait_s,
                       lim.max_inflight)

    def activate(self, sv: ServingVersion) -> ServingVersion | None:
        """Make ``sv`` the serving version; the previous one drains and closes in the background."""
        limits = self._model_limits(sv)
        sv.batcher = self._batcher(sv, limits)
        sv.size_check = admission.SizeCheck(sv.model.inputs, self.limits.max_batch)
        sv.admission_gate = self._gate(sv.name)
        if sv.gate is None:  # (a version served again keeps its gate: a drain may wait on it)
            sv.gate = InflightGate(self._lock)
        sv.body_bound = admission.body_bound(sv.model.inputs, self.limits.max_batch, 1 << 62)
        self.shapes.add(sv.name, sv.model.known_shapes)  # its golden samples
        if sv.worker is not None:  # a worker that answers HTTP itself reports its calls back here
            sv.worker.bind(sv.name, sv.version,
                           lambda c, e, ok, bad, shapes: self._remote_calls(sv, c, e, ok, bad, shapes),
                           {"limits": limits.to_dict(), "shapes": self.shapes.shapes(sv.name)})
        with self._lock:
            old = self._serving.get(sv.name)
            self._serving[sv.name] = sv
        if old is not None and old is not sv:
            if old.worker is not None:  # a worker serving connections itself: none after this returns
                old.worker.retire()
            self._retire(old)
        log.info("serving %s v%d (%s, %s)", sv.name, sv.version, sv.variant, sv.backend)
        return old

    def _remote_calls(self, sv: ServingVersion, calls: int, errs: int,
                      ok: Iterable[float], bad: Iterable[float], shapes: Iterable[Any] = ()) -> None:
        """Calls a worker answered on its own (agent/serving/adopted.py): for probation and
        telemetry, and the input shapes it learned are computable."""
        self.shapes.add(sv.name, shapes)
        sv.calls += calls
        sv.errors += errs
        obs = self._observer
        if obs is not None:
            for s in ok:
                obs(sv.name, sv.version, sv.backend, s, True)
            for s in bad:
                obs(sv.name, sv.version, sv.backend, s, False)

    def remove(self, name: str) -> ServingVersion | None:
        with self._lock:
            old = self._serving.pop(name, None)
        if old is not None:
            self._retire(old)
        return old

    def _retire(self, old: ServingVersion) -> None:
        def drain() -> None:
            gate = old.gate
            if gate is not None and not gate.wait_idle(DRAIN_TIMEOUT_S):
                log.warning("%s v%d: %d call(s) still in flight after %.0f s; closing anyway",
                            old.name, old.version, gate.count, DRAIN_TIMEOUT_S)
            old.model.close()

        t = threading.Thread(target=drain, name=f"drain-{old.name}-{old.version}", daemon=True)
        t.start()
        self._draining = [d for d in self._draining if d.is_alive()] + [t]

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop serving everything, waiting up to ``timeout_s`` for in-flight calls."""
        with self._lock:
            olds = list(self._serving.values())
            self._serving.clear()
        deadline = time.monotonic() + timeout_s
        for old in olds:
            if old.gate is not None:
                old.gate.wait_idle(max(0.0, deadline - time.monotonic()))
            old.model.close()
        for t in self._draining:
            t.join(max(0.0, deadline - time.monotonic()))
