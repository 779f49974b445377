"""``fleetctl``: the operator's side of the fleet — keys, bundles, signed commands, live view.

Exit codes: 0 ok, 1 the thing failed (one clear line on stderr, no traceback), 2 usage error,
130 interrupted. ``FLEETCTL_DEBUG=1`` shows tracebacks. Defaults from the environment:
``FLEETCTL_BROKER`` (broker URL), ``FLEETCTL_KEY`` (signing key paths, ``os.pathsep``-separated).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from agent import errors
from agent.bundles.trust import TrustStore, load_public_pem, public_pem
from fleetctl import bundle, collect, commands, keys, mqttc, rollout, sim, watch
from fleetctl.follow import ProbationCountdown, silent_device_message
from fleetctl.serve import DEFAULT_HOST, DEFAULT_PORT, ArtifactServer
from fleetctl.sources import certify

log = logging.getLogger("fleetctl")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
ENV_BROKER = "FLEETCTL_BROKER"
ENV_KEY = "FLEETCTL_KEY"
ENV_DEBUG = "FLEETCTL_DEBUG"
QUERY_TIMEOUT_S = 30.0  # status / ping: a live device answers in well under a second
DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
DURATION_UNITS_S = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
# Failures the user can act on: printed as one line, never as a traceback.
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (errors.AgentError, OSError, ValueError, TimeoutError)


class UsageError(Exception):
    """Arguments that parse but do not make sense together (exit 2)."""


def parse_duration(text: str) -> float:
    """``90d``, ``1h``, ``30m``, ``45s``, ``250ms`` or plain seconds → seconds."""
    m = DURATION_RE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (e.g. 90d, 1h, 30m, 45s)")
    return float(m.group(1)) * DURATION_UNITS_S[m.group(2) or "s"]


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from e
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return v


def _nonneg_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from e
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must not be negative")
    return v


def _name(what: str) -> Callable[[str], str]:
    def check(text: str) -> str:
        try:
            return commands.check_name(text, what)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from e
    return check


def _prefix(text: str) -> str:
    try:
        return commands.check_prefix(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def _devices(text: str) -> list[str]:
    return [_name("device")(d.strip()) for d in text.split(",") if d.strip()]


def _out(line: str) -> None:
    print(line, flush=True)


def _err(line: str) -> None:
    print(f"fleetctl: {line}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- keygen / bundle / serve


def cmd_keygen(a: argparse.Namespace) -> int:
    kp = keys.generate_keypair(Path(a.out), a.name, overwrite=a.force)
    _out(kp.key_id)
    print(f"private key {kp.private_path} (0600), public key {kp.public_path}: copy the public key "
          "into each device's trust folder", file=sys.stderr)
    return EXIT_OK


def _signing_key_paths(a: argparse.Namespace) -> list[str]:
    paths: list[str] = list(a.key or [])
    if not paths and os.environ.get(ENV_KEY):
        paths = [p for p in os.environ[ENV_KEY].split(os.pathsep) if p]
    if not paths:
        raise UsageError(f"a signing key is required: --key KEY.key (or ${ENV_KEY})")
    return paths


def cmd_bundle_build(a: argparse.Namespace) -> int:
    signing = keys.load_signing_keys(_signing_key_paths(a))
    out = Path(a.out) if a.out else Path("bundles") / a.name / str(a.version)
    outcomes: list[bundle.Outcome] = []
    agreement: list[certify.Agreement] = []
    if a.inputs and a.sample_input:
        raise UsageError("give --sample-input or --inputs, not both")
    mpath = certify.build_from_source(
        a.source, out, a.name, a.version, signing, tracking_uri=a.mlflow_tracking_uri,
        sample_input=a.sample_input or a.inputs, samples=a.samples, seed=a.seed,
        expires_in_s=a.expires_in, rtol=a.rtol, atol=a.atol, max_p95_ms=a.max_p95_ms,
        extra_files=a.file or (), description=a.description, overwrite=a.force,
        variants=a.variants or (), tflite=a.tflite, prebuilt=a.add_variant or (), unchecked=a.no_check or (),
        keep_going=a.keep_going, outcomes=outcomes, agreement=agreement)
    if agreement:  # a converted model: how its ONNX outputs matched the source framework's
        doc0 = bundle.manifest_document(mpath)
        src = doc0.get("source", {})
        _out(f"converted {src.get('framework')} {src.get('framework_version')} with {src.get('converter')} "
             f"{src.get('converter_version')}; certified against {src.get('framework')}'s own predictions "
             f"({certify.tolerance_note(a.rtol, a.atol)}):")
        for ag in agreement:
            _out(f"  {ag.line()}")
    if len(outcomes) > 1:  # one line per variant: built (where checked, how close), failed or skipped, and why
        for o in outcomes:
            _out(o.line())
    failed = [o.id for o in outcomes if o.status == bundle.FAILED]
    if failed:
        _err(f"warning: {len(failed)} of {len(outcomes)} variants failed and are not in the bundle "
             f"(--keep-going): {', '.join(failed)}")
    doc = bundle.manifest_document(mpath)
    sha = bundle.file_entry(mpath.parent, mpath.name).sha256
    n_files = sum(len(v["files"]) for v in doc["variants"]) + len(doc["files"])
    _out(f"built {doc['name']} v{doc['version']} in {mpath.parent}: {n_files} files, "
         f"signed by {len(signing)} key(s), expires {doc['expires_at']}")
    _out(f"manifest {mpath} sha256 {sha}")
    return EXIT_OK


def cmd_sample_model(a: argparse.Namespace) -> int:
    from fleetctl import samples

    out = Path(a.out)
    request = Path(a.request) if a.request else out.with_suffix(".request.json")
    samples.make_classifier(out, seed=a.seed)
    samples.write_request(request, seed=a.seed)
    _out(f"wrote {out}: a small CNN, input {samples.INPUT_NAME!r} FP32 [batch, {', '.join(map(str, samples.INPUT_SHAPE[1:]))}], "
         f"output {samples.OUTPUT_NAME!r} FP32 [batch, {samples.CLASSES}] (random weights)")
    _out(f"wrote {request}: one KServe v2 request for it (curl ... -d @{request})")
    return EXIT_OK


def cmd_bundle_verify(a: argparse.Namespace) -> int:
    trust_dir = Path(a.trust)
    if not trust_dir.is_dir():
        raise UsageError(f"--trust {trust_dir}: not a directory")
    try:
        report = bundle.verify_path(a.dir, TrustStore.load(trust_dir), a.threshold)
    except errors.AgentError as e:
        _err(f"FAILED {a.dir}: {e.code}: {e.message}")
        return EXIT_FAILED
    _out(bundle.describe(report))
    return EXIT_OK


def cmd_bundle_pack(a: argparse.Namespace) -> int:
    out = bundle.pack_bundle(a.dir, a.out)
    sha = bundle.file_entry(out.parent, out.name)
    _out(f"packed {a.dir} into {out}: {sha.size} bytes, sha256 {sha.sha256}")
    return EXIT_OK


def cmd_serve(a: argparse.Namespace) -> int:
    logging.getLogger("fleetctl.serve").setLevel(logging.INFO)
    server = ArtifactServer(a.dir, a.host, a.port).start()
    _out(f"serving {server.root} at {server.url} (Ctrl-C to stop)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        server.stop()
    return EXIT_OK


# ---------------------------------------------------------------- MQTT commands


def _connect(a: argparse.Namespace) -> Any:
    password = None
    if a.password_file:
        password = Path(a.password_file).read_text().strip()
    return mqttc.connect(a.broker, ca_file=a.ca_file, cert_file=a.cert_file, key_file=a.cert_key_file,
                         username=a.username, password=password, timeout_s=a.connect_timeout)


def _targets(a: argparse.Namespace) -> list[commands.Target]:
    if a.group:
        return [commands.group_target(a.group)]
    devices: list[str] = []
    for chunk in a.device or []:
        for d in chunk:
            if d not in devices:
                devices.append(d)
    if not devices:
        raise UsageError("give --device ID[,ID...] or --group G")
    return [commands.device_target(d) for d in devices]


def _print_update(prefix: str, command_id: str,
                  countdown: ProbationCountdown | None = None) -> Callable[[str, dict[str, Any]], None]:
    def show(device: str, update: dict[str, Any]) -> None:
        line = countdown.update(device, update) if countdown is not None else None
        if line is not None and "probation" in update:  # the step's window: shown as the countdown's first line
            _out(line)
            return
        _out(watch.format_message(commands.job_topic(prefix, device, command_id), update))
    return show


def _print_due(countdown: ProbationCountdown) -> Callable[[], None]:
    def tick() -> None:
        for line in countdown.tick():
            _out(line)
    return tick


def _send(a: argparse.Namespace, ctype: str, params: dict[str, Any], *, wait: bool,
          timeout_s: float, quiet_updates: bool = False,
          countdown: ProbationCountdown | None = None) -> commands.JobOutcome | None:
    """Sign and send one command to the targets; with ``wait`` follow it to the end (printing a
    probation countdown to ``countdown``) and note each device's latest status."""
    targets = _targets(a)
    if wait and ctype not in ("status", "ping") and any("group" in t for t in targets):
        raise UsageError("--wait needs --device targets (a group's members are not known in advance); "
                         "`fleetctl rollout --group G` finds them and follows each device")
    signing = keys.load_signing_keys(_signing_key_paths(a))
    req = commands.CommandRequest(ctype, params, a.ttl, a.id or "")
    client = _connect(a)
    try:
        def sent(topics: list[str]) -> None:
            for t in topics:
                print(f"sent {req.id} ({ctype}) to {t}", file=sys.stderr if quiet_updates else sys.stdout,
                      flush=True)
        on_update = None if quiet_updates else _print_update(a.prefix, req.id, countdown)
        if wait and "group" in targets[0]:  # status/ping: members are whoever answers (rollout.collect_group)
            sent([commands.command_topic(a.prefix, targets[0])])
            return rollout.collect_group(client, a.prefix, targets[0]["group"], req, signing, timeout_s, on_update)
        return commands.run_command(client, a.prefix, targets, req, signing, wait=wait,
                                    timeout_s=timeout_s, on_update=on_update, on_sent=sent,
                                    on_tick=_print_due(countdown) if countdown is not None else None,
                                    watch_status=True)
    finally:
        mqttc.disconnect(client)


