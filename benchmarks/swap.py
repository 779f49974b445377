"""4. Hot swap: inference latency while the serving version is replaced again and again by signed
deploys, against the steady state just before; every failed request is counted.

Four keep-alive clients send KServe v2 JSON requests to the tiny model back to back. Steady state:
``steady_s`` seconds with nothing else going on. Swap phase: ``swaps`` deploys of new versions one
after another (download, load in a new worker, validate, activate, retire the old worker), from the
first command's publish to the last SUCCEEDED.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np

from benchmarks import harness as h
from benchmarks.context import Context

CLIENTS = 4


class Load:
    """Clients in threads recording (end time, latency, ok) until stopped."""

    def __init__(self, port: int, req: bytes, clients: int = CLIENTS) -> None:
        self.samples: list[list[tuple[float, float, bool]]] = [[] for _ in range(clients)]
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(port, req, i), daemon=True) for i in range(clients)]

    def _run(self, port: int, req: bytes, i: int) -> None:
        c = h.KeepAlive(port, timeout_s=60)
        mine = self.samples[i]
        pc = time.perf_counter
        while not self._stop.is_set():
            t0 = pc()
            try:
                status, _ = c.request(req)
                ok = status == 200
            except OSError:
                ok = False
            t1 = pc()
            mine.append((t1, t1 - t0, ok))
        c.close()

    def start(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)

    def between(self, t0: float, t1: float) -> tuple[list[float], int]:
        xs = [(lat, ok) for s in self.samples for (t, lat, ok) in s if t0 <= t < t1]
        return [lat * 1000 for lat, ok in xs if ok], sum(1 for _, ok in xs if not ok)


def run(ctx: Context) -> dict[str, Any]:
    sc = ctx.scale
    manifests = []
    for v in range(1, sc.swaps + 2):
        model = h.make_mlp(ctx.work / "src" / f"swap-{v}.onnx", seed=200 + v)
        manifests.append(ctx.fleet.bundle(model, ctx.bundles / "swap" / str(v), "swap", v))
    req_x = np.random.default_rng(2).standard_normal((1, 16)).astype(np.float32)
    out: dict[str, Any] = {}
    obs = ctx.observer()
    try:
        for mode in sc.modes:
            d = ctx.daemon(mode, extra={"deploy": {"probation_s": 0}})
            try:
                d.start(obs)
                pin = "onnxruntime:CPUExecutionProvider" if sc.pin_swaps else None
                d.deploy(obs, ctx.fleet, "swap", ctx.url(manifests[0]), backend=pin)
                load = Load(d.api_port, h.infer_request("swap", req_x, False, d.api_port)).start()
                try:
                    time.sleep(0.5)  # warm-up, not counted
                    s0 = time.perf_counter()
                    time.sleep(sc.steady_s)
                    s1 = time.perf_counter()
                    deploy_s: list[float] = []
                    marks: list[float] = []
                    for i, m in enumerate(manifests[1:]):
                        ctx.log(f"swap ({mode}): {i + 1}/{sc.swaps}")
                        dt, _ = d.deploy(obs, ctx.fleet, "swap", ctx.url(m), backend=pin)
                        deploy_s.append(dt)
                        marks.append(time.perf_counter() - s0)
                    s2 = time.perf_counter()
                    time.sleep(0.3)
                finally:
                    load.stop()
                steady, steady_err = load.between(s0, s1)
                during, during_err = load.between(s1, s2)
                out[mode] = {
                    "steady_ms": h.stats(steady).to_dict(), "steady_errors": steady_err, "steady_s": s1 - s0,
                    "swap_ms": h.stats(during).to_dict(), "swap_errors": during_err, "swap_s": s2 - s1,
                    "swaps": sc.swaps, "deploy_s": h.stats(deploy_s).to_dict(),
                    "timeline": _timeline(load, s0, s2), "swapped_at_s": marks,
                }
            finally:
                d.stop()
    finally:
        obs.close()
    return out


def _timeline(load: Load, t0: float, t1: float) -> dict[str, Any]:
    """A thinned (time, latency) series for the plot: at most 4000 points."""
    pts = sorted((t - t0, lat * 1000) for s in load.samples for (t, lat, ok) in s if t0 <= t < t1 and ok)
    step = max(1, len(pts) // 4000)
    return {"t_s": [round(p[0], 4) for p in pts[::step]], "ms": [round(p[1], 3) for p in pts[::step]]}
