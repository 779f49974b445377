"""agentctl: the technician's tool on the device (SURFACE.md).

Talks to the running daemon over its control socket; ``hw`` works without one.
Exit codes: 0 ok, 1 the thing failed, 2 usage error, 3 daemon not reachable.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from agent import config, errors
from agent.cli.progress import Progress

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


class Unreachable(Exception):
    pass


def socket_source(args: argparse.Namespace) -> tuple[str, str]:
    """The control socket to use and how it was found (for the message when nothing answers there)."""
    if args.socket:
        return args.socket, "given with --socket"
    if args.config:
        how = "--config"
    elif os.environ.get(config.ENV_CONFIG):
        how = f"${config.ENV_CONFIG}"
    elif config.DEFAULT_CONFIG_PATH.exists():
        how = "the default config path"
    else:
        return config.load(None).api.control_socket, (
            f"the built-in default: no --config, no ${config.ENV_CONFIG} and no {config.DEFAULT_CONFIG_PATH}")
    cfg = config.load(args.config)
    return cfg.api.control_socket, f"api.control_socket of {cfg.source} (config found via {how})"


def unreachable_message(path: str, how: str, reason: str) -> str:
    """Where agentctl looked, how that path was chosen, and what to try next."""
    return (f"daemon not reachable at {path}: {reason}\n"
            f"  socket path: {how}\n"
            f"  config search order: --config FILE, then ${config.ENV_CONFIG}, then {config.DEFAULT_CONFIG_PATH}; "
            "--socket PATH bypasses it\n"
            "  is the daemon running? `systemctl status edge-agent`; start it with `systemctl start edge-agent`, "
            "or by hand with `edge-agent run --config FILE`")


def _call(args: argparse.Namespace, op: str, progress: Any = None, **params: Any) -> Any:
    """One control call; ``progress`` (e.g. a progress.Progress) receives the daemon's progress lines."""
    from agent.serving.control import ControlClient

    path, how = socket_source(args)
    client = ControlClient(path)
    try:
        return client.call(op, on_progress=progress, **params)
    except (FileNotFoundError, ConnectionRefusedError, ConnectionError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise Unreachable(unreachable_message(str(client.path), how, reason)) from e
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
             f"api        {':'.join(map(str, s['api'])) if isinstance(s['api'], list) else s['api'] or 'off'}"]
    refused = (s.get("commands") or {}).get("refused_unauthenticated") or {}
    if refused:
        lines.append(f"refused    {sum(refused.values())} unauthenticated message(s), not answered ("
                     + ", ".join(f"{k} {n}" for k, n in sorted(refused.items())) + ")")
    ret = s.get("retention")
    if ret:
        by_state = ", ".join(f"{k} {n}" for k, n in sorted(ret["reported"].items())) or "none"
        lines.append(f"jobs       {ret['jobs']} kept (bound {ret['jobs_max']} once expired), "
                     f"{ret['job_events']} timeline rows; swept every {ret['sweep_interval_s']:g} s")
        lines.append(f"reported   {sum(ret['reported'].values())} final updates (bound {ret['reported_max']}): {by_state}")
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


def autotune_lines(result: Any) -> list[str]:
    """Autotune's verdict in a deploy's result: each measured candidate's latency and throughput,
    the objective and why the winner won; [] when autotune did not run."""
    tune = (result.get("selection") or {}).get("autotune") if isinstance(result, dict) else None
    if not isinstance(tune, dict) or tune.get("state") not in ("measured", "cached"):
        return []
    w = tune.get("winner") or {}
    head = (f"autotune ({tune['state']}, objective {tune.get('objective', 'latency')}, "
            f"{tune.get('concurrency', '-')} callers for throughput):")
    rows = []
    for r in tune.get("measured") or []:
        won = "*" if (r.get("backend"), r.get("variant")) == (w.get("backend"), w.get("variant")) else ""
        err = (r.get("error") or {}).get("code", "")
        rows.append([won + str(r.get("backend")), str(r.get("variant")),
                     f"{r['median_ms']:g} ms" if "median_ms" in r else "-",
                     f"{r['throughput_rps']:g} req/s" if "throughput_rps" in r else "-", err])
    table = _table(rows, ["BACKEND", "VARIANT", "P50", "THROUGHPUT", "ERROR"]) if rows else "  nothing measured"
    return [head, *("  " + line for line in table.splitlines()), f"  won: {tune.get('won') or '-'}"]


