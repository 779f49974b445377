"""Choosing a (variant, backend target) pair, with synthetic targets (plain dataclasses)."""

from __future__ import annotations

from typing import Any

import pytest

from agent import errors
from agent.backends.base import Availability, Target
from agent.backends.selection import DEFAULT_RANKING, rank
from agent.bundles.manifest import Manifest, parse_document

OK = Availability(True, "test")


def _file(path: str, ch: str) -> dict[str, Any]:
    return {"path": path, "size": 1, "sha256": ch * 64}


def manifest(*variants: tuple[str, str, str]) -> Manifest:
    """variants: (id, format, precision)."""
    vs = []
    for i, (vid, fmt, prec) in enumerate(variants):
        ext = {"onnx": "onnx", "tflite": "tflite", "openvino": "xml"}[fmt]
        vs.append({"id": vid, "format": fmt, "precision": prec,
                   "files": [_file(f"{vid}/model.{ext}", "0123456789abcdef"[i])]})
    return parse_document({
        "v": 1, "name": "det", "version": 1, "expires_at": "2036-01-01T00:00:00Z",
        "io": {"inputs": [{"name": "x", "dtype": "float32", "shape": [1, 4]}],
               "outputs": [{"name": "y", "dtype": "float32", "shape": [1, 3]}]},
        "variants": vs})


ALL = manifest(("onnx-fp32", "onnx", "fp32"), ("onnx-fp16", "onnx", "fp16"),
               ("ov-fp16", "openvino", "fp16"), ("tfl-int8", "tflite", "int8"))


def T(tid: str, formats: tuple[str, ...], usable: bool = True, reason: str = "") -> Target:
    runtime, target = tid.split(":", 1)
    return Target(runtime, target, formats, Availability(usable, reason or ("ok" if usable else "missing")))


ORT_CPU = T("onnxruntime:CPUExecutionProvider", ("onnx",))
ORT_CUDA = T("onnxruntime:CUDAExecutionProvider", ("onnx",))
OV_CPU = T("openvino:CPU", ("openvino", "onnx"))
OV_GPU = T("openvino:GPU", ("openvino", "onnx"))
TFL = T("tflite:xnnpack", ("tflite",))


def test_default_ranking_prefers_accelerator_then_native_precision() -> None:
    d = rank(ALL, [ORT_CPU, TFL, ORT_CUDA, OV_CPU])
    assert (d.chosen.target.id, d.chosen.variant.id) == ("onnxruntime:CUDAExecutionProvider", "onnx-fp16")
    order = [(c.target.id, c.variant.id) for c in d.candidates]
    # CUDA (fp16 before fp32), then openvino:CPU, then ORT CPU (fp32 before fp16), then tflite.
    assert order == [
        ("onnxruntime:CUDAExecutionProvider", "onnx-fp16"),
        ("onnxruntime:CUDAExecutionProvider", "onnx-fp32"),
        ("openvino:CPU", "onnx-fp32"),
        ("openvino:CPU", "ov-fp16"),  # same precision: the device's native IR before ONNX
        ("openvino:CPU", "onnx-fp16"),
        ("onnxruntime:CPUExecutionProvider", "onnx-fp32"),
        ("onnxruntime:CPUExecutionProvider", "onnx-fp16"),
        ("tflite:xnnpack", "tfl-int8"),
    ]
    assert "default ranking" in d.chosen.why


def test_precision_preference_on_cpu_picks_fp32() -> None:
    d = rank(ALL, [ORT_CPU])
    assert d.chosen.variant.id == "onnx-fp32"
    assert [c.variant.precision for c in d.candidates] == ["fp32", "fp16"]
    d = rank(manifest(("a", "onnx", "fp16"), ("b", "onnx", "int8")), [ORT_CPU])
    assert d.chosen.variant.id == "b"  # CPU: fp32, int8, fp16