def _report(outcome: commands.JobOutcome, timeout_s: float, prefix: str,
            countdown: ProbationCountdown | None = None) -> int:
    """Exit status for a followed command, with one stderr line per device that did not succeed."""
    for device, last in outcome.last.items():
        if last is None:
            _err(silent_device_message(device, outcome.command_id, timeout_s, outcome.status, prefix))
        elif last.get("state") not in commands.TERMINAL_STATES:
            left = countdown.left_s(device) if countdown is not None else None
            more = f" ({left:.0f} s of probation left; a longer --timeout waits for the end)" if left is not None else ""
            _err(f"{device}: still {last.get('state')} {last.get('step') or ''}".rstrip() + f" after {timeout_s:g} s{more}")
        elif last.get("state") != "SUCCEEDED":
            raw_err = last.get("error")
            err: dict[str, Any] = raw_err if isinstance(raw_err, dict) else {}
            _err(f"{device}: {last.get('state')} {err.get('code', '')}: {err.get('message', '')}".rstrip(": "))
    return EXIT_OK if outcome.succeeded else EXIT_FAILED


def _generic(ctype: str, params_of: Callable[[argparse.Namespace], dict[str, Any]]
             ) -> Callable[[argparse.Namespace], int]:
    def run(a: argparse.Namespace) -> int:
        countdown = ProbationCountdown()
        outcome = _send(a, ctype, params_of(a), wait=a.wait, timeout_s=a.timeout, countdown=countdown)
        return EXIT_OK if outcome is None else _report(outcome, a.timeout, a.prefix, countdown)
    return run


