"""What every benchmark section shares: the run's scale, a work folder, the broker, the fleet's
keys, the bundles (built once) and the artifact server, and a way to start floor processes."""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import harness as h


@dataclass(frozen=True)
class Scale:
    """How much of each measurement a run does (``full``, ``quick``, ``smoke``)."""

    name: str
    repeats: int  # footprint: fresh daemons per (mode, runtime)
    modes: tuple[str, ...]  # backends.isolation values measured
    runtimes: tuple[str, ...]
    tiny_requests: int  # single-client latency samples, tiny model
    cnn_requests: int  # ... realistic CNN (0: skip the CNN)
    throughput_s: float  # seconds per (concurrency) throughput run
    concurrency: tuple[int, ...]
    inproc_calls: int  # in-process overhead: calls per batch
    deploy_sizes_mb: tuple[float, ...]
    deploy_repeats: int
    swaps: int
    steady_s: float
    telemetry_s: float
    outage_s: float
    fleet_sizes: tuple[int, ...]
    fleet_processes: int = 2
    plots: bool = True
    settle_s: float = 1.0  # after a start or deploy, before memory is read
    fleet_idle_s: float = 3.0  # idle CPU window per fleet size
    pin_swaps: bool = False  # swaps at defaults (autotune on) unless pinned
    collect_devices: int = 10_000  # fleet collector: simulated devices
    collect_compress: float = 10.0  # ... their 60 s periods divided by this
    collect_s: float = 30.0  # ... measured window


SCALES = {
    "full": Scale("full", repeats=3, modes=("process", "none"), runtimes=("onnxruntime", "openvino", "tflite"),
                  tiny_requests=3000, cnn_requests=200, throughput_s=3.0, concurrency=(1, 4, 16),
                  inproc_calls=20000, deploy_sizes_mb=(1, 50, 200), deploy_repeats=3, swaps=8, steady_s=6.0,
                  telemetry_s=20.0, outage_s=6.0, fleet_sizes=(100, 500, 1000)),
    "quick": Scale("quick", repeats=1, modes=("process", "none"), runtimes=("onnxruntime", "openvino", "tflite"),
                   tiny_requests=800, cnn_requests=20, throughput_s=0.6, concurrency=(1, 4, 16),
                   inproc_calls=5000, deploy_sizes_mb=(1, 50), deploy_repeats=1, swaps=3, steady_s=2.0,
                   telemetry_s=4.0, outage_s=2.0, fleet_sizes=(1000,), settle_s=0.5, fleet_idle_s=2.0,
                   collect_devices=2000, collect_s=10.0),
    "smoke": Scale("smoke", repeats=1, modes=("process",), runtimes=("onnxruntime",),
                   tiny_requests=50, cnn_requests=0, throughput_s=0.3, concurrency=(1, 4),
                   inproc_calls=500, deploy_sizes_mb=(1,), deploy_repeats=1, swaps=1, steady_s=0.5,
                   telemetry_s=2.0, outage_s=1.0, fleet_sizes=(20,), fleet_processes=1, plots=False,
                   settle_s=0.2, fleet_idle_s=0.5, pin_swaps=True, collect_devices=100, collect_compress=60.0,
                   collect_s=3.0),
}

BACKEND_OF = {"onnxruntime": "onnxruntime:CPUExecutionProvider", "openvino": "openvino:CPU", "tflite": "tflite:xnnpack"}
VARIANT_FILE = {"onnxruntime": "model.onnx", "openvino": "openvino/fp32/model.xml", "tflite": "model.tflite"}


@dataclass
class Context:
    scale: Scale
    work: Path
    broker: h.Broker
    fleet: h.Fleet
    bundles: Path
    server: h.ArtifactServer
    results: dict[str, Any] = field(default_factory=dict)
    peers: tuple[str, ...] = ()  # the peers section: which servers (empty: all)
    peers_cache: Path | None = None  # ... where their virtual environments are kept between runs
    _built: dict[str, Path] = field(default_factory=dict)
    _daemons: int = 0

    def log(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def daemon(self, isolation: str = "process", **kw: Any) -> h.Daemon:
        self._daemons += 1
        return h.Daemon(self.work / f"daemon-{self._daemons}", self.broker, self.fleet.trust_dir,
                        isolation=isolation, **kw)

    def tiny_bundle(self, version: int = 1, name: str = "tiny") -> Path:
        """The tiny MLP with ONNX, OpenVINO IR and TFLite variants (one per runtime)."""
        key = f"{name}/{version}"
        if key not in self._built:
            model = h.make_mlp(self.work / "src" / f"{name}-{version}.onnx", seed=version)
            variants = [v for v, rt in (("openvino-fp32", "openvino"), ("tflite", "tflite")) if rt in self.scale.runtimes]
            self._built[key] = self.fleet.bundle(model, self.bundles / name / str(version), name, version, variants)
        return self._built[key]

    def cnn_bundle(self, version: int = 1) -> Path:
        key = f"cnn/{version}"
        if key not in self._built:
            model = h.make_cnn(self.work / "src" / f"cnn-{version}.onnx", seed=version)
            self._built[key] = self.fleet.bundle(model, self.bundles / "cnn" / str(version), "cnn", version)
        return self._built[key]

    def url(self, manifest: Path) -> str:
        return self.server.url(manifest.relative_to(self.bundles).as_posix())

    def observer(self, **kw: Any) -> h.Observer:
        return h.Observer(self.broker, **kw)


class Floor:
    """A floor process (benchmarks/floors.py): started, ready, measured, stopped."""

    def __init__(self, kind: str, *args: str) -> None:
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen([h.PYTHON, "-m", "benchmarks.floors", kind, *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=h.env(), cwd=h.REPO)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        if not line.startswith("ready"):
            self.close()
            raise RuntimeError(f"floor {kind} did not start (exit {self.proc.poll()}): {line!r}")
        self.startup_s = time.monotonic() - self.t0
        self.info: dict[str, Any] = json.loads(line[len("ready"):] or "{}")

    def footprint(self) -> h.Footprint:
        return h.tree_footprint(self.proc.pid)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self) -> Floor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
