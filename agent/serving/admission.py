"""Per-model admission: what a caller may push into a model, and whose fault a failure is.

Why: requests are chosen by callers, and a caller must not be able to exhaust a worker's memory,
keep it busy past the hung-worker deadline, or make a valid version look broken (docs/security.md,
docs/deployments.md). Used by the registry in the daemon and in each worker alike.

Invariants:
- A request is at most ``request_bound`` bytes of tensors (``max_batch`` rows on a dynamic batch
  dimension): beyond it ``too_large`` (413), before the runtime sees it.
- At most ``max_inflight`` runtime calls per model run at once; at most ``max_queue`` more wait,
  each at most ``queue_wait_s``: beyond that ``busy`` (503 with Retry-After).
- A runtime failure counts against a version only on input shapes known to be computable: the
  version's golden samples, or shapes a version of the model answered before (``ShapeBook``).
  On any other shape it is the caller's ``invalid_input`` (the shape, and the runtime's words).
- Request bodies being read or held in one process total at most ``BodyBudget.limit`` bytes
  (``api.max_body_inflight_mb``), reserved before a body is read: beyond it ``busy``. One body
  alone always fits, so the bound is the larger of the budget and one body limit.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from agent import errors

if TYPE_CHECKING:
    from agent.bundles.manifest import TensorSpec

DEFAULT_MAX_BATCH = 64
DEFAULT_MAX_INFLIGHT = 4
DEFAULT_MAX_QUEUE = 64
DEFAULT_QUEUE_WAIT_S = 10.0
DEFAULT_BATCH_DELAY_US = 500
MAX_BATCH_DELAY_US = 1_000_000  # a batch never waits a second for company
DEFAULT_BODY_INFLIGHT_BYTES = 256 * 1024 * 1024  # request bodies held at once per process
RETRY_AFTER_S = 1  # what a ``busy`` answer asks the caller to wait
MAX_SHAPES = 256  # known-computable input shapes kept per model (more are not learned)
JSON_BYTES_PER_ELEMENT = 32  # worst case of one number written out in a JSON body ("-1.2345678e-05, ")
BODY_SLACK_BYTES = 64 * 1024  # a request's JSON header, names and parameters
CALLER_CODES = frozenset({errors.INVALID_INPUT, errors.TOO_LARGE, errors.BUSY})  # never a model error
STRING_ELEMENT_BYTES = 256  # what one element of a string (KServe BYTES) input may take in a body: text and framing
_ITEM_BYTES = {"bool": 1, "int8": 1, "uint8": 1, "int16": 2, "uint16": 2, "float16": 2, "bfloat16": 2,
               "int32": 4, "uint32": 4, "float32": 4, "int64": 8, "uint64": 8, "float64": 8,
               "string": STRING_ELEMENT_BYTES}

ShapeKey = tuple[tuple[str, tuple[int, ...]], ...]


@dataclass(frozen=True)
class Limits:
    """Per-model bounds (config ``backends.max_batch``, ``max_inflight``, ``max_queue``)."""

    max_batch: int = DEFAULT_MAX_BATCH
    max_inflight: int = DEFAULT_MAX_INFLIGHT
    max_queue: int = DEFAULT_MAX_QUEUE
    queue_wait_s: float = DEFAULT_QUEUE_WAIT_S
    batch_rows: int = 1  # dynamic batching (config serving.max_batch): at most this many rows per call; ≤ 1 off
    batch_delay_us: int = DEFAULT_BATCH_DELAY_US  # how long a batch waits for more requests (serving.max_queue_delay_us)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def batch_settings(override: Mapping[str, Any], limits: Limits) -> tuple[int, int]:
    """(rows per batch, delay in µs): the manifest's ``serving.max_batch`` and
    ``serving.max_queue_delay_us`` where given and valid, else the config's (``limits``)."""
    rows, delay = limits.batch_rows, limits.batch_delay_us
    r, d = override.get("max_batch"), override.get("max_queue_delay_us")
    if isinstance(r, int) and not isinstance(r, bool) and 0 <= r <= limits.max_batch:
        rows = r
    if isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_BATCH_DELAY_US:
        delay = d
    return rows, delay


