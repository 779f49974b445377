"""Trained models to ONNX: scikit-learn (skl2onnx), XGBoost and LightGBM (onnxmltools).

Each ``from_*`` returns a ``Source`` whose ONNX graph has one input named ``input`` and the
conventional outputs: classifiers ``label`` (int64 or string, as the model's classes) and
``probabilities`` (float32 [N, classes], no ZipMap: a map cannot travel as a KServe v2 tensor),
regressors ``variable`` (float32 [N, 1]). ``predict`` gives the same outputs computed by the
source framework itself, on the sample inputs as given (float64 stays float64), so the
certification compares the device's answer with the trained model's, not with another conversion.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fleetctl.sources import (
    LABEL,
    PICKLE_WARNING,
    PROBABILITIES,
    VARIABLE,
    Source,
    SourceError,
    need,
)

log = logging.getLogger(__name__)

INPUT_NAME = "input"
ONNX_OPSET = 17  # onnxruntime >= 1.14 runs it; new enough for every operator the converters emit
ONNXMLTOOLS_OPSET = 15  # the highest onnxmltools 1.16 converts to
ML_OPSET = 3  # ai.onnx.ml: TreeEnsemble* v3 (float thresholds), supported by every onnxruntime the agent takes
CLASSIFIER_OUTPUTS: tuple[str, ...] = (LABEL, PROBABILITIES)
REGRESSOR_OUTPUTS: tuple[str, ...] = (VARIABLE,)


def input_dtype(example: np.ndarray | None) -> str:
    """The ONNX input dtype for sample inputs of this dtype: float32, int64 or string."""
    if example is None or example.dtype.kind == "f":
        return "float32"
    if example.dtype.kind in "iub":
        return "int64"
    if example.dtype.kind in "USO":
        return "string"
    raise SourceError(f"sample inputs of dtype {example.dtype} cannot feed a converted model "
                      "(floats, integers or strings)")


def _tensor_type(dtype: str, n_features: int) -> Any:
    dt = need("skl2onnx.common.data_types", "sklearn")
    cls = {"float32": dt.FloatTensorType, "int64": dt.Int64TensorType, "string": dt.StringTensorType}[dtype]
    return cls([None, n_features])


def _width(n_features: Any, example: np.ndarray | None, what: str) -> int:
    if n_features is not None and int(n_features) > 0:
        return int(n_features)
    if example is not None and example.ndim == 2:
        return int(example.shape[1])
    raise SourceError(f"{what}: the number of input features is unknown; give --sample-input")


def rename_outputs(model: Any, names: tuple[str, ...]) -> Any:
    """Rename the graph's outputs, in order, to ``names`` (every reference to them too)."""
    outs = list(model.graph.output)
    if len(outs) != len(names):
        raise SourceError(f"the converted model has outputs {[o.name for o in outs]}, expected {len(names)}: "
                          f"{', '.join(names)}")
    mapping = {o.name: n for o, n in zip(outs, names, strict=True) if o.name != n}
    if not mapping:
        return model
    taken = {x for node in model.graph.node for x in (*node.input, *node.output)} - set(mapping)
    clash = sorted(set(mapping.values()) & taken)
    if clash:
        raise SourceError(f"cannot rename the outputs: {clash} already name other tensors in the graph")
    for node in model.graph.node:
        node.output[:] = [mapping.get(x, x) for x in node.output]
        node.input[:] = [mapping.get(x, x) for x in node.input]
    for o in model.graph.output:
        o.name = mapping.get(o.name, o.name)
    return model


def batch_first(model: Any) -> Any:
    """Make every output's first dimension the dynamic batch ``N`` (onnxmltools declares a fixed 1
    for LightGBM's labels, which a batch of several samples contradicts)."""
    for o in model.graph.output:
        dims = o.type.tensor_type.shape.dim if o.type.HasField("tensor_type") else []
        if len(dims):
            dims[0].Clear()
            dims[0].dim_param = "N"
    return model


def _version(module: str) -> str:
    """The version an installed module reports (``xgboost-cpu`` installs the ``xgboost`` module)."""
    import importlib

    try:
        return str(getattr(importlib.import_module(module), "__version__", "unknown"))
    except ImportError:
        return "unknown"


def _labels(values: Any) -> np.ndarray:
    """Class labels as a plain array: strings as unicode (``.npz`` without pickles), ints as int64."""
    a = np.asarray(values)
    if a.dtype.kind in "OUS":
        return a.astype(str)
    if a.dtype.kind == "b":
        return a.astype(np.int64)
    if a.dtype.kind in "iu":
        return a.astype(np.int64)
    raise SourceError(f"class labels of dtype {a.dtype} are not supported (integers or strings)")


# ------------------------------------------------------------------------------ scikit-learn


