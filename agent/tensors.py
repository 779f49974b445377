"""numpy arrays on the control socket: {"dtype", "shape", "b64"} (raw little-endian bytes), and
string tensors as {"dtype": "string", "shape", "strings"} (at most MAX_STRINGS elements)."""

from __future__ import annotations

import base64
import binascii
from typing import Any

from agent import errors

DTYPES = ("float32", "float16", "float64", "int8", "uint8", "int16", "int32", "int64", "bool")
STRING = "string"
MAX_STRINGS = 1 << 20  # elements of one string tensor (each is a Python object)


def encode(a: Any) -> dict[str, Any]:
    import numpy as np

    arr = np.ascontiguousarray(a)
    if arr.dtype.kind in "OUS":
        values = [x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x) for x in arr.ravel().tolist()]
        return {"dtype": STRING, "shape": list(arr.shape), "strings": values}
    return {"dtype": str(arr.dtype), "shape": list(arr.shape),
            "b64": base64.b64encode(arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()).decode()}


def decode(doc: Any, name: str = "tensor") -> Any:
    import numpy as np

    if not isinstance(doc, dict):
        raise errors.RejectError(errors.INVALID_INPUT, f"{name}: expected an object with dtype, shape, b64")
    dtype, shape = doc.get("dtype"), doc.get("shape")
    if dtype == STRING:
        return _decode_strings(doc, name)
    if dtype not in DTYPES:
        raise errors.RejectError(errors.INVALID_INPUT, f"{name}: dtype {dtype!r} not one of {', '.join(DTYPES)}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise errors.RejectError(errors.INVALID_INPUT, f"{name}: shape {shape!r} is not a list of sizes")
    try:
        raw = base64.b64decode(str(doc.get("b64", "")), validate=True)
    except (binascii.Error, ValueError) as e:
        raise errors.RejectError(errors.INVALID_INPUT, f"{name}: b64 is not valid base64") from e
    dt = np.dtype(dtype).newbyteorder("<")
    count = 1
    for d in shape:
        count *= d
    if len(raw) != count * dt.itemsize:
        raise errors.RejectError(errors.INVALID_INPUT,
                                 f"{name}: {len(raw)} bytes for shape {shape} of {dtype} ({count * dt.itemsize} expected)")
    return np.frombuffer(raw, dtype=dt).astype(np.dtype(dtype)).reshape(shape)


def _decode_strings(doc: dict[str, Any], name: str) -> Any:
    import numpy as np

    shape, values = doc.get("shape"), doc.get("strings")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise errors.RejectError(errors.INVALID_INPUT, f"{name}: shape {shape!r} is not a list of sizes")
    count = 1
    for d in shape:
        count *= d
    if (not isinstance(values, list) or len(values) != count or count > MAX_STRINGS
            or not all(isinstance(v, str) for v in values)):
        raise errors.RejectError(errors.INVALID_INPUT,
                                 f"{name}: strings must be a list of {count} strings (at most {MAX_STRINGS})")
    a = np.empty(count, dtype=object)
    a[:] = values
    return a.reshape(shape)
