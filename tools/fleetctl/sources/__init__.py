"""Model sources for ``fleetctl bundle build``: an ONNX file, a trained model file, an MLflow URI.

``open_source(SOURCE)`` turns what the user names into a ``Source``: ONNX bytes with the
conventional outputs (classifiers ``label`` and ``probabilities``, regressors ``variable``), the
source framework's own ``predict`` for the certification (fleetctl/sources/certify.py), and the
provenance the manifest records (framework and converter versions).

Invariants:
- Converters and MLflow are optional: a missing one raises ``SourceError`` naming the extra to
  install, never an ImportError.
- Loading a pickle (``.joblib``, ``.pkl``, an MLflow sklearn model) runs code from the file:
  only load files you trust. ``--help`` and docs/model-sources.md say so.
- ``.onnx`` files are passed through untouched (no ``predict``: onnxruntime's outputs are the
  golden ones, as before).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fleetctl.bundle import BuildError

ONNX_SUFFIXES = (".onnx",)
SKLEARN_SUFFIXES = (".joblib", ".pkl", ".pickle")
XGBOOST_SUFFIXES = (".json", ".ubj")
LIGHTGBM_SUFFIXES = (".txt",)
MLFLOW_SCHEMES = ("models:/", "runs:/")
LABEL, PROBABILITIES, VARIABLE = "label", "probabilities", "variable"
INSTALL = {"sklearn": "pip install 'edge-agent[sklearn]'", "xgboost": "pip install 'edge-agent[xgboost]'",
           "lightgbm": "pip install 'edge-agent[lightgbm]'", "mlflow": "pip install 'edge-agent[mlflow]'",
           "onnx": "pip install 'edge-agent[build]'"}
PICKLE_WARNING = ("loading a .joblib/.pkl file (or an MLflow sklearn model) runs code stored in it: "
                  "build only from files you trust")


class SourceError(BuildError):
    """The source cannot be read or converted; the message says why and, for a missing
    package, the install line."""


def need(module: str, extra: str) -> Any:
    """Import ``module`` or raise SourceError naming the extra that brings it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise SourceError(f"{module} is not installed; it is needed for this source: {INSTALL[extra]}") from e


@dataclass
class Source:
    """A model ready to bundle: ONNX bytes, how the source framework predicts, where it came from."""

    onnx: bytes
    kind: str  # "classifier", "regressor" or "onnx"
    input_name: str
    input_dtype: str  # the ONNX input's dtype name: float32, int64 or string
    n_features: int | None
    predict: Callable[[np.ndarray], dict[str, np.ndarray]] | None  # None: an .onnx file
    provenance: dict[str, str] = field(default_factory=dict)
    example: np.ndarray | None = None  # sample inputs the source carries (an MLflow input example)
    exact: tuple[str, ...] = ()  # outputs that must match exactly (class labels)


def kind_of(spec: str) -> str:
    """Which reader a SOURCE string goes to: onnx, sklearn, xgboost, lightgbm or mlflow."""
    if spec.startswith(MLFLOW_SCHEMES):
        return "mlflow"
    suffix = Path(spec).suffix.lower()
    for kind, suffixes in (("onnx", ONNX_SUFFIXES), ("sklearn", SKLEARN_SUFFIXES),
                           ("xgboost", XGBOOST_SUFFIXES), ("lightgbm", LIGHTGBM_SUFFIXES)):
        if suffix in suffixes:
            return kind
    raise SourceError(f"{spec}: unknown source; give an .onnx file, a scikit-learn model (.joblib, .pkl), "
                      "an XGBoost model (.json, .ubj), a LightGBM model (.txt) or an MLflow URI "
                      "(models:/NAME/VERSION, models:/NAME@ALIAS, runs:/RUN_ID/PATH)")


def open_source(spec: str, *, tracking_uri: str | None = None, example: np.ndarray | None = None) -> Source:
    """The ``Source`` for a SOURCE argument; ``example`` (the --sample-input array) fixes the
    input's dtype and width where the model file does not say."""
    kind = kind_of(spec)
    if kind == "mlflow":
        from fleetctl.sources.mlflow_source import open_mlflow

        return open_mlflow(spec, tracking_uri=tracking_uri, example=example)
    path = Path(spec)
    if not path.is_file():
        raise SourceError(f"{spec}: no such model file")
    if kind == "onnx":
        return Source(path.read_bytes(), "onnx", "", "", None, None, {"framework": "onnx"})
    from fleetctl.sources import convert

    if kind == "sklearn":
        return convert.from_sklearn(convert.load_pickle(path), example)
    if kind == "xgboost":
        return convert.from_xgboost(path, example)
    return convert.from_lightgbm(path, example)
