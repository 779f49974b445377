"""9. Peers: the agent beside the servers its users would otherwise run on the device, in the same
run, on the same models, with the same client (``python -m benchmarks --peers``).

The peers, each installed from PyPI into its own virtual environment under the work folder
(``--peers-cache DIR`` keeps them between runs): MLServer with mlserver-sklearn serving the
scikit-learn pipeline saved with joblib (``model-settings.json``, as MLServer's docs say); KServe's
Python ModelServer with a custom Model wrapping onnxruntime; a FastAPI/uvicorn app calling
onnxruntime. The agent serves the same models as ONNX: the pipeline converted by ``fleetctl bundle
build model.joblib`` (skl2onnx), and a small CNN with a [1,3,48,192] input built here. Per server and
repeat (the servers alternate, three repeats): start-up to the model answering ready, RSS of the
process tree idle (models loaded, no request yet) and loaded (after the load runs), single-client
p50/p99, requests/s at 1 and 8 keep-alive clients (and the server tree's CPU per request there), KServe v2 JSON, and binary tensors (KServe's
binary tensor data extension, input and output) where the server speaks them: the agent and KServe's
ModelServer; MLServer's REST API and the FastAPI app take JSON only. A peer that cannot be installed
is reported with pip's last line, never measured in another way.
"""

from __future__ import annotations

import http.client
import json
import statistics
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmarks import harness as h
from benchmarks.context import Context

PEERS = ("mlserver", "kserve", "fastapi")
SERVERS = ("agent", *PEERS)
PIP_TIMEOUT_S = 900.0
READY_TIMEOUT_S = 120.0
CLIENTS = (1, 8)
SPREAD_CLIENTS = 8  # the concurrency whose spread over the repeats is judged
BINARY = ("agent", "kserve")  # the servers here that speak the binary tensor extension
CNN_SHAPE = (1, 3, 48, 192)
FEATURES = 16
APPS = Path(__file__).resolve().parent / "peer_apps"


def pins() -> dict[str, list[str]]:
    """What each peer installs: current releases that install on Python 3.11, and the agent's own
    onnxruntime for the peers that call it (the same runtime on both sides)."""
    ort = f"onnxruntime=={metadata.version('onnxruntime')}"
    # uvloop 0.22 made asyncio.get_event_loop() raise in a fresh process, which MLServer 1.7.1's
    # inference-pool workers call at start: with it no model loads.
    return {"mlserver": ["mlserver==1.7.1", "mlserver-sklearn==1.7.1", "uvloop<0.22",
                         f"scikit-learn=={metadata.version('scikit-learn')}"],
            "kserve": ["kserve==0.21.0", ort],
            "fastapi": ["fastapi==0.165.0", "uvicorn==0.54.0", ort]}


def install(peer: str, root: Path) -> tuple[Path | None, str]:
    """A virtual environment with the peer's pins: (its python, "") or (None, pip's last line)."""
    venv = root / peer
    py = venv / "bin" / "python"
    if not py.exists():
        r = subprocess.run(["python3", "-m", "venv", str(venv)], capture_output=True,
                           text=True, timeout=120)
        if r.returncode != 0:
            return None, (r.stderr.strip().splitlines() or ["venv failed"])[-1]
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", *pins()[peer]],
                       capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    if r.returncode != 0:
        return None, ((r.stderr + r.stdout).strip().splitlines() or [f"pip exited {r.returncode}"])[-1]
    return py, ""


def _sklearn_pipeline(src: Path) -> Path:
    """A scikit-learn pipeline (scaler + logistic regression, 16 features) saved with joblib."""
    import joblib
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, FEATURES)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64)
    pipe = make_pipeline(StandardScaler(), LogisticRegression()).fit(x, y)
    src.parent.mkdir(parents=True, exist_ok=True)
    joblib.dump(pipe, src)
    np.save(src.with_name("sk-x.npy"), x[:16])
    return src


