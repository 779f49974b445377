"""1. Footprint: memory and start-up of the idle daemon and of the daemon serving one small model
on each runtime, beside the floors measured in the same run.

Memory is the whole process tree (the daemon and its model worker processes): RSS summed over the
processes, and PSS (shared pages split between them, so a library two processes map counts once).
Start-up is from the process start to its retained ``online`` status arriving at a fleet-side
subscriber (connected to the broker and subscribed), and to ``/v2/health/ready``.
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import psutil

from benchmarks import harness as h
from benchmarks.context import BACKEND_OF, VARIANT_FILE, Context, Floor

RUNTIME_LIBS = {  # a file mapped into the process means the package's native code was loaded
    "numpy": "_multiarray_umath", "onnxruntime": "onnxruntime_pybind11_state", "openvino": "libopenvino",
    "ai_edge_litert": "_pywrap_tensorflow_interpreter_wrapper", "cryptography": "cryptography/hazmat/bindings/_rust",
}


def mapped_libs(pid: int) -> dict[str, bool]:
    """Which runtimes' native libraries the process has mapped (from /proc/PID/maps)."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return {}
    return {name: marker in maps for name, marker in RUNTIME_LIBS.items()}


def _fp(f: h.Footprint) -> dict[str, float]:
    return {"rss_mb": f.rss_mb, "pss_mb": f.pss_mb, "uss_mb": f.uss_mb, "processes": f.processes}


def run(ctx: Context) -> dict[str, Any]:
    sc = ctx.scale
    samples: dict[str, list[dict[str, float]]] = defaultdict(list)
    manifest = ctx.tiny_bundle()
    bundle_dir = manifest.parent
    obs = ctx.observer()
    try:
        # Floors, in fresh processes, interleaved with the daemons' repeats below.
        for r in range(sc.repeats):
            ctx.log(f"footprint: floors, repeat {r + 1}/{sc.repeats}")
            with Floor("bare") as f:
                samples["floor:bare"].append({**_fp(f.footprint()), "startup_s": f.startup_s})
            with Floor("paho", ctx.broker.host, str(ctx.broker.port)) as f:
                samples["floor:paho"].append({**_fp(f.footprint()), "startup_s": f.startup_s})
            for rt in sc.runtimes:
                with Floor("runtime", rt, str(bundle_dir / VARIANT_FILE[rt])) as f:
                    samples[f"floor:{rt}"].append({**_fp(f.footprint()), "startup_s": f.startup_s})
            for mode in sc.modes:
                for rt in sc.runtimes:
                    ctx.log(f"footprint: daemon ({mode}) + {rt}, repeat {r + 1}/{sc.repeats}")
                    d = ctx.daemon(mode)
                    try:
                        online_s = d.start(obs)
                        ready_s = d.wait_api()
                        _wait_probe(d)  # steady state: the one-off backend probe of a first boot is over
                        time.sleep(sc.settle_s)
                        idle = d.footprint()
                        libs = mapped_libs(d.pid)
                        samples[f"daemon:{mode}:idle"].append(
                            {**_fp(idle), "startup_s": online_s, "api_ready_s": ready_s})
                        samples[f"libs:{mode}:idle"].append({k: float(v) for k, v in libs.items()})
                        if rt == sc.runtimes[0]:  # a restart on the same state folder: the probe is cached
                            d.stop()
                            online2 = d.start(obs)
                            samples[f"daemon:{mode}:restart"].append({"startup_s": online2})
                        _, final = d.deploy(obs, ctx.fleet, "tiny", ctx.url(manifest), backend=BACKEND_OF[rt])
                        _infer_some(d)
                        time.sleep(sc.settle_s)
                        fp = d.footprint()
                        samples[f"daemon:{mode}:{rt}"].append(_fp(fp))
                        samples[f"libs:{mode}:{rt}"].append({k: float(v) for k, v in mapped_libs(d.pid).items()})
                        tree = [mapped_libs(c.pid) for c in psutil.Process(d.pid).children(recursive=True)]
                        samples[f"libs:{mode}:{rt}:workers"].append(
                            {k: float(any(t.get(k, False) for t in tree)) for k in RUNTIME_LIBS})
                        samples[f"daemon:{mode}:{rt}:variant"].append({"ok": float(final["result"]["backend"] == BACKEND_OF[rt])})
                    finally:
                        d.stop()
    finally:
        obs.close()
    out: dict[str, Any] = {}
    for key, rows in samples.items():
        metrics = {m for row in rows for m in row}
        out[key] = {m: h.stats([row[m] for row in rows if m in row]).to_dict() for m in sorted(metrics)}
    return out


def _wait_probe(d: h.Daemon, timeout_s: float = 60.0) -> None:
    """Until the daemon's background backend probe (agent/backends/probed.py) wrote its cache and
    its child process is gone."""
    import psutil

    cache = d.root / "state" / "cache" / "backend-targets.json"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cache.exists() and not psutil.Process(d.pid).children():
            return
        time.sleep(0.05)
    raise TimeoutError(f"no backend probe cache after {timeout_s} s:\n{d.tail()}")


def _infer_some(d: h.Daemon, n: int = 20) -> None:
    import numpy as np

    req = h.infer_request("tiny", np.ones((1, 16), np.float32), False, d.api_port)
    c = h.KeepAlive(d.api_port)
    try:
        for _ in range(n):
            status, body = c.request(req)
            if status != 200:
                raise RuntimeError(f"infer failed: {status} {body[:200]!r}")
    finally:
        c.close()