def _query(ctype: str) -> Callable[[argparse.Namespace], int]:
    """status / ping: always wait, print the final result of each device."""
    def run(a: argparse.Namespace) -> int:
        t0 = time.monotonic()
        outcome = _send(a, ctype, {}, wait=True, timeout_s=a.timeout, quiet_updates=not a.verbose)
        if outcome is None:  # not reached: wait=True always returns an outcome
            return EXIT_FAILED
        rtt_ms = (time.monotonic() - t0) * 1000.0
        if a.group and not outcome.last:
            _err(f"no device of group {a.group} answered within {a.timeout:g} s; is any device of it online, "
                 "with the group in its config (groups = [...])? `fleetctl watch` lists the devices seen")
        for device, last in outcome.last.items():
            if last is None or last.get("state") != "SUCCEEDED":
                continue
            result = last.get("result")
            if ctype == "ping":
                pong = result.get("pong") if isinstance(result, dict) else result
                if a.group:  # a group wait ends after a quiet period: the elapsed time says nothing per device
                    _out(f"{device} pong {pong}")
                else:
                    _out(f"{device} pong {pong} ({rtt_ms:.1f} ms including connect)")
            elif a.json:
                _out(json.dumps({"device": device, "result": result}, separators=(",", ":")))
            else:
                _out(f"{device}:")
                _out(json.dumps(result, indent=2, sort_keys=True))
        return _report(outcome, a.timeout, a.prefix)
    return run