def load_pickle(path: Path) -> Any:
    """A scikit-learn model saved with joblib or pickle. Runs code from the file: see PICKLE_WARNING."""
    log.warning("%s: %s", path, PICKLE_WARNING)
    joblib = need("joblib", "sklearn")
    try:
        return joblib.load(path)
    except Exception as e:  # unpickling raises whatever the stored objects raise
        raise SourceError(f"{path}: not a loadable scikit-learn model ({type(e).__name__}: {e})") from e


def from_sklearn(model: Any, example: np.ndarray | None, provenance: dict[str, str] | None = None) -> Source:
    """A scikit-learn classifier or regressor (a Pipeline ending in one too) through skl2onnx."""
    sk_base = need("sklearn.base", "sklearn")
    skl2onnx = need("skl2onnx", "sklearn")
    if sk_base.is_classifier(model):
        kind, names = "classifier", CLASSIFIER_OUTPUTS
    elif sk_base.is_regressor(model):
        kind, names = "regressor", REGRESSOR_OUTPUTS
    else:
        raise SourceError(f"{type(model).__name__}: not a scikit-learn classifier or regressor "
                          "(a Pipeline must end in one)")
    dtype = input_dtype(example)
    width = _width(getattr(model, "n_features_in_", None), example, type(model).__name__)
    options = {id(model): {"zipmap": False}} if kind == "classifier" else None
    try:
        onx = skl2onnx.convert_sklearn(model, initial_types=[(INPUT_NAME, _tensor_type(dtype, width))],
                                       options=options, target_opset={"": ONNX_OPSET, "ai.onnx.ml": ML_OPSET})
    except Exception as e:  # skl2onnx raises assorted errors for estimators it has no converter for
        raise SourceError(f"skl2onnx could not convert {type(model).__name__}: {e}") from e
    batch_first(rename_outputs(onx, names))

    def predict(x: np.ndarray) -> dict[str, np.ndarray]:
        if kind == "classifier":
            return {LABEL: _labels(model.predict(x)), PROBABILITIES: np.asarray(model.predict_proba(x), np.float64)}
        return {VARIABLE: np.asarray(model.predict(x), np.float64).reshape(len(x), -1)}

    prov = {"framework": "scikit-learn", "framework_version": _version("sklearn"),
            "converter": "skl2onnx", "converter_version": _version("skl2onnx"), "estimator": _estimator_name(model),
            **(provenance or {})}
    return Source(onx.SerializeToString(), kind, INPUT_NAME, dtype, width, predict, prov,
                  exact=(LABEL,) if kind == "classifier" else ())


def _estimator_name(model: Any) -> str:
    steps = getattr(model, "steps", None)
    if steps:
        return "Pipeline(" + ", ".join(type(s).__name__ for _, s in steps) + ")"
    return type(model).__name__


# ------------------------------------------------------------------------------ XGBoost


def load_xgboost(path: Path) -> Any:
    """An XGBoost model file (.json, .ubj) as a Booster."""
    xgb = need("xgboost", "xgboost")
    try:
        return xgb.Booster(model_file=str(path))
    except Exception as e:  # XGBoostError and friends
        raise SourceError(f"{path}: not a readable XGBoost model ({e})") from e


def xgboost_kind(booster: Any) -> tuple[str, int]:
    """(classifier|regressor, number of classes) from the booster's objective."""
    cfg = json.loads(booster.save_config())
    objective = str(cfg["learner"]["objective"]["name"])
    if objective.startswith("binary:logistic"):
        return "classifier", 2
    if objective in ("multi:softprob", "multi:softmax"):
        return "classifier", int(cfg["learner"]["learner_model_param"]["num_class"])
    if objective.startswith("reg:") and objective != "reg:logistic":
        return "regressor", 0
    raise SourceError(f"XGBoost objective {objective!r} is not supported (binary:logistic, multi:softprob, "
                      "multi:softmax, reg:*)")


def from_xgboost(path_or_booster: Path | Any, example: np.ndarray | None,
                 provenance: dict[str, str] | None = None) -> Source:
    """An XGBoost Booster (or a file of one) through onnxmltools; labels are class indices."""
    xgb = need("xgboost", "xgboost")
    booster = load_xgboost(path_or_booster) if isinstance(path_or_booster, Path) else path_or_booster
    if hasattr(booster, "get_booster"):  # an XGBClassifier / XGBRegressor from MLflow
        booster = booster.get_booster()
    kind, n_classes = xgboost_kind(booster)
    width = _width(booster.num_features(), example, "XGBoost model")
    wrapper = _xgb_wrapper(xgb, booster, kind, n_classes)

    def predict(x: np.ndarray) -> dict[str, np.ndarray]:
        if kind == "regressor":
            return {VARIABLE: np.asarray(booster.predict(xgb.DMatrix(x)), np.float64).reshape(len(x), -1)}
        proba = np.asarray(wrapper.predict_proba(x), np.float64)
        return {LABEL: np.argmax(proba, axis=1).astype(np.int64), PROBABILITIES: proba}

    onx = _onnxmltools("convert_xgboost", wrapper, width, names=CLASSIFIER_OUTPUTS if kind == "classifier"
                       else REGRESSOR_OUTPUTS, extra="xgboost")
    prov = {"framework": "xgboost", "framework_version": _version("xgboost"), "converter": "onnxmltools",
            "converter_version": _version("onnxmltools"), **(provenance or {})}
    return Source(onx, kind, INPUT_NAME, "float32", width, predict, prov,
                  exact=(LABEL,) if kind == "classifier" else ())