def cmd_explain(args: argparse.Namespace) -> int:
    j = _call(args, "explain", job=args.job)
    lines = [f"job {j['id']} ({j['type']}{', ' + j['model'] if j.get('model') else ''}): {j['state']}"]
    t0 = j["timeline"][0]["ts"] if j["timeline"] else 0
    for ev in j["timeline"]:
        detail = ev.get("detail") or {}
        why = f"  {detail.get('code')}: {detail.get('message')}" if isinstance(detail, dict) and detail.get("code") else ""
        lines.append(f"  +{ev['ts'] - t0:8.3f}s  {ev['state']:<11} {ev.get('step') or '':<18}{why}")
    if j.get("result"):
        lines += autotune_lines(j["result"])
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
    from agent.backends.selection import merge_live_targets
    from agent.hardware import hw_report

    dirs = None
    forced = "auto"
    if args.root == "/":
        try:
            cfg = config.load(args.config)
            dirs, forced = cfg.hardware.profiles_dirs, cfg.hardware.profile
        except errors.ConfigError:
            pass
    rep = hw_report(args.root, dirs, forced, reconcile=merge_live_targets)
    facts = rep.get("facts", {})
    lines = [f"profile   {rep.get('profile')}  ({rep.get('profile_reason', '')})"]
    for label, key in (("arch", "architecture"), ("cpu", "cpu_model"), ("cores", "cpu_count"), ("board", "board")):
        if facts.get(key) not in (None, ""):
            lines.append(f"{label:<9} {facts[key]}")
    if facts.get("memory_total_kib"):
        lines.append(f"{'memory':<9} {facts['memory_total_kib'] // 1024} MiB")
    accels = [f"{k} ({'ready' if v.get('ready') else 'not ready'})" for k, v in (facts.get("accelerators") or {}).items()
              if isinstance(v, dict) and v.get("present")]
    lines.append(f"{'accel':<9} {', '.join(accels) or 'none detected'}")
    for prob in rep.get("profile_problems", []):
        lines.append(f"warning   {prob}")
    lines.append(_table([[b["rank"], b["name"], "yes" if b["usable"] else "no", ",".join(b.get("precisions", [])),
                          b.get("reason", "")] for b in rep.get("backends", [])],
                        ["RANK", "BACKEND", "USABLE", "PRECISIONS", "WHY"]))
    _out(args, rep, "\n".join(lines))
    return EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    backends: Any = "all" if args.backends == "all" else [b for b in args.backends.split(",") if b] if args.backends else None
    params: dict[str, Any] = {"model": args.model, "iterations": args.n}
    if backends is not None:
        params["backends"] = backends
    r = _call(args, "bench", **params)
    rows = []
    for vid, per in (r.get("variants") or {r["variant"]: r["backends"]}).items():
        for bid, f in per.items():
            serving = "*" if (vid, bid) == (r["variant"], r.get("serving_backend", "")) else ""
            rows.append([vid, bid + serving, f"{f['p50_ms']:.3f}" if f.get("usable") else "-",
                         f"{f['p90_ms']:.3f}" if f.get("usable") else "-", f"{f['p99_ms']:.3f}" if f.get("usable") else "-",
                         str(f.get("runs", "")), f.get("compute_precision", "") if f.get("usable") else f.get("reason", "")])
    human = f"{r['model']} v{r['version']} ({r['iterations']} iterations; serving {r['variant']})\n" + _table(
        rows, ["VARIANT", "BACKEND", "P50_MS", "P90_MS", "P99_MS", "RUNS", "PRECISION / WHY NOT"])
    _out(args, r, human)
    return EXIT_OK


def _progress(args: argparse.Namespace) -> Progress:
    """Progress on stderr for long calls: redrawn on a terminal, one line per step in a pipe."""
    return Progress(enabled=not args.json or sys.stderr.isatty())


