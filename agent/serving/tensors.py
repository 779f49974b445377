"""KServe v2 tensors: datatypes, JSON and binary tensor codecs, infer request and reply bodies.

Invariants:
- Binary tensors are little-endian and packed in the order of the inputs/outputs that name a
  ``binary_data_size``. A BYTES tensor is text: in JSON a (nested) list of strings, in binary each
  element as a 4-byte little-endian length then its UTF-8 bytes; it feeds and answers models with
  ``string`` tensors, within the same body limit as every tensor and at most
  ``MAX_BYTES_ELEMENTS`` elements (each costs a Python object, not 4 bytes of an array).
- Bad input of any shape (deep nesting, shapes whose product overflows, values out of range) is
  ``invalid_input`` with a message naming the tensor, never an internal error.
- numpy is imported lazily, only when a request needs it.
- JSON goes through orjson where installed and through the standard library otherwise; both give
  the same values and the same errors: whatever orjson refuses (NaN, Infinity, lone surrogates,
  bad text) the standard library decides, a request refused is refused as the
  standard library's values show, and a reply holding a value orjson would write differently (a
  non-finite float) is written by the standard library. One difference remains: through orjson an
  integer beyond 64 bits in an accepted request is a float (a FP64 tensor takes 1e30 written as
  digits; the standard library's values refuse it as non-numeric).
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

from agent import errors

# orjson, a maintained parser built for large number arrays (the standard library is the
# fallback), imported at the first JSON body: an idle daemon has none. None: the standard
# library only (orjson not installed: a core dependency, absent only in a stripped install).
_UNLOADED: Any = object()
_orjson: Any = _UNLOADED


def _fast_json() -> Any:
    """orjson (imported on first use), or None for the standard library."""
    global _orjson
    if _orjson is _UNLOADED:
        try:
            import orjson
        except ImportError:  # pragma: no cover - see above
            _orjson = None
        else:
            _orjson = orjson
    return _orjson


if TYPE_CHECKING:
    import numpy as np

    from agent.serving.registry import ServingVersion

HEADER_LENGTH = "Inference-Header-Content-Length"
HEADER_LENGTH_KEY = HEADER_LENGTH.lower()
JSON_TYPE = "application/json"
BINARY_TYPE = "application/octet-stream"
MAX_DIMS = 32  # a tensor's rank
MAX_DIM = 2**31 - 1  # one dimension
MAX_ELEMENTS = 2**32  # a tensor's element count (the body limit bounds real data well below)

# KServe v2 datatype ↔ numpy dtype name (the names TensorSpec.dtype uses).
KSERVE_TO_NUMPY = {"BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32",
                   "UINT64": "uint64", "INT8": "int8", "INT16": "int16", "INT32": "int32",
                   "INT64": "int64", "FP16": "float16", "FP32": "float32", "FP64": "float64"}
NUMPY_TO_KSERVE = {v: k for k, v in KSERVE_TO_NUMPY.items()}
_BYTES_DTYPES = {"tensor(string)", "string", "str", "object", "bytes"}
BYTES = "BYTES"
BYTES_LENGTH_BYTES = 4  # each binary BYTES element: uint32 little-endian length, then the bytes
MAX_BYTES_ELEMENTS = 1 << 20  # strings in one BYTES tensor


_ENCODER = json.JSONEncoder(separators=(",", ":"))
_DECODER = json.JSONDecoder()


def to_json(obj: Any, exact: bool = False) -> bytes:
    """Compact JSON. ``exact``: the standard library's text, for values orjson would write
    differently (NaN and ±Infinity, which orjson writes as null), and for documents written once,
    which need not load orjson (≈ 2 MB of a process's memory) before a request does."""
    if not exact:
        oj = _orjson if _orjson is not _UNLOADED else _fast_json()
        if oj is not None:
            try:
                return oj.dumps(obj)
            except (oj.JSONEncodeError, TypeError):
                pass  # integers beyond 64 bits, very deep values: the standard library writes or refuses them
    return _ENCODER.encode(obj).encode()


def from_json(text: bytes | memoryview, fast: bool = True) -> Any:
    """UTF-8 JSON text → Python values; orjson first (unless not ``fast``), the standard library
    for all it refuses.

    Raises what the standard library raises (``ValueError``, ``UnicodeDecodeError``,
    ``RecursionError``), so both paths accept the same documents and fail with the same messages.
    One difference in values: orjson reads an integer beyond 64 bits as a float."""
    oj = _orjson if _orjson is not _UNLOADED else _fast_json()
    if fast and oj is not None:
        try:
            return oj.loads(text)
        except oj.JSONDecodeError:
            pass
    # UTF-8 (RFC 8259): decoded here rather than by json.loads' encoding sniffing
    return _DECODER.decode(str(text, "utf-8"))


def _invalid(message: str) -> errors.RejectError:
    return errors.RejectError(errors.INVALID_INPUT, message)


class InferRequest:
    """A decoded infer request: the feed, the outputs wanted (name, as binary) and the id."""

    __slots__ = ("binary_default", "feed", "id", "wanted")

    def __init__(self, feed: dict[str, Any], wanted: list[tuple[str, bool]] | None, binary_default: bool,
                 rid: Any) -> None:
        self.feed = feed
        self.wanted = wanted
        self.binary_default = binary_default
        self.id = rid


def kserve_dtype(dtype: str) -> str:
    if dtype in NUMPY_TO_KSERVE:
        return NUMPY_TO_KSERVE[dtype]
    if dtype in _BYTES_DTYPES:
        return "BYTES"
    return dtype.upper()


def _parse_shape(name: str, shape: Any) -> list[int]:
    if type(shape) is list and len(shape) <= MAX_DIMS:  # the common case in one pass
        n = 1
        for d in shape:
            if type(d) is not int or not 0 <= d <= MAX_DIM:
                break
            n *= d
            if n > MAX_ELEMENTS:
                break
        else:
            return shape
    return _check_shape(name, shape)


def _check_shape(name: str, shape: Any) -> list[int]:
    """Every check of a shape, in the order their refusals are worded."""
    if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise _invalid(f"input {name!r}: shape must be a list of non-negative integers, got {str(shape)[:200]}")
    if len(shape) > MAX_DIMS or any(d > MAX_DIM for d in shape):
        raise _invalid(f"input {name!r}: shape {str(shape)[:200]} exceeds {MAX_DIMS} dimensions "
                       f"of at most {MAX_DIM}")
    n = 1
    for d in shape:  # math.prod would build a huge integer first
        n *= d
        if n > MAX_ELEMENTS:
            raise _invalid(f"input {name!r}: shape {shape} has more than {MAX_ELEMENTS} elements")
    return shape


def _all_ints(data: Any) -> bool:
    """Whether a nested list holds only integers (the slow path, for error messages only)."""
    try:
        if isinstance(data, list):
            return all(_all_ints(d) for d in data)
    except RecursionError:
        return False
    return isinstance(data, int) and not isinstance(data, bool)


def _tensor_from_json(name: str, datatype: str, np_dtype: str, shape: list[int],
                      data: Any) -> np.ndarray:
    import numpy as np

    n = math.prod(shape)
    try:
        a = np.asarray(data)
    except (ValueError, TypeError, RecursionError) as e:
        raise _invalid(f"input {name!r}: data is not a rectangular list of numbers ({e})") from e
    if a.size != n:
        raise _invalid(f"input {name!r}: shape {shape} has {n} element(s), data has {a.size}")
    target = _np_dtype(np_dtype)
    if a.size:
        kind = a.dtype.kind
        if target.kind == "b":
            ok = kind == "b"
        elif target.kind in "iu":
            ok = kind in "iu"
        else:
            ok = kind in "fiu"
        if not ok and target.kind in "iu" and kind in "fO" and _all_ints(data):
            # numpy turns integers beyond int64 into float64 or object: a range error, not a type one
            raise _invalid(f"input {name!r}: a value is out of the {datatype} range")
        if not ok:
            what = {"b": "booleans", "f": "non-integer numbers", "i": "integers", "u": "integers",
                    "U": "strings"}.get(kind, "non-numeric values")
            raise _invalid(f"input {name!r}: datatype {datatype}, but data holds {what}")
        if target.kind in "iu":
            info = np.iinfo(target)
            if a.min() < info.min or a.max() > info.max:
                raise _invalid(f"input {name!r}: a value is out of the {datatype} range "
                               f"[{info.min}, {info.max}]")
    return a.astype(target, copy=False).reshape(shape)


_NP_DTYPES: dict[str, Any] = {}  # numpy dtype name → dtype; np.dtype() is slow
_WIRE_DTYPES: dict[str, Any] = {}  # numpy dtype name → its little-endian dtype


def _np_dtype(np_dtype: str) -> Any:
    dt = _NP_DTYPES.get(np_dtype)
    if dt is None:
        import numpy as np

        dt = _NP_DTYPES[np_dtype] = np.dtype(np_dtype)
    return dt


def _wire_dtype(np_dtype: str) -> Any:
    dt = _WIRE_DTYPES.get(np_dtype)
    if dt is None:
        import numpy as np

        dt = _WIRE_DTYPES[np_dtype] = np.dtype(np_dtype).newbyteorder("<")
    return dt


def _tensor_from_binary(name: str, datatype: str, np_dtype: str, shape: list[int],
                        buf: memoryview) -> np.ndarray:
    import numpy as np

    target = _wire_dtype(np_dtype)
    need = math.prod(shape) * target.itemsize
    if len(buf) != need:
        raise _invalid(f"input {name!r}: shape {shape} of {datatype} needs {need} byte(s), "
                       f"binary_data_size is {len(buf)}")
    a = np.frombuffer(buf, dtype=target).reshape(shape)
    if not target.isnative:
        a = a.astype(target.newbyteorder("="))
    elif not a.flags.aligned:
        a = a.copy()  # the JSON header's length decides the offset; runtimes want aligned data
    return a


def _strings_from_json(name: str, shape: list[int], data: Any) -> np.ndarray:
    """A BYTES tensor from JSON: a flat or nested list of exactly prod(shape) strings."""
    import numpy as np

    n = math.prod(shape)
    if n > MAX_BYTES_ELEMENTS:
        raise _invalid(f"input {name!r}: {n} strings, a BYTES tensor holds at most {MAX_BYTES_ELEMENTS}")
    flat: list[Any] = data if isinstance(data, list) else [data]
    for _ in range(MAX_DIMS):  # nested lists flatten one level per pass, bounded by the rank limit
        if not any(isinstance(x, list) for x in flat):
            break
        if not all(isinstance(x, list) for x in flat):
            raise _invalid(f"input {name!r}: data mixes lists and strings")
        flat = [y for x in flat for y in x]
        if len(flat) > n:
            break
    if len(flat) != n:
        raise _invalid(f"input {name!r}: shape {shape} has {n} element(s), data has {len(flat)}")
    if not all(type(x) is str for x in flat):
        raise _invalid(f"input {name!r}: datatype BYTES, but data holds values that are not strings")
    a = np.empty(n, dtype=object)
    a[:] = flat
    return a.reshape(shape)


def _strings_from_binary(name: str, shape: list[int], buf: memoryview) -> np.ndarray:
    """A BYTES tensor from binary data: per element a uint32 LE length, then that many UTF-8 bytes."""
    import numpy as np

    n = math.prod(shape)
    if n > MAX_BYTES_ELEMENTS:
        raise _invalid(f"input {name!r}: {n} strings, a BYTES tensor holds at most {MAX_BYTES_ELEMENTS}")
    out = np.empty(n, dtype=object)
    pos, end = 0, len(buf)
    for i in range(n):
        if pos + BYTES_LENGTH_BYTES > end:
            raise _invalid(f"input {name!r}: binary BYTES data ends before element {i} of {n}")
        size = int.from_bytes(buf[pos:pos + BYTES_LENGTH_BYTES], "little")
        pos += BYTES_LENGTH_BYTES
        if pos + size > end:
            raise _invalid(f"input {name!r}: BYTES element {i} claims {size} byte(s), "
                           f"{end - pos} are left")
        try:
            out[i] = str(buf[pos:pos + size], "utf-8")
        except UnicodeDecodeError as e:
            raise _invalid(f"input {name!r}: BYTES element {i} is not UTF-8 text") from e
        pos += size
    if pos != end:
        raise _invalid(f"input {name!r}: {end - pos} byte(s) of binary BYTES data after its {n} element(s)")
    return out.reshape(shape)


def _strings(a: np.ndarray) -> list[str]:
    """A string output's elements as text (onnxruntime gives str objects; bytes are UTF-8)."""
    out = []
    for x in a.ravel().tolist():
        if isinstance(x, bytes):
            x = x.decode("utf-8", "replace")
        elif not isinstance(x, str):
            raise errors.AgentError(errors.INTERNAL, f"a string output holds a {type(x).__name__}")
        out.append(x)
    return out


def _strings_to_binary(values: list[str]) -> bytes:
    parts = []
    for v in values:
        b = v.encode("utf-8")
        parts.append(len(b).to_bytes(BYTES_LENGTH_BYTES, "little"))
        parts.append(b)
    return b"".join(parts)


_OUT_DATATYPES: dict[Any, str | None] = {}  # numpy dtype → KServe datatype; str(dtype) is slow


def _out_datatype(dtype: Any) -> str | None:
    dt = _OUT_DATATYPES.get(dtype, "")
    if dt == "":
        dt = _OUT_DATATYPES[dtype] = BYTES if dtype.kind in "OUS" else NUMPY_TO_KSERVE.get(str(dtype))
    return dt


SMALL_OUTPUT = 64  # elements below which Python checks finiteness faster than numpy starts to


def _all_finite(a: np.ndarray, values: list[Any]) -> bool:
    if a.size <= SMALL_OUTPUT and a.dtype.kind == "f":
        return all(map(math.isfinite, values))
    import numpy as np

    return bool(np.isfinite(a).all())


def _tensor_to_binary(a: np.ndarray) -> bytes:
    import numpy as np

    le = a.dtype.newbyteorder("<")
    return np.ascontiguousarray(a, dtype=le).tobytes()


def decode_request(headers: dict[str, str], body: bytes) -> InferRequest:
    """An infer request's body (JSON, or JSON then binary tensors) → the model's feed and wishes.

    A request refused after orjson read it is read again by the standard library alone, so a
    refusal names what the standard library's values show (an integer beyond 64 bits is out of
    range, not a float). That costs a refused request no more than before orjson."""
    try:
        return _decode_request(headers, body, True)
    except errors.RejectError:
        if _fast_json() is None:
            raise
    return _decode_request(headers, body, False)


def _decode_request(headers: dict[str, str], body: bytes, fast: bool) -> InferRequest:
    hlen_s = headers.get(HEADER_LENGTH_KEY)
    binary: memoryview | None = None
    if hlen_s is not None:
        hlen_s = hlen_s.strip()
        if not hlen_s.isdigit() or int(hlen_s) > len(body):
            raise _invalid(f"{HEADER_LENGTH} {hlen_s!r} is not a length within the {len(body)}-byte body")
        hlen = int(hlen_s)
        view = memoryview(body)
        header_b: bytes | memoryview = view[:hlen]
        binary = view[hlen:]
    else:
        header_b = body
    try:
        req = from_json(header_b, fast)
    except RecursionError as e:
        raise _invalid("request body nests JSON too deeply") from e
    except (ValueError, UnicodeDecodeError) as e:
        raise _invalid(f"request body is not valid JSON: {e}") from e
    if not isinstance(req, dict):
        raise _invalid("request body must be a JSON object with \"inputs\"")
    raw_inputs = req.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise _invalid("\"inputs\" must be a non-empty list of tensors")

    feed: dict[str, Any] = {}
    offset = 0
    for i, t in enumerate(raw_inputs):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise _invalid(f"inputs[{i}] must be an object with a \"name\"")
        tname: str = t["name"]
        if tname in feed:
            raise _invalid(f"input {tname!r} is given twice")
        datatype = t.get("datatype")
        if not isinstance(datatype, str) or (datatype not in KSERVE_TO_NUMPY and datatype != BYTES):
            raise _invalid(f"input {tname!r}: unknown datatype {datatype!r}; "
                           f"expected one of {', '.join(KSERVE_TO_NUMPY)}, {BYTES}")
        np_dtype = KSERVE_TO_NUMPY.get(datatype, "")
        shape = _parse_shape(tname, t.get("shape"))
        params = t.get("parameters") or {}
        if not isinstance(params, dict):
            raise _invalid(f"input {tname!r}: \"parameters\" must be an object")
        bsize = params.get("binary_data_size")
        if bsize is not None:
            if not isinstance(bsize, int) or isinstance(bsize, bool) or bsize < 0:
                raise _invalid(f"input {tname!r}: binary_data_size must be a non-negative integer")
            if binary is None:
                raise _invalid(f"input {tname!r}: binary_data_size given without the "
                               f"{HEADER_LENGTH} header")
            if offset + bsize > len(binary):
                raise _invalid(f"input {tname!r}: binary_data_size {bsize} runs past the end of "
                               f"the binary data ({len(binary) - offset} byte(s) left)")
            chunk = binary[offset:offset + bsize]
            feed[tname] = (_strings_from_binary(tname, shape, chunk) if datatype == BYTES
                           else _tensor_from_binary(tname, datatype, np_dtype, shape, chunk))
            offset += bsize
        else:
            if "data" not in t:
                raise _invalid(f"input {tname!r} has neither \"data\" nor binary_data_size")
            feed[tname] = (_strings_from_json(tname, shape, t["data"]) if datatype == BYTES
                           else _tensor_from_json(tname, datatype, np_dtype, shape, t["data"]))
    if binary is not None and offset != len(binary):
        raise _invalid(f"{len(binary) - offset} byte(s) of binary data are not claimed by any input")

    rparams = req.get("parameters") or {}
    binary_default = bool(rparams.get("binary_data_output", False)) if isinstance(rparams, dict) else False
    return InferRequest(feed, _wanted_outputs(req.get("outputs"), binary_default), binary_default, req.get("id"))


def _wanted_outputs(raw_outputs: Any, binary_default: bool) -> list[tuple[str, bool]] | None:
    """The request's ``outputs`` → (name, as binary) pairs; None: every output."""
    if raw_outputs is None:
        return None
    if not isinstance(raw_outputs, list):
        raise _invalid("\"outputs\" must be a list")
    wanted = []
    for i, o in enumerate(raw_outputs):
        if not isinstance(o, dict) or not isinstance(o.get("name"), str):
            raise _invalid(f"outputs[{i}] must be an object with a \"name\"")
        op = o.get("parameters") or {}
        b = op.get("binary_data", binary_default) if isinstance(op, dict) else binary_default
        wanted.append((o["name"], bool(b)))
    return wanted


def encode_response(sv: ServingVersion, results: dict[str, Any], r: InferRequest) -> tuple[bytes | list[bytes], str, tuple[tuple[str, str], ...]]:
    """The model's outputs → (body, content type, extra headers) of the reply."""
    wanted, binary_default = r.wanted, r.binary_default
    if wanted is None:
        wanted = [(k, binary_default) for k in results]
    else:
        missing = [k for k, _ in wanted if k not in results]
        if missing:
            raise _invalid(f"unknown output(s) {missing}; the model gives {list(results)}")
    out_meta: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    exact = not isinstance(r.id, (str, int, type(None)))  # an id as sent: a NaN in it stays NaN
    for oname, as_binary in wanted:
        a = results[oname]
        dt = _out_datatype(a.dtype)
        if dt is None:
            raise errors.AgentError(errors.INTERNAL,
                                    f"output {oname!r} has dtype {a.dtype}, which this server cannot send")
        if dt == BYTES:
            values = _strings(a)
            if as_binary:
                blob = _strings_to_binary(values)
                blobs.append(blob)
                out_meta.append({"name": oname, "datatype": dt, "shape": list(a.shape),
                                 "parameters": {"binary_data_size": len(blob)}})
            else:
                out_meta.append({"name": oname, "datatype": dt, "shape": list(a.shape), "data": values})
        elif as_binary:
            blob = _tensor_to_binary(a)
            blobs.append(blob)
            out_meta.append({"name": oname, "datatype": dt, "shape": list(a.shape),
                             "parameters": {"binary_data_size": len(blob)}})
        else:
            values = a.ravel().tolist()
            if a.dtype.kind in "fc" and a.size and not exact:  # NaN/Infinity are written as the stdlib does
                exact = not _all_finite(a, values)
            out_meta.append({"name": oname, "datatype": dt, "shape": list(a.shape), "data": values})
    resp: dict[str, Any] = {"model_name": sv.name, "model_version": str(sv.version)}
    if r.id is not None:
        resp["id"] = r.id
    resp["outputs"] = out_meta
    head = to_json(resp, exact)
    if not blobs:
        return head, JSON_TYPE, ()
    return [head, *blobs], BINARY_TYPE, ((HEADER_LENGTH, str(len(head))),)
