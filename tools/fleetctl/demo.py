"""``fleetctl demo``: the whole product on one machine, end to end, in under a minute.

A local broker (Mosquitto when installed, else amqtt: fleetctl.devbroker), dev signing keys and a device
trust folder, a sample bundle built and signed from a small CNN, the artifact server, the real
``edge-agent`` daemon as a process, a signed deploy, inference through the local KServe v2 API
(checked against onnxruntime called directly), and job updates, status, heartbeat and latency
telemetry printed as they arrive. Everything listens on loopback only.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

from fleetctl import bundle, commands, keys, mqttc, samples
from fleetctl.serve import ArtifactServer
from fleetctl.watch import format_message

DEVICE_ID = "demo-device"
MODEL = "demo-classifier"
AGENT_READY_TIMEOUT_S = 30.0
DEPLOY_TIMEOUT_S = 120.0
TELEMETRY_TIMEOUT_S = 30.0
INFER_REQUESTS = 200
BROKER_START_TIMEOUT_S = 10.0
BROKER_ENV = "FLEETCTL_DEMO_BROKER"  # "amqtt": use the fallback broker even where Mosquitto is installed
CHILD_STOP_TIMEOUT_S = 10.0  # the agent's own shutdown (flush, final status, workers) fits well inside this
ORPHAN_STOP_TIMEOUT_S = 5.0  # a process the agent started that outlived it: SIGTERM, then SIGKILL after this
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout_s:.0f} s")


class DemoBroker:
    """Mosquitto when it is installed, else amqtt (MQTT 3.1.1) in a child process."""

    def __init__(self, workdir: Path) -> None:
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.embedded: Any = None
        binary = shutil.which("mosquitto") or next(
            (p for p in ("/usr/sbin/mosquitto", "/usr/bin/mosquitto") if os.path.exists(p)), None)
        if os.environ.get(BROKER_ENV) == "amqtt":  # the fallback, even where Mosquitto is installed
            binary = None
        if binary:
            conf = workdir / "mosquitto.conf"
            conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n")
            self.proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)
            self.kind = f"Mosquitto ({binary})"
            _wait_port(self.port, BROKER_START_TIMEOUT_S)
        else:
            from fleetctl.devbroker import DevBroker

            self.embedded = DevBroker(self.port, log_path=workdir / "broker.log").start()
            self.kind = "amqtt, MQTT 3.1.1 (install mosquitto for MQTT 5)"

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if self.embedded is not None:
            self.embedded.stop()


def _say(out: TextIO, text: str) -> None:
    out.write(text + "\n")
    out.flush()


def _interrupt(signum: int, _frame: Any) -> None:
    """SIGTERM and SIGHUP end the demo the way Ctrl-C does: through the cleanup in ``run_demo``."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _stop_process_tree(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM ``proc``, wait for it, then make sure nothing it started (the model's worker
    processes) outlives it; every wait has a deadline and ends in SIGKILL."""
    import psutil

    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        descendants = []
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(CHILD_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(CHILD_STOP_TIMEOUT_S)
    _, alive = psutil.wait_procs(descendants, timeout=ORPHAN_STOP_TIMEOUT_S)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(alive, timeout=ORPHAN_STOP_TIMEOUT_S)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()


def _tool(name: str) -> str:
    """How to call one of this installation's commands from the current folder: the bare name when
    it is the one on PATH, else its path (``.venv/bin/agentctl`` after ``bash tools/demo.sh``)."""
    path = Path(sys.executable).parent / name
    if not path.exists() or shutil.which(name) == str(path):
        return name
    rel = os.path.relpath(path)
    return rel if not rel.startswith("..") else str(path)


def run_demo(workdir: Path, keep_running: bool = False, out: TextIO | None = None) -> int:
    """Run the demo in ``workdir`` (made anew); returns 0 when every stage worked."""
    import numpy as np
    import onnxruntime as ort
    import requests

    from agent.bundles.trust import public_pem

    out = out or sys.stdout
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    procs: list[subprocess.Popen[bytes]] = []
    stops: list[Any] = []
    seen: dict[str, list[dict[str, Any]]] = {}
    seen_cv = threading.Condition()
    in_main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, _interrupt) for sig in STOP_SIGNALS} if in_main else {}
    try:
        _say(out, "== 1. broker")
        broker = DemoBroker(workdir)
        stops.append(broker.stop)
        _say(out, f"   {broker.kind} on {broker.url}")

        _say(out, "== 2. signing keys and the device's trust folder")
        kp = keys.generate_keypair(workdir / "keys", "dev")
        trust = workdir / "device" / "trust"
        trust.mkdir(parents=True)
        (trust / "dev.pem").write_bytes(public_pem(keys.load_signing_key(kp.private_path).public_key()))
        os.chmod(trust, 0o755)
        _say(out, f"   key {kp.key_id[:16]}… ({kp.private_path})")

        _say(out, "== 3. a sample bundle from a small CNN, signed")
        model_path = samples.make_classifier(workdir / "model" / "classifier.onnx")
        bundle_dir = workdir / "bundles" / MODEL / "1"
        manifest = bundle.build_bundle(model_path, bundle_dir, MODEL, 1, [keys.load_signing_key(kp.private_path)],
                                       description="demo classifier (random weights)")
        _say(out, f"   {manifest}")

        _say(out, "== 4. artifact server")
        server = ArtifactServer(workdir / "bundles", "127.0.0.1", 0).start()
        stops.append(server.stop)
        manifest_url = f"{server.url.rstrip('/')}/{MODEL}/1/manifest.json"
        _say(out, f"   {manifest_url}")

        _say(out, "== 5. the agent (edge-agent run)")
        api_port = _free_port()
        sock = workdir / "device" / "control.sock"
        cfg = workdir / "device" / "agent.toml"
        cfg.write_text(
            f'device_id = "{DEVICE_ID}"\ngroups = ["demo"]\nstate_dir = "state"\n\n'
            f'[mqtt]\nurl = "{broker.url}"\n\n[trust]\nkeys_dir = "trust"\n\n'
            f'[telemetry]\nheartbeat_s = 2\nwindow_s = 2\n\n'
            f'[api]\nlisten = "127.0.0.1:{api_port}"\ncontrol_socket = "{sock}"\ncontrol_group = ""\n')
        log = open(workdir / "device" / "agent.log", "wb")  # noqa: SIM115 - lives as long as the agent
        agent = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(cfg)],
                                 stdout=log, stderr=subprocess.STDOUT)
        procs.append(agent)
        _say(out, f"   pid {agent.pid}, config {cfg}, log {workdir / 'device' / 'agent.log'}")

        client = mqttc.connect(broker.url, client_id=f"demo-fleet-{os.getpid()}")
        stops.append(lambda: mqttc.disconnect(client))

        quiet = threading.Event()  # set once the demo is done: `fleetctl watch` is the live view then

        def on_message(c: Any, u: Any, msg: Any) -> None:
            try:
                doc = json.loads(msg.payload)
            except ValueError:
                return
            kind = msg.topic.split("/")[-2] if "/jobs/" in msg.topic else msg.topic.rsplit("/", 1)[-1]
            with seen_cv:  # checked and printed under the lock: nothing is printed after quiet.set()
                if quiet.is_set():
                    return
                seen.setdefault(kind, []).append(doc)
                seen_cv.notify_all()
                _say(out, "   << " + format_message(msg.topic, doc))

        prefix = "edge"
        topics = [f"{prefix}/{DEVICE_ID}/{k}" for k in ("status", "heartbeat", "telemetry", "events")]
        for t in topics:
            client.message_callback_add(t, on_message)
        # Job updates arrive through the deploy's own subscription (jobs/<id>); one more
        # overlapping subscription would deliver each of them twice.
        client.message_callback_add(f"{prefix}/{DEVICE_ID}/jobs/+", on_message)
        mqttc.subscribe(client, topics)

        def wait_for(pred: Any, timeout_s: float, what: str) -> None:
            deadline = time.monotonic() + timeout_s
            with seen_cv:
                while not pred():
                    left = deadline - time.monotonic()
                    if left <= 0 or agent.poll() is not None:
                        raise TimeoutError(f"{what} did not arrive within {timeout_s:.0f} s (agent log: {workdir / 'device' / 'agent.log'})")
                    seen_cv.wait(min(left, 0.5))

        wait_for(lambda: any(s.get("online") for s in seen.get("status", [])), AGENT_READY_TIMEOUT_S, "the agent's online status")

        _say(out, "== 6. signed deploy command")
        sk = [keys.load_signing_key(kp.private_path)]
        req = commands.CommandRequest("deploy", commands.deploy_params(MODEL, manifest_url))
        outcome = commands.run_command(client, prefix, [commands.device_target(DEVICE_ID)], req, sk,
                                       wait=True, timeout_s=DEPLOY_TIMEOUT_S)
        if outcome is None or not outcome.succeeded:
            _say(out, f"   deploy did not succeed: {outcome.last if outcome else 'no outcome'}")
            return 1

        _say(out, f"== 7. inference through the local KServe v2 API (http://127.0.0.1:{api_port})")
        rng = np.random.default_rng(0)
        image = rng.random(samples.INPUT_SHAPE, dtype=np.float32)
        body = {"inputs": [{"name": samples.INPUT_NAME, "shape": list(image.shape), "datatype": "FP32",
                            "data": image.reshape(-1).tolist()}]}
        http = requests.Session()
        base = f"http://127.0.0.1:{api_port}/v2/models/{MODEL}"
        meta = http.get(base, timeout=5).json()
        _say(out, f"   metadata: platform {meta['platform']}, inputs {meta['inputs']}")
        r = http.post(f"{base}/infer", json=body, timeout=5)
        r.raise_for_status()
        got = np.asarray(r.json()["outputs"][0]["data"], dtype=np.float32)
        direct = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"]).run(None, {samples.INPUT_NAME: image})[0]
        diff = float(np.abs(got - direct.reshape(-1)).max())
        _say(out, f"   top class {int(got.argmax())}, max |agent − onnxruntime direct| = {diff:.2e}")
        if diff > 1e-5:
            _say(out, "   outputs differ from onnxruntime called directly")
            return 1
        t0 = time.perf_counter()
        for _ in range(INFER_REQUESTS):
            http.post(f"{base}/infer", json=body, timeout=5).raise_for_status()
        per = (time.perf_counter() - t0) / INFER_REQUESTS * 1000
        _say(out, f"   {INFER_REQUESTS} more requests: {per:.2f} ms each on average (JSON, keep-alive)")

        _say(out, "== 8. heartbeat and latency telemetry arriving")
        wait_for(lambda: seen.get("heartbeat") and any(MODEL in t.get("models", {}) for t in seen.get("telemetry", [])),
                 TELEMETRY_TIMEOUT_S, "heartbeat and telemetry")
        tele = next(t for t in seen["telemetry"] if MODEL in t.get("models", {}))["models"][MODEL]
        _say(out, f"   window: {tele['count']} requests, p50 {tele['latency_ms']['p50']} ms, p99 {tele['latency_ms']['p99']} ms")
        with seen_cv:
            quiet.set()  # nothing more is recorded or printed, so the hint stays the last thing on screen
        _closing_hint(out, keep_running, sock, broker.url, base)
        if keep_running:
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                _say(out, "\nstopping everything the demo started …")
        return 0
    finally:
        if in_main:  # a second Ctrl-C must not cut the cleanup short; each of its waits has a deadline
            for sig in STOP_SIGNALS:
                signal.signal(sig, signal.SIG_IGN)
        _cleanup(procs, stops, out)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _closing_hint(out: TextIO, keep_running: bool, sock: Path, broker_url: str, model_url: str) -> None:
    """What to try next, only where it works: the commands need the demo's processes running."""
    agentctl, fleetctl = _tool("agentctl"), _tool("fleetctl")
    if not keep_running:
        _say(out, "\nDemo OK. Everything it started stops now. To try the device and fleet commands "
                  "against it, run it with --keep-running (bash tools/demo.sh --keep-running).")
        return
    _say(out, f"\nDemo OK. Everything keeps running (--keep-running) until Ctrl-C or SIGTERM to pid {os.getpid()}, "
              "which stop all of it. In another terminal:")
    _say(out, f"   $ {agentctl} status --socket {sock}")
    _say(out, f"   $ {fleetctl} watch --broker {broker_url}")
    _say(out, f"   $ curl -s {model_url}")


def _cleanup(procs: list[subprocess.Popen[bytes]], stops: list[Any], out: TextIO) -> None:
    """Stop the agent (and any worker it left), then the broker, server and client, newest first."""
    for p in procs:
        _stop_process_tree(p)
    for stop in reversed(stops):
        try:
            stop()
        except Exception as e:
            _say(out, f"   (cleanup: {e})")
