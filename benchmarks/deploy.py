"""3. Deploy: from the signed command's publish to the SUCCEEDED job update, for bundles of about
1, 50 and 200 MB on loopback, beside the floor (download + sha256 + fsync + model load, alone).

Each repeat deploys a new bundle (new bytes: the content-addressed store would otherwise reuse the
files) as the next version of the same model; probation is off so SUCCEEDED is not 60 s late by
design. Variants: ``process`` at defaults (autotune measures every runtime that reads the bundle),
``process`` and ``none`` with the backend pinned to onnxruntime (what the floor does).
"""

from __future__ import annotations

import json
import subprocess
import time
from collections import defaultdict
from typing import Any

from benchmarks import harness as h
from benchmarks.context import Context

PINNED = "onnxruntime:CPUExecutionProvider"


def variants(ctx: Context) -> list[tuple[str, str, str | None]]:
    out: list[tuple[str, str, str | None]] = [("process, autotune (defaults)", "process", None)]
    out += [(f"{m}, pinned", m, PINNED) for m in ctx.scale.modes]
    if ctx.scale.name == "smoke":
        out = out[1:2]
    return out


def floor(manifest_url: str, dest: str) -> dict[str, float]:
    r = subprocess.run([h.PYTHON, "-m", "benchmarks.floors", "deploy", manifest_url, dest], capture_output=True,
                       text=True, timeout=600, env=h.env(), cwd=h.REPO, check=True)
    doc: dict[str, float] = json.loads(r.stdout.strip().splitlines()[-1])
    return doc


def run(ctx: Context) -> dict[str, Any]:
    sc = ctx.scale
    bundles: dict[tuple[float, int], Any] = {}
    floors: dict[float, list[dict[str, float]]] = defaultdict(list)
    for size in sc.deploy_sizes_mb:
        for r in range(sc.deploy_repeats):
            ctx.log(f"deploy: building a {size:g} MB bundle ({r + 1}/{sc.deploy_repeats})")
            name = f"m{size:g}mb"
            model = h.make_sized(ctx.work / "src" / f"{name}-{r}.onnx", int(size * 2**20), seed=100 + r)
            bundles[(size, r)] = ctx.fleet.bundle(model, ctx.bundles / name / str(r + 1), name, r + 1)
            model.unlink()
            floors[size].append(floor(ctx.url(bundles[(size, r)]), str(ctx.work / "floor" / f"{name}-{r}")))
    obs = ctx.observer()
    out: dict[str, Any] = {"floor": {}, "agent": {}, "first_deploy": {}}
    try:
        for label, mode, pin in variants(ctx):
            d = ctx.daemon(mode, extra={"deploy": {"probation_s": 0}})
            try:
                d.start(obs)
                time.sleep(sc.settle_s)
                # The first deploy after a start also imports the download stack (and, in-process,
                # the runtime): measured once here, apart from the steady figures below.
                first, _ = d.deploy(obs, ctx.fleet, "tiny", ctx.url(ctx.tiny_bundle()), backend=pin)
                out["first_deploy"][label] = first
                for size in sc.deploy_sizes_mb:
                    rows: list[dict[str, Any]] = []
                    for r in range(sc.deploy_repeats):
                        ctx.log(f"deploy: {label}, {size:g} MB ({r + 1}/{sc.deploy_repeats})")
                        m = bundles[(size, r)]
                        elapsed, final = d.deploy(obs, ctx.fleet, f"m{size:g}mb", ctx.url(m), backend=pin)
                        figs = final.get("result", {}).get("figures", {})
                        rows.append({"total_s": elapsed, "steps_s": figs.get("steps_s", {}),
                                     "backend": final.get("result", {}).get("backend")})
                    steps = {k for row in rows for k in row["steps_s"]}
                    out["agent"][f"{label}/{size:g}"] = {
                        "total_s": h.stats([row["total_s"] for row in rows]).to_dict(),
                        "steps_s": {k: h.stats([row["steps_s"].get(k, 0.0) for row in rows]).median for k in steps},
                        "backend": rows[-1]["backend"], "mode": mode, "pinned": pin is not None, "size_mb": size}
            finally:
                d.stop()
    finally:
        obs.close()
    for size, rows in floors.items():
        out["floor"][f"{size:g}"] = {k: h.stats([row[k] for row in rows]).to_dict() for k in rows[0]}
    return out
