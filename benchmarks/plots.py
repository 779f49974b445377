"""The PNG figures of docs/benchmarks.md (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

RUNTIMES = ("onnxruntime", "openvino", "tflite")
DPI = 110


def draw(res: dict[str, Any], out: Path) -> dict[str, str]:
    """Write every figure the results allow; returns {key: file name}."""
    s = res.get("sections", {})
    made: dict[str, str] = {}
    for key, fn, sec in (("footprint", _footprint, "footprint"), ("serving_latency", _latency, "serving"),
                         ("serving_throughput", _throughput, "serving"), ("deploy", _deploy, "deploy"),
                         ("swap", _swap, "swap"), ("fleet", _fleet, "fleet")):
        data = s.get(sec)
        if not data or "error" in data:
            continue
        fig = fn(data)
        if fig is None:
            continue
        name = f"{key}.png"
        fig.savefig(out / name, dpi=DPI, bbox_inches="tight")
        plt.close(fig)
        made[key] = name
    return made


def _m(row: dict[str, Any] | None, metric: str) -> float:
    if not row or metric not in row:
        return 0.0
    return float(row[metric]["median"])


def _footprint(fp: dict[str, Any]) -> Any:
    modes = sorted({k.split(":")[1] for k in fp if k.startswith("daemon:")})
    groups = ["idle", *[r for r in RUNTIMES if f"floor:{r}" in fp]]
    fig, ax = plt.subplots(figsize=(9, 4.2))
    width = 0.8 / (1 + len(modes))
    xs = range(len(groups))
    floor = [_m(fp.get("floor:paho" if g == "idle" else f"floor:{g}"), "rss_mb") for g in groups]
    ax.bar([x - 0.4 + width / 2 for x in xs], floor, width, label="floor (same run)", color="#999999")
    for i, mode in enumerate(modes):
        vals = [_m(fp.get(f"daemon:{mode}:{g}"), "rss_mb") for g in groups]
        pss = [_m(fp.get(f"daemon:{mode}:{g}"), "pss_mb") for g in groups]
        pos = [x - 0.4 + width * (i + 1.5) for x in xs]
        ax.bar(pos, vals, width, label=f"daemon, isolation={mode} (RSS, tree)")
        ax.scatter(pos, pss, marker="_", s=200, color="black", zorder=3, label="PSS (tree)" if i == 0 else None)
    ax.axhline(30, ls="--", lw=1, color="tab:red", label="aim: idle ≤ 30 MB")
    ax.axhline(31.5, ls=":", lw=1, color="tab:purple", label="Mender client idle (Go), 31.5 MB")
    ax.set_xticks(list(xs), ["idle (floor: Python+paho)", *[f"+ {g} model" for g in groups[1:]]])
    ax.set_ylabel("MB")
    ax.set_title("Memory: daemon and its worker processes vs floors")
    ax.legend(fontsize=7, ncol=2)
    return fig


def _latency(sv: dict[str, Any]) -> Any:
    labels, agent, echo = [], [], []
    for key, row in sv.get("agent", {}).items():
        mode, model, enc = key.split("/")
        labels.append(f"{model}\n{enc}\n{mode}")
        agent.append((row["latency"]["ms"]["median"], row["latency"]["ms"]["p99"]))
        e = (row.get("echo_latency") or sv.get("echo", {}).get(f"{model}/{enc}", {}).get("latency") or {}).get("ms")
        echo.append((e["median"], e["p99"]) if e else (0.0, 0.0))
    if not labels:
        return None
    fig, ax = plt.subplots(figsize=(max(6, len(labels) * 1.1), 4.2))
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], [a[0] for a in agent], 0.4, label="agent p50")
    ax.scatter([x - 0.2 for x in xs], [a[1] for a in agent], marker="_", s=300, color="black", label="p99")
    ax.bar([x + 0.2 for x in xs], [e[0] for e in echo], 0.4, label="echo floor p50", color="#999999")
    ax.scatter([x + 0.2 for x in xs], [e[1] for e in echo], marker="_", s=300, color="black")
    for (m, v), color in zip(sv.get("direct", {}).items(), ("tab:green", "tab:purple"), strict=False):
        ax.axhline(v["ms"]["median"], ls=":", lw=1, color=color, label=f"{m}: runtime called directly, p50")
    ax.set_yscale("log")
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set_ylabel("ms per request (log)")
    ax.set_title("KServe v2 over loopback, one keep-alive client")
    ax.legend(fontsize=7)
    return fig


def _throughput(sv: dict[str, Any]) -> Any:
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for key, row in sv.get("agent", {}).items():
        tp = row["throughput"]
        cs = sorted(tp, key=int)
        ax.plot([int(c) for c in cs], [tp[c]["rps"] for c in cs], marker="o", label=f"agent {key}")
    for key, row in sv.get("echo", {}).items():
        tp = row["throughput"]
        cs = sorted(tp, key=int)
        ax.plot([int(c) for c in cs], [tp[c]["rps"] for c in cs], ls="--", marker="x", label=f"echo floor {key}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("concurrent keep-alive clients")
    ax.set_ylabel("requests/s (log)")
    ax.set_title("Throughput vs clients (2 cores shared by clients and server)")
    ax.legend(fontsize=6, ncol=2)
    return fig


def _deploy(dp: dict[str, Any]) -> Any:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    by: dict[str, list[tuple[float, float]]] = {}
    for key, row in dp.get("agent", {}).items():
        label, size = key.rsplit("/", 1)
        by.setdefault(label, []).append((float(size), row["total_s"]["median"]))
    for label, pts in by.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"agent: {label}")
    fl = sorted((float(k), v["total_s"]["median"]) for k, v in dp.get("floor", {}).items())
    if fl:
        ax.plot([p[0] for p in fl], [p[1] for p in fl], marker="s", color="#666666", label="floor")
        ax.plot([p[0] for p in fl], [1.2 * p[1] + 0.5 for p in fl], ls="--", color="tab:red", label="aim: 1.2× floor + 0.5 s")
    ax.set_xscale("log")
    ax.set_xlabel("bundle MB")
    ax.set_ylabel("command → SUCCEEDED, s")
    ax.set_title("Deploy over loopback")
    ax.legend(fontsize=7)
    return fig


def _swap(sw: dict[str, Any]) -> Any:
    modes = [m for m, r in sw.items() if isinstance(r, dict) and "timeline" in r]
    if not modes:
        return None
    fig, axes = plt.subplots(len(modes), 1, figsize=(9, 2.6 * len(modes)), squeeze=False)
    for ax, mode in zip(axes[:, 0], modes, strict=True):
        r = sw[mode]
        ax.scatter(r["timeline"]["t_s"], r["timeline"]["ms"], s=2, alpha=0.5)
        ax.axvline(r["steady_s"], color="tab:red", lw=1, label="swaps start")
        for i, t in enumerate(r.get("swapped_at_s", [])):
            ax.axvline(t, color="tab:green", lw=0.6, ls="--", label="a new version serves" if i == 0 else None)
        ax.axhline(r["steady_ms"]["p99"], ls=":", color="black", lw=1, label="steady p99")
        ax.set_yscale("log")
        ax.set_ylabel("ms (log)")
        ax.set_title(f"isolation={mode}: {r['swaps']} swaps under 4 clients", fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
    axes[-1, 0].set_xlabel("s")
    fig.tight_layout()
    return fig


def _fleet(fl: dict[str, Any]) -> Any:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in fl.get("sizes", []):
        ts = r["cdf"]["t_s"]
        if not ts:
            continue
        ys = [(i + 1) / len(ts) * 100 for i in range(len(ts))]
        ax.plot(ts, ys, label=f"{r['devices']} devices")
    ax.axvline(60, ls="--", color="tab:red", lw=1, label="aim: 60 s")
    ax.set_xscale("log")
    ax.set_xlabel("s since the signed group deploy was published")
    ax.set_ylabel("% of devices SUCCEEDED")
    ax.set_title("Group deploy reaching simulated devices (one Mosquitto)")
    ax.legend(fontsize=7)
    return fig
