"""The JSON tensor codec gives the same tensors, replies and errors through orjson as through the
standard library (agent/serving/tensors.py ``from_json``/``to_json``): orjson where installed, the
standard library for everything orjson refuses."""

from __future__ import annotations

import json
import math
import random
from typing import Any

import numpy as np
import pytest

from agent import errors
from agent.serving import tensors

orjson = pytest.importorskip("orjson")


@pytest.fixture
def stdlib_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tensors, "_orjson", None)


def _decode_both(body: bytes, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Any]:
    """decode_request's outcome (feed, or the error's code and message) with orjson, then stdlib only."""
    def once() -> Any:
        try:
            r = tensors.decode_request({}, body)
        except errors.AgentError as e:
            return ("error", e.code, str(e))
        return r.feed, r.wanted, r.id
    fast = once()
    with monkeypatch.context() as m:
        m.setattr(tensors, "_orjson", None)
        slow = once()
    return fast, slow


def _same_feed(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        if a[k].dtype.kind == "f":
            np.testing.assert_array_equal(a[k], b[k])  # NaN equals NaN here, bit patterns aside
            assert np.array_equal(np.signbit(a[k]), np.signbit(b[k]))
        else:
            assert a[k].tolist() == b[k].tolist()


def _body(*inputs: dict[str, Any], **extra: Any) -> bytes:
    return json.dumps({"inputs": list(inputs), **extra}).encode()


def test_orjson_is_the_path_taken() -> None:
    """The fast path is really orjson (installed as a core dependency, imported at the first
    JSON body), not the fallback."""
    tensors.from_json(b"[1]")
    assert tensors._orjson is orjson


def test_float32_image_tensor_identical(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(7)
    x = rng.standard_normal((1, 3, 48, 192)).astype(np.float32)
    extremes = [0.0, -0.0, 5e-324, 2.2250738585072011e-308, 1e-45, 0.00012345678901234567, 3.4028235e38]
    data = x.tolist()
    data[0][0][0][:len(extremes)] = extremes
    (ff, fw, fid), (sf, sw, sid) = _decode_both(
        _body({"name": "x", "datatype": "FP32", "shape": [1, 3, 48, 192], "data": data}, id="r1"), monkeypatch)
    _same_feed(ff, sf)
    assert (fw, fid) == (sw, sid) == (None, "r1")
    assert ff["x"].dtype == np.float32 and ff["x"].shape == (1, 3, 48, 192)


@pytest.mark.parametrize("text", ["NaN", "Infinity", "-Infinity", "1e400", "-1e400"])
def test_non_finite_literals_identical(text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """orjson refuses NaN/Infinity (not JSON); the standard library accepts them, so both paths do."""
    body = b'{"inputs":[{"name":"x","datatype":"FP64","shape":[3],"data":[1.5,' + text.encode() + b',-0.0]}]}'
    (ff, *_), (sf, *_) = _decode_both(body, monkeypatch)
    _same_feed(ff, sf)
    v = ff["x"][1]
    assert math.isnan(v) if text == "NaN" else math.isinf(v)


@pytest.mark.parametrize(("datatype", "values"), [
    ("INT64", [-(2**63), 2**63 - 1, 0, -1]),
    ("UINT64", [2**64 - 1, 2**63, 0]),
    ("UINT64", [2**64, 1]),        # beyond 64 bits: orjson refuses, the stdlib parses, the range check refuses
    ("INT64", [10**30, -5]),
    ("INT32", [2**31, 0]),
    ("INT8", [True, 1]),
    ("FP32", [2**64 - 1, -1]),
    ("FP64", [2**64 - 1, 2**63]),
])
def test_integers_identical(datatype: str, values: list[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    fast, slow = _decode_both(_body({"name": "i", "datatype": datatype, "shape": [len(values)], "data": values}),
                              monkeypatch)
    if fast[0] == "error":
        assert fast == slow and fast[1] == errors.INVALID_INPUT
    else:
        _same_feed(fast[0], slow[0])
        assert fast[0]["i"].tolist() == values or fast[0]["i"].dtype.kind == "f"


def test_integer_beyond_64_bits_in_a_float_tensor(monkeypatch: pytest.MonkeyPatch) -> None:
    """The one documented difference: orjson reads 10**30 as the float 1e30, which a FP64 tensor
    takes; the standard library's integer makes a non-numeric array, refused."""
    fast, slow = _decode_both(_body({"name": "f", "datatype": "FP64", "shape": [2], "data": [10**30, 1]}),
                              monkeypatch)
    assert fast[0]["f"].tolist() == [1e30, 1.0]
    assert slow[0] == "error" and slow[1] == errors.INVALID_INPUT


def test_nested_shapes_and_bytes_identical(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(3)
    nested = [[[rng.randint(-1000, 1000) for _ in range(4)] for _ in range(3)] for _ in range(2)]
    words = [["héllo", "", "\u2603 snow", "tab\there"], ["quote\"s", "\\back", "\U0001f600", "\u0000nul"]]
    body = _body({"name": "n", "datatype": "INT32", "shape": [2, 3, 4], "data": nested},
                 {"name": "f", "datatype": "FP32", "shape": [2, 2], "data": [1, 2.5, -3, 1e-7]},
                 {"name": "s", "datatype": "BYTES", "shape": [2, 4], "data": words},
                 {"name": "b", "datatype": "BOOL", "shape": [2], "data": [True, False]},
                 outputs=[{"name": "y", "parameters": {"binary_data": True}}], id={"k": [1, 2]})
    fast, slow = _decode_both(body, monkeypatch)
    _same_feed(fast[0], slow[0])
    assert fast[1:] == slow[1:] == ([("y", True)], {"k": [1, 2]})
    assert fast[0]["s"].tolist() == words and fast[0]["n"].tolist() == nested


@pytest.mark.parametrize("body", [
    b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}',   # truncated
    b'{"inputs": [], }',                                                                # trailing comma
    b"\xef\xbb\xbf{}",                                                                 # a BOM
    b'{"a": "\xff"}',                                                                   # not UTF-8
    b'{"inputs": [{"name": "\\ud800", "datatype": "FP32", "shape": [1], "data": [1]}]}',  # a lone surrogate
    b"[" * 5000 + b"]" * 5000,                                                          # deep nesting
    b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [01, 2]}]}',  # a leading zero
    b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]} x',    # trailing text
    b'"just a string"',
    b"",
])
def test_bad_or_odd_bodies_identical(body: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every body gives the same outcome on both paths: the same tensors or the same error text."""
    fast, slow = _decode_both(body, monkeypatch)
    if fast[0] == "error" or slow[0] == "error":
        assert fast == slow
    else:
        _same_feed(fast[0], slow[0])
        assert fast[1:] == slow[1:]


def test_binary_request_header_identical(monkeypatch: pytest.MonkeyPatch) -> None:
    """The JSON header of a binary request (a slice of the body) decodes the same on both paths."""
    head = _body({"name": "x", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": 8}},
                 {"name": "y", "datatype": "INT64", "shape": [1], "data": [2**63 - 1]})
    body = head + np.array([1.5, -2], dtype="<f4").tobytes()
    headers = {tensors.HEADER_LENGTH_KEY: str(len(head))}
    outcomes = [tensors.decode_request(headers, body).feed]
    monkeypatch.setattr(tensors, "_orjson", None)
    outcomes.append(tensors.decode_request(headers, body).feed)
    _same_feed(*outcomes)
    assert outcomes[0]["x"].tolist() == [1.5, -2.0] and outcomes[0]["y"].tolist() == [2**63 - 1]


def test_duplicate_keys_last_wins_on_both(monkeypatch: pytest.MonkeyPatch) -> None:
    body = b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1], "data": [2]}]}'
    (ff, *_), (sf, *_) = _decode_both(body, monkeypatch)
    _same_feed(ff, sf)
    assert ff["x"].tolist() == [2.0]


class _SV:
    name, version = "m", 3


@pytest.mark.parametrize("rid", ["r", 7, None, 2**70, {"nested": [1, "a"]}, float("nan")])
@pytest.mark.parametrize("out", [
    np.arange(12, dtype=np.float32).reshape(3, 4) / 7,
    np.array([np.nan, np.inf, -np.inf, 1.0], dtype=np.float32),
    np.array([2**64 - 1, 0], dtype=np.uint64),
    np.array([[b"x", "\u2603"]], dtype=object),
])
def test_reply_text_parses_to_the_same_values(rid: Any, out: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    """A JSON reply written through orjson holds exactly the values the standard library writes;
    non-finite floats (in outputs or the id) are written as the standard library writes them."""
    r = tensors.InferRequest({}, None, False, rid)
    fast, ctype, _ = tensors.encode_response(_SV(), {"y": out}, r)  # type: ignore[arg-type]
    monkeypatch.setattr(tensors, "_orjson", None)
    slow, _, _ = tensors.encode_response(_SV(), {"y": out}, r)  # type: ignore[arg-type]
    assert ctype == tensors.JSON_TYPE
    assert isinstance(fast, bytes) and isinstance(slow, bytes)
    fd, sd = json.loads(fast), json.loads(slow)
    assert json.dumps(fd, sort_keys=True) == json.dumps(sd, sort_keys=True)  # NaN-safe comparison
    if out.dtype.kind == "f" and not np.isfinite(out).all():
        assert fast == slow  # NaN/Infinity: the standard library's text, not orjson's null


def test_stdlib_only_install_still_serves(stdlib_only: None) -> None:
    """Without orjson (a stripped install) the standard library decodes and writes alone."""
    r = tensors.decode_request({}, b'{"inputs":[{"name":"x","datatype":"FP32","shape":[2],"data":[1,NaN]}]}')
    assert r.feed["x"][0] == 1.0 and math.isnan(r.feed["x"][1])
    body, _, _ = tensors.encode_response(_SV(), {"y": np.array([1.0, np.inf])}, r)  # type: ignore[arg-type]
    assert body == b'{"model_name":"m","model_version":"3","outputs":[{"name":"y","datatype":"FP64","shape":[2],"data":[1.0,Infinity]}]}'