def cmd_rollback(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"model": args.model}
    if args.to is not None:
        params["to_version"] = args.to
    with _progress(args) as prog:
        prog({"step": "rollback", "message": f"{args.model}: loading and validating the kept version"})
        r = _call(args, "rollback", progress=prog, **params)
    _out(args, r, f"{r['name']}: now serving v{r['version']} on {r['backend']} (was v{r['previous']}); job {r['job']}")
    return EXIT_OK


def cmd_remove(args: argparse.Namespace) -> int:
    r = _call(args, "remove", model=args.model)
    _out(args, r, f"{r['name']}: removed, {r['freed_bytes'] / 2**20:.1f} MiB freed; job {r['job']}")
    return EXIT_OK


def cmd_config(args: argparse.Namespace) -> int:
    if not args.set:
        cfg = _call(args, "config")
        flat = [[k, json.dumps(v)] for k, v in cfg.items() if not isinstance(v, dict)]
        flat += [[f"{sec}.{k}", json.dumps(v)] for sec, d in cfg.items() if isinstance(d, dict) for k, v in d.items()]
        _out(args, cfg, _table(flat, ["KEY", "VALUE"]))
        return EXIT_OK
    changes: dict[str, Any] = {}
    for item in args.set:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            print(f"agentctl: --set {item!r}: expected KEY=VALUE", file=sys.stderr)
            return EXIT_USAGE
        try:
            changes[key.strip()] = json.loads(raw)
        except ValueError:
            changes[key.strip()] = raw
    r = _call(args, "config", set=changes)
    _out(args, r, _table([[k, json.dumps(v)] for k, v in r.items()], ["KEY", "VALUE (remote overrides now in effect)"]))
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    """Check an offline bundle (archive or folder) as this device would; no daemon needed."""
    from agent.bundles.offline import verify_path
    from agent.bundles.trust import TrustStore

    threshold = args.threshold
    identities: list[str] | None = list(args.identity) if args.identity else None
    if args.trust:
        keys_dir = args.trust
    else:
        cfg = config.load(args.config)
        keys_dir, threshold = cfg.trust.keys_dir, threshold or cfg.trust.threshold
        identities = identities if identities is not None else list(cfg.trust.decryption_keys)
    rep = verify_path(args.bundle, TrustStore.load(Path(keys_dir)), threshold or 1, identities=identities)
    m = rep.manifest
    _out(args, {"ok": True, "name": m.name, "version": m.version, "files": [f.to_dict() for f in rep.files],
                "expires_at": m.expires_at, "encryption": rep.encryption}, rep.describe())
    return EXIT_OK


def cmd_install(args: argparse.Namespace) -> int:
    """Install an offline bundle through the daemon (same checks as a fleet deploy)."""
    params: dict[str, Any] = {"path": str(Path(args.bundle).resolve())}
    if args.model:
        params["model"] = args.model
    if args.backend:
        params["backend"] = args.backend
    with _progress(args) as prog:
        r = _call(args, "install", progress=prog, **params)
    from agent.deploy.offline import installed

    err = r.get("error") or {}
    ok = installed(r)
    if ok:
        res = r.get("result") or {}
        human = f"{res.get('name')} v{res.get('version')} installed and serving on {res.get('backend')}; job {r['job']}"
        if r["state"] != "SUCCEEDED":
            human += " (on probation: a crash or errors roll it back)"
    else:
        human = f"{r['model']}: {r['state']} at {r.get('step') or '-'}: {err.get('code')}: {err.get('message')}; job {r['job']}"
    if args.json:
        _out(args, r, human)
    else:
        print(human, file=sys.stdout if ok else sys.stderr)
    return EXIT_OK if ok else EXIT_FAILED


def cmd_doctor(args: argparse.Namespace) -> int:
    from agent.cli import doctor

    rep = doctor.run(args.config, args.socket, timeout_s=args.timeout, smoke=not args.no_smoke)
    _out(args, rep.to_dict(), rep.render())
    return EXIT_OK if rep.ok else EXIT_FAILED