def _deploy_params(a: argparse.Namespace) -> dict[str, Any]:
    return commands.deploy_params(a.model, a.manifest_url, a.manifest_sha256, a.backend)


def _rollback_params(a: argparse.Namespace) -> dict[str, Any]:
    p: dict[str, Any] = {"model": a.model}
    if a.to_version is not None:
        p["to_version"] = a.to_version
    return p


def _config_params(a: argparse.Namespace) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    for item in a.set or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--set {item!r}: expected KEY=VALUE")
        try:
            settings[key.strip()] = json.loads(raw)
        except ValueError:
            settings[key.strip()] = raw
    if not settings:
        raise UsageError("config: give at least one --set KEY=VALUE")
    return {"set": settings}


def _trust_params(a: argparse.Namespace) -> dict[str, Any]:
    add = []
    for path in a.add or []:
        pem = Path(path).read_bytes()
        add.append(public_pem(load_public_pem(pem, str(path))).decode())
    if not add and not a.remove:
        raise UsageError("trust: give --add PUB.pem and/or --remove KEYID")
    return {"add": add, "remove": list(a.remove or [])}


def _bench_params(a: argparse.Namespace) -> dict[str, Any]:
    p: dict[str, Any] = {"model": a.model, "iterations": a.iterations}
    if a.backends:
        p["backends"] = "all" if a.backends == "all" else [b for b in a.backends.split(",") if b]
    return p


def cmd_demo(a: argparse.Namespace) -> int:
    from fleetctl.demo import run_demo

    return run_demo(a.workdir.resolve(), keep_running=a.keep_running)


def cmd_watch(a: argparse.Namespace) -> int:
    client = _connect(a)
    try:
        if a.live:
            watch.watch_live(client, a.prefix, a.device, as_json=a.json, interval_s=a.interval, duration_s=a.duration)
        else:
            watch.watch(client, a.prefix, a.device, as_json=a.json, count=a.count, duration_s=a.duration)
    except KeyboardInterrupt:
        pass
    finally:
        mqttc.disconnect(client)
    return EXIT_OK


# ---------------------------------------------------------------- parser


def _add_broker_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("broker")
    g.add_argument("--broker", default=os.environ.get(ENV_BROKER, mqttc.DEFAULT_BROKER),
                   help=f"mqtt:// or mqtts:// URL (default ${ENV_BROKER} or %(default)s)")
    g.add_argument("--prefix", type=_prefix, default=commands.DEFAULT_PREFIX, help="topic prefix (default %(default)s)")
    g.add_argument("--ca-file", help="CA bundle for mqtts://")
    g.add_argument("--cert-file", help="client certificate for mutual TLS")
    g.add_argument("--cert-key-file", help="client certificate's private key")
    g.add_argument("--username")
    g.add_argument("--password-file", help="file holding the MQTT password")
    g.add_argument("--connect-timeout", type=parse_duration, default=mqttc.DEFAULT_TIMEOUT_S,
                   metavar="DURATION", help="TCP connect + CONNACK timeout (default %(default)gs)")


