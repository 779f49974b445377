"""Deploys through the real runner with all three backends: profile ranking, fallback, autotune.

Bundles are built by fleetctl (real conversions, real signatures) and fetched over file://; the
state database, store, outbox and runtimes are real. The hardware policy is the generic-x86_64
profile matched on the captured AMD EPYC server (tests/data/hw-captures), so the ranking does not
depend on the machine running the tests; the backends that then run are this machine's.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import HW_CAPTURES
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from test_backends import IN, make_mlp, reference

from agent import errors
from agent.backends import available_backends
from agent.backends.selection import policy_from_report
from agent.bundles.fetch import Fetcher, FetchLimits
from agent.bundles.manifest import sign_manifest
from agent.bundles.store import Store
from agent.bundles.trust import TrustStore, key_id
from agent.deploy.jobs import JobReporter
from agent.deploy.runner import DeployContext, DeployRunner, DeploySettings
from agent.hardware import hw_report, shipped_profiles_dir
from agent.mqtt.topics import Topics
from agent.serving.registry import Registry
from agent.state import StateDB
from agent.telemetry.outbox import Outbox
from fleetctl.bundle import build_bundle, manifest_document

OV_CPU, ORT_CPU, TFL = "openvino:CPU", "onnxruntime:CPUExecutionProvider", "tflite:xnnpack"
POLICY = policy_from_report(hw_report(HW_CAPTURES / "amd-epyc-7451-server",
                                      profiles_dirs=[shipped_profiles_dir()]))


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

    def deploy(self, job: str, manifest: Path, pin: str | None = None) -> dict[str, Any]:
        assert self.db.create_job(job, "deploy", "mlp", {"model": "mlp"}, time.time() + 600)
        self.runner.run(DeployContext(job, "mlp", manifest.as_uri(), pin=pin))
        return [json.loads(r.payload) for r in self.outbox.peek(0, 10_000) if r.topic == f"edge/dev1/jobs/{job}"][-1]

    def events(self, kind: str) -> list[dict[str, Any]]:
        docs = [json.loads(r.payload) for r in self.outbox.peek(0, 10_000) if r.topic == "edge/dev1/events"]
        return [d for d in docs if d.get("event") == kind]


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    key = Ed25519PrivateKey.generate()
    trust = TrustStore({key_id(key.public_key()): key.public_key()})
    db = StateDB(tmp_path / "state" / "state.db")
    outbox = Outbox(tmp_path / "state" / "outbox.db", 64 * 2**20)
    store = Store(tmp_path / "state" / "models")
    registry = Registry()
    e = Env(tmp_path, key, db, outbox, store, registry, None, DeploySettings(  # type: ignore[arg-type]
        policy=POLICY, autotune=False, cache_dir=str(tmp_path / "state" / "cache"), hw_fingerprint="test-fp"))
    e.runner = DeployRunner(db, store, Fetcher(FetchLimits(max_attempts=2, backoff_base_s=0.01)), lambda: trust,
                            registry, available_backends(), JobReporter(db, outbox, Topics("edge", "dev1")),
                            lambda: e.settings)
    try:
        yield e
    finally:
        registry.close()
        outbox.close()
        db.close()


@pytest.fixture(scope="module")
def mlp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_mlp(tmp_path_factory.mktemp("src") / "mlp.onnx")


def build(env: Env, mlp: Path, folder: str, version: int = 1, **kw: Any) -> Path:
    return build_bundle(mlp, env.tmp / folder, "mlp", version, [env.key], samples=3, **kw)


def serve_check(env: Env, mlp: Path, atol: float) -> str:
    sv = env.registry.get("mlp")
    assert sv is not None
    x = np.random.default_rng(9).standard_normal((5, IN)).astype(np.float32)
    _, out = env.registry.infer("mlp", {"x": x})
    np.testing.assert_allclose(out["probs"], reference(x, mlp), atol=atol, rtol=0)
    return sv.backend


def test_profile_ranking_picks_backend_and_precision(env: Env, mlp: Path) -> None:
    m = build(env, mlp, "b1", variants=["onnx-int8", "openvino-fp32", "tflite"])
    final = env.deploy("j1", m)
    assert final["state"] == "SUCCEEDED", final
    r = final["result"]
    # generic-x86_64 ranks OpenVINO's CPU plugin first, int8 before fp32 there.
    assert (r["backend"], r["variant"]) == (OV_CPU, "onnx-int8")
    sel = r["selection"]
    assert sel["profile"] == "generic-x86_64"
    assert sel["chosen"]["rationale"].startswith("generic-x86_64: OpenVINO's CPU plugin")
    assert "ranked #3 by the profile generic-x86_64" in sel["chosen"]["why"]
    assert [c["backend"] for c in sel["ranked"]][:3] == [OV_CPU] * 3
    assert {u["backend"] for u in sel["unusable"]} >= {"onnxruntime:CUDAExecutionProvider", "tflite:edgetpu"}
    assert sel["autotune"] == {"state": "skipped", "why": "backends.autotune is off"}
    assert r["figures"]["validation"]["max_abs_error"] < 0.05  # within the int8 variant's own tolerance
    vdir = env.store.version_dir("mlp", 1)
    assert (vdir / "model_int8.onnx").exists() and not (vdir / "model.tflite").exists()  # only what serves
    assert serve_check(env, mlp, atol=0.05) == OV_CPU


def test_broken_variant_falls_back_with_an_event(env: Env, mlp: Path) -> None:
    broken = env.tmp / "broken"
    broken.mkdir()
    (broken / "model.xml").write_text("<net>this is not an IR</net>")
    (broken / "model.bin").write_bytes(b"\0" * 16)
    wrong = make_mlp(env.tmp / "wrong" / "model.onnx", seed=99)  # loads fine, answers wrongly
    m = build(env, mlp, "b1", prebuilt=[f"ov-broken:openvino:fp32:{broken / 'model.xml'}",
                                        f"onnx-wrong:onnx:int8:{wrong}"], unchecked=["ov-broken", "onnx-wrong"])
    final = env.deploy("j1", m)
    assert final["state"] == "SUCCEEDED", final
    r = final["result"]
    assert (r["backend"], r["variant"]) == (OV_CPU, "onnx-fp32")
    falls = env.events("backend_fallback")
    assert [(e["failed"]["variant"], e["error"]["code"], e["next"]["variant"]) for e in falls] == [
        ("onnx-wrong", errors.VALIDATION_FAILED, "ov-broken"),
        ("ov-broken", errors.LOAD_FAILED, "onnx-fp32")]
    assert [f["variant"] for f in r["figures"]["fallbacks"]] == ["onnx-wrong", "ov-broken"]
    assert serve_check(env, mlp, atol=1e-5) == OV_CPU


def test_pin_is_honoured_or_refused(env: Env, mlp: Path) -> None:
    m = build(env, mlp, "b1", variants=["tflite"])
    final = env.deploy("j1", m, pin=TFL)
    assert (final["state"], final["result"]["backend"], final["result"]["variant"]) == ("SUCCEEDED", TFL, "tflite-fp32")
    assert serve_check(env, mlp, atol=1e-5) == TFL
    m2 = build(env, mlp, "b2", version=2)
    refused = env.deploy("j2", m2, pin="openvino:NPU")
    assert (refused["state"], refused["error"]["code"]) == ("REJECTED", errors.NO_COMPATIBLE_BACKEND)
    assert "openvino:NPU" in refused["error"]["message"] and "available_devices" in refused["error"]["message"]
    assert env.registry.get("mlp").version == 1  # type: ignore[union-attr]


def resign(env: Env, src: Path, folder: str, version: int) -> Path:
    """The same files as bundle ``src`` under a new version (a re-release of the same model)."""
    dst = env.tmp / folder
    shutil.copytree(src.parent, dst)
    doc = manifest_document(dst / "manifest.json")
    doc["version"] = version
    (dst / "manifest.json").write_bytes(sign_manifest(doc, [env.key]))
    return dst / "manifest.json"


def test_autotune_measures_keeps_fastest_and_caches(env: Env, mlp: Path) -> None:
    env.settings = replace(env.settings, autotune=True)
    m1 = build(env, mlp, "b1", variants=["openvino-fp32", "tflite"])
    final = env.deploy("j1", m1)
    assert final["state"] == "SUCCEEDED", final
    r = final["result"]
    tune = r["selection"]["autotune"]
    assert tune["state"] == "measured" and len(tune["measured"]) == 3
    rows = {(row["backend"], row["variant"]): row for row in tune["measured"]}
    assert set(rows) == {(OV_CPU, "openvino-fp32"), (OV_CPU, "onnx-fp32"), (ORT_CPU, "onnx-fp32")}
    fastest = min(rows.values(), key=lambda row: row["median_ms"])
    assert tune["winner"] == {"backend": fastest["backend"], "variant": fastest["variant"]}
    assert (r["backend"], r["variant"]) == (fastest["backend"], fastest["variant"])
    assert r["selection"]["chosen"] == {k: v for k, v in r["selection"]["ranked"][0].items()}
    for row in rows.values():
        assert row["runs"] >= 3 and row["max_abs_error"] < 1e-5 and row["compute_precision"] == "fp32"
    info = env.db.version("mlp", 1)
    assert info is not None and (info["backend"], info["variant"]) == (fastest["backend"], fastest["variant"])
    # The winner's golden check and timings were autotune's, on the model that now serves.
    assert r["figures"]["validation"]["measured_by"] == "autotune"
    assert r["figures"]["validation"]["max_abs_error"] == rows[(r["backend"], r["variant"])]["max_abs_error"]
    serve_check(env, mlp, atol=1e-5)

    m2 = resign(env, m1, "b2", 2)  # same model files: the verdict is reused, nothing is measured
    final2 = env.deploy("j2", m2)
    assert final2["state"] == "SUCCEEDED", final2
    tune2 = final2["result"]["selection"]["autotune"]
    assert tune2["state"] == "cached" and tune2["winner"] == tune["winner"]
    assert tune2["measured"] == tune["measured"]
    assert (final2["result"]["backend"], final2["result"]["variant"]) == (fastest["backend"], fastest["variant"])

    env.settings = replace(env.settings, hw_fingerprint="other-hardware")
    final3 = env.deploy("j3", resign(env, m1, "b3", 3))
    assert final3["result"]["selection"]["autotune"]["state"] == "measured"  # another fingerprint: measured again

    # Retrained weights, same layout (tensor specs, variants, file sizes): the verdict applies,
    # and the reused winner is validated as usual before it serves.
    retrained = make_mlp(env.tmp / "retrained" / "mlp.onnx", seed=11)
    final4 = env.deploy("j4", build(env, retrained, "b4", 4, variants=["openvino-fp32", "tflite"]))
    assert final4["state"] == "SUCCEEDED", final4
    tune4 = final4["result"]["selection"]["autotune"]
    assert (tune4["state"], tune4.get("basis"), tune4.get("measured_version")) == ("cached", "layout", 3), tune4
    assert tune4["winner"] == final3["result"]["selection"]["autotune"]["winner"]
    assert final4["result"]["figures"]["validation"]["runs"] >= 3


def test_autotune_reports_a_failing_candidate_and_never_picks_it(env: Env, mlp: Path) -> None:
    env.settings = replace(env.settings, autotune=True)
    broken = env.tmp / "broken"
    broken.mkdir()
    (broken / "model.xml").write_text("<net/>")
    (broken / "model.bin").write_bytes(b"")
    m = build(env, mlp, "b1", prebuilt=[f"ov-broken:openvino:fp32:{broken / 'model.xml'}"], unchecked=["ov-broken"])
    final = env.deploy("j1", m)
    assert final["state"] == "SUCCEEDED", final
    tune = final["result"]["selection"]["autotune"]
    failed = [row for row in tune["measured"] if "error" in row]
    assert [(row["variant"], row["error"]["code"]) for row in failed] == [("ov-broken", errors.LOAD_FAILED)]
    assert tune["winner"]["variant"] == "onnx-fp32"
    assert final["result"]["selection"]["ranked"][-1]["variant"] == "ov-broken"  # the failed one goes last
    ev = env.events("backend_fallback")
    assert len(ev) == 1 and ev[0]["during"] == "autotune" and ev[0]["failed"]["variant"] == "ov-broken"


def make_cnn(path: Path) -> Path:
    """A small CNN (conv, relu, global pool, dense, softmax) on [batch, 3, 24, 24] images."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(5)

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    nodes = [helper.make_node("Conv", ["x", "k1", "c1b"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "k2", "c2b"], ["c2"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("GlobalAveragePool", ["r2"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "d", "db"], ["logits"], transB=1),
             helper.make_node("Softmax", ["logits"], ["probs"], axis=-1)]
    graph = helper.make_graph(
        nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 24, 24])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 5])],
        initializer=[numpy_helper.from_array(w(8, 3, 3, 3), "k1"), numpy_helper.from_array(w(8), "c1b"),
                     numpy_helper.from_array(w(16, 8, 3, 3), "k2"), numpy_helper.from_array(w(16), "c2b"),
                     numpy_helper.from_array(w(5, 16), "d"), numpy_helper.from_array(w(5), "db")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize(("objective", "isolation"), [("latency", "none"), ("throughput", "process")])
def test_autotune_objective_picks_by_its_figure(env: Env, objective: str, isolation: str) -> None:
    from agent.cli.agentctl import autotune_lines

    env.settings = replace(env.settings, autotune=True, autotune_objective=objective, autotune_concurrency=3,
                           isolation=isolation)
    cnn = make_cnn(env.tmp / "src" / "cnn.onnx")
    m1 = build(env, cnn, "b1", variants=["openvino-fp32"])
    final = env.deploy("j1", m1)
    assert final["state"] == "SUCCEEDED", final
    tune = final["result"]["selection"]["autotune"]
    assert (tune["state"], tune["objective"], tune["concurrency"]) == ("measured", objective, 3)
    rows = tune["measured"]
    assert len(rows) == 3 and all("error" not in r for r in rows)
    for r in rows:  # both figures for every candidate, whatever the objective
        assert r["median_ms"] > 0 and r["throughput_rps"] > 0 and r["concurrency"] == 3 and r["throughput_calls"] >= 3
    best = (max(rows, key=lambda r: r["throughput_rps"]) if objective == "throughput"
            else min(rows, key=lambda r: r["median_ms"]))
    assert tune["winner"] == {"backend": best["backend"], "variant": best["variant"]}
    assert (final["result"]["backend"], final["result"]["variant"]) == (best["backend"], best["variant"])
    figure = f"{best['throughput_rps']:g} req/s" if objective == "throughput" else f"{best['median_ms']:g} ms"
    assert tune["won"].startswith(f"objective {objective}: {best['backend']} ({best['variant']}) {figure}, best of 3")

    text = "\n".join(autotune_lines(final["result"]))  # what `agentctl explain` prints for the job
    assert f"objective {objective}, 3 callers" in text and tune["won"] in text
    for r in rows:
        mark = "*" if r is best else ""
        assert any(line.split()[:4] == [mark + r["backend"], r["variant"], f"{r['median_ms']:g}", "ms"]
                   and f"{r['throughput_rps']:g} req/s" in line for line in text.splitlines()), (r, text)

    # The same files under the other objective: the cached verdict does not apply, measured again.
    other = "latency" if objective == "throughput" else "throughput"
    env.settings = replace(env.settings, autotune_objective=other)
    final2 = env.deploy("j2", resign(env, m1, "b2", 2))
    tune2 = final2["result"]["selection"]["autotune"]
    assert (final2["state"], tune2["state"], tune2["objective"]) == ("SUCCEEDED", "measured", other), final2


def _worker_pids() -> set[int]:
    import psutil

    out = set()
    for p in psutil.Process().children():
        try:
            if any("agent.serving.worker" in part for part in p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE:
                out.add(p.pid)
        except psutil.Error:
            continue
    return out


def test_process_isolation_loads_into_workers_started_during_the_download(env: Env, mlp: Path) -> None:
    """With process isolation the workers for the first candidates start (interpreter, runtime
    import) while the bundle downloads; the model loads into one of them, the others end."""
    from agent.backends import isolated

    started: list[Any] = []
    real = isolated.prestart

    def spy(runtime: str) -> Any:
        sp = real(runtime)
        started.append(sp)
        return sp

    def settle(serving_pid: int) -> None:
        deadline = time.monotonic() + 10
        while _worker_pids() != {serving_pid} and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _worker_pids() == {serving_pid}, "every other worker (candidates, spares) has ended"

    isolated.prestart = spy  # type: ignore[assignment]  # observes the real function; nothing faked
    try:
        env.settings = replace(env.settings, isolation="process")
        final = env.deploy("j1", build(env, mlp, "b1"))
        assert final["state"] == "SUCCEEDED", final
        assert [sp.runtime for sp in started] == [final["result"]["backend"].split(":")[0]]
        sv = env.registry.get("mlp")
        assert sv is not None and sv.model.pid == started[0].proc.pid, "the model loaded into the worker started ahead"  # type: ignore[attr-defined]
        serve_check(env, mlp, atol=1e-5)

        started.clear()  # autotune: one worker ahead for each of the two candidates loaded first
        env.settings = replace(env.settings, autotune=True)
        final = env.deploy("j2", build(env, mlp, "b2", 2, variants=["openvino-fp32"]))
        assert final["state"] == "SUCCEEDED", final
        assert len(started) == 2
        sv = env.registry.get("mlp")
        assert sv is not None and sv.version == 2
        settle(sv.model.pid)  # type: ignore[attr-defined]
        serve_check(env, mlp, atol=1e-5)
    finally:
        isolated.prestart = real  # type: ignore[assignment]


def test_a_keep_going_bundle_deploys_with_the_variants_that_passed(env: Env, mlp: Path) -> None:
    wrong = make_mlp(env.tmp / "wrong" / "model.onnx", seed=99)  # fails its build-time check
    outcomes: list[Any] = []
    m = build(env, mlp, "b1", variants=["onnx-int8"], prebuilt=[f"onnx-wrong:onnx:fp32:{wrong}"],
              keep_going=True, outcomes=outcomes)
    assert [(o.id, o.status) for o in outcomes] == [("onnx-fp32", "built"), ("onnx-int8", "built"),
                                                    ("onnx-wrong", "failed")]
    assert [v["id"] for v in manifest_document(m)["variants"]] == ["onnx-fp32", "onnx-int8"]
    final = env.deploy("j1", m)
    assert final["state"] == "SUCCEEDED", final
    r = final["result"]
    assert (r["backend"], r["variant"]) == (OV_CPU, "onnx-int8")
    assert r["figures"]["validation"]["max_abs_error"] < 0.05  # within the int8 variant's own tolerance
    assert serve_check(env, mlp, atol=0.05) == OV_CPU
