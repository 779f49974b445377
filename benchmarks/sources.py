"""7. A tree ensemble from its training framework: per-call cost of one prediction (one sample) with
the framework's own ``predict_proba``, with onnxruntime called directly on the converted model,
and through the agent (KServe v2 JSON and binary over loopback, single keep-alive client, process
isolation as shipped). The model: XGBoost, 100 trees of depth 6 on scikit-learn's breast-cancer
data set (30 features, 2 classes), built with ``fleetctl bundle build model.json`` (certified).
"""

from __future__ import annotations

import json
import time
from typing import Any

from benchmarks import harness as h
from benchmarks.context import Context

TREES, DEPTH = 100, 6
NAME = "trees"


def _request(x: Any, binary: bool, port: int) -> bytes:
    """A KServe v2 infer request for the converted model's one input, ``input``."""
    shape = list(x.shape)
    if binary:
        blob = x.astype("<f4").tobytes()
        head = json.dumps({"inputs": [{"name": "input", "shape": shape, "datatype": "FP32",
                                       "parameters": {"binary_data_size": len(blob)}}],
                           "parameters": {"binary_data_output": True}}, separators=(",", ":")).encode()
        body = head + blob
        extra = f"Inference-Header-Content-Length: {len(head)}\r\nContent-Type: application/octet-stream\r\n"
    else:
        body = json.dumps({"inputs": [{"name": "input", "shape": shape, "datatype": "FP32",
                                       "data": x.ravel().tolist()}]}, separators=(",", ":")).encode()
        extra = "Content-Type: application/json\r\n"
    return (f"POST /v2/models/{NAME}/infer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{extra}"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def _timed(fn: Any, n: int) -> dict[str, Any]:
    for _ in range(max(5, n // 20)):
        fn()
    lat = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        lat.append((time.perf_counter() - t0) * 1000)
    return {"ms": h.stats(lat).to_dict()}


def run(ctx: Context) -> dict[str, Any]:
    import numpy as np
    import onnxruntime as ort
    import xgboost as xgb
    from sklearn.datasets import load_breast_cancer

    from fleetctl.sources.certify import build_from_source

    n = max(50, ctx.scale.tiny_requests // 4)
    xs, ys = load_breast_cancer(return_X_y=True)
    model = xgb.XGBClassifier(n_estimators=TREES, max_depth=DEPTH, random_state=0, n_jobs=1).fit(xs, ys)
    src = ctx.work / "src" / "trees.json"
    src.parent.mkdir(parents=True, exist_ok=True)
    model.save_model(src)
    np.save(ctx.work / "src" / "trees-x.npy", xs[:16])
    manifest = build_from_source(str(src), ctx.bundles / NAME / "1", NAME, 1, ctx.fleet.keys,
                                 sample_input=ctx.work / "src" / "trees-x.npy", overwrite=True)
    x64 = xs[:1]
    x32 = x64.astype(np.float32)
    res: dict[str, Any] = {"model": f"XGBoost {xgb.__version__}, {TREES} trees of depth {DEPTH}, 30 features",
                           "requests": n}
    ctx.log("sources: xgboost predict_proba, then onnxruntime directly")
    res["framework"] = _timed(lambda: model.predict_proba(x64), n)
    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(manifest.parent / "model.onnx"), sess_options=so,
                                providers=["CPUExecutionProvider"])
    res["onnxruntime"] = _timed(lambda: sess.run(None, {"input": x32}), n)
    obs = ctx.observer()
    d = ctx.daemon("process")
    try:
        d.start(obs)
        d.wait_api()
        d.deploy(obs, ctx.fleet, NAME, ctx.url(manifest))
        for enc in ("json", "binary"):
            ctx.log(f"sources: the agent, {enc}")
            lat, errs, _ = h.drive(d.api_port, _request(x32, enc == "binary", d.api_port), 1, duration_s=600,
                                   max_requests=n, warmup=max(5, n // 20))
            res[f"agent_{enc}"] = {"ms": h.stats([v * 1000 for v in lat]).to_dict(), "errors": errs}
    finally:
        d.stop()
        obs.close()
    return res