def test_prefer_overrides_ranking() -> None:
    d = rank(ALL, [ORT_CUDA, ORT_CPU, TFL], prefer=["tflite:xnnpack", "onnxruntime:CPUExecutionProvider"])
    assert d.chosen.target.id == "tflite:xnnpack"
    assert [c.target.id for c in d.candidates][:3] == [
        "tflite:xnnpack", "onnxruntime:CPUExecutionProvider", "onnxruntime:CPUExecutionProvider"]
    assert d.candidates[-1].target.id == "onnxruntime:CUDAExecutionProvider"
    assert "prefer" in d.chosen.why


def test_profile_ranking_replaces_default() -> None:
    ranking = (("tflite:xnnpack", ("int8",)), ("onnxruntime:CPUExecutionProvider", ("fp16", "fp32")))
    d = rank(ALL, [ORT_CPU, TFL, ORT_CUDA], ranking=ranking)
    assert [(c.target.id, c.variant.id) for c in d.candidates] == [
        ("tflite:xnnpack", "tfl-int8"),
        ("onnxruntime:CPUExecutionProvider", "onnx-fp16"),
        ("onnxruntime:CPUExecutionProvider", "onnx-fp32"),
        ("onnxruntime:CUDAExecutionProvider", "onnx-fp32"),  # unranked targets come last
        ("onnxruntime:CUDAExecutionProvider", "onnx-fp16"),
    ]
    assert "profile" in d.chosen.why
    assert "not ranked" in d.candidates[-1].why


def test_pin_honoured_even_when_ranked_lower() -> None:
    d = rank(ALL, [ORT_CUDA, ORT_CPU, TFL], pin="onnxruntime:CPUExecutionProvider")
    assert {c.target.id for c in d.candidates} == {"onnxruntime:CPUExecutionProvider"}
    assert d.chosen.variant.id == "onnx-fp32"
    assert "pinned" in d.chosen.why


def test_pin_to_unusable_target_names_pin_and_reason() -> None:
    cuda_off = T("onnxruntime:CUDAExecutionProvider", ("onnx",), usable=False,
                 reason="no NVIDIA GPU is present")
    with pytest.raises(errors.RejectError) as ei:
        rank(ALL, [ORT_CPU, cuda_off], pin="onnxruntime:CUDAExecutionProvider")
    assert ei.value.code == errors.NO_COMPATIBLE_BACKEND
    assert "onnxruntime:CUDAExecutionProvider" in ei.value.message
    assert "no NVIDIA GPU is present" in ei.value.message


def test_pin_to_unknown_target_names_pin() -> None:
    with pytest.raises(errors.RejectError) as ei:
        rank(ALL, [ORT_CPU, TFL], pin="coreml:ANE")
    assert ei.value.code == errors.NO_COMPATIBLE_BACKEND
    assert "coreml:ANE" in ei.value.message
    assert "not known" in ei.value.message


def test_pin_to_target_without_a_fitting_variant() -> None:
    onnx_only = manifest(("onnx-fp32", "onnx", "fp32"))
    with pytest.raises(errors.RejectError) as ei:
        rank(onnx_only, [ORT_CPU, TFL], pin="tflite:xnnpack")
    assert ei.value.code == errors.NO_COMPATIBLE_BACKEND
    assert "tflite:xnnpack" in ei.value.message


def test_unusable_targets_are_explained() -> None:
    cuda_off = T("onnxruntime:CUDAExecutionProvider", ("onnx",), usable=False, reason="no GPU")
    ov_off = T("openvino:NPU", ("openvino",), usable=False, reason="no NPU device")
    onnx_only = manifest(("onnx-fp32", "onnx", "fp32"))
    d = rank(onnx_only, [cuda_off, ov_off, TFL, ORT_CPU])
    ex = d.explain()
    assert ex["chosen"] == {"variant": "onnx-fp32", "backend": "onnxruntime:CPUExecutionProvider",
                            "why": d.chosen.why}
    unusable = {u["backend"]: u["reason"] for u in ex["unusable"]}
    assert unusable["onnxruntime:CUDAExecutionProvider"] == "no GPU"
    assert unusable["openvino:NPU"] == "no NPU device"
    assert "no tflite variant" in unusable["tflite:xnnpack"]
    assert [r["backend"] for r in ex["ranked"]] == ["onnxruntime:CPUExecutionProvider"]


