"""Backend targets listed by a short-lived child process, cached: the daemon imports no runtime
just to learn what it could use.

Why: ``targets()`` imports the runtime (onnxruntime, OpenVINO, LiteRT, and numpy with them). In
the daemon that cost ~70 MB of resident memory for the whole life of an idle agent whose models
run in worker processes anyway (docs/benchmarks.md). The child pays it and exits.

Invariants:
- ``ProbedBackend.targets()`` answers what the wrapped backend's ``targets()`` answers in a fresh
  interpreter of the same Python; ``load`` and every other attribute are the wrapped backend's.
- The probe runs at most once per evidence key (runtime distributions and versions, device nodes,
  the environment variables runtimes read); the answer is kept in memory and in ``cache_file``, so
  a restart or a deploy pays nothing while the key holds. A device plugged in changes the key.
- Never raises: a probe that fails or times out falls back to ``targets()`` in this process
  (the behaviour before this module), and says so in the log.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent.backends.base import Availability, LoadedModel, LoadOptions, Target

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 120.0  # a first `import openvino` from a cold disk took ~40 s on the bench machine
CACHE_VERSION = 1
RUNTIME_DISTS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "openvino", "ai-edge-litert",
                 "tflite-runtime")
DEVICE_DIRS = ("/dev", "/dev/dri", "/dev/accel", "/dev/bus/usb")  # GPUs, NPUs, Coral/Myriad USB sticks
RUNTIME_ENV = ("LD_LIBRARY_PATH", "CUDA_VISIBLE_DEVICES", "PATH")
WARM_DELAY_S = 3.0  # the background probe waits this long: start-up (connect, subscribe) comes first
PROBE_NICE = 10  # the child yields the CPU to the daemon it works for


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def dist_versions(dists: Sequence[str]) -> dict[str, str]:
    """``{dist: version}`` ("" when not installed) from the ``NAME-VERSION.dist-info`` (or
    ``.egg-info``) folder names on ``sys.path``, the first one found winning, as in
    ``importlib.metadata.version``; importing that module costs the idle daemon ≈ 1.1 MB of RSS
    (zipfile, csv, email, ...). tests/unit/test_dist_versions.py checks both agree."""
    wanted: dict[str, list[str]] = {}
    for d in dists:
        wanted.setdefault(_norm(d), []).append(d)
    out = dict.fromkeys(dists, "")
    found: set[str] = set()
    for entry in sys.path:
        try:
            names = sorted(os.listdir(entry or "."))
        except OSError:  # a zip file, a missing folder
            continue
        for n in names:
            stem, dot, ext = n.rpartition(".")
            if not dot or ext not in ("dist-info", "egg-info"):
                continue
            name, _, rest = stem.partition("-")
            key = _norm(name)
            if key in wanted and key not in found:
                found.add(key)
                version = rest.partition("-")[0] or _metadata_version(os.path.join(entry or ".", n))
                for d in wanted[key]:
                    out[d] = version
    return out


def _metadata_version(folder: str) -> str:
    """The ``Version:`` header of a metadata folder whose name carries none (an editable install)."""
    for f in ("METADATA", "PKG-INFO"):
        try:
            with open(os.path.join(folder, f), encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    if line.startswith("Version:"):
                        return line.partition(":")[2].strip()
                    if not line.strip():
                        break  # the headers end at the first blank line
        except OSError:
            continue
    return ""


def _listing(d: str) -> list[str]:
    out: list[str] = []
    try:
        for root, dirs, files in os.walk(d) if d != "/dev" else [(d, [], os.listdir(d))]:
            dirs.sort()
            out.extend(f"{root}/{f}" for f in sorted(files))
    except OSError:
        pass
    return out


def evidence_key(runtimes: Sequence[str]) -> str:
    """What the targets depend on, hashed: cheap to compute (no runtime import)."""
    doc = {"v": CACHE_VERSION, "python": sys.executable, "runtimes": sorted(runtimes),
           "dists": dist_versions(RUNTIME_DISTS),
           "devices": [x for d in DEVICE_DIRS for x in _listing(d)],
           "env": {k: os.environ.get(k, "") for k in RUNTIME_ENV}}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32]


def _to_doc(targets: Sequence[Target]) -> list[dict[str, Any]]:
    return [{"runtime": t.runtime, "target": t.target, "formats": list(t.formats),
             "usable": t.availability.usable, "reason": t.availability.reason} for t in targets]


def _from_doc(rows: Sequence[dict[str, Any]]) -> list[Target]:
    return [Target(str(r["runtime"]), str(r["target"]), tuple(str(f) for f in r["formats"]),
                   Availability(bool(r["usable"]), str(r["reason"]))) for r in rows]


class TargetProbe:
    """One child-process probe of every built-in backend, shared by their ``ProbedBackend``s."""

    def __init__(self, backends: Sequence[Any], cache_file: Path | None = None,
                 timeout_s: float = PROBE_TIMEOUT_S) -> None:
        self._backends = {b.runtime: b for b in backends}
        self.cache_file = cache_file
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._key = ""
        self._targets: dict[str, list[Target]] = {}
        self.probes = 0  # child processes run (tests, benchmarks)

    def targets(self, runtime: str) -> list[Target]:
        key = evidence_key(list(self._backends))
        with self._lock:
            if key != self._key:
                self._targets = self._cached(key) or self._probe(key)
                self._key = key
            return list(self._targets.get(runtime, []))

    def _cached(self, key: str) -> dict[str, list[Target]] | None:
        if self.cache_file is None:
            return None
        try:
            doc = json.loads(self.cache_file.read_text())
            if doc.get("key") != key:
                return None
            return {rt: _from_doc(rows) for rt, rows in doc["targets"].items()}
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _probe(self, key: str) -> dict[str, list[Target]]:
        self.probes += 1
        try:
            r = subprocess.run([sys.executable, "-m", __name__, *self._backends], capture_output=True,
                               timeout=self.timeout_s, check=True, stdin=subprocess.DEVNULL)
            doc = json.loads(r.stdout.strip().splitlines()[-1])  # the last line: a runtime may print too
            found = {rt: _from_doc(rows) for rt, rows in doc.items()}
        except (OSError, subprocess.SubprocessError, ValueError, KeyError, TypeError, IndexError) as e:
            log.warning("backend probe in a child process failed (%s); listing targets in the daemon", e)
            return {rt: b.targets() for rt, b in self._backends.items()}
        if self.cache_file is not None:
            try:
                from agent.fsutil import atomic_write

                self.cache_file.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(self.cache_file, json.dumps(
                    {"key": key, "targets": {rt: _to_doc(ts) for rt, ts in found.items()}}).encode())
            except OSError as e:
                log.warning("cannot write the backend probe cache %s: %s", self.cache_file, e)
        return found


class ProbedBackend:
    """A backend whose ``targets()`` come from ``TargetProbe``; everything else is the backend's."""

    def __init__(self, backend: Any, probe: TargetProbe) -> None:
        self._backend = backend
        self._probe = probe
        self.runtime: str = backend.runtime

    def targets(self) -> list[Target]:
        return self._probe.targets(self.runtime)

    def load(self, model_path: Path, target: str, options: LoadOptions) -> LoadedModel:
        model: LoadedModel = self._backend.load(model_path, target, options)
        return model

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)