def item_bytes(dtype: str) -> int:
    return _ITEM_BYTES.get(dtype, 8)


def request_bound(specs: Iterable[TensorSpec], max_batch: int) -> tuple[int, int] | None:
    """(tensor bytes, elements) of the largest request the model takes, with ``max_batch`` rows
    on a dynamic first dimension; None when another dimension is dynamic (no bound from shapes)."""
    total_b = total_n = 0
    for s in specs:
        n = 1
        for i, d in enumerate(s.shape):
            if d is None or d < 0:
                if i != 0:
                    return None
                d = max_batch
            n *= d
        total_n += n
        total_b += n * item_bytes(s.dtype)
    return total_b, total_n


def body_bound(specs: Iterable[TensorSpec], max_batch: int, cap: int) -> int:
    """The largest request body worth reading for this model (JSON or binary), at most ``cap``."""
    b = request_bound(specs, max_batch)
    if b is None:
        return cap
    return min(cap, BODY_SLACK_BYTES + max(b[0], b[1] * JSON_BYTES_PER_ELEMENT))


class SizeCheck:
    """``too_large`` for a request over the model's bound: more than ``max_batch`` rows on a
    dynamic batch dimension, or more tensor bytes than the model's largest request. Made once
    per model version (it runs on every call); calling it also gives the request's shape key."""

    __slots__ = ("_batched", "_bound", "_max_batch")

    def __init__(self, specs: Iterable[TensorSpec], max_batch: int) -> None:
        specs = tuple(specs)
        self._max_batch = max_batch
        self._batched = tuple(s.name for s in specs if s.shape and (s.shape[0] is None or s.shape[0] < 0))
        b = request_bound(specs, max_batch)
        self._bound = -1 if b is None else b[0]

    def __call__(self, feed: Mapping[str, Any]) -> ShapeKey:
        """Refuse a request over the bound; else its ``shape_key``."""
        mb, bound = self._max_batch, self._bound
        if len(feed) == 1:  # the common case in one step; anything to refuse is worded below
            for name, a in feed.items():
                shape = getattr(a, "shape", ())
                if (name not in self._batched or not shape or shape[0] <= mb) and \
                        not 0 <= bound < int(getattr(a, "nbytes", 0)):
                    return ((name, tuple(shape)),)
        for name in self._batched:
            shape = getattr(feed.get(name), "shape", None)
            if shape and shape[0] > mb:
                raise errors.RejectError(errors.TOO_LARGE, f"input {name!r}: a batch of {shape[0]} is more than "
                                                           f"the {mb} allowed (backends.max_batch)")
        if bound >= 0:
            size = sum(int(getattr(a, "nbytes", 0)) for a in feed.values())
            if size > bound:
                raise errors.RejectError(errors.TOO_LARGE, f"request tensors are {size} bytes; this model takes "
                                                           f"at most {bound}")
        return shape_key(feed)


def check_size(specs: Iterable[TensorSpec], feed: Mapping[str, Any], max_batch: int) -> None:
    """``SizeCheck(specs, max_batch)(feed)``, for one call."""
    SizeCheck(specs, max_batch)(feed)


def shape_key(feed: Mapping[str, Any]) -> ShapeKey:
    if len(feed) == 1:
        for k, a in feed.items():
            return ((k, tuple(getattr(a, "shape", ()))),)
    return tuple(sorted((k, tuple(getattr(a, "shape", ()))) for k, a in feed.items()))


