"""``python -m benchmarks [--quick | --smoke] [--only SECTION,...] [--peers]``: run the benchmarks on
loopback and write docs/benchmarks.md, docs/benchmarks/*.png and benchmarks/results.json.

Bounded: ``full`` ≈ 12 minutes, ``--quick`` ≤ 3 minutes, ``--smoke`` (CI) ≈ 30 seconds.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks import harness as h
from benchmarks.context import SCALES, Context

SECTIONS = ("footprint", "serving", "deploy", "swap", "telemetry", "fleet", "collect", "sources", "sealed",
            "jsoncodec", "batching", "autotune")
OPTIONAL = ("peers",)  # installs other servers from PyPI: only when asked (``--peers``)
RESULTS_NAME = "results.json"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="fewer repeats and sizes (≤ 3 minutes)")
    g.add_argument("--smoke", action="store_true", help="a minimal pass that checks the harness works (CI)")
    ap.add_argument("--only", default="", help=f"comma-separated sections of {', '.join(SECTIONS)}")
    ap.add_argument("--peers", action="store_true", help="run the peers section (installs the peer servers from PyPI)")
    ap.add_argument("--peer-set", default="", help="peers section: comma-separated of agent, mlserver, kserve, fastapi")
    ap.add_argument("--peers-cache", type=Path, help="peers section: keep the peers' virtual environments here")
    ap.add_argument("--out", type=Path, default=h.REPO / "docs", help="where benchmarks.md and benchmarks/*.png go")
    ap.add_argument("--results", type=Path, help=f"raw results JSON (default benchmarks/{RESULTS_NAME})")
    ap.add_argument("--work", type=Path, help="work folder (default: a temporary one, removed after)")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--from-results", type=Path, metavar="JSON", help="only rewrite the report from saved results")
    a = ap.parse_args(argv)
    if a.from_results:
        from benchmarks import report

        res = json.loads(a.from_results.read_text())
        report.write(res, a.out, plots=not a.no_plots)
        print(f"wrote {a.out / 'benchmarks.md'} from {a.from_results}")
        return 0
    scale = SCALES["smoke" if a.smoke else "quick" if a.quick else "full"]
    only = [s.strip() for s in a.only.split(",") if s.strip()] or ([] if a.peers else list(SECTIONS))
    if a.peers and "peers" not in only:
        only.append("peers")
    unknown = set(only) - set(SECTIONS) - set(OPTIONAL)
    if unknown:
        ap.error(f"unknown section(s): {', '.join(sorted(unknown))}")
    sys.path[:0] = [str(h.REPO), str(h.REPO / "tools")]
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(h.REPO), str(h.REPO / "tools"),
                                                            os.environ.get("PYTHONPATH")]))
    h.raise_fd_limit()
    import compileall  # as installed: the agent's bytecode compiled once (pip does), not at every start

    compileall.compile_dir(str(h.REPO / "agent"), quiet=1)
    results_path = a.results or (h.REPO / "benchmarks" / RESULTS_NAME)
    with tempfile.TemporaryDirectory(prefix="edge-bench-") as tmp:
        work = a.work or Path(tmp)
        peer_set = tuple(p.strip() for p in a.peer_set.split(",") if p.strip())
        results = run(scale, only, work, peer_set, a.peers_cache)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    if (a.only or a.peers) and results_path.exists():  # a partial rerun replaces its sections, keeps the others
        old = json.loads(results_path.read_text())
        if old.get("scale") == results["scale"]:
            old["sections"].update(results["sections"])
            old["machine"] = results["machine"]
            reruns = [r for r in old.get("reruns", []) if not set(r["sections"]) <= set(results["sections"])]
            old["reruns"] = [*reruns, {"sections": sorted(results["sections"]), "started": results["started"]}]
            results = old
    results_path.write_text(json.dumps(results, indent=1, default=str))
    from benchmarks import report

    report.write(results, a.out, plots=scale.plots and not a.no_plots)
    failed = [s for s, r in results["sections"].items() if "error" in r]
    print(f"wrote {a.out / 'benchmarks.md'} and {results_path}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def run(scale: Any, only: list[str], work: Path, peers: tuple[str, ...] = (),
        peers_cache: Path | None = None) -> dict[str, Any]:
    t0 = time.monotonic()
    results: dict[str, Any] = {"scale": scale.name, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                               "machine": h.machine(), "sections": {}}
    work.mkdir(parents=True, exist_ok=True)
    with h.Broker(work / "broker").start() as broker:
        fleet = h.Fleet(work / "fleet")
        bundles = work / "bundles"
        with h.ArtifactServer(bundles) as server:
            ctx = Context(scale, work, broker, fleet, bundles, server, peers=peers, peers_cache=peers_cache)
            for name in (*SECTIONS, *OPTIONAL):
                if name not in only:
                    continue
                ts = time.monotonic()
                ctx.log(f"== {name}")
                try:
                    mod = importlib.import_module(f"benchmarks.{name}")
                    out = mod.run(ctx)
                except Exception as e:  # one broken section must not lose the others' figures
                    traceback.print_exc()
                    out = {"error": f"{type(e).__name__}: {e}"}
                out["elapsed_s"] = time.monotonic() - ts
                results["sections"][name] = out
                ctx.log(f"== {name} done in {out['elapsed_s']:.1f} s")
    results["elapsed_s"] = time.monotonic() - t0
    return results


if __name__ == "__main__":
    sys.exit(main())
