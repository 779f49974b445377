"""MLflow model URIs as bundle sources: ``models:/NAME/VERSION``, ``models:/NAME@ALIAS``, ``runs:/RUN_ID/PATH``.

The model's artifacts are downloaded into a temporary folder from the tracking/registry store
(``--mlflow-tracking-uri``, also the registry URI: a local ``file:`` or ``sqlite:`` store, or a
server; set for the build and put back), its ``MLmodel``
names the flavour, and the flavour's own loader gives the trained model, which goes through the
same converters as a model file (fleetctl/sources/convert.py). Flavours: sklearn, xgboost,
lightgbm (converted and certified), onnx (bundled as it is).

Sample inputs, when ``--sample-input`` gives none: the model's input example, else seeded random
ones of the width and dtype its signature gives. The provenance adds the URI, the run id and the
MLflow version. MLflow's usage telemetry is switched off before MLflow is imported.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from fleetctl.sources import PICKLE_WARNING, Source, SourceError, need

log = logging.getLogger(__name__)

EXAMPLE_SAMPLES = 4  # random samples drawn from a signature when the model has no input example
EXAMPLE_SEED = 0
FLAVOURS = ("sklearn", "xgboost", "lightgbm", "onnx")
URI_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")  # MLflow exports what it is set to


def _mlflow(tracking_uri: str | None) -> Any:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no usage reports from a build
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri.startswith("file:") or (uri and "://" not in uri and ":" not in uri.split("/")[0]):
        # MLflow 3 refuses its file store unless asked; reading an existing one is what a build does
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return need("mlflow", "mlflow")


@contextlib.contextmanager
def _store(mlflow: Any, uri: str | None) -> Iterator[None]:
    """MLflow's tracking and registry URI set to ``uri`` for the block, then put back."""
    if not uri:
        yield
        return
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    # What was set, not what resolves from it (the default store, or the tracking URI for the registry)
    before = (getattr(tracking_utils, "_tracking_uri", None), getattr(registry_utils, "_registry_uri", None))
    env = {k: os.environ.get(k) for k in URI_ENV}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before[0])
        mlflow.set_registry_uri(before[1])
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def open_mlflow(uri: str, *, tracking_uri: str | None = None, example: np.ndarray | None = None) -> Source:
    """The Source for an MLflow model URI (see the module docstring)."""
    mlflow = _mlflow(tracking_uri)
    with _store(mlflow, tracking_uri):
        return _open(mlflow, uri, tracking_uri, example)


def _open(mlflow: Any, uri: str, tracking_uri: str | None, example: np.ndarray | None) -> Source:
    from fleetctl.sources import convert

    with tempfile.TemporaryDirectory(prefix="fleetctl-mlflow-") as d:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=d, tracking_uri=tracking_uri,
                                                             registry_uri=tracking_uri))
            meta = mlflow.models.Model.load(str(local))
        except Exception as e:  # MlflowException, OSError: a missing model, version, alias or store
            raise SourceError(f"{uri}: cannot fetch the model from MLflow "
                              f"({tracking_uri or mlflow.get_tracking_uri()}): {e}") from e
        flavours = meta.flavors or {}
        prov = {"mlflow_uri": uri, "mlflow_run_id": str(meta.run_id or ""), "mlflow_version": mlflow.__version__}
        ex = example if example is not None else input_example(local, meta)
        if "onnx" in flavours and not any(f in flavours for f in FLAVOURS[:3]):
            data = local / str(flavours["onnx"].get("data", "model.onnx"))
            return Source(data.read_bytes(), "onnx", "", "", None, None, {"framework": "onnx", **prov}, ex)
        if "sklearn" in flavours:
            if flavours["sklearn"].get("serialization_format") != "skops":
                log.warning("%s: %s", uri, PICKLE_WARNING)
            src = convert.from_sklearn(_load(mlflow, "sklearn", local), ex, prov)
        elif "xgboost" in flavours:
            src = convert.from_xgboost(_load(mlflow, "xgboost", local), ex, prov)
        elif "lightgbm" in flavours:
            src = convert.from_lightgbm(_load(mlflow, "lightgbm", local), ex, prov)
        else:
            raise SourceError(f"{uri}: flavours {sorted(flavours)}; fleetctl takes {', '.join(FLAVOURS)}")
    src.example = ex
    return src


def _load(mlflow: Any, flavour: str, local: Path) -> Any:
    extra = flavour if flavour in ("xgboost", "lightgbm") else "sklearn"
    need({"sklearn": "sklearn", "xgboost": "xgboost", "lightgbm": "lightgbm"}[flavour], extra)
    module = need(f"mlflow.{flavour}", "mlflow")
    try:
        return module.load_model(str(local))
    except Exception as e:  # the flavour's loader raises whatever its format raises
        raise SourceError(f"MLflow {flavour} model in {local.name}: cannot load it ({type(e).__name__}: {e})") from e


def input_example(local: Path, meta: Any) -> np.ndarray | None:
    """The model's saved input example as an array, else random samples shaped by its signature."""
    info = getattr(meta, "saved_input_example_info", None) or {}
    path = local / str(info.get("artifact_path", "input_example.json"))
    if path.is_file():
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise SourceError(f"the model's input example {path.name} is not JSON: {e}") from e
        if isinstance(doc, dict):  # pandas "split" orient, or {"inputs": ...}
            doc = doc.get("data", doc.get("inputs"))
        if isinstance(doc, list) and doc:
            a = np.asarray(doc)
            return a.reshape(1, -1) if a.ndim == 1 else a
    return _from_signature(meta)


def _from_signature(meta: Any) -> np.ndarray | None:
    sig = getattr(meta, "signature", None)
    if sig is None or sig.inputs is None:
        return None
    spec = sig.inputs.to_dict()
    rng = np.random.default_rng(EXAMPLE_SEED)
    if len(spec) == 1 and spec[0].get("type") == "tensor":
        ts = spec[0]["tensor-spec"]
        shape = [int(d) for d in ts.get("shape", [])]
        if len(shape) == 2 and shape[1] > 0:
            dtype = np.dtype(ts.get("dtype", "float32"))
            if dtype.kind == "f":
                return rng.standard_normal((EXAMPLE_SAMPLES, shape[1])).astype(dtype)
        return None
    if spec and all(c.get("type") in ("double", "float") for c in spec):  # one numeric column per feature
        return rng.standard_normal((EXAMPLE_SAMPLES, len(spec)))
    return None