def test_nothing_usable_lists_reasons() -> None:
    cpu_off = T("onnxruntime:CPUExecutionProvider", ("onnx",), usable=False, reason="onnxruntime is not installed")
    with pytest.raises(errors.RejectError) as ei:
        rank(manifest(("onnx-fp32", "onnx", "fp32")), [cpu_off])
    assert ei.value.code == errors.NO_COMPATIBLE_BACKEND
    assert "onnxruntime is not installed" in ei.value.message
    assert ei.value.details["unusable"] == [{"backend": "onnxruntime:CPUExecutionProvider",
                                             "reason": "onnxruntime is not installed"}]


def test_default_ranking_ids_are_well_formed() -> None:
    for tid, precs in DEFAULT_RANKING:
        assert ":" in tid and precs
        assert set(precs) <= {"fp32", "fp16", "int8"}


def test_gpu_prefers_fp16_over_fp32() -> None:
    ov_only = manifest(("ov-fp32", "openvino", "fp32"), ("ov-fp16", "openvino", "fp16"))
    d = rank(ov_only, [OV_GPU, OV_CPU])
    assert (d.chosen.target.id, d.chosen.variant.id) == ("openvino:GPU", "ov-fp16")
    cpu_first = [c for c in d.candidates if c.target.id == "openvino:CPU"]
    assert [c.variant.id for c in cpu_first] == ["ov-fp32", "ov-fp16"]


TREE_OPS = ["ai.onnx.ml.TreeEnsembleClassifier", "ai.onnx.ml.ZipMap"]


def tree_manifest(operators: list[str]) -> Manifest:
    doc = manifest(("onnx-fp32", "onnx", "fp32")).raw
    doc["variants"][0]["operators"] = operators
    return parse_document(doc)


def test_onnx_ml_operators_go_to_onnxruntime_and_openvino_and_litert_name_them() -> None:
    d = rank(tree_manifest(TREE_OPS), [OV_CPU, ORT_CPU, TFL])
    assert [(c.target.id, c.variant.id) for c in d.candidates] == [("onnxruntime:CPUExecutionProvider", "onnx-fp32")]
    why = {r["backend"]: r["reason"] for r in d.rejected}
    assert why["openvino:CPU"] == ("openvino cannot run operators ai.onnx.ml.TreeEnsembleClassifier, "
                                   "ai.onnx.ml.ZipMap (variant onnx-fp32); onnxruntime runs them")
    assert why["tflite:xnnpack"] == ("no tflite variant in the bundle; LiteRT has no kernels for the model's "
                                     "operators ai.onnx.ml.TreeEnsembleClassifier, ai.onnx.ml.ZipMap")


def test_an_onnx_ml_operator_openvino_converts_does_not_exclude_it() -> None:
    d = rank(tree_manifest(["ai.onnx.ml.Normalizer"]), [OV_CPU, ORT_CPU])
    assert d.chosen.target.id == "openvino:CPU"


def test_only_onnxruntime_missing_leaves_no_backend_with_every_reason() -> None:
    with pytest.raises(errors.RejectError) as e:
        rank(tree_manifest(TREE_OPS), [OV_CPU, T("onnxruntime:CPUExecutionProvider", ("onnx",), usable=False,
                                                 reason="onnxruntime is not installed")])
    assert e.value.code == errors.NO_COMPATIBLE_BACKEND
    assert "openvino cannot run operators ai.onnx.ml.TreeEnsembleClassifier" in e.value.message
    assert "onnxruntime is not installed" in e.value.message


def test_a_manifest_with_bad_operators_is_invalid() -> None:
    doc = manifest(("onnx-fp32", "onnx", "fp32")).raw
    for bad in ("TreeEnsemble", ["x" * 200], ["a b"], ["op"] * 65):
        doc["variants"][0]["operators"] = bad
        with pytest.raises(errors.RejectError) as e:
            parse_document(doc)
        assert e.value.code == errors.INVALID_MANIFEST and "operators" in e.value.message
