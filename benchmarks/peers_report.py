"""Rendering of the peers section (benchmarks/peers.py) into docs/benchmarks.md."""

from __future__ import annotations

from typing import Any

from benchmarks.peers import BINARY, CLIENTS, PEERS, SERVERS, SPREAD_CLIENTS

LABELS = {"agent": "agent (process)", "mlserver": "MLServer + mlserver-sklearn", "kserve": "KServe py + ORT",
          "fastapi": "FastAPI+uvicorn + ORT"}
MODEL_LABELS = {"sk": "sklearn pipeline, JSON", "sk_bin": "sklearn pipeline, binary", "cnn": "CNN, JSON",
                "cnn_bin": "CNN, binary"}
NO_BINARY = {"mlserver": "no binary", "fastapi": "JSON only"}  # why a server has no binary rows
LOWER_IS_BETTER = ("p50_ms", "p99_ms", "startup_s", "rss_idle_mb", "rss_loaded_mb", "cpu_us1", "cpu_us8")


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
    from benchmarks import notes

    summ: dict[str, dict[str, Any]] = pr.get("summary", {})
    servers = [s for s in SERVERS if s in summ]
    loads = pr.get("load_avg", [])
    d.add("## 12. Peers: the agent beside the servers users would otherwise run", "",
          "`python -m benchmarks --peers`. Every server below was installed from PyPI into its own virtual "
          "environment and measured in this one run, on the same models, with the same client (the harness's "
          "keep-alive client, KServe v2 JSON and binary tensors); the servers alternate over "
          f"{pr.get('repeats')} repeat(s) and each figure is the median over them, so the ratios compare "
          "figures taken side by side. MLServer serves the scikit-learn pipeline itself (joblib, "
          "`mlserver_sklearn.SKLearnModel`, model-settings.json); KServe's Python ModelServer (a custom Model "
          "wrapping onnxruntime), the FastAPI app and the agent serve the same pipeline converted to ONNX by "
          "`fleetctl bundle build model.joblib`, and a small CNN with a "
          f"{pr.get('cnn_shape')} input (MLServer has no ONNX runtime: —), as JSON and, where the server speaks "
          "them, as binary tensors. The peers' processes run with their "
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
    repeats = int(pr.get("repeats") or 1)
    for m in MODEL_LABELS:
        if not any(f"{m}/p50_ms" in summ[s] for s in servers):
            continue
        for key, label, nd in (("p50_ms", "p50 ms, 1 client", 3), ("p99_ms", "p99 ms, 1 client", 3),
                               *((f"rps{c}", f"req/s, {c} client{'s' if c > 1 else ''}", 0) for c in CLIENTS)):
            rows.append([f"{MODEL_LABELS[m]}: {label}",
                         *(_cell(summ[s], f"{m}/{key}", nd, s, m) for s in servers), _ratio(f"{m}/{key}", summ)])
        if repeats > 1:
            rows.append([f"{MODEL_LABELS[m]}: {SPREAD_CLIENTS}-client req/s spread over {repeats} repeats",
                         *(_spread(summ[s], f"{m}/rps{SPREAD_CLIENTS}", s, m) for s in servers), ""])
        rows.append([f"{MODEL_LABELS[m]}: server CPU µs per request, {SPREAD_CLIENTS} clients",
                     *(_cell(summ[s], f"{m}/cpu_us{SPREAD_CLIENTS}", 0, s, m) for s in servers),
                     _ratio(f"{m}/cpu_us{SPREAD_CLIENTS}", summ)])
        rows.append([f"{MODEL_LABELS[m]}: errors",
                     *(str(summ[s].get(f"{m}/errors", _missing(s, m))) for s in servers), ""])
    for key, label, nd in (("startup_s", "start-up s", 2), ("rss_idle_mb", "RSS idle MiB", 1),
                           ("rss_loaded_mb", "RSS loaded MiB", 1)):
        rows.append([label, *(_f(summ[s].get(key), nd) for s in servers), _ratio(key, summ)])
    head = ["", *(LABELS[s] for s in servers), "agent ÷ best peer"]
    d.table(head, rows)
    d.add("Requests/s cells give the median and, in brackets, the range over the repeats. The spread rows give "
          "the farthest repeat from the median in % of the median (± that covers every repeat), then the range. "
          "Server CPU per request: user + system time of the server's whole process tree during the "
          f"{SPREAD_CLIENTS}-client run over the requests it answered (the clients' CPU is not in it): when "
          "requests/s drop while this stays, the server got less of the machine; when it rises with them, the "
          "server spent more per request. "
          "Binary rows: KServe v2 binary tensors in and out (`binary_data_size`, `binary_data_output`, "
          "`Inference-Header-Content-Length`), sent only to the servers that speak the extension "
          f"({', '.join(LABELS[b] for b in BINARY)}); MLServer's REST API and the FastAPI app take JSON only.", "",
          notes.PEERS, "")


def _missing(server: str, model: str) -> str:
    """What a cell says when ``server`` has no figure for ``model``."""
    if model.endswith("_bin") and server in NO_BINARY:
        return NO_BINARY[server]
    return "—"


def _cell(s: dict[str, Any], key: str, nd: int, server: str = "", model: str = "") -> str:
    v = s.get(key)
    if v is None:
        return _missing(server, model)
    rng = s.get(f"{key}_range")
    return _f(v, nd) + (f" ({_f(rng[0], nd)}–{_f(rng[1], nd)})" if rng and rng[0] != rng[1] else "")


def _spread(s: dict[str, Any], key: str, server: str, model: str) -> str:
    pct, rng = s.get(f"{key}_spread_pct"), s.get(f"{key}_range")
    if pct is None or not rng:
        return _missing(server, model)
    return f"±{pct:.1f} % ({_f(rng[0], 0)}–{_f(rng[1], 0)})"


SPREAD_AIM_PCT = 10.0  # at 8 clients, every repeat within ± this of the median
PEER_RATIO_AIM = 1.5  # the small model at 8 clients, over the best peer


def aims(pr: dict[str, Any]) -> list[list[str]]:
    """The serving-under-load aims judged on this section: (aim, measured, reference, verdict)."""
    summ: dict[str, dict[str, Any]] = pr.get("summary", {})
    a = summ.get("agent")
    if not a:
        return []
    repeats = int(pr.get("repeats") or 1)
    rows: list[list[str]] = []
    c = SPREAD_CLIENTS
    for m, label in MODEL_LABELS.items():
        pct, rng = a.get(f"{m}/rps{c}_spread_pct"), a.get(f"{m}/rps{c}_range")
        if pct is None or rng is None:
            continue
        peers = [f"{p} ±{summ[p][f'{m}/rps{c}_spread_pct']:.1f} %" for p in PEERS
                 if f"{m}/rps{c}_spread_pct" in summ.get(p, {})]
        verdict = "– (one repeat)" if repeats < 2 else ("✅ meets" if pct <= SPREAD_AIM_PCT else "❌ misses")
        reps = " / ".join(f"{v:,.0f}" for v in a.get(f"{m}/rps{c}_repeats", []))
        cpu = " / ".join(f"{v:,.0f}" for v in a.get(f"{m}/cpu_us{c}_repeats", []))
        loads = " / ".join(f"{la[0]:.1f}" for la in pr.get("load_avg", []))
        rows.append([f"agent at {c} clients, {label}: req/s within ±{SPREAD_AIM_PCT:g} % across {repeats} repeats",
                     f"±{pct:.1f} % (per repeat {reps} req/s" + (f"; server CPU {cpu} µs per request" if cpu else "")
                     + ")",
                     "peers (same run): " + (", ".join(peers) if peers else "none measured")
                     + (f"; load average at each repeat {loads}" if loads else ""), verdict])
    v = a.get(f"sk/rps{c}")
    best = max(((summ[p][f"sk/rps{c}"], p) for p in PEERS if f"sk/rps{c}" in summ.get(p, {})), default=None)
    if v is not None and best is not None:
        ratio = v / best[0] if best[0] else float("inf")
        rows.append([f"small model (sklearn pipeline, JSON) at {c} clients ≥ {PEER_RATIO_AIM:g}× the best peer's req/s",
                     f"{v:,.0f} req/s ({ratio:.2f}×)",
                     f"{LABELS[best[1]]} {best[0]:,.0f} req/s (×{PEER_RATIO_AIM:g} = {PEER_RATIO_AIM * best[0]:,.0f})",
                     "✅ meets" if ratio >= PEER_RATIO_AIM else "❌ misses"])
    return rows
