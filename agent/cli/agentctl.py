"""agentctl: the technician's tool on the device (SURFACE.md).

Talks to the running daemon over its control socket; ``hw`` works without one.
Exit codes: 0 ok, 1 the thing failed, 2 usage error, 3 daemon not reachable.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from agent import config, errors

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


class Unreachable(Exception):
    pass


def _client(args: argparse.Namespace) -> Any:
    from agent.serving.control import ControlClient

    path = args.socket
    if not path:
        cfg = config.load(args.config)
        path = cfg.api.control_socket
    return ControlClient(path)


def _call(args: argparse.Namespace, op: str, **params: Any) -> Any:
    client = _client(args)
    try:
        return client.call(op, **params)
    except (FileNotFoundError, ConnectionRefusedError, ConnectionError) as e:
        raise Unreachable(f"daemon not reachable at {client.path}: {e.strerror if isinstance(e, OSError) and e.strerror else e}") from e
    except PermissionError as e:
        raise Unreachable(f"no permission to use {client.path} (join its group, or use sudo)") from e


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def _out(args: argparse.Namespace, data: Any, human: str) -> None:
    print(json.dumps(data, indent=2, default=str) if args.json else human)


def cmd_status(args: argparse.Namespace) -> int:
    s = _call(args, "status")
    mq = s["mqtt"]
    lines = [f"device     {s['device']}  (agent {s['agent']}, profile {s['profile']}, up {s['uptime_s']:.0f} s)",
             f"mqtt       {mq['state']}" + (f" — {mq['last_error']}" if mq.get("last_error") else "") + f"  (reconnects {mq['reconnects']})",
             f"outbox     {s['outbox']['depth']} queued, {s['outbox']['dropped']} dropped",
             f"api        {s['api'] or 'off'}"]
    if s.get("deploying"):
        lines.append(f"deploying  {s['deploying']}")
    if s["models"]:
        lines.append(_table([[m["name"], m.get("version") or "-", m.get("variant", "-"), m.get("backend", "-"), m["state"],
                              m.get("previous") or "-"] for m in s["models"]],
                            ["MODEL", "VERSION", "VARIANT", "BACKEND", "STATE", "PREVIOUS"]))
    else:
        lines.append("models     none deployed")
    _out(args, s, "\n".join(lines))
    return EXIT_OK


def cmd_models(args: argparse.Namespace) -> int:
    ms = _call(args, "models")
    human = _table([[m["name"], m.get("version") or "-", ",".join(map(str, m.get("kept", []))), m.get("variant", "-"),
                     m.get("backend", "-"), m["state"]] for m in ms],
                   ["MODEL", "SERVING", "KEPT", "VARIANT", "BACKEND", "STATE"]) if ms else "no models deployed"
    _out(args, ms, human)
    return EXIT_OK


def cmd_jobs(args: argparse.Namespace) -> int:
    js = _call(args, "jobs", limit=args.limit)
    rows = [[j["id"], j["type"], j.get("model") or "-", j["state"], j.get("step") or "-",
             (j.get("error") or {}).get("code", "")] for j in js]
    _out(args, js, _table(rows, ["JOB", "TYPE", "MODEL", "STATE", "STEP", "ERROR"]) if js else "no jobs")
    return EXIT_OK


def cmd_explain(args: argparse.Namespace) -> int:
    j = _call(args, "explain", job=args.job)
    lines = [f"job {j['id']} ({j['type']}{', ' + j['model'] if j.get('model') else ''}): {j['state']}"]
    t0 = j["timeline"][0]["ts"] if j["timeline"] else 0
    for ev in j["timeline"]:
        detail = ev.get("detail") or {}
        why = f"  {detail.get('code')}: {detail.get('message')}" if isinstance(detail, dict) and detail.get("code") else ""
        lines.append(f"  +{ev['ts'] - t0:8.3f}s  {ev['state']:<11} {ev.get('step') or '':<18}{why}")
    if j.get("result"):
        lines.append("result: " + json.dumps(j["result"], default=str)[:2000])
    _out(args, j, "\n".join(lines))
    return EXIT_OK if j["state"] in ("SUCCEEDED", "QUEUED", "IN_PROGRESS") else EXIT_FAILED


def load_inputs(path: str) -> dict[str, Any]:
    """Tensors from .npz (one per input), .npy (the single input) or .json ({name: nested list})."""
    import numpy as np

    p = Path(path)
    if p.suffix == ".npz":
        with np.load(p, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    if p.suffix == ".npy":
        return {"": np.load(p, allow_pickle=False)}
    if p.suffix == ".json":
        doc = json.loads(p.read_text())
        if not isinstance(doc, dict):
            raise ValueError(f"{path}: expected an object {{input name: nested list}}")
        return {k: np.asarray(v, dtype=np.float32) if not isinstance(v, dict) else
                np.asarray(v["data"], dtype=v.get("dtype", "float32")).reshape(v.get("shape", -1)) for k, v in doc.items()}
    raise ValueError(f"{path}: unsupported input file (use .npz, .npy or .json)")


def cmd_infer(args: argparse.Namespace) -> int:
    from agent import tensors

    try:
        inputs = load_inputs(args.input)
    except (OSError, ValueError) as e:
        print(f"agentctl: {e}", file=sys.stderr)
        return EXIT_USAGE
    if "" in inputs:  # a bare .npy: bind it to the model's only input
        models = {m["name"]: m for m in _call(args, "models")}
        io = (models.get(args.model) or {}).get("io")
        if not io or len(io["inputs"]) != 1:
            print("agentctl: a .npy input needs a model with exactly one input; use .npz", file=sys.stderr)
            return EXIT_USAGE
        inputs = {io["inputs"][0]["name"]: inputs.pop("")}
    t0 = time.perf_counter()
    res = _call(args, "infer", model=args.model, inputs={k: tensors.encode(v) for k, v in inputs.items()})
    rtt = (time.perf_counter() - t0) * 1000
    outs = {k: tensors.decode(v, k) for k, v in res["outputs"].items()}
    if args.json:
        print(json.dumps({"model": res["model"], "version": res["version"], "backend": res["backend"],
                          "latency_ms": res["latency_ms"], "outputs": {k: v.tolist() for k, v in outs.items()}}))
    else:
        print(f"{res['model']} v{res['version']} on {res['backend']}: {res['latency_ms']:.3f} ms in the runtime, {rtt:.3f} ms round trip")
        for k, v in outs.items():
            print(f"  {k} {v.dtype} {list(v.shape)}: {_preview(v)}")
    return EXIT_OK


def _preview(v: Any, n: int = 8) -> str:
    flat = v.reshape(-1)
    s = ", ".join(f"{x:.6g}" if v.dtype.kind == "f" else str(x) for x in flat[:n])
    return f"[{s}{', …' if flat.size > n else ''}]"


def cmd_hw(args: argparse.Namespace) -> int:
    from agent.hardware import hw_report

    dirs = None
    forced = "auto"
    if args.root == "/":
        try:
            cfg = config.load(args.config)
            dirs, forced = cfg.hardware.profiles_dirs, cfg.hardware.profile
        except errors.ConfigError:
            pass
    rep = hw_report(args.root, dirs, forced)
    facts = rep.get("facts", {})
    lines = [f"profile   {rep.get('profile')}  ({rep.get('profile_reason', '')})"]
    for key in ("arch", "cpu_model", "board", "cores", "memory_mb"):
        if facts.get(key) not in (None, ""):
            lines.append(f"{key:<9} {facts[key]}")
    for prob in rep.get("profile_problems", []):
        lines.append(f"warning   {prob}")
    lines.append(_table([[b["rank"], b["name"], "yes" if b["usable"] else "no", b.get("reason", "")]
                         for b in rep.get("backends", [])], ["RANK", "BACKEND", "USABLE", "WHY"]))
    _out(args, rep, "\n".join(lines))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="daemon config (default $EDGE_AGENT_CONFIG or /etc/edge-agent/agent.toml)")
    common.add_argument("--socket", help="control socket path (default: from the config)")
    common.add_argument("--json", action="store_true", help="machine-readable output")
    ap = argparse.ArgumentParser(prog="agentctl", description="Diagnose and drive the edge-agent on this device")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("status", parents=[common], help="agent, broker and models at a glance").set_defaults(fn=cmd_status)
    sub.add_parser("models", parents=[common], help="deployed models and kept versions").set_defaults(fn=cmd_models)
    j = sub.add_parser("jobs", parents=[common], help="recent jobs")
    j.add_argument("--limit", type=int, default=20)
    j.set_defaults(fn=cmd_jobs)
    e = sub.add_parser("explain", parents=[common], help="timeline of one job with reasons")
    e.add_argument("job")
    e.set_defaults(fn=cmd_explain)
    i = sub.add_parser("infer", parents=[common], help="run one inference through the daemon")
    i.add_argument("model")
    i.add_argument("--input", required=True, help=".npz, .npy or .json file")
    i.set_defaults(fn=cmd_infer)
    h = sub.add_parser("hw", parents=[common], help="detected hardware, profile and backends (no daemon needed)")
    h.add_argument("--root", default="/", help="detect on a captured filesystem root")
    h.set_defaults(fn=cmd_hw)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    try:
        args = ap.parse_args(argv)
    except SystemExit as e:
        return EXIT_USAGE if e.code else EXIT_OK
    try:
        return int(args.fn(args))
    except Unreachable as e:
        print(f"agentctl: {e}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except errors.ConfigError as e:
        print(f"agentctl: {e.message}", file=sys.stderr)
        return EXIT_USAGE
    except errors.AgentError as e:
        if args.json:
            print(json.dumps({"error": e.to_dict()}))
        print(f"agentctl: {e.code}: {e.message}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
