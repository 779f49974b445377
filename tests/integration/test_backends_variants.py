"""fleetctl bundle build with variants: real conversions (onnxconverter-common, onnxruntime's
quantiser, OpenVINO's converter, the built-in TFLite writer), each checked at build time on the
real runtimes, and the signed manifest a device verifies."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from test_backends import make_mlp

from agent.bundles.trust import TrustStore, key_id
from fleetctl.bundle import BuildError, build_bundle, manifest_document, verify_bundle
from fleetctl.samples import make_classifier
from fleetctl.variants import REDUCED_TOLERANCE, convert_onnx_to_tflite, tflite_precision

ALL = ["onnx-fp16", "onnx-int8", "openvino-fp32", "openvino-fp16", "tflite"]


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def test_every_variant_is_made_checked_and_signed(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    model = make_mlp(tmp_path / "mlp.onnx")
    checks: list[dict] = []
    mpath = build_bundle(model, tmp_path / "b", "mlp", 1, [key], variants=ALL, checks=checks)
    doc = manifest_document(mpath)
    got = {v["id"]: v for v in doc["variants"]}
    assert list(got) == ["onnx-fp32", "onnx-fp16", "onnx-int8", "openvino-fp32", "openvino-fp16", "tflite-fp32"]
    assert [f["path"] for f in got["openvino-fp16"]["files"]] == ["openvino/fp16/model.xml", "openvino/fp16/model.bin"]
    with np.load(tmp_path / "b" / "samples" / "expected.npz") as z:
        scale = float(np.abs(z["probs"]).max())
    for vid, v in got.items():
        if v["precision"] == "fp32":
            assert "tolerance" not in v, vid  # the bundle's own rtol/atol
        else:
            rtol, frac = REDUCED_TOLERANCE[v["precision"]]
            assert v["tolerance"]["rtol"] == rtol and v["tolerance"]["atol"] == pytest.approx(frac * scale, rel=1e-2)
    by = {c["variant"]: c for c in checks}
    assert set(by) == set(got) - {"onnx-fp32"}
    assert by["openvino-fp32"]["backend"] == "openvino:CPU" and by["openvino-fp32"]["compute_precision"] == "fp32"
    assert by["tflite-fp32"]["backend"] == "tflite:xnnpack"
    for c in checks:
        assert c["max_abs_error"] <= c["atol"] + c["rtol"], c
    assert by["openvino-fp32"]["max_abs_error"] < 1e-5 and by["tflite-fp32"]["max_abs_error"] < 1e-5
    # A device's check of the signed bundle passes: every variant file is listed with size and sha256.
    report = verify_bundle(tmp_path / "b", TrustStore({key_id(key.public_key()): key.public_key()}))
    assert len(report.files) == 1 + 1 + 1 + 2 + 2 + 1 + 2


def test_builtin_tflite_converter_refuses_convolutions_clearly(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    cnn = make_classifier(tmp_path / "cnn.onnx")
    with pytest.raises(BuildError) as ei:
        build_bundle(cnn, tmp_path / "b", "cnn", 1, [key], variants=["tflite"])
    assert "variant tflite-fp32 (tflite/fp32): failed: TFLite variant: operator Conv (unnamed node, output 'c1') " \
           "is not supported by the built-in flatbuffer writer (nor are GlobalAveragePool in this graph); " \
           "pass --tflite FILE" in str(ei.value)
    # The other converters take the CNN.
    build_bundle(cnn, tmp_path / "b", "cnn", 1, [key], variants=["openvino-fp16", "onnx-fp16"], overwrite=True)


def test_given_tflite_and_prebuilt_files_join_as_they_are(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    model = make_mlp(tmp_path / "mlp.onnx")
    convert_onnx_to_tflite(model, tmp_path / "given.tflite")
    assert tflite_precision(tmp_path / "given.tflite") == "fp32"
    ir = tmp_path / "ir"
    build_bundle(model, tmp_path / "first", "mlp", 1, [key], variants=["openvino-fp32"])
    (ir).mkdir()
    for f in ("model.xml", "model.bin"):
        (ir / f).write_bytes((tmp_path / "first" / "openvino" / "fp32" / f).read_bytes())
    checks: list[dict] = []
    mpath = build_bundle(model, tmp_path / "b", "mlp", 1, [key], tflite=tmp_path / "given.tflite",
                         prebuilt=[f"ov-ir:openvino:fp32:{ir / 'model.xml'}"], checks=checks)
    got = {v["id"]: [f["path"] for f in v["files"]] for v in manifest_document(mpath)["variants"]}
    assert got == {"onnx-fp32": ["model.onnx"], "tflite-fp32": ["variants/tflite-fp32/given.tflite"],
                   "ov-ir": ["variants/ov-ir/model.xml", "variants/ov-ir/model.bin"]}
    assert all(c["max_abs_error"] < 1e-5 for c in checks)


def test_a_variant_outside_tolerance_fails_the_build(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    model = make_mlp(tmp_path / "mlp.onnx")
    wrong = make_mlp(tmp_path / "wrong.onnx", seed=42)
    with pytest.raises(BuildError) as ei:
        build_bundle(model, tmp_path / "b", "mlp", 1, [key], prebuilt=[f"onnx-x:onnx:fp32:{wrong}"])
    assert "variant onnx-x (onnx/fp32): failed: did not pass its build-time check on " \
           "onnxruntime:CPUExecutionProvider" in str(ei.value)
    assert "exceeds" in str(ei.value)
    with pytest.raises(BuildError, match="unknown variant 'onnx-bf16'"):
        build_bundle(model, tmp_path / "b", "mlp", 1, [key], variants=["onnx-bf16"])
    with pytest.raises(BuildError, match="--no-check names no variant"):
        build_bundle(model, tmp_path / "b", "mlp", 1, [key], unchecked=["nope"], overwrite=True)
    with pytest.raises(BuildError, match="expected ID:FORMAT:PRECISION:PATH"):
        build_bundle(model, tmp_path / "b", "mlp", 1, [key], prebuilt=["just-a-path.onnx"], overwrite=True)


def test_fleetctl_cli_builds_variants(tmp_path: Path) -> None:
    model = make_mlp(tmp_path / "mlp.onnx")
    env_py = [sys.executable, "-m", "fleetctl.main"]
    r = subprocess.run([*env_py, "keygen", "--out", str(tmp_path / "k"), "--name", "fleet"], capture_output=True,
                       text=True, timeout=60, cwd=REPO)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([*env_py, "bundle", "build", str(model), "--name", "mlp", "--version", "1", "--key",
                        str(tmp_path / "k" / "fleet.key"), "--out", str(tmp_path / "b"),
                        "--variants", "onnx-int8,openvino-fp16", "--variants", "tflite"],
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "variant onnx-int8 (onnx/int8): built, checked on onnxruntime:CPUExecutionProvider" in r.stdout
    assert "variant openvino-fp16 (openvino/fp16): built, checked on openvino:CPU computing in" in r.stdout
    assert "variant tflite-fp32 (tflite/fp32): built, checked on tflite:xnnpack" in r.stdout
    r = subprocess.run([*env_py, "bundle", "build", str(model), "--name", "mlp", "--version", "2", "--key",
                        str(tmp_path / "k" / "fleet.key"), "--out", str(tmp_path / "c"), "--variants", "coreml"],
                       capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 1 and "unknown variant 'coreml'" in r.stderr