def _request(model: str, input_name: str, x: Any, port: int, binary: bool = False) -> bytes:
    """A KServe v2 infer request: JSON, or binary tensors in and out (the binary tensor extension:
    ``binary_data_size`` on the input, ``binary_data_output`` on the request, the JSON part's length
    in ``Inference-Header-Content-Length``)."""
    tensor: dict[str, Any] = {"name": input_name, "shape": list(x.shape), "datatype": "FP32"}
    if binary:
        blob = x.astype("<f4").tobytes()
        tensor["parameters"] = {"binary_data_size": len(blob)}
        head = json.dumps({"inputs": [tensor], "parameters": {"binary_data_output": True}},
                          separators=(",", ":")).encode()
        body = head + blob
        extra = f"Inference-Header-Content-Length: {len(head)}\r\nContent-Type: application/octet-stream\r\n"
    else:
        tensor["data"] = x.ravel().tolist()
        body = json.dumps({"inputs": [tensor]}, separators=(",", ":")).encode()
        extra = "Content-Type: application/json\r\n"
    return (f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{extra}"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def _wait_ready(port: int, model: str, proc: subprocess.Popen[Any] | None, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            c.request("GET", f"/v2/models/{model}/ready")
            if c.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{model} not ready on port {port} after {timeout_s} s")


class Client(h.KeepAlive):
    """The harness's keep-alive client, also reading chunked bodies: KServe's ModelServer sends its
    binary-tensor answers with ``Transfer-Encoding: chunked`` (its JSON ones with a length)."""

    def _more(self, s: Any) -> bytes:
        chunk: bytes = s.recv(262144)
        if not chunk:
            raise ConnectionError("connection closed by the server")
        return chunk

    def _read(self, s: Any) -> tuple[int, bytes]:
        buf = self._buf
        while b"\r\n\r\n" not in buf:
            buf += self._more(s)
        head, _, rest = buf.partition(b"\r\n\r\n")
        low = head.lower()
        if b"transfer-encoding: chunked" not in low:
            self._buf = buf
            return super()._read(s)
        status = int(head.split(b"\r\n", 1)[0].split(b" ", 2)[1])
        body: list[bytes] = []
        buf = rest
        while True:
            while b"\r\n" not in buf:
                buf += self._more(s)
            line, _, buf = buf.partition(b"\r\n")
            size = int(line.split(b";", 1)[0], 16)
            while len(buf) < size + 2:
                buf += self._more(s)
            if size == 0:  # the last chunk, then trailers (none expected) up to an empty line
                while not buf.startswith(b"\r\n") and b"\r\n\r\n" not in buf:
                    buf += self._more(s)
                self._buf = buf[2:] if buf.startswith(b"\r\n") else buf.partition(b"\r\n\r\n")[2]
                break
            body.append(buf[:size])
            buf = buf[size + 2:]
        if b"connection: close" in low:
            self.close()
        return status, b"".join(body)


class Peer:
    """A peer server as a process tree: started, ready (every model), measured, stopped."""

    def __init__(self, peer: str, py: Path, work: Path, models: dict[str, Path]) -> None:
        self.port = h.free_port()
        work.mkdir(parents=True, exist_ok=True)
        self.log = work / f"{peer}.log"
        if peer == "mlserver":
            cmd = [str(py.parent / "mlserver"), "start", str(self._mlserver_folder(work, models))]
        else:
            app = APPS / ("kserve_ort.py" if peer == "kserve" else "fastapi_ort.py")
            cmd = [str(py), str(app), str(self.port), *(f"{n}={p}" for n, p in models.items())]
        t0 = time.monotonic()
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=work, start_new_session=True)
        try:
            for m in models:
                _wait_ready(self.port, m, self.proc, READY_TIMEOUT_S)
        except Exception as e:
            self.stop()
            errors = [ln for ln in self.log.read_text(errors="replace").splitlines() if "Error" in ln]
            raise RuntimeError(f"{peer} did not start ({e}): {errors[-1] if errors else 'no error logged'}") from e
        self.startup_s = time.monotonic() - t0

    def _mlserver_folder(self, work: Path, models: dict[str, Path]) -> Path:
        folder = work / "mlserver-models"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "settings.json").write_text(json.dumps(
            {"http_port": self.port, "grpc_port": h.free_port(), "metrics_port": h.free_port()}))
        for name, path in models.items():
            d = folder / name
            d.mkdir(exist_ok=True)
            (d / "model.joblib").write_bytes(path.read_bytes())
            (d / "model-settings.json").write_text(json.dumps(
                {"name": name, "implementation": "mlserver_sklearn.SKLearnModel",
                 "parameters": {"uri": "./model.joblib", "version": "v1"}}))
        return folder

    def footprint(self) -> h.Footprint:
        return h.tree_footprint(self.proc.pid)

    def stop(self) -> None:
        h.stop_process(self.proc, group=True)


