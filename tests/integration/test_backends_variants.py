"""fleetctl bundle build with variants: real conversions (onnxconverter-common, onnxruntime's
quantiser, OpenVINO's converter, the built-in TFLite writer), each checked at build time on the
real runtimes, and the signed manifest a device verifies."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from test_backends import make_mlp

from agent.bundles.trust import TrustStore, key_id
from fleetctl.bundle import (
    BuildError,
    VariantsFailed,
    build_bundle,
    manifest_document,
    verify_bundle,
)
from fleetctl.keys import generate_keypair
from fleetctl.main import main
from fleetctl.samples import make_classifier
from fleetctl.variants import (
    REDUCED_TOLERANCE,
    Outcome,
    VariantError,
    convert_onnx_to_tflite,
    convert_openvino_ir,
    tflite_precision,
)

ALL = ["onnx-fp16", "onnx-int8", "openvino-fp32", "openvino-fp16", "tflite"]
KILL_WAIT_S = 60.0  # a build in a subprocess reaches its staging folder within seconds
DETECTOR_REFUSAL = ("variant tflite-fp32 (tflite/fp32): failed: TFLite variant: operator Shape (node 'shape_0') "
                    "is not supported by the built-in flatbuffer writer (nor are Concat, Resize, Slice in this "
                    "graph); pass --tflite FILE with a converted model")


def make_detector(path: Path, seed: int = 3) -> Path:
    """A tiny detector head shaped like a paddle2onnx export: the upsampled size is computed from
    the input's shape (Shape → Slice → Concat → Resize), which onnxconverter-common, onnxruntime's
    quantiser and OpenVINO take and the built-in TFLite writer does not."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal((1, 1, 1, 1)).astype(np.float32), "gain"),
             numpy_helper.from_array(np.array([0], np.int64), "zero"),
             numpy_helper.from_array(np.array([2], np.int64), "two"),
             numpy_helper.from_array(np.array([8, 8], np.int64), "hw")]
    nodes = [helper.make_node("Mul", ["image", "gain"], ["scaled"], name="scale_0"),
             helper.make_node("Shape", ["scaled"], ["scaled_shape"], name="shape_0"),
             helper.make_node("Slice", ["scaled_shape", "zero", "two"], ["nc"], name="slice_0"),
             helper.make_node("Concat", ["nc", "hw"], ["size"], name="concat_0", axis=0),
             helper.make_node("Resize", ["scaled", "", "", "size"], ["up"], name="upsample_1", mode="nearest"),
             helper.make_node("Sigmoid", ["up"], ["prob"], name="head_sigmoid")]
    graph = helper.make_graph(nodes, "detector",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 4, 4])],
                              [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["batch", 1, 8, 8])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` (relative path → sha256)."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def listed(manifest: Path) -> set[str]:
    doc = manifest_document(manifest)
    return {"manifest.json", *(f["path"] for v in doc["variants"] for f in v["files"]),
            *(f["path"] for f in doc["files"])}


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
    outcomes: list[Outcome] = []
    mpath = build_bundle(model, tmp_path / "b", "mlp", 1, [key], tflite=tmp_path / "given.tflite",
                         prebuilt=[f"ov-ir:openvino:fp32:{ir / 'model.xml'}"], checks=checks,
                         variants=["tflite"], outcomes=outcomes)
    assert [(o.id, o.status) for o in outcomes] == [("onnx-fp32", "built"), ("tflite-fp32", "built"),
                                                    ("ov-ir", "built"), ("tflite-fp32", "skipped")]
    assert outcomes[-1].line() == (f"variant tflite-fp32 (tflite/fp32): skipped: --tflite {tmp_path / 'given.tflite'} "
                                   "is the TFLite variant of this build")
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
    assert not (tmp_path / "b").exists()
    # With --keep-going the copied file of the failed variant is not left in the bundle.
    mpath = build_bundle(model, tmp_path / "k", "mlp", 1, [key], prebuilt=[f"onnx-x:onnx:fp32:{wrong}"],
                         keep_going=True)
    assert [v["id"] for v in manifest_document(mpath)["variants"]] == ["onnx-fp32"]
    assert set(tree(tmp_path / "k")) == listed(mpath) and not (tmp_path / "k" / "variants").exists()
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


def test_default_build_lists_every_outcome_and_writes_nothing(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    det = make_detector(tmp_path / "src" / "det.onnx")
    out = tmp_path / "bundles" / "det"
    with pytest.raises(VariantsFailed) as ei:
        build_bundle(det, out, "det", 1, [key], variants=["onnx-fp16", "tflite"])
    assert [(o.id, o.status) for o in ei.value.outcomes] == [
        ("onnx-fp32", "built"), ("onnx-fp16", "built"), ("tflite-fp32", "failed")]
    msg = str(ei.value)
    assert msg.startswith("1 of 3 variants failed; nothing written (--keep-going builds the bundle with the "
                          "variants that passed):\n")
    assert "\n  variant onnx-fp16 (onnx/fp16): built, checked on onnxruntime:CPUExecutionProvider" in msg
    assert DETECTOR_REFUSAL in msg
    assert "scaled_shape" not in msg  # the operator is named, not the int64 tensor it makes
    assert list((tmp_path / "bundles").iterdir()) == []  # no bundle, no staging folder, no variant file
    # Over a previous bundle (--force), a failed build leaves it byte for byte.
    build_bundle(det, out, "det", 1, [key], variants=["onnx-int8"])
    before = tree(out)
    with pytest.raises(VariantsFailed):
        build_bundle(det, out, "det", 2, [key], variants=["onnx-fp16", "tflite"], overwrite=True)
    assert tree(out) == before
    assert [p.name for p in (tmp_path / "bundles").iterdir()] == ["det"]


def test_keep_going_signs_the_variants_that_passed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    det = make_detector(tmp_path / "src" / "det.onnx")
    kp = generate_keypair(tmp_path / "keys", "fleet")
    trust = tmp_path / "trust"
    trust.mkdir()
    (trust / "fleet.pem").write_bytes(kp.public_path.read_bytes())
    out = tmp_path / "bundles" / "det" / "1"
    args = ["bundle", "build", str(det), "--name", "det", "--version", "1", "--key", str(kp.private_path),
            "--out", str(out), "--variants", "onnx-fp16,tflite"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "fleetctl: error: 1 of 3 variants failed; nothing written" in err and DETECTOR_REFUSAL in err
    assert not out.exists()
    assert main([*args, "--keep-going"]) == 0
    cap = capsys.readouterr()
    assert "variant onnx-fp16 (onnx/fp16): built, checked on onnxruntime:CPUExecutionProvider" in cap.out
    assert DETECTOR_REFUSAL in cap.out
    assert "fleetctl: warning: 1 of 3 variants failed and are not in the bundle (--keep-going): tflite-fp32" in cap.err
    doc = manifest_document(out / "manifest.json")
    assert [v["id"] for v in doc["variants"]] == ["onnx-fp32", "onnx-fp16"]
    assert set(tree(out)) == listed(out / "manifest.json")
    assert main(["bundle", "verify", str(out), "--trust", str(trust)]) == 0
    assert "OK det v1: variants onnx-fp32 (onnx/fp32), onnx-fp16 (onnx/fp16); 4 files OK" in capsys.readouterr().out


def test_force_rebuild_leaves_only_the_files_of_its_manifest(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    model = make_mlp(tmp_path / "mlp.onnx")
    out = tmp_path / "b"
    build_bundle(model, out, "mlp", 1, [key], variants=["onnx-fp16", "onnx-int8", "openvino-fp32"])
    assert (out / "model_fp16.onnx").is_file() and (out / "openvino" / "fp32" / "model.bin").is_file()
    (out / "notes.txt").write_text("written by hand")
    mpath = build_bundle(model, out, "mlp", 2, [key], variants=["onnx-int8"], overwrite=True)
    assert set(tree(out)) == listed(mpath) == {"manifest.json", "model.onnx", "model_int8.onnx",
                                               "samples/input.npz", "samples/expected.npz"}
    assert not (out / "openvino").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "mlp.onnx"]
    verify_bundle(out, TrustStore({key_id(key.public_key()): key.public_key()}))
    # Without --force a bundle stays; a folder that is not a bundle is never replaced, even with it.
    with pytest.raises(BuildError, match="already exists"):
        build_bundle(model, out, "mlp", 3, [key])
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "model.onnx").write_bytes(model.read_bytes())
    with pytest.raises(BuildError, match="not empty and not a bundle"):
        build_bundle(mine / "model.onnx", mine, "mlp", 1, [key], overwrite=True)
    assert [p.name for p in mine.iterdir()] == ["model.onnx"]


def test_an_interrupted_build_leaves_the_previous_bundle(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    model = make_mlp(tmp_path / "mlp.onnx")
    kp = generate_keypair(tmp_path / "keys", "fleet")
    out = tmp_path / "bundles" / "b"
    build_bundle(model, out, "mlp", 1, [key])
    before = tree(out)

    def interrupt(sig: signal.Signals) -> int:
        """Start a --force build of v2 and send ``sig`` once it has staged its folder."""
        proc = subprocess.Popen([sys.executable, "-m", "fleetctl.main", "bundle", "build", str(model), "--name", "mlp",
                                 "--version", "2", "--key", str(kp.private_path), "--out", str(out), "--force",
                                 "--variants", ",".join(ALL)], cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + KILL_WAIT_S
            while not any(out.parent.glob(".b.partial-*/model.onnx")) and proc.poll() is None:
                assert time.monotonic() < deadline, "the build never staged its folder"
                time.sleep(0.005)
            proc.send_signal(sig)
            return proc.wait(timeout=KILL_WAIT_S)
        finally:
            proc.kill()
            proc.wait(timeout=KILL_WAIT_S)

    assert interrupt(signal.SIGINT) == 130  # Ctrl-C: fleetctl's "interrupted" exit
    assert tree(out) == before
    assert [p.name for p in out.parent.iterdir()] == ["b"]  # it removed its own staging folder
    assert interrupt(signal.SIGKILL) == -signal.SIGKILL
    assert tree(out) == before  # mid-build, the output is still the previous bundle
    assert len(list(out.parent.glob(".b.partial-*"))) == 1  # what the killed process left
    mpath = build_bundle(model, out, "mlp", 2, [key], variants=["onnx-int8"], overwrite=True)
    assert set(tree(out)) == listed(mpath)
    assert [p.name for p in out.parent.iterdir()] == ["b"]  # the next build swept the dead one's folder


def test_tflite_refusals_name_the_operator(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def save(nodes: list, inits: list, shape: list, out_shape: list) -> Path:
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], initializer=inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        onnx.checker.check_model(model)
        path = tmp_path / f"m{len(list(tmp_path.iterdir()))}.onnx"
        onnx.save(model, str(path))
        return path

    hint = "; pass --tflite FILE with a converted model (onnx2tf or the TensorFlow converter)"
    up = save([helper.make_node("Resize", ["x", "", "scales"], ["up"], name="upsample_1", mode="nearest"),
               helper.make_node("Sigmoid", ["up"], ["y"], name="head")],
              [numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")], [1, 1, 4, 4], [1, 1, 8, 8])
    with pytest.raises(VariantError) as ei:
        convert_onnx_to_tflite(up, tmp_path / "up.tflite")
    assert str(ei.value) == ("TFLite variant: operator Resize (node 'upsample_1') is not supported by the "
                             "built-in flatbuffer writer" + hint)
    # An operator the writer knows, used in a way TFLite cannot express.
    sm = save([helper.make_node("Softmax", ["x"], ["y"], name="attn_softmax", axis=1)], [], [1, 3, 4], [1, 3, 4])
    with pytest.raises(VariantError) as ei:
        convert_onnx_to_tflite(sm, tmp_path / "sm.tflite")
    assert str(ei.value) == ("TFLite variant: operator Softmax (node 'attn_softmax') works over axis 1 of a "
                             "rank-3 tensor (TFLite: the last axis only)" + hint)
    assert not list(tmp_path.glob("*.tflite"))


def test_replacing_without_an_atomic_swap_still_leaves_one_whole_bundle(tmp_path: Path, key: Ed25519PrivateKey,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # Faked: a kernel or filesystem without renameat2(RENAME_EXCHANGE), which this machine has.
    import fleetctl.bundle as fb

    monkeypatch.setattr(fb, "_exchange", lambda a, b: False)
    model = make_mlp(tmp_path / "mlp.onnx")
    out = tmp_path / "bundles" / "b"
    build_bundle(model, out, "mlp", 1, [key], variants=["onnx-fp16"])
    mpath = build_bundle(model, out, "mlp", 2, [key], overwrite=True)
    assert manifest_document(mpath)["version"] == 2
    assert set(tree(out)) == listed(mpath)
    assert [p.name for p in out.parent.iterdir()] == ["b"]  # the retired folder is gone too


def test_openvino_variants_convert_to_the_same_bytes_every_time(tmp_path: Path) -> None:
    # OpenVINO numbers the nodes it names from a counter global to the process; renumbered, the
    # same model gives the same IR, so a retrained model keeps its layout (sizes) for autotune.
    model = make_mlp(tmp_path / "mlp.onnx")
    for d in ("a", "b"):
        convert_openvino_ir(model, tmp_path / d / "model.xml", fp16=False)
    assert (tmp_path / "a" / "model.xml").read_bytes() == (tmp_path / "b" / "model.xml").read_bytes()
    assert b'name="w1"' in (tmp_path / "a" / "model.xml").read_bytes()  # names from the ONNX graph stay
