"""11. Dynamic batching: a CNN shaped like the PP-OCR text classifier (input [N,3,48,192], four
strided convolutions, global pooling, a 2-way softmax; dynamic first dimension) answering 8
concurrent clients with ``serving.max_batch`` = 8 and with batching off, onnxruntime on the CPU,
the agent's admission defaults otherwise.

Two ways, in the same run:
- over HTTP through the real daemon (the figure the aim judges): one daemon per setting (batching
  off / on, onnxruntime's intra-op threads at its default / 1), the model deployed by a signed
  command and pinned to onnxruntime, 8 keep-alive clients sending KServe v2 binary tensors to its
  API; the daemons take turns, the order reversed every other repeat. Intra-op threads 1 against
  the default tells whether one request already keeps both cores busy (then a batch has no idle
  core to fill).
- in one process through ``Registry.infer`` (what batching changes: the runtime calls, without
  the HTTP and codec cost, which is the same either way).
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
HTTP_LOAD_S = {"full": 4.0, "quick": 1.5, "smoke": 0.3}  # 8-client run per (setting, repeat)
HTTP_SINGLE = {"full": 60, "quick": 20, "smoke": 5}  # single-client requests per (setting, repeat)
HTTP_THREADS = {"full": (0, 1), "quick": (0, 1), "smoke": (0,)}  # backends.threads: 0 the runtime's default


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


def _http_setting(mode: str, threads: int) -> str:
    return f"{mode}/threads={threads or 'default'}"


def _http(ctx: Context) -> dict[str, Any]:
    """Batching off and on through the daemon's KServe HTTP API (binary tensors), per intra-op
    threads setting; the daemons take turns within each repeat."""
    import numpy as np

    from agent.config import BackendsConfig

    sc = ctx.scale.name
    path = ctx.work / "batching" / "cls.onnx"
    if not path.exists():
        make_cls_cnn(path)
    manifest = ctx.fleet.bundle(path, ctx.bundles / "batching-cls" / "1", "cls", 1)
    x = np.random.default_rng(2).standard_normal((1, 3, 48, 192)).astype(np.float32)
    settings = [(mode, t) for t in HTTP_THREADS[sc] for mode in ("off", "on")]
    obs = ctx.observer()
    daemons: dict[str, h.Daemon] = {}
    raw: dict[str, dict[str, list[float]]] = {}
    errs: dict[str, int] = {}
    try:
        for mode, t in settings:
            key = _http_setting(mode, t)
            d = daemons[key] = ctx.daemon("process", device_id=f"bench-batching-{len(daemons)}", extra={
                "serving": {"max_batch": BATCH_ROWS if mode == "on" else 1, "max_queue_delay_us": DELAY_US},
                "backends": {"threads": t}})
            d.start(obs)
            d.wait_api()
            d.deploy(obs, ctx.fleet, "cls", ctx.url(manifest), backend="onnxruntime:CPUExecutionProvider")
            raw[key] = {"rps": [], "p50_1": [], "lat_8": []}
            errs[key] = 0
        for r in range(REPEATS[sc]):
            for mode, t in settings if r % 2 == 0 else settings[::-1]:
                key = _http_setting(mode, t)
                d = daemons[key]
                ctx.log(f"batching over HTTP: {key} ({r + 1}/{REPEATS[sc]})")
                req = h.infer_request("cls", x, True, d.api_port)
                one, e1, _ = h.drive(d.api_port, req, 1, duration_s=600, max_requests=HTTP_SINGLE[sc], warmup=3)
                lat, e8, wall = h.drive(d.api_port, req, CLIENTS, duration_s=HTTP_LOAD_S[sc], warmup=2)
                raw[key]["p50_1"].append(h.stats([v * 1e3 for v in one]).median)
                raw[key]["rps"].append((len(lat) - e8) / wall)
                raw[key]["lat_8"].extend(v * 1e3 for v in lat)
                errs[key] += e1 + e8
    finally:
        for d in daemons.values():
            d.stop()
        obs.close()
    return {"settings": {k: {"rps": h.stats(v["rps"]).to_dict(), "latency_ms": h.stats(v["lat_8"]).to_dict(),
                             "single_p50_ms": h.stats(v["p50_1"]).to_dict(), "errors": errs[k]}
                         for k, v in raw.items()},
            "load_s": HTTP_LOAD_S[sc], "single_requests": HTTP_SINGLE[sc], "encoding": "binary",
            "max_inflight": BackendsConfig().max_inflight, "repeats": REPEATS[sc]}


PER_ROW_ROUNDS = {"full": 8, "quick": 4, "smoke": 1}
PER_ROW_BATCHES = (1, 4)  # 4: what a batch holds at the default admission (backends.max_inflight)


def _per_row(ctx: Context) -> dict[str, dict[str, float]]:
    """Runtime time per image, one call at a time, at batch 1 and batch 4, with onnxruntime's
    default intra-op threads and with one: whether a batched call is any cheaper per row here."""
    import numpy as np

    from agent.backends.base import LoadOptions
    from agent.backends.onnxruntime import CPU, OnnxRuntimeBackend

    path = ctx.work / "batching" / "cls.onnx"
    rng = np.random.default_rng(3)
    xs = {b: {"x": rng.standard_normal((b, 3, 48, 192)).astype(np.float32)} for b in PER_ROW_BATCHES}
    out: dict[str, dict[str, float]] = {}
    for threads in (0, 1):
        model = OnnxRuntimeBackend().load(path, CPU, LoadOptions(threads=threads))
        try:
            per: dict[int, list[float]] = {b: [] for b in PER_ROW_BATCHES}
            for b in PER_ROW_BATCHES:
                model.infer(xs[b])  # warm
            for _ in range(PER_ROW_ROUNDS[ctx.scale.name]):  # rounds alternate the batch sizes
                for b in PER_ROW_BATCHES:
                    calls = max(PER_ROW_BATCHES) // b
                    t0 = time.perf_counter()
                    for _ in range(calls):
                        model.infer(xs[b])
                    per[b].append((time.perf_counter() - t0) * 1e3 / (calls * b))
        finally:
            model.close()
        out[f"threads={threads or 'default'}"] = {str(b): h.stats(v).median for b, v in per.items()}
    return out


def run(ctx: Context) -> dict[str, Any]:
    out = _in_process(ctx)
    out["per_row_ms"] = _per_row(ctx)
    out["http"] = _http(ctx)
    out["load_avg_1m"] = round(os.getloadavg()[0], 2)
    return out


def _in_process(ctx: Context) -> dict[str, Any]:
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