def _measure(port: int, pid: int, req: bytes, n: int, seconds: float) -> dict[str, Any]:
    """Single-client latency, then requests/s and the server's CPU per request (its whole process
    tree: user + system) at each of CLIENTS."""
    lat, errs, _ = h.drive(port, req, 1, duration_s=600, max_requests=n, warmup=max(5, n // 20), client=Client)
    row: dict[str, Any] = {"ms": h.stats([x * 1000 for x in lat]).to_dict(), "errors": errs, "rps": {},
                           "cpu_us": {}}
    for c in CLIENTS:
        cpu0 = h.tree_cpu_s([pid])
        tl, te, wall = h.drive(port, req, c, duration_s=seconds, warmup=3, client=Client)
        answered = len(tl) - te  # answered requests only: errors do not count
        row["rps"][str(c)] = answered / wall
        row["cpu_us"][str(c)] = (h.tree_cpu_s([pid]) - cpu0) / max(1, answered) * 1e6
        row["errors"] += te
    return row


def _kinds(server: str, models: Any) -> list[str]:
    """What ``server`` is measured on: each model as JSON, and as binary tensors ("MODEL_bin")
    where the server speaks them."""
    return [*models, *(f"{m}_bin" for m in models if server in BINARY)]


def _agent_run(ctx: Context, manifests: dict[str, Path], reqs: dict[str, Any], n: dict[str, int]) -> dict[str, Any]:
    obs = ctx.observer()
    d = ctx.daemon("process")
    try:
        t0 = time.monotonic()
        d.start(obs)
        d.wait_api()
        out: dict[str, Any] = {"startup_s": time.monotonic() - t0, "models": {}}
        for m, man in manifests.items():
            d.deploy(obs, ctx.fleet, m, ctx.url(man), backend="onnxruntime:CPUExecutionProvider")
        time.sleep(ctx.scale.settle_s)
        out["rss_idle_mb"] = d.footprint().rss_mb
        for kind in _kinds("agent", manifests):
            out["models"][kind] = _measure(d.api_port, d.pid, reqs[kind](d.api_port), n[kind], ctx.scale.throughput_s)
        out["rss_loaded_mb"] = d.footprint().rss_mb
        return out
    finally:
        d.stop()
        obs.close()


def _peer_run(ctx: Context, peer: str, py: Path, models: dict[str, Path], reqs: dict[str, Any],
              n: dict[str, int]) -> dict[str, Any]:
    p = Peer(peer, py, ctx.work / "peers-run" / peer, models)
    try:
        out: dict[str, Any] = {"startup_s": p.startup_s, "models": {}}
        time.sleep(ctx.scale.settle_s)
        out["rss_idle_mb"] = p.footprint().rss_mb
        for kind in _kinds(peer, models):
            out["models"][kind] = _measure(p.port, p.proc.pid, reqs[kind](p.port), n[kind], ctx.scale.throughput_s)
        out["rss_loaded_mb"] = p.footprint().rss_mb
        return out
    finally:
        p.stop()


def run(ctx: Context) -> dict[str, Any]:
    import numpy as np

    from fleetctl.sources.certify import build_from_source

    sc = ctx.scale
    repeats = 3 if sc.name == "full" else 1
    chosen = [s for s in SERVERS if s in ctx.peers] if ctx.peers else list(SERVERS)
    sk = _sklearn_pipeline(ctx.work / "src" / "sk.joblib")
    sk_manifest = build_from_source(str(sk), ctx.bundles / "sk" / "1", "sk", 1, ctx.fleet.keys,
                                    sample_input=sk.with_name("sk-x.npy"), overwrite=True)
    cnn_onnx = h.make_cnn(ctx.work / "src" / "cnn48.onnx", shape=CNN_SHAPE)
    with_cnn = sc.cnn_requests > 0
    manifests = {"sk": sk_manifest, **({"cnn": ctx.fleet.bundle(cnn_onnx, ctx.bundles / "cnn48" / "1", "cnn", 1)}
                                       if with_cnn else {})}
    x_sk = np.random.default_rng(1).standard_normal((1, FEATURES)).astype(np.float32)
    x_cnn = np.random.default_rng(1).standard_normal(CNN_SHAPE).astype(np.float32)
    # the converted model's input is "input"; MLServer names its input freely; the CNN's is "x"
    reqs = {"sk": lambda port: _request("sk", "input", x_sk, port),
            "sk_bin": lambda port: _request("sk", "input", x_sk, port, binary=True),
            "cnn": lambda port: _request("cnn", "x", x_cnn, port),
            "cnn_bin": lambda port: _request("cnn", "x", x_cnn, port, binary=True)}
    n = {"sk": min(sc.tiny_requests, 1000), "cnn": sc.cnn_requests}
    n.update({f"{m}_bin": v for m, v in n.items()})
    res: dict[str, Any] = {"repeats": repeats, "servers": {}, "not_installed": {}, "failed": {}, "versions": pins(),
                           "load_avg": [], "cnn_shape": list(CNN_SHAPE),
                           "binary": [b for b in BINARY if b in chosen]}
    pys: dict[str, Path] = {}
    venvs = ctx.peers_cache or (ctx.work / "peer-venvs")
    for peer in [p for p in chosen if p in PEERS]:
        ctx.log(f"peers: installing {peer} into {venvs / peer}")
        py, err = install(peer, venvs)
        if py is None:
            res["not_installed"][peer] = err
        else:
            pys[peer] = py
    order = [s for s in SERVERS if (s == "agent" and s in chosen) or s in pys]
    for r in range(repeats):
        res["load_avg"].append(list(_loadavg()))
        for srv in order:  # alternate: every server once per repeat
            ctx.log(f"peers: repeat {r + 1}/{repeats}, {srv}")
            if srv == "agent":
                out = _agent_run(ctx, manifests, reqs, n)
            else:
                models = {"sk": sk} if srv == "mlserver" else {
                    "sk": sk_manifest.parent / "model.onnx", **({"cnn": cnn_onnx} if with_cnn else {})}
                try:
                    out = _peer_run(ctx, srv, pys[srv], models, reqs, n)
                except RuntimeError as e:  # reported as it failed, never measured another way
                    res["failed"][srv] = str(e).splitlines()[0][:300]
                    continue
            res["servers"].setdefault(srv, []).append(out)
    res["summary"] = summarise(res["servers"])
    return res


def _loadavg() -> tuple[float, float, float]:
    import os

    return os.getloadavg()


def summarise(servers: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Medians over the repeats per server: startup, RSS, and per model p50/p99/req/s."""
    out: dict[str, dict[str, Any]] = {}
    for srv, runs in servers.items():
        s: dict[str, Any] = {k: statistics.median(r[k] for r in runs) for k in ("startup_s", "rss_idle_mb",
                                                                                "rss_loaded_mb")}
        for m in runs[0]["models"]:  # "sk", "cnn", and "sk_bin", "cnn_bin" where binary was measured
            s[f"{m}/p50_ms"] = statistics.median(r["models"][m]["ms"]["median"] for r in runs)
            s[f"{m}/p99_ms"] = statistics.median(r["models"][m]["ms"]["p99"] for r in runs)
            s[f"{m}/errors"] = sum(r["models"][m]["errors"] for r in runs)
            for c in CLIENTS:
                vals = [r["models"][m]["rps"][str(c)] for r in runs]
                s[f"{m}/rps{c}"] = statistics.median(vals)
                s[f"{m}/rps{c}_range"] = [min(vals), max(vals)]
                s[f"{m}/rps{c}_spread_pct"] = spread_pct(vals)
                s[f"{m}/rps{c}_repeats"] = vals
                cpu = [r["models"][m].get("cpu_us", {}).get(str(c)) for r in runs]
                if all(v is not None for v in cpu):
                    s[f"{m}/cpu_us{c}"] = statistics.median(cpu)
                    s[f"{m}/cpu_us{c}_range"] = [min(cpu), max(cpu)]
                    s[f"{m}/cpu_us{c}_repeats"] = cpu
        out[srv] = s
    return out


def spread_pct(vals: list[float]) -> float:
    """The farthest repeat from the median, in % of the median (± this much covers every repeat)."""
    med = statistics.median(vals)
    return max(abs(v - med) for v in vals) / med * 100 if med else 0.0
