"""Dynamic batching: concurrent requests of one model, with the same per-row shapes, run as one
runtime call on the model's dynamic first dimension, then split back per request.

Why: a runtime call has a fixed cost (dispatch, thread pools) that several small requests can
share (config ``serving.max_batch``, ``serving.max_queue_delay_us``; docs/configuration.md).

Invariants:
- Only requests whose inputs all share one first dimension and whose other dimensions and dtypes
  match run together; a batch holds at most ``max_rows`` rows; a request of more rows runs alone.
- Each request gets exactly its own rows of every output. When outputs cannot be split by rows
  (an output without the batch dimension) or the batched call fails, each request runs alone and
  gets its own answer or error.
- A request waits in the queue at most until its deadline: then it leaves with ``busy`` and the
  others are untouched. Once taken into a batch it waits for that call (bounded by the hung-worker
  deadline of the runtime call itself).
- The first request of a batch runs it, in its own thread, after at most ``delay_s`` (sooner when
  the batch is full in rows, or holds every request admission lets in at once): no thread
  of the batcher's own, no table beyond the requests already admitted (admission bounds them).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from agent import errors

Feed = dict[str, Any]
BatchKey = tuple[tuple[str, tuple[int, ...], str], ...]


class _Item:
    __slots__ = ("done", "error", "feed", "result", "rows", "taken")

    def __init__(self, feed: Feed, rows: int) -> None:
        self.feed, self.rows = feed, rows
        self.done = threading.Event()
        self.taken = False
        self.result: Feed | None = None
        self.error: BaseException | None = None


class _Group:
    __slots__ = ("closed", "items", "rows")

    def __init__(self) -> None:
        self.items: list[_Item] = []
        self.rows = 0
        self.closed = threading.Event()  # full: the leader need not wait out the delay


def batch_key(feed: Feed) -> tuple[BatchKey, int] | None:
    """(what must match to share a batch, the request's rows); None when it cannot batch."""
    rows = -1
    parts = []
    for name in sorted(feed):
        a = feed[name]
        shape = getattr(a, "shape", None)
        if not shape:
            return None
        if rows < 0:
            rows = shape[0]
        elif shape[0] != rows:
            return None
        parts.append((name, tuple(shape[1:]), a.dtype.str))
    if rows <= 0:
        return None
    return tuple(parts), rows


class Batcher:
    """One model version's batch queue: ``infer`` as the runtime's, shared with concurrent callers."""

    def __init__(self, run: Callable[[Feed], Feed], max_rows: int, delay_s: float, wait_s: float,
                 max_requests: int = 0) -> None:
        self._run = run
        self.max_rows = max_rows
        self.max_requests = max_requests  # admission's in-flight bound: no more can come (0: unknown)
        self.delay_s = delay_s
        self.wait_s = wait_s
        self._lock = threading.Lock()
        self._pending: dict[BatchKey, _Group] = {}
        self.batches = 0  # runtime calls that carried more than one request

    def infer(self, feed: Feed, wait_s: float | None = None) -> Feed:
        kr = batch_key(feed)
        if kr is None or kr[1] >= self.max_rows:
            return self._run(feed)
        key, rows = kr
        deadline = time.monotonic() + (self.wait_s if wait_s is None else wait_s)
        item = _Item(feed, rows)
        with self._lock:
            g = self._pending.get(key)
            leader = g is None or g.rows + rows > self.max_rows
            if leader:
                g = self._pending[key] = _Group()
            assert g is not None
            g.items.append(item)
            g.rows += rows
            if g.rows >= self.max_rows or len(g.items) == self.max_requests:
                del self._pending[key]
                g.closed.set()
        if leader:
            g.closed.wait(max(0.0, min(self.delay_s, deadline - time.monotonic())))
            with self._lock:
                if self._pending.get(key) is g:
                    del self._pending[key]
                items = list(g.items)
                for it in items:
                    it.taken = True
            self._run_batch(items)
        elif not item.done.wait(max(0.0, deadline - time.monotonic())):
            with self._lock:
                if not item.taken:
                    g.items.remove(item)
                    g.rows -= rows
                    raise errors.RejectError(errors.BUSY, "the request waited past its deadline in the "
                                             "batch queue")
            item.done.wait()  # taken into a running batch: the runtime call's own deadline bounds it
        if item.error is not None:
            raise item.error
        assert item.result is not None
        return item.result

    def _run_batch(self, items: list[_Item]) -> None:
        try:
            if len(items) > 1 and self._together(items):
                return
            for it in items:
                self._alone(it)
        finally:
            for it in items:
                it.done.set()

    def _together(self, items: list[_Item]) -> bool:
        """One runtime call for all; False when it failed or its outputs cannot be split by rows."""
        import numpy as np

        total = sum(it.rows for it in items)
        try:
            out = self._run({name: np.concatenate([it.feed[name] for it in items]) for name in items[0].feed})
        except Exception:  # each request then runs alone and gets its own answer or error
            return False
        if not all(getattr(a, "shape", None) and a.shape[0] == total for a in out.values()):
            return False
        start = 0
        for it in items:
            it.result = {k: a[start:start + it.rows] for k, a in out.items()}
            start += it.rows
        self.batches += 1
        return True

    def _alone(self, it: _Item) -> None:
        try:
            it.result = self._run(it.feed)
        except BaseException as e:  # handed to the request's own thread, which raises it
            it.error = e
