"""The floors: the least a program needs to do the same job, run alone on the same machine.

Run as ``python -m benchmarks.floors KIND ARGS``; each kind imports only what it needs (no agent
code), prints one JSON line starting with ``ready`` once it does its job, and then waits for
stdin to close (or a signal), so the caller can read its memory and start-up time.

- ``bare``: the Python interpreter, nothing imported.
- ``paho HOST PORT``: paho-mqtt connected to the broker (MQTT 5, TCP_NODELAY), network loop running.
- ``runtime RUNTIME MODEL``: the runtime imported, the model loaded, one inference run.
- ``echo PORT``: a minimal HTTP/1.1 keep-alive echo server on the stdlib stack the agent uses
  (``http.server`` with Nagle off): the floor of the KServe v2 endpoint.
- ``deploy MANIFEST_URL DEST``: download every file of a bundle (requests, 1 MiB chunks), sha256
  while streaming, fsync, then load the model with onnxruntime; prints the seconds and exits.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

CHUNK_BYTES = 1 << 20


def _ready(**extra: Any) -> None:
    sys.stdout.write("ready " + json.dumps(extra) + "\n")
    sys.stdout.flush()


def _hold() -> None:
    sys.stdin.read()  # until the caller closes our stdin (or kills us)


def _quiet_runtimes() -> None:
    """Same telemetry opt-outs as the agent, so the floor does not do work the agent avoids."""
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("ORT_TELEMETRY_DISABLED", "1")
    sys.modules["openvino_telemetry"] = None  # type: ignore[assignment]


def paho(host: str, port: int) -> None:
    import socket
    import threading

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    connected = threading.Event()
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"floor-{os.getpid()}", protocol=mqtt.MQTTv5)
    def nodelay(cl: Any, u: Any, s: Any) -> None:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    c.on_socket_open = nodelay
    c.on_connect = lambda *a: connected.set()
    c.connect(host, port, keepalive=60)
    c.loop_start()
    if not connected.wait(10):
        raise SystemExit("no CONNACK")
    _ready()
    _hold()
    c.loop_stop()
    c.disconnect()


def load_model(runtime: str, path: str) -> Any:
    """Load ``path`` on ``runtime`` the plain way and run it once; returns a callable run(x)."""
    import numpy as np

    _quiet_runtimes()
    if runtime == "onnxruntime":
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = ort.InferenceSession(path, sess_options=so, providers=["CPUExecutionProvider"])
        inp = sess.get_inputs()[0]
        shape = [d if isinstance(d, int) else 1 for d in inp.shape]
        names = [o.name for o in sess.get_outputs()]

        def run(x: Any) -> Any:
            return sess.run(names, {inp.name: x})
    elif runtime == "openvino":
        import openvino as ov

        core = ov.Core()
        compiled = core.compile_model(core.read_model(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        req = compiled.create_infer_request()
        shape = [d.get_length() if d.is_static else 1 for d in compiled.inputs[0].get_partial_shape()]

        def run(x: Any) -> Any:
            return req.infer([x])
    elif runtime == "tflite":
        from ai_edge_litert.interpreter import Interpreter

        interp = Interpreter(model_path=path, num_threads=2)
        interp.allocate_tensors()
        d = interp.get_input_details()[0]
        shape = list(d["shape"])
        out = interp.get_output_details()[0]["index"]

        def run(x: Any) -> Any:
            interp.set_tensor(d["index"], x)
            interp.invoke()
            return interp.get_tensor(out)
    else:
        raise SystemExit(f"unknown runtime {runtime}")
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    run(x)
    return run


def runtime(name: str, path: str) -> None:
    load_model(name, path)
    _ready()
    _hold()


def echo(port: int) -> None:
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Echo(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True

    httpd = Server(("127.0.0.1", port), Echo)
    import threading

    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    _ready()
    _hold()
    httpd.shutdown()


def _fetch(s: Any, manifest_url: str, f: dict[str, Any], dest: str) -> str:
    """One bundle file: streamed with sha256 while writing, fsynced, checked; its path."""
    import hashlib
    from urllib.parse import urljoin

    path = os.path.join(dest, f["path"].replace("/", "_"))
    h = hashlib.sha256()
    with s.get(urljoin(manifest_url, f["path"]), stream=True, timeout=30) as r, open(path, "wb") as out:
        r.raise_for_status()
        for chunk in r.iter_content(CHUNK_BYTES):
            h.update(chunk)
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    if h.hexdigest() != f["sha256"]:
        raise SystemExit(f"{f['path']}: sha256 mismatch")
    return path


def deploy(manifest_url: str, dest: str) -> None:
    """Download + sha256 + fsync of every bundle file, then load the model: the clock starts after
    the imports (a running daemon has its code loaded too)."""
    import base64

    import requests

    _quiet_runtimes()
    import onnxruntime  # noqa: F401  (imported before the clock, like a warm process)

    os.makedirs(dest, exist_ok=True)
    t0 = time.perf_counter()
    s = requests.Session()
    env = s.get(manifest_url, timeout=30).json()
    doc = json.loads(base64.b64decode(env["payload"]))
    files = list(doc.get("files", [])) + [f for v in doc["variants"][:1] for f in v["files"]]
    model_path = ""
    for f in files:
        path = _fetch(s, manifest_url, f, dest)
        if f["path"].endswith(".onnx"):
            model_path = path
    t_dl = time.perf_counter() - t0
    load_model("onnxruntime", model_path)
    total = time.perf_counter() - t0
    print(json.dumps({"total_s": total, "download_s": t_dl, "load_s": total - t_dl,
                      "bytes": sum(int(f["size"]) for f in files)}))


def sealed_deploy(manifest_url: str, dest: str, identity: str) -> None:
    """The floor of an encrypted bundle: download + sha256 + fsync of the ciphertext, decryption
    with pyrage into memory + plaintext sha256, then the onnxruntime session from those bytes."""
    import base64
    import hashlib

    import pyrage
    import requests

    _quiet_runtimes()
    import onnxruntime as ort

    with open(identity) as fh:
        ident = pyrage.x25519.Identity.from_str(next(ln for ln in fh.read().splitlines()
                                                     if ln.startswith("AGE-SECRET-KEY-1")))
    os.makedirs(dest, exist_ok=True)
    t0 = time.perf_counter()
    s = requests.Session()
    env = s.get(manifest_url, timeout=30).json()
    doc = json.loads(base64.b64decode(env["payload"]))
    files = list(doc.get("files", [])) + [f for v in doc["variants"][:1] for f in v["files"]]
    sealed: tuple[str, dict[str, Any]] | None = None
    for f in files:
        path = _fetch(s, manifest_url, f, dest)
        if "encryption" in f:
            sealed = (path, f["encryption"])
    t_dl = time.perf_counter() - t0
    assert sealed is not None, "the bundle has no encrypted file"
    with open(sealed[0], "rb") as fh:
        plain = pyrage.decrypt(fh.read(), [ident])
    if hashlib.sha256(plain).hexdigest() != sealed[1]["plaintext_sha256"]:
        raise SystemExit("plaintext sha256 mismatch")
    t_dec = time.perf_counter() - t0 - t_dl
    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    ort.InferenceSession(plain, sess_options=so, providers=["CPUExecutionProvider"])
    total = time.perf_counter() - t0
    print(json.dumps({"total_s": total, "download_s": t_dl, "decrypt_s": t_dec, "load_s": total - t_dl - t_dec,
                      "bytes": sum(int(f["size"]) for f in files)}))


def main(argv: list[str]) -> int:
    kind, args = argv[0], argv[1:]
    if kind == "bare":
        _ready()
        _hold()
    elif kind == "paho":
        paho(args[0], int(args[1]))
    elif kind == "runtime":
        runtime(args[0], args[1])
    elif kind == "echo":
        echo(int(args[0]))
    elif kind == "deploy":
        deploy(args[0], args[1])
    elif kind == "sealed-deploy":
        sealed_deploy(args[0], args[1], args[2])
    else:
        raise SystemExit(f"unknown floor {kind!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
