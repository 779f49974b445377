"""10. JSON tensors: the infer request codec (agent/serving/tensors.py ``decode_request``) on a
574 KB JSON request — the PP-OCR classifier's input, a [1,3,48,192] float32 tensor as JSON text —
through orjson and through the standard library alone, alternating in one process.

Measured in-process, without HTTP: the figure is the codec's own cost, the part of a JSON request's
latency that grows with its size. The reply (a [1,2] output) is written through both paths too.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from benchmarks import harness as h
from benchmarks.context import Context

SHAPE = (1, 3, 48, 192)
REPEATS = {"full": 60, "quick": 30, "smoke": 3}  # per path; alternating, so load hits both alike


def _body() -> bytes:
    import numpy as np

    x = np.random.default_rng(15).standard_normal(SHAPE).astype(np.float32)
    return json.dumps({"id": "bench", "inputs": [{"name": "x", "datatype": "FP32", "shape": list(SHAPE),
                                                  "data": x.tolist()}]}).encode()


def run(ctx: Context) -> dict[str, Any]:
    import numpy as np

    from agent.serving import tensors

    fast = tensors._fast_json()
    if fast is None:
        raise RuntimeError("orjson is not installed (a core dependency: pip install -e .)")
    body = _body()

    class _SV:
        name, version = "ppocr-cls", 1

    reply = {"softmax": np.array([[0.25, 0.75]], dtype=np.float32)}
    n = REPEATS[ctx.scale.name]
    times: dict[str, dict[str, list[float]]] = {p: {"decode": [], "encode": []} for p in ("stdlib", "orjson")}
    feeds = {}
    for _ in range(n):
        for path in ("stdlib", "orjson"):
            tensors._orjson = None if path == "stdlib" else fast
            try:
                t0 = time.perf_counter()
                r = tensors.decode_request({}, body)
                t1 = time.perf_counter()
                tensors.encode_response(_SV(), reply, r)  # type: ignore[arg-type]
                t2 = time.perf_counter()
            finally:
                tensors._orjson = fast
            times[path]["decode"].append((t1 - t0) * 1e3)
            times[path]["encode"].append((t2 - t1) * 1e3)
            feeds[path] = r.feed["x"]
    if not np.array_equal(feeds["stdlib"], feeds["orjson"]):
        raise RuntimeError("the two paths decoded different tensors")
    ctx.log(f"jsoncodec: {len(body)} bytes, {n} decodes per path")
    out: dict[str, Any] = {"body_bytes": len(body), "shape": list(SHAPE), "repeats": n,
                           "orjson_version": getattr(fast, "__version__", "?"), "load_avg_1m": round(os.getloadavg()[0], 2),
                           "cores": os.cpu_count()}
    for path, t in times.items():
        out[path] = {k: h.stats(v).to_dict() for k, v in t.items()}
    out["decode_speedup"] = out["stdlib"]["decode"]["median"] / out["orjson"]["decode"]["median"]
    return out
