"""8. Encrypted bundles: deploy time of an age-encrypted bundle against the same bundle in plain
and against its floor (download + sha256 + fsync of the ciphertext, decryption and plaintext
sha256 in memory, onnxruntime session from the bytes: benchmarks/floors.py sealed-deploy).

Each repeat deploys new bytes (a new seed: the store would otherwise reuse the files), plain and
encrypted alternately, as the next versions of one model, to one daemon at ``backends.isolation =
"process"`` pinned to onnxruntime (what the floor does), probation off.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from typing import Any

from benchmarks import harness as h
from benchmarks.context import Context

PINNED = "onnxruntime:CPUExecutionProvider"
SIZE_MB = {"full": 50.0, "quick": 50.0, "smoke": 1.0}
REPEATS = {"full": 5, "quick": 2, "smoke": 1}  # the medians of a few pairs: single deploys are noisy on a busy machine


def floor(kind: str, manifest_url: str, dest: str, *extra: str) -> dict[str, float]:
    r = subprocess.run([h.PYTHON, "-m", "benchmarks.floors", kind, manifest_url, dest, *extra], capture_output=True,
                       text=True, timeout=600, env=h.env(), cwd=h.REPO, check=True)
    doc: dict[str, float] = json.loads(r.stdout.strip().splitlines()[-1])
    return doc


def run(ctx: Context) -> dict[str, Any]:
    from fleetctl.bundle import build_bundle
    from fleetctl.sealing import generate_identity

    sc = ctx.scale
    size, repeats = SIZE_MB[sc.name], REPEATS[sc.name]
    ident = generate_identity(ctx.work / "age", "bench", overwrite=True)
    name = f"sealed{size:g}mb"
    pairs = []  # (plain manifest, encrypted manifest) per repeat
    for r in range(repeats):
        ctx.log(f"sealed: building {size:g} MB bundles, plain and encrypted ({r + 1}/{repeats})")
        plain_model = h.make_sized(ctx.work / "src" / f"{name}-p{r}.onnx", int(size * 2**20), seed=200 + r)
        sealed_model = h.make_sized(ctx.work / "src" / f"{name}-s{r}.onnx", int(size * 2**20), seed=300 + r)
        p = build_bundle(plain_model, ctx.bundles / name / str(2 * r + 1), name, 2 * r + 1, ctx.fleet.keys,
                         samples=2, overwrite=True)
        s = build_bundle(sealed_model, ctx.bundles / name / str(2 * r + 2), name, 2 * r + 2, ctx.fleet.keys,
                         samples=2, overwrite=True, encrypt_to=[ident.recipient])
        plain_model.unlink()
        sealed_model.unlink()
        pairs.append((p, s))
    obs = ctx.observer()
    rows: dict[str, list[dict[str, Any]]] = {"plain": [], "sealed": []}
    floors: dict[str, list[dict[str, float]]] = {"plain": [], "sealed": []}
    try:
        d = ctx.daemon("process", extra={"deploy": {"probation_s": 0},
                                         "trust": {"decryption_keys": [str(ident.identity_path)]}})
        d.start(obs)
        try:
            time.sleep(sc.settle_s)
            d.deploy(obs, ctx.fleet, "tiny", ctx.url(ctx.tiny_bundle()), backend=PINNED)  # imports done
            for r, pair in enumerate(pairs):  # each floor right before its deploy: the same machine load
                for kind, manifest in zip(("plain", "sealed"), pair, strict=True):
                    ctx.log(f"sealed: floor and deploy, {kind} {size:g} MB ({r + 1}/{repeats})")
                    dest = str(ctx.work / "floor" / f"{name}-{kind}{r}")
                    floors[kind].append(floor("deploy", ctx.url(manifest), dest) if kind == "plain" else
                                        floor("sealed-deploy", ctx.url(manifest), dest, str(ident.identity_path)))
                    elapsed, final = d.deploy(obs, ctx.fleet, name, ctx.url(manifest), backend=PINNED)
                    rows[kind].append({"total_s": elapsed,
                                       "steps_s": final.get("result", {}).get("figures", {}).get("steps_s", {})})
        finally:
            d.stop()
    finally:
        obs.close()
    out: dict[str, Any] = {"size_mb": size, "agent": {}, "floor": {}, "load_avg_1m": round(os.getloadavg()[0], 2),
                           "cores": os.cpu_count()}  # the machine may be shared: say how busy it was
    for kind in ("plain", "sealed"):
        steps = {k for row in rows[kind] for k in row["steps_s"]}
        out["agent"][kind] = {"total_s": h.stats([row["total_s"] for row in rows[kind]]).to_dict(),
                              "steps_s": {k: h.stats([row["steps_s"].get(k, 0.0) for row in rows[kind]]).median
                                          for k in steps}}
        out["floor"][kind] = {k: h.stats([row[k] for row in floors[kind]]).to_dict() for k in floors[kind][0]}
    return out
