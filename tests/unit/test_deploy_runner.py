"""The deploy job end to end without MQTT: real bundles on disk (file://), real signatures,
real SQLite state and outbox, the real store and fetcher, and onnxruntime on a tiny model."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from conftest import make_linear_onnx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import errors
from agent.backends.onnxruntime import OnnxRuntimeBackend
from agent.bundles.fetch import Fetcher, FetchLimits
from agent.bundles.manifest import sign_manifest
from agent.bundles.store import Store
from agent.bundles.trust import TrustStore, key_id
from agent.deploy.jobs import JobReporter
from agent.deploy.runner import DeployContext, DeployRunner, DeploySettings
from agent.mqtt.topics import Topics
from agent.serving.registry import Registry
from agent.state import StateDB
from agent.telemetry.outbox import Outbox
from agent.timeutil import now_rfc3339

CPU = "onnxruntime:CPUExecutionProvider"
STEPS = ["fetching_manifest", "verifying", "selecting_backend", "downloading", "installing",
         "loading", "validating", "activating"]


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _entry(root: Path, rel: str) -> dict[str, Any]:
    p = root / rel
    return {"path": rel, "size": p.stat().st_size, "sha256": _sha(p)}


def build_bundle(root: Path, key: Ed25519PrivateKey, name: str = "lin", version: int = 1,
                 seed: int = 0, expected_offset: float = 0.0, expires_in_s: float = 3600.0) -> Path:
    """A one-variant ONNX bundle with golden samples; returns the manifest path."""
    root.mkdir(parents=True, exist_ok=True)
    model = make_linear_onnx(root / "model.onnx", seed=seed)
    x = np.random.default_rng(seed + 100).standard_normal((3, 4)).astype(np.float32)
    y = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(["y"], {"x": x})[0]
    (root / "samples").mkdir(exist_ok=True)
    np.savez(root / "samples" / "input.npz", x=x)
    np.savez(root / "samples" / "expected.npz", y=y + np.float32(expected_offset))
    now = time.time()
    doc = {
        "v": 1, "name": name, "version": version,
        "created_at": now_rfc3339(now - 60), "expires_at": now_rfc3339(now + expires_in_s),
        "io": {"inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 4]}],
               "outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 3]}]},
        "variants": [{"id": "onnx-fp32", "format": "onnx", "precision": "fp32",
                      "files": [_entry(root, "model.onnx")]}],
        "files": [_entry(root, "samples/input.npz"), _entry(root, "samples/expected.npz")],
        "validation": {"inputs": "samples/input.npz", "expected": "samples/expected.npz",
                       "rtol": 1e-4, "atol": 1e-5},
    }
    manifest = root / "manifest.json"
    manifest.write_bytes(sign_manifest(doc, [key]))
    return manifest


@dataclass
class Env:
    tmp: Path
    key: Ed25519PrivateKey
    db: StateDB
    outbox: Outbox
    store: Store
    registry: Registry
    runner: DeployRunner
    settings: DeploySettings

    def deploy(self, job_id: str, manifest: Path, model: str = "lin", pin: str | None = None,
               manifest_sha256: str | None = None) -> dict[str, Any]:
        """Run one deploy job; returns its final job update as published."""
        assert self.db.create_job(job_id, "deploy", model, {"model": model}, time.time() + 600)
        self.runner.run(DeployContext(job_id, model, manifest.as_uri(), manifest_sha256=manifest_sha256, pin=pin))
        return self.updates(job_id)[-1]

    def updates(self, job_id: str) -> list[dict[str, Any]]:
        topic = f"edge/dev1/jobs/{job_id}"
        return [json.loads(r.payload) for r in self.outbox.peek(0, 10_000) if r.topic == topic]

    def infer(self, x: np.ndarray) -> np.ndarray:
        _, out = self.registry.infer("lin", {"x": x})
        return out["y"]


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    key = Ed25519PrivateKey.generate()
    trust = TrustStore({key_id(key.public_key()): key.public_key()})
    db = StateDB(tmp_path / "state" / "state.db")
    outbox = Outbox(tmp_path / "state" / "outbox.db", 64 * 2**20)
    store = Store(tmp_path / "state" / "models")
    registry = Registry()
    settings = DeploySettings(threshold=1, keep_versions=2, prefer=(CPU,))
    reporter = JobReporter(db, outbox, Topics("edge", "dev1"))
    runner = DeployRunner(db, store, Fetcher(FetchLimits(max_attempts=2, backoff_base_s=0.01)),
                          lambda: trust, registry, [OnnxRuntimeBackend()], reporter, lambda: settings)
    e = Env(tmp_path, key, db, outbox, store, registry, runner, settings)
    try:
        yield e
    finally:
        registry.close()
        outbox.close()
        db.close()


def _ort(model: Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(["y"], {"x": x})[0]


X = np.arange(8, dtype=np.float32).reshape(2, 4) / 7.0


def test_deploy_succeeds_and_serves(env: Env) -> None:
    m1 = build_bundle(env.tmp / "b1", env.key, version=1, seed=1)
    final = env.deploy("job-1", m1)
    assert final["state"] == "SUCCEEDED", final
    assert (final["v"], final["device"], final["job"], final["type"]) == (1, "dev1", "job-1", "deploy")
    r = final["result"]
    assert (r["name"], r["version"], r["variant"], r["backend"]) == ("lin", 1, "onnx-fp32", CPU)
    assert r["figures"]["validation"]["max_abs_error"] <= 1e-5
    assert r["selection"]["chosen"]["backend"] == CPU

    ups = env.updates("job-1")
    steps = [u["step"] for u in ups if u["state"] == "IN_PROGRESS" and "progress" not in u]
    assert steps == STEPS
    seqs = [u["seq"] for u in ups]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # the jobs stream has no gaps

    sv = env.registry.get("lin")
    assert sv is not None and (sv.version, sv.backend) == (1, CPU)
    np.testing.assert_allclose(env.infer(X), _ort(m1.parent / "model.onnx", X), rtol=1e-6)

    rec = env.db.model("lin")
    assert rec is not None and (rec["serving"], rec["previous"], rec["highwater"]) == (1, None, 1)
    job = env.db.job("job-1")
    assert job is not None and job["state"] == "SUCCEEDED"
    assert [e["step"] for e in env.db.job_timeline("job-1") if e["state"] == "IN_PROGRESS"] == STEPS
    # The loaded file is the hard link into the store of the verified object.
    vfile = env.store.version_dir("lin", 1) / "model.onnx"
    assert vfile.stat().st_ino == env.store.object_path(_sha(m1.parent / "model.onnx")).stat().st_ino


def test_failed_validation_keeps_v1_and_old_version_is_refused(env: Env) -> None:
    m1 = build_bundle(env.tmp / "b1", env.key, version=1, seed=1)
    assert env.deploy("job-1", m1)["state"] == "SUCCEEDED"
    m2 = build_bundle(env.tmp / "b2", env.key, version=2, seed=2, expected_offset=1.0)
    final = env.deploy("job-2", m2)
    assert final["state"] == "FAILED"
    assert final["step"] == "validating"
    assert final["error"]["code"] == errors.VALIDATION_FAILED
    sv = env.registry.get("lin")
    assert sv is not None and sv.version == 1
    np.testing.assert_allclose(env.infer(X), _ort(m1.parent / "model.onnx", X), rtol=1e-6)
    assert env.db.model("lin")["serving"] == 1  # type: ignore[index]

    again = env.deploy("job-3", m1)
    assert again["state"] == "REJECTED"
    assert again["step"] == "verifying"
    assert again["error"]["code"] == errors.ROLLBACK_REFUSED
    assert env.registry.get("lin").version == 1  # type: ignore[union-attr]


def test_manifest_name_mismatch_rejected(env: Env) -> None:
    m = build_bundle(env.tmp / "b1", env.key, name="lin")
    final = env.deploy("job-x", m, model="other")
    assert (final["state"], final["error"]["code"]) == ("REJECTED", errors.INVALID_COMMAND)
    assert env.registry.get("lin") is None and env.registry.get("other") is None


def test_tampered_model_fails_with_hash_mismatch(env: Env) -> None:
    m = build_bundle(env.tmp / "b1", env.key)
    model = m.parent / "model.onnx"
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes
    model.write_bytes(bytes(data))
    final = env.deploy("job-t", m)
    assert (final["state"], final["step"], final["error"]["code"]) == ("FAILED", "downloading", errors.HASH_MISMATCH)
    assert env.registry.get("lin") is None
    assert env.db.model("lin") is None  # nothing installed, no high-water mark
    assert not env.store.version_dir("lin", 1).exists()
    assert list(env.store.partial.iterdir()) == []  # the unverified copy is gone
    assert not any(p.is_file() for p in env.store.objects.rglob("*") if p.name == _sha(model))


def test_expired_manifest_rejected(env: Env) -> None:
    m = build_bundle(env.tmp / "b1", env.key, expires_in_s=-10)
    final = env.deploy("job-e", m)
    assert (final["state"], final["step"], final["error"]["code"]) == ("REJECTED", "verifying", errors.EXPIRED)
    assert env.registry.get("lin") is None


def test_untrusted_manifest_rejected(env: Env) -> None:
    m = build_bundle(env.tmp / "b1", Ed25519PrivateKey.generate())
    final = env.deploy("job-u", m)
    assert (final["state"], final["error"]["code"]) == ("REJECTED", errors.UNTRUSTED_KEY)


def test_manifest_sha256_mismatch_rejected(env: Env) -> None:
    m = build_bundle(env.tmp / "b1", env.key)
    final = env.deploy("job-h", m, manifest_sha256="0" * 64)
    assert (final["state"], final["step"], final["error"]["code"]) == \
        ("REJECTED", "fetching_manifest", errors.HASH_MISMATCH)
    ok = env.deploy("job-h2", m, manifest_sha256=_sha(m).upper())
    assert ok["state"] == "SUCCEEDED"


def test_pin_to_unknown_backend_rejected(env: Env) -> None:
    m = build_bundle(env.tmp / "b1", env.key)
    final = env.deploy("job-p", m, pin="coreml:ANE")
    assert (final["state"], final["step"], final["error"]["code"]) == \
        ("REJECTED", "selecting_backend", errors.NO_COMPATIBLE_BACKEND)
    assert "coreml:ANE" in final["error"]["message"]
    assert env.registry.get("lin") is None


def test_pin_to_cpu_honoured(env: Env) -> None:
    m = build_bundle(env.tmp / "b1", env.key)
    final = env.deploy("job-pc", m, pin=CPU)
    assert final["state"] == "SUCCEEDED"
    assert final["result"]["backend"] == CPU


def test_keep_versions_prunes_oldest(env: Env) -> None:
    bundles = [build_bundle(env.tmp / f"b{v}", env.key, version=v, seed=v) for v in (1, 2, 3)]
    for v, m in enumerate(bundles, start=1):
        assert env.deploy(f"job-{v}", m)["state"] == "SUCCEEDED"
    assert env.db.versions("lin") == [2, 3]
    rec = env.db.model("lin")
    assert rec is not None and (rec["serving"], rec["previous"], rec["highwater"]) == (3, 2, 3)
    assert not env.store.version_dir("lin", 1).exists()
    assert env.store.version_dir("lin", 2).exists()
    v1_model = _sha(bundles[0].parent / "model.onnx")
    assert not env.store.object_path(v1_model).exists()  # its object was collected
    assert env.store.object_path(_sha(bundles[1].parent / "model.onnx")).exists()
    assert env.registry.get("lin").version == 3  # type: ignore[union-attr]
    np.testing.assert_allclose(env.infer(X), _ort(bundles[2].parent / "model.onnx", X), rtol=1e-6)


def test_redeploy_reuses_stored_files(env: Env) -> None:
    m1 = build_bundle(env.tmp / "b1", env.key, version=1, seed=5)
    assert env.deploy("job-1", m1)["state"] == "SUCCEEDED"
    # v2 ships the same model and samples: nothing new is downloaded.
    m2 = build_bundle(env.tmp / "b2", env.key, version=2, seed=5)
    final = env.deploy("job-2", m2)
    assert final["state"] == "SUCCEEDED"
    assert final["result"]["figures"]["downloaded_bytes"] == 0
    assert final["result"]["figures"]["reused_files"] == 3