def cmd_logs(args: argparse.Namespace) -> int:
    from agent.cli import logs

    path = args.socket
    if not path and not args.file:
        path = config.load(args.config).api.control_socket
    return logs.show(path or "", file=args.file, lines=args.lines, follow=args.follow, as_json=args.json,
                     duration_s=args.duration)


def build_parser() -> argparse.ArgumentParser:
    # The common options work before the command (agentctl --json status) and after it
    # (agentctl status --json): SUPPRESS keeps a subcommand from resetting what the top level parsed.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS, help="daemon config (default $EDGE_AGENT_CONFIG or /etc/edge-agent/agent.toml)")
    common.add_argument("--socket", default=argparse.SUPPRESS, help="control socket path (default: from the config)")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
    ap = argparse.ArgumentParser(prog="agentctl", description="Diagnose and drive the edge-agent on this device",
                                 epilog="exit codes: 0 ok, 1 the thing failed, 2 usage error, 3 daemon not reachable")
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--socket", help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
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
    b = sub.add_parser("bench", parents=[common], help="latency of a serving model per usable backend and variant")
    b.add_argument("model")
    b.add_argument("--backends", default="all", help="'all' (default) or a comma list such as openvino:CPU,tflite:xnnpack")
    b.add_argument("-n", type=int, default=100, help="timed iterations per backend (default %(default)s)")
    b.set_defaults(fn=cmd_bench)
    r = sub.add_parser("rollback", parents=[common], help="serve a kept version again (root or the admin group)")
    r.add_argument("model")
    r.add_argument("--to", type=int, metavar="VERSION", help="the kept version to serve (default: the previous one)")
    r.set_defaults(fn=cmd_rollback)
    rm = sub.add_parser("remove", parents=[common], help="stop serving a model and delete it (root or the admin group)")
    rm.add_argument("model")
    rm.set_defaults(fn=cmd_remove)
    c = sub.add_parser("config", parents=[common], help="the daemon's effective config; --set changes remotely settable keys")
    c.add_argument("--set", action="append", metavar="KEY=VALUE", help="VALUE is JSON or a string; repeatable (root or the admin group)")
    c.set_defaults(fn=cmd_config)
    v = sub.add_parser("verify", parents=[common], help="check an offline bundle (.tar, .tar.gz, .zip or folder) as this device would (no daemon needed)")
    v.add_argument("bundle")
    v.add_argument("--trust", metavar="DIR", help="trusted public keys (default: trust.keys_dir of the config)")
    v.add_argument("--threshold", type=int, metavar="K", help="distinct keys that must sign (default: trust.threshold, or 1 with --trust)")
    v.add_argument("--identity", action="append", metavar="FILE",
                   help="age identity for an encrypted bundle's recipient check; repeatable (default: trust.decryption_keys)")
    v.set_defaults(fn=cmd_verify)
    ins = sub.add_parser("install", parents=[common], help="install an offline bundle archive through the daemon (root or the admin group)")
    ins.add_argument("bundle")
    ins.add_argument("--model", help="the model name the bundle must carry (default: the bundle's own)")
    ins.add_argument("--backend", metavar="PIN", help="e.g. onnxruntime:CPUExecutionProvider")
    ins.set_defaults(fn=cmd_install)
    d = sub.add_parser("doctor", parents=[common], help="check broker, TLS, clock, disk, trust, runtimes, a smoke inference (no daemon needed)")
    d.add_argument("--no-smoke", action="store_true", help="skip the smoke inference on each backend")
    d.add_argument("--timeout", type=float, default=5.0, metavar="S", help="network timeout per check (default %(default)s s)")
    d.set_defaults(fn=cmd_doctor)
    lg = sub.add_parser("logs", parents=[common], help="the daemon's log (its log file, or journald)")
    lg.add_argument("-f", "--follow", action="store_true", help="keep printing new lines (Ctrl-C ends)")
    lg.add_argument("-n", "--lines", type=int, default=50, metavar="N", help="how many recent lines (default %(default)s)")
    lg.add_argument("--file", help="read this log file instead of finding the daemon's")
    lg.add_argument("--duration", type=float, metavar="S", help="with -f: stop after S seconds")
    lg.set_defaults(fn=cmd_logs)
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
