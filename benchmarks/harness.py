"""Shared parts of the benchmarks: statistics, the machine, Mosquitto, the daemon as a process, a
fleet-side observer, signed bundles and commands, a lean keep-alive HTTP client.

Everything runs on loopback, every wait has a deadline, and every process started here is stopped
by the context that started it.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
BROKER_START_TIMEOUT_S = 10.0
DAEMON_START_TIMEOUT_S = 60.0
DAEMON_STOP_TIMEOUT_S = 10.0
DEPLOY_TIMEOUT_S = 240.0
DRIVE_START_TIMEOUT_S = 300.0  # every client warmed up and at the start line (a client that died breaks it)
SETTLE_S = 1.0  # after start: let lazy allocations (first heartbeat, threads) happen before RSS is read
PREFIX = "edge"


# -- statistics -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Stats:
    """Median, p99 (nearest rank), min and max of one series; ``n`` samples."""

    n: int
    median: float
    p99: float
    min: float
    max: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def percentile(sorted_xs: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted series (q in 0..100)."""
    if not sorted_xs:
        return math.nan
    k = max(0, min(len(sorted_xs) - 1, math.ceil(q / 100 * len(sorted_xs)) - 1))
    return float(sorted_xs[k])


def stats(xs: Sequence[float]) -> Stats:
    s = sorted(float(x) for x in xs)
    if not s:
        return Stats(0, math.nan, math.nan, math.nan, math.nan)
    mid = len(s) // 2
    median = s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2
    return Stats(len(s), median, percentile(s, 99), s[0], s[-1])


# -- the machine ------------------------------------------------------------------------------

def _dist(name: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/bin/mosquitto") if os.path.exists(p)), None)
    if found is None:
        raise RuntimeError("mosquitto is not installed (apt-get install -y mosquitto)")
    return found


def machine() -> dict[str, Any]:
    """CPU, cores, memory, kernel, Python and the versions of every package that matters here."""
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError, ValueError):
        mem_kb = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
    mosq = "unknown"
    with contextlib.suppress(Exception):
        out = subprocess.run([mosquitto_binary(), "-h"], capture_output=True, text=True, timeout=5)
        mosq = (out.stdout or out.stderr).splitlines()[0].strip()
    return {
        "cpu": cpu, "cores": os.cpu_count() or 0,
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": round(mem_kb / 2**20, 1), "kernel": platform.release(), "os": platform.platform(),
        "python": platform.python_version(), "mosquitto": mosq,
        "packages": {d: _dist(d) for d in ("edge-agent", "paho-mqtt", "cryptography", "psutil", "requests",
                                            "numpy", "onnxruntime", "openvino", "ai-edge-litert", "matplotlib")},
    }


# -- processes --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Footprint:
    """Memory of a process and all its descendants, in MiB."""

    rss_mb: float  # sum of each process's RSS (shared pages counted once per process)
    pss_mb: float  # sum of proportional set sizes (shared pages split between the processes)
    uss_mb: float  # memory only this tree holds
    processes: int


def tree_footprint(pid: int) -> Footprint:
    import psutil

    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    rss = pss = uss = 0
    n = 0
    for p in procs:
        try:
            full = p.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        rss += full.rss
        pss += getattr(full, "pss", full.rss)
        uss += full.uss
        n += 1
    return Footprint(rss / 2**20, pss / 2**20, uss / 2**20, n)


def tree_cpu_s(pids: Sequence[int]) -> float:
    """User + system CPU seconds of these processes and their descendants so far."""
    import psutil

    total = 0.0
    for pid in pids:
        try:
            root = psutil.Process(pid)
            for p in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    t = p.cpu_times()
                    total += t.user + t.system
        except psutil.NoSuchProcess:
            continue
    return total


def raise_fd_limit(want: int = 16384) -> None:
    """Enough descriptors for a broker with thousands of clients (children inherit the limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(hard, max(soft, want)) if hard != resource.RLIM_INFINITY else max(soft, want)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout_s: float, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout_s} s")


def stop_process(proc: subprocess.Popen[Any], timeout_s: float = DAEMON_STOP_TIMEOUT_S, group: bool = False) -> None:
    """SIGTERM, then SIGKILL after ``timeout_s``; ``group``: the whole process group it leads
    (a child started with ``start_new_session=True``), so its own children go too."""
    def send(sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)

    if proc.poll() is None:
        send(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            send(signal.SIGKILL)
            proc.wait(timeout_s)
    if group:  # the leader is gone; anything left in its group is not
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


def env() -> dict[str, str]:
    """The children's environment: this one, with the repo importable and no stray OMP settings."""
    e = dict(os.environ)
    paths = [str(REPO), str(REPO / "tools")]
    if e.get("PYTHONPATH"):
        paths.append(e["PYTHONPATH"])
    e["PYTHONPATH"] = os.pathsep.join(paths)
    return e


