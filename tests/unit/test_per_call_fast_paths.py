"""The per-call fast paths give the answers and refusals of the slow ones, on random inputs.

``check_inputs`` (agent/backends/base.py) returns the caller's dict when every input fits its
spec, else the checks of ``_check_inputs``; ``SizeCheck`` (agent/serving/admission.py) takes a
one-input request without building a list; a request's shape is read in one pass
(``tensors._parse_shape``, else every check of ``_check_shape``); a small float output's
finiteness is checked in Python (``tensors._all_finite``). Each is compared here with the
straightforward version it stands for, over random shapes, dtypes, values and input names."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest

from agent import errors
from agent.backends.base import _check_inputs, check_inputs
from agent.bundles.manifest import TensorSpec
from agent.serving import admission, tensors

DTYPES = ("float32", "float64", "int64", "uint8", "bool", "float16")
CASES = 3000
MAX_BATCH = 6


def _specs(rng: random.Random) -> tuple[TensorSpec, ...]:
    out = []
    for i in range(rng.randint(1, 3)):
        shape = tuple(None if rng.random() < 0.3 else rng.randint(1, 4) for _ in range(rng.randint(0, 3)))
        out.append(TensorSpec(f"in{i}", rng.choice(DTYPES), shape))
    return tuple(out)


def _feed(rng: random.Random, specs: tuple[TensorSpec, ...]) -> dict[str, Any]:
    """Mostly fitting inputs, some with another dtype, rank or size, a missing or an extra name,
    or not an array at all."""
    feed: dict[str, Any] = {}
    for s in specs:
        if rng.random() < 0.05:
            continue  # missing
        shape = [rng.randint(1, 9) if d is None else d for d in s.shape]
        r = rng.random()
        if r < 0.08 and shape:
            shape[rng.randrange(len(shape))] += 1
        elif r < 0.12:
            shape.append(2)
        dtype = s.dtype if rng.random() > 0.1 else rng.choice(DTYPES)
        a = np.zeros(shape, dtype)
        feed[s.name] = a.tolist() if rng.random() < 0.03 else a
    if rng.random() < 0.05:
        feed["extra"] = np.zeros((1,), np.float32)
    return feed


def _outcome(fn: Any, *args: Any) -> Any:
    try:
        return ("ok", fn(*args))
    except errors.AgentError as e:
        return (e.code, e.message)


def _size_reference(specs: tuple[TensorSpec, ...], feed: dict[str, Any]) -> admission.ShapeKey:
    """What SizeCheck promises, written out: rows first, then bytes, then the shape key."""
    for s in specs:
        a = feed.get(s.name)
        if s.shape and (s.shape[0] is None or s.shape[0] < 0) and a is not None:
            shape = getattr(a, "shape", ())
            if shape and shape[0] > MAX_BATCH:
                raise errors.RejectError(errors.TOO_LARGE, f"input {s.name!r}: a batch of {shape[0]} is more "
                                                           f"than the {MAX_BATCH} allowed (backends.max_batch)")
    bound = admission.request_bound(specs, MAX_BATCH)
    size = sum(int(getattr(a, "nbytes", 0)) for a in feed.values())
    if bound is not None and size > bound[0]:
        raise errors.RejectError(errors.TOO_LARGE, f"request tensors are {size} bytes; this model takes "
                                                   f"at most {bound[0]}")
    return admission.shape_key(feed)


@pytest.mark.parametrize("seed", [1, 2])
def test_check_inputs_fast_path_answers_as_the_full_checks(seed: int) -> None:
    rng = random.Random(seed)
    fast_hits = 0
    for _ in range(CASES):
        specs = _specs(rng)
        feed = _feed(rng, specs)
        got, want = _outcome(check_inputs, specs, feed), _outcome(_check_inputs, specs, feed)
        if want[0] == "ok" and got[0] == "ok":
            assert set(got[1]) == set(want[1])
            for k, w in want[1].items():
                g = got[1][k]
                assert g.dtype == w.dtype and g.shape == w.shape and np.array_equal(g, w)
                assert g is w or not isinstance(feed[k], np.ndarray), "the caller's arrays, not copies"
            fast_hits += got[1] is feed
        else:
            assert got == want, (specs, {k: getattr(v, "shape", v) for k, v in feed.items()})
    assert fast_hits > CASES // 4, "the fast path was taken"


@pytest.mark.parametrize("seed", [3, 4])
def test_size_check_answers_as_its_definition(seed: int) -> None:
    rng = random.Random(seed)
    refused = 0
    for _ in range(CASES):
        specs = _specs(rng)
        feed = _feed(rng, specs)
        if rng.random() < 0.4:  # every batched input at, just under or over the bound
            rows = MAX_BATCH + rng.randint(-1, 2)
            for s in specs:
                if s.shape and s.shape[0] is None:
                    feed[s.name] = np.zeros((rows, *(d or 1 for d in s.shape[1:])), s.dtype)
        got = _outcome(admission.SizeCheck(specs, MAX_BATCH), feed)
        want = _outcome(_size_reference, specs, feed)
        assert got == want, (specs, {k: getattr(v, "shape", v) for k, v in feed.items()})
        refused += got[0] != "ok"
    assert refused > CASES // 20, "refusals were exercised"


def _random_shape(rng: random.Random) -> Any:
    r = rng.random()
    if r < 0.05:
        return rng.choice([None, "3", {"a": 1}, (1, 2), 7])
    dims: list[Any] = [rng.choice([0, 1, 2, 3, 16, 255, 2**16]) for _ in range(rng.randint(0, 6))]
    if r < 0.3 and dims:
        dims[rng.randrange(len(dims))] = rng.choice([-1, True, False, 1.0, "2", None, tensors.MAX_DIM,
                                                     tensors.MAX_DIM + 1, 2**40])
    if r > 0.97:
        dims = [1] * (tensors.MAX_DIMS + rng.randint(0, 2))
    return dims


@pytest.mark.parametrize("seed", [5, 6])
def test_shape_fast_path_answers_as_every_check(seed: int) -> None:
    rng = random.Random(seed)
    seen = {"ok": 0, "refused": 0}
    for _ in range(CASES):
        shape = _random_shape(rng)
        got, want = _outcome(tensors._parse_shape, "x", shape), _outcome(tensors._check_shape, "x", shape)
        assert got == want, shape
        if got[0] == "ok":
            assert got[1] is shape
        seen["ok" if got[0] == "ok" else "refused"] += 1
    assert min(seen.values()) > CASES // 20, seen


@pytest.mark.parametrize("seed", [7, 8])
def test_small_output_finiteness_answers_as_numpy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(CASES):
        n = int(rng.integers(1, 2 * tensors.SMALL_OUTPUT))
        a = rng.standard_normal(n).astype(rng.choice(["float16", "float32", "float64"]))
        if rng.random() < 0.5:
            a[rng.integers(0, n)] = rng.choice([np.nan, np.inf, -np.inf])
        assert tensors._all_finite(a, a.ravel().tolist()) == bool(np.isfinite(a).all())