def probed_backends(backends: Sequence[Any], cache_file: Path | None = None, warm: bool = True) -> list[Any]:
    """Wrap the built-in backends (agent.backends.BACKEND_CLASSES); others are returned as they are.

    ``warm``: run the probe on a background thread ``WARM_DELAY_S`` after this call (a call to
    ``targets()`` before or during it probes or waits); with a valid ``cache_file`` that costs a
    file read."""
    from agent.backends import BACKEND_CLASSES

    builtin = {cls for _, cls in BACKEND_CLASSES}
    mine = [b for b in backends if type(b).__name__ in builtin and type(b).__module__.startswith("agent.backends.")]
    probe = TargetProbe(mine, cache_file)
    if mine and warm:  # in the background, after start-up, so the first deploy does not wait for the child
        t = threading.Timer(WARM_DELAY_S, probe.targets, args=(mine[0].runtime,))
        t.name, t.daemon = "backend-probe", True
        t.start()
    return [ProbedBackend(b, probe) if b in mine else b for b in backends]


def main(argv: list[str]) -> int:
    """Child side: print ``{runtime: [target, ...]}`` for the runtimes named in ``argv``."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    with contextlib.suppress(OSError):
        os.nice(PROBE_NICE)
    from agent.backends import available_backends

    wanted = set(argv)
    out = {b.runtime: _to_doc(b.targets()) for b in available_backends() if b.runtime in wanted}
    sys.stdout.write("\n" + json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
