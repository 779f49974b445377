"""11. Dynamic batching: a CNN shaped like the PP-OCR text classifier (input [N,3,48,192], four
strided convolutions, global pooling, a 2-way softmax; dynamic first dimension) answering 8
concurrent clients through ``Registry.infer`` with ``serving.max_batch`` = 8 and with batching off,
alternating in one process, onnxruntime on the CPU, the agent's admission defaults otherwise.

In-process, without HTTP: the figure is what batching changes, the runtime calls; the HTTP and
codec cost per request are the same either way.
"""

from __future__ import annotations

import math
import os
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks import harness as h
from benchmarks.context import Context

CLIENTS = 8
BATCH_ROWS = 8
DELAY_US = 500  # the config default
REQUESTS = {"full": 120, "quick": 60, "smoke": 5}  # per client per repeat
REPEATS = {"full": 3, "quick": 2, "smoke": 1}
JOIN_S = 300.0


def make_cls_cnn(path: Path, seed: int = 0) -> Path:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    chans = [3, 32, 64, 128, 256]  # ≈ 130 M multiply-adds per image
    nodes, inits = [], []
    x = "x"
    for i in range(len(chans) - 1):
        cin, cout = chans[i], chans[i + 1]
        wt = (rng.standard_normal((cout, cin, 3, 3)) * math.sqrt(2 / (cin * 9))).astype(np.float32)
        inits += [numpy_helper.from_array(wt, f"w{i}"), numpy_helper.from_array(np.zeros(cout, np.float32), f"b{i}")]
        nodes += [helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                                   strides=[1, 1] if i == 0 else [2, 2]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
        x = f"r{i}"
    fc = (rng.standard_normal((chans[-1], 2)) * 0.05).astype(np.float32)
    inits += [numpy_helper.from_array(fc, "fc"), numpy_helper.from_array(np.zeros(2, np.float32), "fcb")]
    nodes += [helper.make_node("GlobalAveragePool", [x], ["gap"]),
              helper.make_node("Flatten", ["gap"], ["feat"]),
              helper.make_node("MatMul", ["feat", "fc"], ["mm"]),
              helper.make_node("Add", ["mm", "fcb"], ["logits"]),
              helper.make_node("Softmax", ["logits"], ["probs"], axis=-1)]
    graph = helper.make_graph(nodes, "cls", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 48, 192])],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 2])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def _load(ctx: Context, rows: int) -> Any:
    from agent.backends.base import LoadOptions
    from agent.backends.onnxruntime import CPU, OnnxRuntimeBackend
    from agent.serving.admission import Limits
    from agent.serving.registry import Registry, ServingVersion

    path = ctx.work / "batching" / "cls.onnx"
    if not path.exists():
        make_cls_cnn(path)
    reg = Registry(limits=Limits(batch_rows=rows, batch_delay_us=DELAY_US))
    reg.activate(ServingVersion("cls", 1, "onnx-fp32", OnnxRuntimeBackend().load(path, CPU, LoadOptions())))
    return reg


def _load_run(reg: Any, n: int) -> tuple[float, list[float], int]:
    """(requests/s, latencies ms, errors) of CLIENTS threads each sending n requests back to back."""
    import numpy as np

    lat: list[float] = []
    errs = [0]
    lock = threading.Lock()
    start = threading.Barrier(CLIENTS + 1)

    def client(seed: int) -> None:
        x = {"x": np.random.default_rng(seed).standard_normal((1, 3, 48, 192)).astype(np.float32)}
        mine = []
        start.wait(JOIN_S)
        for _ in range(n):
            t0 = time.perf_counter()
            try:
                reg.infer("cls", x)
            except Exception:
                with lock:
                    errs[0] += 1
            mine.append((time.perf_counter() - t0) * 1e3)
        with lock:
            lat.extend(mine)
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    start.wait(JOIN_S)
    t0 = time.perf_counter()
    for t in threads:
        t.join(JOIN_S)
    return CLIENTS * n / (time.perf_counter() - t0), lat, errs[0]


def run(ctx: Context) -> dict[str, Any]:
    sc = ctx.scale.name
    n, repeats = REQUESTS[sc], REPEATS[sc]
    regs = {"off": _load(ctx, 1), "on": _load(ctx, BATCH_ROWS)}
    for reg in regs.values():  # warm: first calls allocate the runtime's buffers
        _load_run(reg, 2)
    rps: dict[str, list[float]] = {"off": [], "on": []}
    lat: dict[str, list[float]] = {"off": [], "on": []}
    errs = {"off": 0, "on": 0}
    for r in range(repeats):
        for mode in ("off", "on") if r % 2 == 0 else ("on", "off"):
            ctx.log(f"batching: {mode}, {CLIENTS} clients × {n} requests ({r + 1}/{repeats})")
            q, ls, e = _load_run(regs[mode], n)
            rps[mode].append(q)
            lat[mode].extend(ls)
            errs[mode] += e
    on_sv = regs["on"].get("cls")
    out: dict[str, Any] = {"clients": CLIENTS, "max_batch": BATCH_ROWS, "delay_us": DELAY_US, "requests_per_client": n,
                           "repeats": repeats, "batched_calls": on_sv.batcher.batches if on_sv.batcher else 0,
                           "load_avg_1m": round(os.getloadavg()[0], 2), "cores": os.cpu_count()}
    for mode in ("off", "on"):
        out[mode] = {"rps": h.stats(rps[mode]).to_dict(), "latency_ms": h.stats(lat[mode]).to_dict(),
                     "errors": errs[mode]}
    for reg in regs.values():
        reg.close()
    return out