class ShapeBook:
    """Input shapes known to be computable, per model name (bounded); ``fresh()`` hands out the
    ones learned since the last call (a worker reports them to the daemon)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._known: dict[str, set[ShapeKey]] = {}
        self._fresh: list[tuple[str, ShapeKey]] = []

    def knows(self, name: str, key: ShapeKey) -> bool:
        return key in self._known.get(name, ())

    def add(self, name: str, keys: Iterable[Any], report: bool = False) -> None:
        with self._lock:
            known = self._known.setdefault(name, set())
            for k in keys:
                k = tuple((str(n), tuple(int(d) for d in s)) for n, s in k)
                if k not in known and len(known) < MAX_SHAPES:
                    known.add(k)
                    if report:
                        self._fresh.append((name, k))

    def shapes(self, name: str) -> list[ShapeKey]:
        with self._lock:
            return sorted(self._known.get(name, ()))

    def fresh(self) -> list[tuple[str, ShapeKey]]:
        with self._lock:
            out, self._fresh = self._fresh, []
            return out


def runtime_failure(name: str, feed: Mapping[str, Any], e: errors.AgentError) -> errors.RejectError:
    """The caller's error for a runtime failure on shapes not known to be computable."""
    shapes = ", ".join(f"{k} {list(getattr(a, 'shape', ()))}" for k, a in sorted(feed.items()))
    return errors.RejectError(errors.INVALID_INPUT, f"{name}: the runtime cannot compute input(s) {shapes}: "
                                                    f"{e.message}")


class Admission:
    """At most ``max_inflight`` calls at once, ``max_queue`` waiting (each ``queue_wait_s``).

    One lock guards both counts: its own, or ``lock``, the owner's (the serving registry's), so
    that a call takes its slot in the critical section where it looks the model up
    (``take_held``/``give_held``). Only a call that has to queue waits, on a condition over that
    lock (which the wait releases)."""

    def __init__(self, name: str, limits: Limits, lock: threading.Lock | None = None) -> None:
        self.name = name
        self.limits = limits
        self._lock = lock or threading.Lock()  # not re-entered: a plain lock is cheaper
        self._freed = threading.Condition(self._lock)
        self._running = 0
        self._waiting = 0

    def slot(self) -> Admission:
        """``with gate.slot():`` (or ``with gate:``) holds one in-flight slot (``busy`` when none frees up in time)."""
        return self

    def enter(self) -> None:
        """Take one in-flight slot (``busy`` when none frees up in time); ``leave()`` after."""
        with self._lock:
            self.take_held()

    def leave(self) -> None:
        with self._lock:
            self.give_held()

    def take_held(self) -> None:
        """``enter``, the caller holding the lock (a wait for a slot releases it meanwhile)."""
        if self._running >= self.limits.max_inflight:
            self._queue()
        self._running += 1

    def give_held(self) -> None:
        """``leave``, the caller holding the lock."""
        self._running -= 1
        if self._waiting:
            self._freed.notify()

    def _queue(self) -> None:
        """Wait (the lock held) for a free slot, within the queue bound and ``queue_wait_s``."""
        lim = self.limits
        if self._waiting >= lim.max_queue:
            raise errors.RetryableError(errors.BUSY, f"{self.name}: {self._running} calls running and "
                                                     f"{self._waiting} waiting; try again later")
        self._waiting += 1
        try:
            ok = self._freed.wait_for(lambda: self._running < lim.max_inflight, lim.queue_wait_s)
        finally:
            self._waiting -= 1
        if not ok:
            raise errors.RetryableError(errors.BUSY, f"{self.name}: no free slot within "
                                                     f"{lim.queue_wait_s:g} s; try again later")

    def __enter__(self) -> None:
        self.enter()

    def __exit__(self, *exc: object) -> None:
        self.leave()


class BodyBudget:
    """Bytes of request bodies read or being read at once in this process, across all models.

    Why: the per-model bounds act once a body is read; a model with dynamic non-batch dimensions
    takes bodies up to the global limit, and many connections could each hold one meanwhile."""

    def __init__(self, limit: int = DEFAULT_BODY_INFLIGHT_BYTES) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._used = 0

    @property
    def used(self) -> int:
        return self._used

    def reserve(self, n: int) -> bool:
        """Take ``n`` bytes; False (nothing taken) when they do not fit beside what is held."""
        if n <= 0:
            return True
        with self._lock:
            if self._used and self._used + n > self.limit:
                return False
            self._used += n
            return True

    def release(self, n: int) -> None:
        if n <= 0:
            return
        with self._lock:
            self._used = max(0, self._used - n)
