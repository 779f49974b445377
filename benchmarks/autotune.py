"""13. Autotune's choice under each objective: the batching section's CNN (shaped like the PP-OCR
text classifier, input [N,3,48,192], ≈ 130 M multiply-adds per image) deployed at the defaults (autotune on, nothing pinned) to two daemons, one with ``backends.autotune_objective =
"latency"``, one with ``"throughput"`` (``backends.autotune_concurrency`` = 8, the load measured
below). Each deploy's verdict is read back as ``agentctl explain JOB`` shows it: every candidate's
single-call median and requests/s at that concurrency, the winner and why it won. Then the model
each daemon serves is measured over HTTP (binary tensors, the daemons alternating): single-client
p50 and requests/s at 8 clients, so the choice is checked against the load it was made for.
"""

from __future__ import annotations

import os
import subprocess
from typing import Any

from benchmarks import harness as h
from benchmarks.batching import make_cls_cnn
from benchmarks.context import Context

OBJECTIVES = ("latency", "throughput")
CONCURRENCY = 8  # backends.autotune_concurrency, and the clients of the load below
CNN_SHAPE = (1, 3, 48, 192)  # one image of benchmarks/batching.py's classifier
REPEATS = {"full": 3, "quick": 1, "smoke": 1}
LOAD_S = {"full": 3.0, "quick": 1.0, "smoke": 0.3}  # per (daemon, repeat) throughput run
LATENCY_REQUESTS = {"full": 200, "quick": 40, "smoke": 10}
EXPLAIN_TIMEOUT_S = 30.0


def _explain_text(d: h.Daemon, job: str) -> str:
    """``agentctl explain JOB`` as an operator runs it (the human output)."""
    r = subprocess.run([h.PYTHON, "-m", "agent.cli.agentctl", "--socket", str(d.socket), "explain", job],
                       capture_output=True, text=True, timeout=EXPLAIN_TIMEOUT_S, env=h.env(), cwd=h.REPO)
    return "\n".join(ln for ln in r.stdout.splitlines() if not ln.startswith("result: "))


def _verdict(d: h.Daemon, job: str) -> dict[str, Any]:
    """The deploy's autotune verdict from the control socket's ``explain`` (what agentctl reads)."""
    j = d.control("explain", {"job": job})
    tune = ((j.get("result") or {}).get("selection") or {}).get("autotune") or {}
    rows = [{k: r[k] for k in ("backend", "variant", "median_ms", "throughput_rps", "concurrency", "error")
             if k in r} for r in tune.get("measured") or []]
    return {"state": tune.get("state"), "objective": tune.get("objective"), "concurrency": tune.get("concurrency"),
            "metric": tune.get("metric"), "winner": tune.get("winner"), "won": tune.get("won"), "measured": rows,
            "served_by": (j.get("result") or {}).get("backend")}


def run(ctx: Context) -> dict[str, Any]:
    import numpy as np

    sc = ctx.scale.name
    model = make_cls_cnn(ctx.work / "src" / "autotune-cls.onnx")
    manifest = ctx.fleet.bundle(model, ctx.bundles / "autotune-cnn" / "1", "cnn", 1)
    x = np.random.default_rng(1).standard_normal(CNN_SHAPE).astype(np.float32)
    obs = ctx.observer()
    daemons: dict[str, h.Daemon] = {}
    out: dict[str, Any] = {"concurrency": CONCURRENCY, "cnn_shape": list(CNN_SHAPE), "repeats": REPEATS[sc],
                           "objectives": {}}
    try:
        for obj in OBJECTIVES:
            d = daemons[obj] = ctx.daemon("process", device_id=f"bench-autotune-{obj}", extra={
                "backends": {"autotune_objective": obj, "autotune_concurrency": CONCURRENCY}})
            d.start(obs)
            d.wait_api()
            ctx.log(f"autotune: deploying the CNN with objective {obj}")
            took, doc = d.deploy(obs, ctx.fleet, "cnn", ctx.url(manifest))
            job = str(doc.get("id") or doc.get("job") or "")
            v = _verdict(d, job) if job else {"error": f"no job id in {sorted(doc)}"}
            v["deploy_s"] = took
            v["explain"] = _explain_text(d, job) if job else ""
            out["objectives"][obj] = v
        served: dict[str, dict[str, list[float]]] = {o: {"p50_ms": [], "p99_ms": [], "rps": []} for o in OBJECTIVES}
        errors = dict.fromkeys(OBJECTIVES, 0)
        for r in range(REPEATS[sc]):
            for obj in OBJECTIVES if r % 2 == 0 else OBJECTIVES[::-1]:  # alternate: load elsewhere hits both
                d = daemons[obj]
                req = h.infer_request("cnn", x, True, d.api_port)
                lat, e1, _ = h.drive(d.api_port, req, 1, duration_s=600, max_requests=LATENCY_REQUESTS[sc], warmup=5)
                ms = h.stats([t * 1e3 for t in lat])
                tl, e8, wall = h.drive(d.api_port, req, CONCURRENCY, duration_s=LOAD_S[sc], warmup=3)
                served[obj]["p50_ms"].append(ms.median)
                served[obj]["p99_ms"].append(ms.p99)
                served[obj]["rps"].append((len(tl) - e8) / wall)
                errors[obj] += e1 + e8
        for obj in OBJECTIVES:
            out["objectives"][obj]["served"] = {k: h.stats(v).to_dict() for k, v in served[obj].items()}
            out["objectives"][obj]["served"]["errors"] = errors[obj]
            out["objectives"][obj]["served"]["rss_mb"] = daemons[obj].footprint().rss_mb  # the tree, after the load
    finally:
        for d in daemons.values():
            d.stop()
        obs.close()
    out["load_avg_1m"] = round(os.getloadavg()[0], 2)
    out["cores"] = os.cpu_count()
    return out