def _xgb_wrapper(xgb: Any, booster: Any, kind: str, n_classes: int) -> Any:
    """The scikit-learn wrapper onnxmltools converts, around ``booster``."""
    import tempfile

    cls = xgb.XGBClassifier if kind == "classifier" else xgb.XGBRegressor
    model = cls()
    with tempfile.TemporaryDirectory() as d:  # the wrapper restores its classes from a saved model
        p = Path(d) / "model.json"
        booster.save_model(str(p))
        model.load_model(str(p))
    if kind == "classifier" and not hasattr(model, "n_classes_"):
        model.n_classes_ = n_classes
    return model


# ------------------------------------------------------------------------------ LightGBM


def load_lightgbm(path: Path) -> Any:
    """A LightGBM model file (.txt) as a Booster."""
    lgb = need("lightgbm", "lightgbm")
    try:
        return lgb.Booster(model_file=str(path))
    except Exception as e:  # LightGBMError and friends
        raise SourceError(f"{path}: not a readable LightGBM model ({e})") from e


def lightgbm_kind(booster: Any) -> tuple[str, int]:
    """(classifier|regressor, number of classes) from the booster's objective."""
    objective = str(booster.dump_model(num_iteration=0).get("objective", "")).split(" ")[0]
    if objective == "binary":
        return "classifier", 2
    if objective in ("multiclass", "multiclassova"):
        return "classifier", int(booster.dump_model(num_iteration=0).get("num_class", 0))
    if objective in ("regression", "regression_l1", "huber", "fair", "quantile", "mape", "poisson", "gamma",
                     "tweedie"):
        return "regressor", 0
    raise SourceError(f"LightGBM objective {objective!r} is not supported (binary, multiclass, regression*)")


def from_lightgbm(path_or_booster: Path | Any, example: np.ndarray | None,
                  provenance: dict[str, str] | None = None) -> Source:
    """A LightGBM Booster (or a file of one) through onnxmltools; labels are class indices."""
    booster = load_lightgbm(path_or_booster) if isinstance(path_or_booster, Path) else path_or_booster
    if hasattr(booster, "booster_"):  # an LGBMClassifier / LGBMRegressor from MLflow
        booster = booster.booster_
    kind, _ = lightgbm_kind(booster)
    width = _width(booster.num_feature(), example, "LightGBM model")

    def predict(x: np.ndarray) -> dict[str, np.ndarray]:
        raw = np.asarray(booster.predict(x), np.float64)
        if kind == "regressor":
            return {VARIABLE: raw.reshape(len(x), -1)}
        proba = np.stack([1.0 - raw, raw], axis=1) if raw.ndim == 1 else raw
        return {LABEL: np.argmax(proba, axis=1).astype(np.int64), PROBABILITIES: proba}

    onx = _onnxmltools("convert_lightgbm", booster, width, names=CLASSIFIER_OUTPUTS if kind == "classifier"
                       else REGRESSOR_OUTPUTS, extra="lightgbm", zipmap=False)
    prov = {"framework": "lightgbm", "framework_version": _version("lightgbm"), "converter": "onnxmltools",
            "converter_version": _version("onnxmltools"), **(provenance or {})}
    return Source(onx, kind, INPUT_NAME, "float32", width, predict, prov,
                  exact=(LABEL,) if kind == "classifier" else ())


def _onnxmltools(fn: str, model: Any, width: int, names: tuple[str, ...], extra: str, **kw: Any) -> bytes:
    tools = need("onnxmltools", extra)
    dt = need("onnxmltools.convert.common.data_types", extra)
    convert: Callable[..., Any] = getattr(tools, fn)
    try:
        onx = convert(model, initial_types=[(INPUT_NAME, dt.FloatTensorType([None, width]))],
                      target_opset=ONNXMLTOOLS_OPSET, **kw)
    except Exception as e:  # onnxmltools raises assorted errors for models it cannot convert
        raise SourceError(f"onnxmltools could not convert the {type(model).__name__}: {e}") from e
    return bytes(batch_first(rename_outputs(onx, names)).SerializeToString())