def _add_command_args(p: argparse.ArgumentParser, *, wait_default_timeout: float,
                      with_wait: bool = True, group_ok: bool = True) -> None:
    t = p.add_mutually_exclusive_group(required=True)
    t.add_argument("--device", type=_devices, action="append", metavar="ID[,ID...]",
                   help="target device(s); repeatable")
    if group_ok:
        t.add_argument("--group", type=_name("group"), help="target every device in a group")
    else:
        p.set_defaults(group=None)
    p.add_argument("--key", action="append", metavar="KEY.key",
                   help=f"Ed25519 signing key; repeat for a threshold (default ${ENV_KEY})")
    p.add_argument("--ttl", type=parse_duration, default=commands.DEFAULT_TTL_S, metavar="DURATION",
                   help="command lifetime (default 1h)")
    p.add_argument("--id", help="command id (default: TYPE-<16 hex>)")
    if with_wait:
        p.add_argument("--wait", action="store_true", help="follow the job updates until a final state")
    p.add_argument("--timeout", type=parse_duration, default=wait_default_timeout, metavar="DURATION",
                   help="how long --wait waits (default %(default)gs)")
    _add_broker_args(p)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fleetctl", description="Operate a fleet of edge ML agents.")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    p = sub.add_parser("keygen", help="make an Ed25519 signing key pair")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--name", default=keys.DEFAULT_KEY_NAME, help="file name stem (default %(default)s)")
    p.add_argument("--force", action="store_true", help="replace existing key files")
    p.set_defaults(func=cmd_keygen)

    pb = sub.add_parser("bundle", help="build or verify a model bundle")
    bsub = pb.add_subparsers(dest="bundle_cmd", required=True, metavar="ACTION")
    p = bsub.add_parser(
        "build", help="sign a bundle from an ONNX model, a scikit-learn/XGBoost/LightGBM model or an MLflow URI",
        description="SOURCE is an .onnx file; a scikit-learn estimator or pipeline saved with joblib or pickle "
                    "(.joblib, .pkl; converted with skl2onnx); an XGBoost model (.json, .ubj) or a LightGBM "
                    "model (.txt; converted with onnxmltools); or an MLflow model URI (models:/NAME/VERSION, "
                    "models:/NAME@ALIAS, runs:/RUN_ID/PATH) with --mlflow-tracking-uri. A converted model's "
                    "golden samples are the source framework's own predictions, and the build refuses a "
                    "conversion that changes them. WARNING: loading a .joblib/.pkl file or an MLflow "
                    "scikit-learn model runs code stored in it; build only from files you trust.")
    p.add_argument("source", metavar="SOURCE",
                   help="MODEL.onnx, MODEL.joblib|.pkl (runs code from the file), MODEL.json|.ubj (XGBoost), "
                        "MODEL.txt (LightGBM) or an MLflow URI")
    p.add_argument("--mlflow-tracking-uri", metavar="URI",
                   help="MLflow tracking/registry store for a models:/ or runs:/ SOURCE (file:/PATH, sqlite:///PATH, "
                        "http://...; default $MLFLOW_TRACKING_URI)")
    p.add_argument("--sample-input", metavar="FILE.npy|.npz",
                   help="sample inputs: an .npy array for the model's one input, or an .npz keyed by input name "
                        "(default: the MLflow input example, else seeded random samples)")
    p.add_argument("--name", type=_name("name"), required=True)
    p.add_argument("--version", type=_positive_int, required=True)
    p.add_argument("--key", action="append", metavar="KEY.key", help=f"signing key; repeatable (default ${ENV_KEY})")
    p.add_argument("--out", metavar="DIR", help="output folder (default ./bundles/NAME/VERSION)")
    p.add_argument("--inputs", metavar="SAMPLES.npz", help="golden inputs keyed by input name (as --sample-input)")
    p.add_argument("--samples", type=_positive_int, default=bundle.DEFAULT_SAMPLES,
                   help="random samples when no --inputs (default %(default)s)")
    p.add_argument("--seed", type=int, default=bundle.DEFAULT_SEED)
    p.add_argument("--expires-in", type=parse_duration, default=bundle.DEFAULT_EXPIRES_IN_S,
                   metavar="DURATION", help="manifest lifetime (default 90d)")
    p.add_argument("--rtol", type=_nonneg_float, default=bundle.DEFAULT_RTOL)
    p.add_argument("--atol", type=_nonneg_float, default=bundle.DEFAULT_ATOL)
    p.add_argument("--max-p95-ms", type=_nonneg_float, metavar="MS", help="latency SLO checked on the device")
    p.add_argument("--file", action="append", metavar="PATH", help="extra common file (e.g. labels.txt)")
    p.add_argument("--description", default="")
    p.add_argument("--force", action="store_true", help="rebuild a folder that already has a manifest")
    p.add_argument("--variants", action="append", metavar="LIST",
                   help="extra variants to convert, comma-separated: onnx-fp16, onnx-int8, openvino-fp32, "
                        "openvino-fp16, tflite (each checked against the golden outputs)")
    p.add_argument("--tflite", metavar="FILE.tflite", help="a converted .tflite to add as a variant (precision read from it)")
    p.add_argument("--add-variant", action="append", metavar="ID:FORMAT:PRECISION:PATH",
                   help="a prebuilt variant file (an OpenVINO .xml brings its .bin); repeatable")
    p.add_argument("--no-check", action="append", metavar="VARIANT_ID",
                   help="add this variant without the build-time check (e.g. an Edge TPU model); repeatable")
    p.add_argument("--keep-going", action="store_true",
                   help="when a variant fails, sign the bundle with those that passed and list the rest "
                        "(default: fail listing every variant's outcome, writing nothing)")
    p.set_defaults(func=cmd_bundle_build)
    p = bsub.add_parser("verify", help="check a bundle's signature and files as a device would")
    p.add_argument("dir", metavar="DIR|ARCHIVE", help="a bundle folder or a .tar, .tar.gz or .zip from `bundle pack`")
    p.add_argument("--trust", required=True, metavar="TRUST_DIR", help="folder of trusted *.pem public keys")
    p.add_argument("--threshold", type=_positive_int, default=1)
    p.set_defaults(func=cmd_bundle_verify)
    p = bsub.add_parser("pack", help="pack a bundle folder into one archive for offline install")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--out", required=True, metavar="FILE", help="ends in .tar, .tar.gz, .tgz or .zip")
    p.set_defaults(func=cmd_bundle_pack)

    p = sub.add_parser("sample-model", help="write a small ONNX image classifier and a request for it, to try a deploy")
    p.add_argument("--out", required=True, metavar="MODEL.onnx")
    p.add_argument("--request", metavar="FILE.json", help="KServe v2 request to write (default MODEL.request.json)")
    p.add_argument("--seed", type=int, default=7, help="weights and request seed (default %(default)s)")
    p.set_defaults(func=cmd_sample_model)

    p = sub.add_parser("serve", help="static artifact server for development (HTTP, Range)")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--host", default=DEFAULT_HOST)
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("deploy", help="deploy a bundle to devices or a group")
    p.add_argument("--model", type=_name("model"), required=True)
    p.add_argument("--manifest-url", required=True, metavar="URL")
    p.add_argument("--manifest-sha256", metavar="HEX")
    p.add_argument("--backend", metavar="PIN", help="e.g. onnxruntime:CPUExecutionProvider")
    _add_command_args(p, wait_default_timeout=commands.DEFAULT_WAIT_TIMEOUT_S)
    p.set_defaults(func=_generic("deploy", _deploy_params))

    p = sub.add_parser("rollback", help="go back to a kept version")
    p.add_argument("--model", type=_name("model"), required=True)
    p.add_argument("--to-version", type=_positive_int)
    _add_command_args(p, wait_default_timeout=commands.DEFAULT_WAIT_TIMEOUT_S)
    p.set_defaults(func=_generic("rollback", _rollback_params))

    p = sub.add_parser("remove", help="stop serving and delete a model")
    p.add_argument("--model", type=_name("model"), required=True)
    _add_command_args(p, wait_default_timeout=commands.DEFAULT_WAIT_TIMEOUT_S)
    p.set_defaults(func=_generic("remove", lambda a: {"model": a.model}))

    p = sub.add_parser("cancel", help="cancel a running job")
    p.add_argument("--job", required=True, metavar="COMMAND_ID")
    _add_command_args(p, wait_default_timeout=QUERY_TIMEOUT_S)
    p.set_defaults(func=_generic("cancel", lambda a: {"job": a.job}))

    p = sub.add_parser("config", help="set remotely settable config keys")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="VALUE is JSON or a string; repeatable")
    _add_command_args(p, wait_default_timeout=QUERY_TIMEOUT_S)
    p.set_defaults(func=_generic("config", _config_params))

    p = sub.add_parser("trust", help="add or remove trusted signing keys (signed by current keys)")
    p.add_argument("--add", action="append", metavar="PUB.pem")
    p.add_argument("--remove", action="append", metavar="KEYID")
    _add_command_args(p, wait_default_timeout=QUERY_TIMEOUT_S)
    p.set_defaults(func=_generic("trust", _trust_params))

    p = sub.add_parser("bench", help="measure a model's latency per backend on devices")
    p.add_argument("--model", type=_name("model"), required=True)
    p.add_argument("--backends", help="comma list or 'all'")
    p.add_argument("--iterations", type=_positive_int, default=100)
    _add_command_args(p, wait_default_timeout=commands.DEFAULT_WAIT_TIMEOUT_S)
    p.set_defaults(func=_generic("bench", _bench_params))

    for ctype, text in (("status", "the full status snapshot of devices"), ("ping", "round trip to devices")):
        p = sub.add_parser(ctype, help=text)
        p.add_argument("--json", action="store_true", help="one JSON line per device")
        _add_command_args(p, wait_default_timeout=QUERY_TIMEOUT_S, with_wait=False)
        p.set_defaults(func=_query(ctype))

    p = sub.add_parser("demo", help="run everything locally: broker, bundle, agent, deploy, inference, telemetry")
    p.add_argument("--workdir", type=Path, default=Path("demo-run"), help="made anew (default ./demo-run)")
    p.add_argument("--keep-running", action="store_true", help="leave everything running until Ctrl-C")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("watch", help="live view of status, jobs, heartbeats, telemetry and events")
    p.add_argument("--device", type=_name("device"), help="only this device")
    p.add_argument("--json", action="store_true", help="raw JSON, one message per line")
    p.add_argument("--count", type=_positive_int, help="stop after N messages")
    p.add_argument("--duration", type=parse_duration, metavar="DURATION", help="stop after this long")
    p.add_argument("--live", action="store_true", help="a table of devices, jobs and p50/p99 per model, redrawn "
                   "(with --json: one snapshot object per interval)")
    p.add_argument("--interval", type=parse_duration, default=watch.LIVE_INTERVAL_S, metavar="DURATION",
                   help="--live redraw interval (default %(default)gs)")
    _add_broker_args(p)
    p.set_defaults(func=cmd_watch)

    p = sub.add_parser("rollout", help="staged deploy: canary, waves, abort and rollback on failures; resumable")
    rollout.add_arguments(p, parse_duration)
    _add_broker_args(p)
    p.set_defaults(func=lambda a: rollout.run_cli(a, _connect, keys.load_signing_keys, lambda: _signing_key_paths(a)))

    p = sub.add_parser("collect", help="device streams → Prometheus /metrics (scale out with --share)")
    collect.add_arguments(p, parse_duration)
    _add_broker_args(p)
    p.set_defaults(func=lambda a: collect.run_cli(a, _connect, lambda c, t: mqttc.subscribe(c, t), mqttc.disconnect))

    p = sub.add_parser("sim", help="simulated devices (real MQTT clients) for tests and benchmarks")
    sim.add_arguments(p, parse_duration)
    _add_broker_args(p)
    p.set_defaults(func=sim.run_cli)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fleetctl`` console script; returns the exit status."""
    parser = build_parser()
    try:
        a = parser.parse_args(list(argv) if argv is not None else None)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    func: Callable[[argparse.Namespace], int] = a.func
    try:
        return func(a)
    except UsageError as e:
        parser.print_usage(sys.stderr)
        _err(f"error: {e}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        _err("interrupted")
        return EXIT_INTERRUPTED
    except EXPECTED_ERRORS as e:
        if os.environ.get(ENV_DEBUG):
            raise
        _err(f"error: {_describe(e)}")
        return EXIT_FAILED


def _describe(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename and e.strerror:
        return f"{e.filename}: {e.strerror}"
    return str(e) or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
