"""The device's golden comparison: floating outputs within tolerance, labels (integer, boolean and
string outputs) exactly, as a converted model's certified samples require."""

from __future__ import annotations

import numpy as np
import pytest

from agent import errors
from agent.backends.golden import max_error

RTOL, ATOL = 1e-3, 1e-4


def test_labels_and_probabilities_that_match_pass() -> None:
    expected = {"label": np.array(["setosa", "virginica"]), "probabilities": np.array([[0.9, 0.1], [0.2, 0.8]])}
    got = {"label": np.array(["setosa", "virginica"], dtype=object),  # onnxruntime gives str objects
           "probabilities": np.array([[0.90001, 0.1], [0.2, 0.8]], dtype=np.float32)}
    assert max_error(got, expected, RTOL, ATOL, "ort") < 1e-4


@pytest.mark.parametrize(("got", "want", "needle"), [
    (np.array(["setosa", "setosa"], dtype=object), np.array(["setosa", "virginica"]), "'virginica'"),
    (np.array([1000, 7]), np.array([1001, 7]), "expected 1001"),  # within rtol·|1001|, but a label
    (np.array([True, False]), np.array([True, True]), "at flat index 1"),
    (np.array([1.0, 2.0]), np.array(["a", "b"]), "must match exactly"),
])
def test_a_label_that_differs_fails_validation(got: np.ndarray, want: np.ndarray, needle: str) -> None:
    with pytest.raises(errors.RejectError) as e:
        max_error({"label": got}, {"label": want}, RTOL, ATOL, "ort")
    assert e.value.code == errors.VALIDATION_FAILED and "'label'" in e.value.message and needle in e.value.message


def test_a_label_of_another_shape_fails_validation() -> None:
    with pytest.raises(errors.RejectError) as e:
        max_error({"label": np.array([1, 2, 3])}, {"label": np.array([1, 2])}, RTOL, ATOL, "ort")
    assert e.value.code == errors.VALIDATION_FAILED and "shape [3]" in e.value.message
