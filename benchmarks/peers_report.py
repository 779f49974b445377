"""Rendering of the peers section (benchmarks/peers.py) into docs/benchmarks.md."""

from __future__ import annotations

from typing import Any

from benchmarks.peers import CLIENTS, PEERS, SERVERS

LABELS = {"agent": "agent (process)", "mlserver": "MLServer + mlserver-sklearn", "kserve": "KServe py + ORT",
          "fastapi": "FastAPI+uvicorn + ORT"}
MODEL_LABELS = {"sk": "sklearn pipeline", "cnn": "CNN"}
LOWER_IS_BETTER = ("p50_ms", "p99_ms", "startup_s", "rss_idle_mb", "rss_loaded_mb")


def _f(x: float | None, nd: int) -> str:
    return "—" if x is None else f"{x:,.{nd}f}"


def _ratio(key: str, summ: dict[str, dict[str, Any]]) -> str:
    """The agent's figure over the best peer's (below 1 is better for times and memory)."""
    a = summ.get("agent", {}).get(key)
    peers = [summ[p][key] for p in PEERS if p in summ and summ[p].get(key) is not None]
    if a is None or not peers:
        return "—"
    best = min(peers) if key.rsplit("/", 1)[-1] in LOWER_IS_BETTER else max(peers)
    return f"{a / best:.2f}×" if best else "—"


def render(d: Any, pr: dict[str, Any]) -> None:
    summ: dict[str, dict[str, Any]] = pr.get("summary", {})
    servers = [s for s in SERVERS if s in summ]
    loads = pr.get("load_avg", [])
    d.add("## 12. Peers: the agent beside the servers users would otherwise run", "",
          "`python -m benchmarks --peers`. Every server below was installed from PyPI into its own virtual "
          "environment and measured in this one run, on the same models, with the same client (the harness's "
          "keep-alive client, KServe v2 JSON); the servers alternate over "
          f"{pr.get('repeats')} repeat(s) and each figure is the median over them, so the ratios compare "
          "figures taken side by side. MLServer serves the scikit-learn pipeline itself (joblib, "
          "`mlserver_sklearn.SKLearnModel`, model-settings.json); KServe's Python ModelServer (a custom Model "
          "wrapping onnxruntime), the FastAPI app and the agent serve the same pipeline converted to ONNX by "
          "`fleetctl bundle build model.joblib`, and a small CNN with a "
          f"{pr.get('cnn_shape')} input (MLServer has no ONNX runtime: —). The peers' processes run with their "
          "defaults, as their guides show them: onnxruntime's default session options in KServe and FastAPI (its "
          "intra-op threads spin while they wait; the agent turns spinning off, which counts on a loaded "
          "2-core machine), MLServer's one inference-pool worker process. Start-up: process start to every model answering ready for the peers; for the agent, "
          "to its API answering (its models then arrive by a deploy, measured in section 3). RSS: the whole "
          "process tree, idle (models loaded, no request yet) and after the load. Ratio: the agent over the "
          "best peer (below 1 is better for times and memory, above 1 for requests/s).", "")
    if loads:
        d.add("The machine is shared with other work: load average (1, 5, 15 min) at the start of each "
              "repeat: " + "; ".join(" / ".join(f"{x:.2f}" for x in la) for la in loads)
              + ". Absolute figures move with that load; the ratios, measured side by side, move less.", "")
    for peer, err in pr.get("not_installed", {}).items():
        d.add(f"**{LABELS[peer]} could not be installed here** (`pip install {' '.join(pr['versions'][peer])}`): "
              f"`{err}` — not measured.", "")
    for srv, err in pr.get("failed", {}).items():
        d.add(f"**{LABELS[srv]} failed in this run**: `{err}` — its runs are left out.", "")
    d.add("Versions: " + "; ".join(f"{p}: {', '.join(v)}" for p, v in pr.get("versions", {}).items()) + ".", "")
    rows: list[list[str]] = []
    for m in ("sk", "cnn"):
        if not any(f"{m}/p50_ms" in summ[s] for s in servers):
            continue
        for key, label, nd in (("p50_ms", "p50 ms, 1 client", 3), ("p99_ms", "p99 ms, 1 client", 3),
                               *((f"rps{c}", f"req/s, {c} client{'s' if c > 1 else ''}", 0) for c in CLIENTS)):
            rows.append([f"{MODEL_LABELS[m]}: {label}",
                         *(_cell(summ[s], f"{m}/{key}", nd) for s in servers), _ratio(f"{m}/{key}", summ)])
        rows.append([f"{MODEL_LABELS[m]}: errors", *(str(summ[s].get(f"{m}/errors", "—")) for s in servers), ""])
    for key, label, nd in (("startup_s", "start-up s", 2), ("rss_idle_mb", "RSS idle MiB", 1),
                           ("rss_loaded_mb", "RSS loaded MiB", 1)):
        rows.append([label, *(_f(summ[s].get(key), nd) for s in servers), _ratio(key, summ)])
    head = ["", *(LABELS[s] for s in servers), "agent ÷ best peer"]
    d.table(head, rows)
    d.add("Requests/s cells give the median and, in brackets, the range over the repeats.", "")


def _cell(s: dict[str, Any], key: str, nd: int) -> str:
    v = s.get(key)
    if v is None:
        return "—"
    rng = s.get(f"{key}_range")
    return _f(v, nd) + (f" ({_f(rng[0], nd)}–{_f(rng[1], nd)})" if rng and rng[0] != rng[1] else "")