# -- the broker -------------------------------------------------------------------------------

class Broker:
    """A real Mosquitto on a free loopback port (TCP_NODELAY on, as FIELD-NOTES asks)."""

    def __init__(self, workdir: Path, sys_interval_s: int = 0) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.host = "127.0.0.1"
        workdir.mkdir(parents=True, exist_ok=True)
        self.conf = workdir / "mosquitto.conf"
        lines = [f"listener {self.port} 127.0.0.1", "allow_anonymous true", "set_tcp_nodelay true",
                 "max_queued_messages 100000", "max_inflight_messages 0", "user root"]
        if sys_interval_s:
            lines.append(f"sys_interval {sys_interval_s}")
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self) -> Broker:
        raise_fd_limit()
        self.proc = subprocess.Popen([mosquitto_binary(), "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_port(self.port, BROKER_START_TIMEOUT_S)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, 5)
            self.proc = None

    def __enter__(self) -> Broker:
        return self if self.proc is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- fleet side: observer, keys, commands --------------------------------------------------------

@dataclass
class Message:
    t: float  # time.monotonic() at arrival
    topic: str
    doc: dict[str, Any]
    size: int  # payload bytes
    retain: bool


class Observer:
    """A fleet-side MQTT client: records what arrives under ``topics`` and publishes commands."""

    def __init__(self, broker: Broker, topics: Sequence[str] = (f"{PREFIX}/#",), keep: bool = True,
                 on_message: Callable[[Message], None] | None = None) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.messages: list[Message] = []
        self.count = 0
        self.keep = keep
        self._hook = on_message
        self._cv = threading.Condition()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-obs-{os.getpid()}-{id(self)}",
                                  protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        def nodelay(cl: Any, u: Any, s: Any) -> None:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        self.client.on_socket_open = nodelay
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.client.subscribe([(t, 1) for t in topics])
        if not subscribed.wait(10):
            raise TimeoutError("observer: no SUBACK within 10 s")

    def _on_message(self, c: Any, u: Any, msg: Any) -> None:
        t = time.monotonic()
        payload = bytes(msg.payload)
        try:
            doc = json.loads(payload) if payload else {}
        except ValueError:
            doc = {}
        m = Message(t, msg.topic, doc if isinstance(doc, dict) else {}, len(payload), bool(msg.retain))
        if self._hook is not None:
            self._hook(m)
        with self._cv:
            self.count += 1
            if self.keep:
                self.messages.append(m)
            self._cv.notify_all()

    def wait(self, pred: Callable[[Message], bool], timeout_s: float, what: str, after: int = 0) -> Message:
        deadline = time.monotonic() + timeout_s
        i = after
        with self._cv:
            while True:
                while i < len(self.messages):
                    if pred(self.messages[i]):
                        return self.messages[i]
                    i += 1
                left = deadline - time.monotonic()
                if left <= 0:
                    tail = "\n".join(f"{m.topic} {json.dumps(m.doc)[:300]}" for m in self.messages[-8:])
                    raise TimeoutError(f"no {what} within {timeout_s:g} s; last messages:\n{tail}")
                self._cv.wait(left)

    def mark(self) -> int:
        with self._cv:
            return len(self.messages)

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        self.client.publish(topic, payload, qos=qos).wait_for_publish(10)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class Fleet:
    """The operator's signing key and trust folder."""

    def __init__(self, workdir: Path) -> None:
        from fleetctl import keys

        self.kp = keys.generate_keypair(workdir / "keys", "fleet", overwrite=True)
        self.keys = keys.load_signing_keys([str(self.kp.private_path)])
        self.trust_dir = workdir / "trust"
        self.trust_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
        os.chmod(self.trust_dir, 0o755)
        (self.trust_dir / "fleet.pem").write_bytes(self.kp.public_path.read_bytes())
        os.chmod(self.trust_dir / "fleet.pem", 0o644)

    def command(self, type_: str, params: dict[str, Any], target: dict[str, str]) -> tuple[str, bytes]:
        from fleetctl.commands import make_command

        return make_command(type_, params, target, self.keys)

    def bundle(self, model: Path, out: Path, name: str, version: int, variants: Sequence[str] = (),
               samples: int = 2) -> Path:
        from fleetctl.bundle import build_bundle

        return build_bundle(model, out, name, version, self.keys, variants=list(variants), samples=samples,
                            overwrite=True)


class ArtifactServer:
    """`fleetctl serve` as its own process (so its GIL is not the benchmark's)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, rel: str) -> str:
        return f"http://127.0.0.1:{self.port}/{rel}"

    def __enter__(self) -> ArtifactServer:
        self.root.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([PYTHON, "-m", "fleetctl.main", "serve", str(self.root), "--port", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env())
        wait_port(self.port, 20)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            stop_process(self.proc, 5)


# -- the daemon -------------------------------------------------------------------------------

@dataclass
class Daemon:
    """The real ``edge-agent`` as a process with its own folder and config."""

    root: Path
    broker: Broker
    trust_dir: Path
    device_id: str = "bench"
    isolation: str = "process"
    groups: tuple[str, ...] = ()
    extra: dict[str, dict[str, Any]] = field(default_factory=dict)  # [section] key = value overrides
    api_port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0

    @property
    def socket(self) -> Path:
        return self.root / "control.sock"

    @property
    def log(self) -> Path:
        return self.root / "agent.log"

    def write_config(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        self.api_port = self.api_port or free_port()
        sections: dict[str, dict[str, Any]] = {
            "mqtt": {"url": self.broker.url},
            "trust": {"keys_dir": str(self.trust_dir)},
            "api": {"listen": f"127.0.0.1:{self.api_port}", "control_socket": str(self.socket), "control_group": ""},
            "backends": {"isolation": self.isolation},
        }
        for sec, kv in self.extra.items():
            sections.setdefault(sec, {}).update(kv)
        groups = ", ".join(json.dumps(g) for g in self.groups)
        text = f'device_id = "{self.device_id}"\ngroups = [{groups}]\nstate_dir = "state"\n'
        for sec, kv in sections.items():
            text += f"\n[{sec}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in kv.items())
        cfg = self.root / "agent.toml"
        cfg.write_text(text)
        return cfg

    def start(self, obs: Observer, timeout_s: float = DAEMON_START_TIMEOUT_S) -> float:
        """Start and wait until its birth status (online) reached the broker; returns the seconds."""
        cfg = self.write_config()
        mark = obs.mark()
        logf = open(self.log, "ab")  # noqa: SIM115 - the child holds it; closed with the file object
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen([PYTHON, "-m", "agent", "run", "--config", str(cfg)], stdout=logf,
                                     stderr=subprocess.STDOUT, env=env(), cwd=self.root)
        logf.close()
        topic = f"{PREFIX}/{self.device_id}/status"
        deadline = time.monotonic() + timeout_s

        def online(m: Message) -> bool:
            return m.topic == topic and m.doc.get("online") is True

        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                m = obs.wait(online, min(0.5, max(0.01, deadline - time.monotonic())), "online status", after=mark)
                return m.t - self.started_at
            except TimeoutError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"agent not online after {timeout_s} s:\n{self.tail()}") from None

    def wait_api(self, timeout_s: float = 20.0) -> float:
        """Wait for ``/v2/health/ready``; returns seconds since start."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.api_port, timeout=1)
                c.request("GET", "/v2/health/ready")
                if c.getresponse().status == 200:
                    c.close()
                    return time.monotonic() - self.started_at
                c.close()
            except OSError:
                pass
            time.sleep(0.01)
        raise TimeoutError(f"API not ready after {timeout_s} s:\n{self.tail()}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def footprint(self) -> Footprint:
        return tree_footprint(self.pid)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def control(self, method: str, params: dict[str, Any] | None = None, timeout_s: float = 30) -> Any:
        """One call on the control socket (what agentctl does)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout_s)
            s.connect(str(self.socket))
            s.sendall(json.dumps({"op": method, "params": params or {}}).encode() + b"\n")
            f = s.makefile("rb")
            while True:
                line = f.readline()
                if not line:
                    raise ConnectionError(f"control socket closed before answering {method}")
                reply = json.loads(line)
                if "progress" not in reply:
                    break
        if not reply.get("ok"):
            raise RuntimeError(f"control {method}: {reply.get('error')}")
        return reply.get("result")

    def deploy(self, obs: Observer, fleet: Fleet, model: str, manifest_url: str, backend: str | None = None,
               timeout_s: float = DEPLOY_TIMEOUT_S) -> tuple[float, dict[str, Any]]:
        """Send a signed deploy; return (seconds from publish to the final job update, that update)."""
        from fleetctl.commands import deploy_params

        cid, env_bytes = fleet.command("deploy", deploy_params(model, manifest_url, backend=backend),
                                       {"device": self.device_id})
        mark = obs.mark()
        topic = f"{PREFIX}/{self.device_id}/jobs/{cid}"
        t0 = time.monotonic()
        obs.publish(f"{PREFIX}/{self.device_id}/cmd", env_bytes)
        final = obs.wait(lambda m: m.topic == topic and m.doc.get("state") in TERMINAL, timeout_s,
                         f"end of deploy {cid}", after=mark)
        if final.doc.get("state") != "SUCCEEDED":
            raise RuntimeError(f"deploy {model} ended {final.doc.get('state')}: {final.doc.get('error')}\n{self.tail()}")
        return final.t - t0, final.doc


TERMINAL = frozenset({"SUCCEEDED", "FAILED", "REJECTED", "CANCELED", "TIMED_OUT"})


@contextlib.contextmanager
def running(d: Daemon, obs: Observer) -> Iterator[Daemon]:
    d.start(obs)
    try:
        yield d
    finally:
        d.stop()


# -- models -----------------------------------------------------------------------------------

def make_mlp(path: Path, seed: int = 0, d_in: int = 16, hidden: int = 32, d_out: int = 4) -> Path:
    """A tiny MLP (Gemm, Relu, MatMul, Add, Softmax) that every runtime here can run."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)

    def w(*shape: int) -> Any:
        return (rng.standard_normal(shape) * 0.3).astype(np.float32)

    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h1"], transB=1),
             helper.make_node("Relu", ["h1"], ["r1"]),
             helper.make_node("MatMul", ["r1", "w2"], ["h2"]),
             helper.make_node("Add", ["h2", "b2"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["probs"], axis=-1)]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", d_in])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", d_out])],
        initializer=[numpy_helper.from_array(w(hidden, d_in), "w1"), numpy_helper.from_array(w(hidden), "b1"),
                     numpy_helper.from_array(w(hidden, d_out), "w2"), numpy_helper.from_array(w(d_out), "b2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


CNN_INPUT = (1, 3, 224, 224)


def make_cnn(path: Path, seed: int = 0, shape: tuple[int, ...] = CNN_INPUT) -> Path:
    """A small image classifier shaped like the edge CNNs people deploy: 224×224×3 in, six strided
    3×3 convolutions with ReLU (16→256 channels), global average pooling, a 1000-way softmax
    (``shape``: another [1,3,H,W] input, e.g. a text-line classifier's 48×192)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    chans = [3, 16, 32, 64, 128, 256, 256]
    nodes, inits = [], []
    x = "x"
    for i in range(len(chans) - 1):
        cin, cout = chans[i], chans[i + 1]
        wt = (rng.standard_normal((cout, cin, 3, 3)) * math.sqrt(2 / (cin * 9))).astype(np.float32)
        inits += [numpy_helper.from_array(wt, f"w{i}"), numpy_helper.from_array(np.zeros(cout, np.float32), f"b{i}")]
        nodes += [helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                                   strides=[2, 2] if i < 5 else [1, 1]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
        x = f"r{i}"
    fc = (rng.standard_normal((chans[-1], 1000)) * 0.05).astype(np.float32)
    inits += [numpy_helper.from_array(fc, "fc"), numpy_helper.from_array(np.zeros(1000, np.float32), "fcb"),
              numpy_helper.from_array(np.array([1, chans[-1]], np.int64), "flat")]
    nodes += [helper.make_node("GlobalAveragePool", [x], ["gap"]),
              helper.make_node("Reshape", ["gap", "flat"], ["feat"]),
              helper.make_node("MatMul", ["feat", "fc"], ["mm"]),
              helper.make_node("Add", ["mm", "fcb"], ["logits"]),
              helper.make_node("Softmax", ["logits"], ["probs"], axis=-1)]
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [1, 1000])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def make_sized(path: Path, size_bytes: int, seed: int = 0) -> Path:
    """A linear model whose weights make the file about ``size_bytes`` (deploy sizes)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    d_out = 64
    d_in = max(1, size_bytes // (4 * d_out))
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((d_in, d_out), dtype=np.float32) * 0.01
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "sized",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", d_in])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", d_out])],
        initializer=[numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


# -- HTTP -------------------------------------------------------------------------------------

def infer_request(model: str, x: Any, binary: bool, port: int) -> bytes:
    """A complete KServe v2 infer request (HTTP/1.1 keep-alive) for input ``x`` named "x"."""
    shape = list(x.shape)
    if binary:
        blob = x.astype("<f4").tobytes()
        head = json.dumps({"inputs": [{"name": "x", "shape": shape, "datatype": "FP32",
                                       "parameters": {"binary_data_size": len(blob)}}],
                           "parameters": {"binary_data_output": True}}, separators=(",", ":")).encode()
        body = head + blob
        extra = f"Inference-Header-Content-Length: {len(head)}\r\nContent-Type: application/octet-stream\r\n"
    else:
        body = json.dumps({"inputs": [{"name": "x", "shape": shape, "datatype": "FP32",
                                       "data": x.ravel().tolist()}]}, separators=(",", ":")).encode()
        extra = "Content-Type: application/json\r\n"
    head_s = (f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{extra}"
              f"Content-Length: {len(body)}\r\n\r\n")
    return head_s.encode() + body


def echo_request(body: bytes, port: int) -> bytes:
    return (f"POST /echo HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


class KeepAlive:
    """A lean HTTP/1.1 keep-alive client: sends prepared request bytes, reads one response."""

    def __init__(self, port: int, timeout_s: float = 30.0) -> None:
        self.port = port
        self.timeout_s = timeout_s
        self.sock: socket.socket | None = None
        self._buf = b""

    def _connect(self) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=self.timeout_s)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = s
        self._buf = b""
        return s

    def request(self, req: bytes) -> tuple[int, bytes]:
        s = self.sock or self._connect()
        try:
            s.sendall(req)
            return self._read(s)
        except OSError:
            self.close()
            raise

    def _read(self, s: socket.socket) -> tuple[int, bytes]:
        buf = self._buf
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(262144)
            if not chunk:
                raise ConnectionError("connection closed by the server")
            buf += chunk
        head, _, rest = buf.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length = 0
        close = False
        for line in lines[1:]:
            k, _, v = line.partition(b":")
            k = k.strip().lower()
            if k == b"content-length":
                length = int(v)
            elif k == b"connection" and v.strip().lower() == b"close":
                close = True
        parts = [rest]
        have = len(rest)
        while have < length:
            chunk = s.recv(max(262144, length - have))
            if not chunk:
                raise ConnectionError("connection closed mid-body")
            parts.append(chunk)
            have += len(chunk)
        data = b"".join(parts)
        body, self._buf = data[:length], data[length:]
        if close:
            self.close()
        return status, body

    def close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
            self.sock = None


def drive(port: int, req: bytes, clients: int, duration_s: float, max_requests: int = 0,
          warmup: int = 20, client: Callable[[int], KeepAlive] = KeepAlive) -> tuple[list[float], int, float]:
    """``clients`` keep-alive connections (``client(port)`` each), each sending ``req`` back to back
    for ``duration_s`` (or ``max_requests`` in all). Returns (latencies in s, errors, wall seconds)."""
    lat: list[list[float]] = [[] for _ in range(clients)]
    errs = [0] * clients
    stop_at = [0.0]
    go = threading.Barrier(clients + 1)
    budget = [max_requests]
    lock = threading.Lock()

    def one(i: int) -> None:
        c = client(port)
        try:
            for _ in range(warmup):
                c.request(req)
        except OSError:
            errs[i] += 1
        except BaseException:
            go.abort()  # an answer the client cannot read: the others and the caller leave the start line
            raise
        go.wait(DRIVE_START_TIMEOUT_S)
        mine = lat[i]
        pc = time.perf_counter
        while pc() < stop_at[0]:
            if max_requests:
                with lock:
                    if budget[0] <= 0:
                        break
                    budget[0] -= 1
            t0 = pc()
            try:
                status, _ = c.request(req)
            except OSError:
                errs[i] += 1
                continue
            mine.append(pc() - t0)
            if status != 200:
                errs[i] += 1
        c.close()

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    stop_at[0] = time.perf_counter() + 3600
    go.wait(DRIVE_START_TIMEOUT_S)
    t0 = time.perf_counter()
    stop_at[0] = t0 + duration_s
    for t in threads:
        t.join(duration_s + 60)
    wall = time.perf_counter() - t0
    return [x for xs in lat for x in xs], sum(errs), wall
