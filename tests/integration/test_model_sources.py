"""Trained models to a device: scikit-learn, XGBoost and LightGBM models, from their saved files and
from a local MLflow registry, built into certified bundles, deployed with signed commands to one
real daemon (real Mosquitto, real onnxruntime in the agent's worker) and asked over KServe v2.

The device's answers must equal what the source framework itself predicts on the same samples:
class labels exactly, probabilities and regression values within the bundle's tolerance. The
models are trained here, small, on data sets scikit-learn ships (iris, breast cancer, diabetes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from agentproc import AgentProcess
from conftest import Mosquitto, start_mosquitto
from opskit import env, fleetctl

from agent.bundles.trust import load_private_key
from fleetctl import commands, keys, mqttc
from fleetctl.bundle import BuildError, manifest_document
from fleetctl.sources.certify import CertificationError, build_from_source
from fleetctl.variants import BUILT, SKIPPED, Outcome

for _mod in ("sklearn", "skl2onnx", "onnxmltools", "xgboost", "lightgbm", "mlflow", "joblib"):
    pytest.importorskip(_mod, reason="pip install 'edge-agent[test]' brings the model-source extras")

import joblib  # noqa: E402
import lightgbm as lgb  # noqa: E402
import xgboost as xgb  # noqa: E402
from sklearn.datasets import load_breast_cancer, load_diabetes, load_iris  # noqa: E402
from sklearn.ensemble import GradientBoostingRegressor, RandomForestClassifier  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

DEPLOY_TIMEOUT_S = 60.0
HTTP_TIMEOUT_S = 10.0
RTOL, ATOL = 1e-3, 1e-4  # the bundle's tolerance: the build certifies with it, devices validate with it
SAMPLES = 12  # sample inputs per model: golden samples and KServe requests
IRIS_NAMES = np.array(["setosa", "versicolor", "virginica"])


@dataclass
class Trained:
    """One trained model: its saved file, how to log it to MLflow, and its own predictions."""

    name: str
    file: Path
    x: np.ndarray  # sample inputs, float64 as the model was trained on
    predict: Callable[[np.ndarray], dict[str, np.ndarray]]
    log: Callable[[Any, str], Any]  # (mlflow, registered name) → logged model info


def _sk_classifier(m: Any) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    return lambda x: {"label": np.asarray(m.predict(x)), "probabilities": m.predict_proba(x)}


def _train(root: Path) -> list[Trained]:
    root.mkdir(parents=True, exist_ok=True)
    xi, yi = load_iris(return_X_y=True)
    xb, yb = load_breast_cancer(return_X_y=True)
    xd, yd = load_diabetes(return_X_y=True)
    rows = np.random.default_rng(0).permutation(len(xb))[:SAMPLES]
    out: list[Trained] = []

    pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(xb, yb)
    joblib.dump(pipe, root / "pipeline.joblib")
    out.append(Trained("pipeline", root / "pipeline.joblib", xb[rows], _sk_classifier(pipe),
                       lambda mlflow, n, m=pipe: mlflow.sklearn.log_model(m, name=n, input_example=xb[:3],
                                                                          registered_model_name=n)))

    forest = RandomForestClassifier(n_estimators=8, max_depth=4, random_state=0).fit(xi, IRIS_NAMES[yi])
    joblib.dump(forest, root / "forest.pkl")
    out.append(Trained("forest", root / "forest.pkl", xi[::13], _sk_classifier(forest),
                       lambda mlflow, n, m=forest: mlflow.sklearn.log_model(
                           m, name=n, input_example=xi[:3], registered_model_name=n,
                           skops_trusted_types=["sklearn.tree._tree.Tree"])))

    boost = xgb.XGBClassifier(n_estimators=10, max_depth=3, random_state=0).fit(xi, yi)
    boost.save_model(root / "xgboost.json")
    out.append(Trained("xgboost", root / "xgboost.json", xi[::13], _sk_classifier(boost),
                       lambda mlflow, n, m=boost: mlflow.xgboost.log_model(m, name=n, input_example=xi[:3],
                                                                           registered_model_name=n)))

    gbm = lgb.train({"objective": "binary", "num_leaves": 7, "verbose": -1, "seed": 0}, lgb.Dataset(xb, yb), 10)
    gbm.save_model(root / "lightgbm.txt")

    def gbm_predict(x: np.ndarray) -> dict[str, np.ndarray]:
        p = gbm.predict(x)
        return {"label": (p > 0.5).astype(np.int64), "probabilities": np.stack([1 - p, p], axis=1)}

    out.append(Trained("lightgbm", root / "lightgbm.txt", xb[rows], gbm_predict,
                       lambda mlflow, n, m=gbm: mlflow.lightgbm.log_model(m, name=n, input_example=xb[:3],
                                                                          registered_model_name=n)))

    reg = GradientBoostingRegressor(n_estimators=20, max_depth=3, random_state=0).fit(xd, yd)
    joblib.dump(reg, root / "regressor.joblib")
    out.append(Trained("regressor", root / "regressor.joblib", xd[:SAMPLES],
                       lambda x, m=reg: {"variable": m.predict(x).reshape(-1, 1)},
                       lambda mlflow, n, m=reg: mlflow.sklearn.log_model(  # the pickle format, too
                           m, name=n, input_example=xd[:3], registered_model_name=n,
                           serialization_format="cloudpickle")))
    return out


@dataclass
class Kit:
    root: Path
    broker: Mosquitto
    agent: AgentProcess
    key: Path
    trained: dict[str, Trained]
    registry: str  # sqlite: tracking and registry store
    versions: int = 0

    def deploy(self, manifest: Path) -> dict[str, Any]:
        """A signed deploy of the bundle at ``manifest`` as model ``src``, followed to the end; its result."""
        client = mqttc.connect(self.broker.url)
        try:
            req = commands.CommandRequest("deploy", commands.deploy_params("src", manifest.as_uri()))
            out = commands.run_command(client, "edge", [commands.device_target("dev1")], req,
                                       [load_private_key(self.key)], wait=True, timeout_s=DEPLOY_TIMEOUT_S)
        finally:
            mqttc.disconnect(client)
        assert out is not None and out.succeeded, f"{out}\n{self.agent.log.read_text()[-3000:]}"
        last = out.last["dev1"]
        assert last is not None
        result: dict[str, Any] = last["result"]
        return result

    def build(self, source: str, **kw: Any) -> Path:
        self.versions += 1
        return build_from_source(source, self.root / "bundles" / str(self.versions), "src", self.versions,
                                 [load_private_key(self.key)], rtol=RTOL, atol=ATOL, tracking_uri=self.registry,
                                 **kw)


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kit]:
    root = tmp_path_factory.mktemp("sources")
    (root / "broker").mkdir()
    import mlflow

    kp = keys.generate_keypair(root / "keys", "fleet")
    trained = {t.name: t for t in _train(root / "models")}
    registry = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(registry)
    experiment = mlflow.create_experiment("sources", artifact_location=(root / "artifacts").as_uri())  # not ./mlruns
    with mlflow.start_run(experiment_id=experiment):
        for t in trained.values():
            t.log(mlflow, t.name)
    mlflow.MlflowClient(registry, registry).set_registered_model_alias("xgboost", "champion", 1)
    broker = start_mosquitto(root / "broker")
    agent = AgentProcess(root / "device", broker.url, extra_toml="\n[deploy]\nprobation_s = 0.2\n")
    try:
        agent.write_config()
        agent.trust_key(kp.public_path.read_bytes())
        agent.start()
        yield Kit(root, broker, agent, kp.private_path, trained, registry)
    finally:
        if agent.proc is not None:
            agent.stop()
        broker.stop()


def infer(kit: Kit, x: np.ndarray) -> dict[str, np.ndarray]:
    """KServe v2 JSON inference on the daemon; outputs by name."""
    body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                        "data": x.astype(np.float32).reshape(-1).tolist()}]}
    req = urllib.request.Request(f"{kit.agent.api}/v2/models/src/infer", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S) as r:
        doc = json.loads(r.read())
    return {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in doc["outputs"]}


def assert_same_predictions(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    for name, w in want.items():
        g = got[name]
        if name == "label":
            assert g.reshape(-1).tolist() == np.asarray(w).reshape(-1).tolist(), name
        else:
            np.testing.assert_allclose(g.reshape(w.shape), w, rtol=RTOL, atol=ATOL, err_msg=name)


CASES = ("pipeline", "forest", "xgboost", "lightgbm", "regressor")
MLFLOW_URIS = {"pipeline": "models:/pipeline/1", "forest": "models:/forest/1", "xgboost": "models:/xgboost@champion",
               "lightgbm": "models:/lightgbm/1", "regressor": "models:/regressor/1"}


@pytest.mark.parametrize("case", CASES)
def test_saved_file_and_mlflow_model_answer_as_the_source_framework(kit: Kit, case: str) -> None:
    t = kit.trained[case]
    sample = kit.root / f"{case}.npy"
    np.save(sample, t.x)
    want = t.predict(t.x)
    for source in (str(t.file), MLFLOW_URIS[case]):
        manifest = kit.build(source, sample_input=sample)
        doc = manifest_document(manifest)
        assert doc["source"]["framework"] in ("scikit-learn", "xgboost", "lightgbm")
        assert doc["source"]["converter"] in ("skl2onnx", "onnxmltools") and doc["source"]["converter_version"]
        outputs = [o["name"] for o in doc["io"]["outputs"]]
        assert outputs == (["variable"] if case == "regressor" else ["label", "probabilities"]), source
        result = kit.deploy(manifest)
        assert result["backend"] == "onnxruntime:CPUExecutionProvider"
        if case != "pipeline":  # tree ensembles: OpenVINO names the operators it cannot convert
            why = {r["backend"]: r["reason"] for r in result["selection"]["unusable"]}
            assert "cannot run operators ai.onnx.ml.TreeEnsemble" in why["openvino:CPU"], why
        assert_same_predictions(infer(kit, t.x), want)
    if case == "forest":  # string labels through the control socket too
        np.save(kit.root / "forest32.npy", t.x.astype(np.float32))
        r = kit.agent.agentctl("infer", "src", "--input", str(kit.root / "forest32.npy"), "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["outputs"]["label"] == want["label"].tolist()


def test_string_features_travel_as_bytes_tensors(kit: Kit, tmp_path: Path) -> None:
    """A pipeline that one-hot encodes string features: built, deployed, asked with a KServe BYTES tensor."""
    from sklearn.preprocessing import OneHotEncoder

    rng = np.random.default_rng(0)
    x = rng.choice(["red", "green", "blue"], size=(60, 2))
    y = (x[:, 0] == "red") | (x[:, 1] == "blue")
    m = make_pipeline(OneHotEncoder(handle_unknown="ignore"), LogisticRegression()).fit(x, y.astype(int))
    joblib.dump(m, tmp_path / "colors.joblib")
    np.save(tmp_path / "colors.npy", x[:8])
    manifest = kit.build(str(tmp_path / "colors.joblib"), sample_input=tmp_path / "colors.npy")
    assert manifest_document(manifest)["io"]["inputs"] == [{"name": "input", "dtype": "string", "shape": [-1, 2]}]
    kit.deploy(manifest)
    ask = x[20:30]
    body = {"inputs": [{"name": "input", "shape": list(ask.shape), "datatype": "BYTES", "data": ask.tolist()}]}
    req = urllib.request.Request(f"{kit.agent.api}/v2/models/src/infer", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S) as r:
        out = {o["name"]: o for o in json.loads(r.read())["outputs"]}
    assert out["label"]["data"] == m.predict(ask).tolist()
    np.testing.assert_allclose(np.reshape(out["probabilities"]["data"], (10, 2)), m.predict_proba(ask),
                               rtol=RTOL, atol=ATOL)


def test_mlflow_run_uri_in_a_file_store_with_its_input_example(kit: Kit, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """``runs:/RUN_ID/PATH`` from a ``file:`` store; no --sample-input: the input example is the sample."""
    import mlflow

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 logs into a file store only when asked
    store = (tmp_path / "mlruns").as_uri()
    mlflow.set_tracking_uri(store)
    t = kit.trained["lightgbm"]
    with mlflow.start_run() as run:
        mlflow.lightgbm.log_model(lgb.Booster(model_file=str(t.file)), name="gbm", input_example=t.x[:5])
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")  # the build reads a file store without being asked
    manifest = build_from_source(f"runs:/{run.info.run_id}/gbm", tmp_path / "bundle", "gbm", 1,
                                 [load_private_key(kit.key)], tracking_uri=store)
    doc = manifest_document(manifest)
    assert doc["source"]["mlflow_run_id"] == run.info.run_id and doc["source"]["framework"] == "lightgbm"
    with np.load(manifest.parent / doc["validation"]["inputs"]) as z:
        np.testing.assert_array_equal(z["input"], t.x[:5].astype(np.float32))
    with np.load(manifest.parent / doc["validation"]["expected"]) as z:
        np.testing.assert_allclose(z["probabilities"], t.predict(t.x[:5])["probabilities"], rtol=1e-12)


def test_mlflow_onnx_flavour_is_bundled_as_it_is_with_its_input_example(kit: Kit, tmp_path: Path) -> None:
    import mlflow
    import onnx

    first = kit.build(str(kit.trained["pipeline"].file), sample_input=None)  # any converted model will do
    mlflow.set_tracking_uri(kit.registry)
    with mlflow.start_run(experiment_id=mlflow.get_experiment_by_name("sources").experiment_id):
        mlflow.onnx.log_model(onnx.load(first.parent / "model.onnx"), name="onnx", registered_model_name="as-onnx",
                              input_example=kit.trained["pipeline"].x[:3].astype(np.float32))
    manifest = build_from_source("models:/as-onnx/1", tmp_path / "b", "as-onnx", 1, [load_private_key(kit.key)],
                                 tracking_uri=kit.registry)
    doc = manifest_document(manifest)
    assert doc["source"]["framework"] == "onnx" and doc["source"]["mlflow_uri"] == "models:/as-onnx/1"
    assert (manifest.parent / "model.onnx").read_bytes() == (first.parent / "model.onnx").read_bytes()
    with np.load(manifest.parent / doc["validation"]["inputs"]) as z:
        np.testing.assert_array_equal(z["input"], kit.trained["pipeline"].x[:3].astype(np.float32))


def test_a_conversion_that_flips_labels_is_refused_with_the_worst_sample(kit: Kit, tmp_path: Path) -> None:
    """A float64 model whose decision boundary lies between two neighbouring float32 values: the
    float32 conversion answers differently for a sample between them, and the build says which."""
    t0 = 1.7e9  # seconds since 1970: float32 steps by 128 here
    m = LogisticRegression().fit(np.array([[-1.0], [1.0]]), np.array([0, 1]))
    m.coef_, m.intercept_ = np.array([[1.0]]), np.array([-(t0 + 10.0)])
    joblib.dump(m, tmp_path / "clock.joblib")
    x = np.array([[t0 - 1000.0], [t0 + 20.0], [t0 + 1000.0]])
    assert m.predict(x).tolist() == [0, 1, 1]
    np.save(tmp_path / "x.npy", x)
    with pytest.raises(CertificationError) as e:
        build_from_source(str(tmp_path / "clock.joblib"), tmp_path / "bundle", "clock", 1, [load_private_key(kit.key)],
                          sample_input=tmp_path / "x.npy")
    assert "worst sample #1" in str(e.value) and "1700000020.0" in str(e.value)
    assert not (tmp_path / "bundle").exists()
    r = fleetctl("bundle", "build", str(tmp_path / "clock.joblib"), "--name", "clock", "--version", "1",
                 "--key", str(kit.key), "--sample-input", str(tmp_path / "x.npy"), "--out", str(tmp_path / "cli"))
    assert r.returncode == 1 and "worst sample #1" in r.stderr, r.stderr
    assert not (tmp_path / "cli").exists()


def test_variants_that_cannot_hold_onnx_ml_operators_are_skipped_with_the_reason(kit: Kit, tmp_path: Path) -> None:
    outcomes: list[Outcome] = []
    manifest = build_from_source(str(kit.trained["xgboost"].file), tmp_path / "b", "x", 1, [load_private_key(kit.key)],
                                 variants=["onnx-fp16", "onnx-int8", "openvino-fp32", "tflite"], outcomes=outcomes)
    status = {o.id: (o.status, o.reason) for o in outcomes}
    assert status["onnx-fp32"][0] == BUILT
    for vid in ("onnx-fp16", "onnx-int8", "openvino-fp32", "tflite-fp32"):
        assert status[vid][0] == SKIPPED and "ai.onnx.ml.TreeEnsembleClassifier" in status[vid][1], status[vid]
    doc = manifest_document(manifest)
    assert [v["id"] for v in doc["variants"]] == ["onnx-fp32"]
    assert "ai.onnx.ml.TreeEnsembleClassifier" in doc["variants"][0]["operators"]


def test_a_missing_converter_names_the_install_line(kit: Kit, tmp_path: Path) -> None:
    """fleetctl where skl2onnx cannot be imported: the error names the extra to install."""
    (tmp_path / "block").mkdir()
    (tmp_path / "block" / "skl2onnx.py").write_text("raise ImportError('not installed here')\n")
    r = subprocess.run([sys.executable, "-m", "fleetctl.main", "bundle", "build", str(kit.trained["pipeline"].file),
                        "--name", "m", "--version", "1", "--key", str(kit.key), "--out", str(tmp_path / "b")],
                       capture_output=True, text=True, timeout=120,
                       env={**env(), "PYTHONPATH": f"{tmp_path / 'block'}{os.pathsep}{env()['PYTHONPATH']}"})
    assert r.returncode == 1 and "pip install 'edge-agent[sklearn]'" in r.stderr, r.stderr
    assert "runs code stored in it" in r.stderr  # the pickle warning comes first


def test_build_refuses_an_unknown_source_kind(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="unknown source"):
        build_from_source(str(tmp_path / "model.h5"), tmp_path / "b", "m", 1, [])
