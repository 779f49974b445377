"""Manifest schema and the signed-manifest wrapper (BUNDLE.md "Manifest document")."""

from __future__ import annotations

import base64
import copy
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import errors
from agent.bundles import dsse
from agent.bundles.manifest import (
    MAX_FILES,
    MAX_MANIFEST_BYTES,
    parse_document,
    sign_manifest,
    verify_manifest,
)
from agent.bundles.trust import TrustStore, key_id

SHA_A = "a" * 64
SHA_B = "b" * 64
SHA_C = "c" * 64
SHA_D = "d" * 64
SHA_E = "e" * 64


def valid_doc() -> dict[str, Any]:
    return {
        "v": 1, "name": "detector", "version": 7,
        "created_at": "2026-01-01T00:00:00Z", "expires_at": "2036-01-01T00:00:00.000Z",
        "description": "test",
        "io": {"inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 4]}],
               "outputs": [{"name": "y", "dtype": "float32", "shape": ["batch", 3]}]},
        "variants": [
            {"id": "onnx-fp32", "format": "onnx", "precision": "fp32",
             "files": [{"path": "model.onnx", "size": 100, "sha256": SHA_A}]},
            {"id": "openvino-fp16", "format": "openvino", "precision": "fp16",
             "files": [{"path": "openvino/model.xml", "size": 10, "sha256": SHA_B},
                       {"path": "openvino/model.bin", "size": 20, "sha256": SHA_C}]},
        ],
        "files": [{"path": "labels.txt", "size": 3, "sha256": SHA_D},
                  {"path": "samples/input.npz", "size": 5, "sha256": SHA_E},
                  {"path": "samples/expected.npz", "size": 6, "sha256": SHA_E.replace("e", "f")}],
        "validation": {"inputs": "samples/input.npz", "expected": "samples/expected.npz",
                       "rtol": 1e-3, "atol": 1e-4, "max_p95_ms": 50},
        "requires": {"agent": ">=0.1"},
    }


def _invalid(doc: Any) -> str:
    with pytest.raises(errors.RejectError) as ei:
        parse_document(doc)
    assert ei.value.code == errors.INVALID_MANIFEST, ei.value
    return ei.value.message


def test_valid_document_parses() -> None:
    m = parse_document(valid_doc())
    assert (m.name, m.version) == ("detector", 7)
    assert [v.id for v in m.variants] == ["onnx-fp32", "openvino-fp16"]
    assert m.inputs[0].name == "x" and m.inputs[0].shape == (None, 4)
    assert m.outputs[0].shape == (None, 3)
    assert m.variant("openvino-fp16").main_file.path == "openvino/model.xml"
    assert m.validation is not None and m.validation.max_p95_ms == 50.0
    assert m.validation.rtol == 1e-3
    assert not m.is_expired()
    assert m.is_expired(now=4_000_000_000.0)


def test_missing_name() -> None:
    d = valid_doc()
    del d["name"]
    assert "'name'" in _invalid(d)


@pytest.mark.parametrize("bad", [0, -1, "1", True, 1.5, None])
def test_bad_version_field(bad: Any) -> None:
    d = valid_doc()
    d["version"] = bad
    assert "version" in _invalid(d)


@pytest.mark.parametrize("bad", [0, "1", True, 1.0])
def test_bad_schema_v(bad: Any) -> None:
    d = valid_doc()
    d["v"] = bad
    assert "manifest v" in _invalid(d)


def test_newer_schema_v_is_unsupported_version() -> None:
    d = valid_doc()
    d["v"] = 2
    with pytest.raises(errors.RejectError) as ei:
        parse_document(d)
    assert ei.value.code == errors.UNSUPPORTED_VERSION


@pytest.mark.parametrize("bad", ["A" * 64, "a" * 63, "g" * 64, 123])
def test_bad_sha256(bad: Any) -> None:
    d = valid_doc()
    d["variants"][0]["files"][0]["sha256"] = bad
    assert "variants[0].files[0]" in _invalid(d)


@pytest.mark.parametrize("bad", ["../model.onnx", "a/../../etc/passwd", "/etc/passwd", "a//b",
                                 "./model.onnx", "", "manifest.json", "dir/", None])
def test_bad_paths(bad: Any) -> None:
    d = valid_doc()
    d["variants"][0]["files"][0]["path"] = bad
    assert "variants[0].files[0].path" in _invalid(d)


def test_bad_size() -> None:
    d = valid_doc()
    d["files"][0]["size"] = -1
    assert "files[0].size" in _invalid(d)
    d["files"][0]["size"] = "3"
    assert "files[0]" in _invalid(d)


def test_unknown_format_and_precision() -> None:
    d = valid_doc()
    d["variants"][1]["format"] = "tensorflow"
    assert "variants[1].format" in _invalid(d)
    d = valid_doc()
    d["variants"][0]["precision"] = "bf16"
    assert "variants[0].precision" in _invalid(d)


def test_duplicate_variant_id() -> None:
    d = valid_doc()
    d["variants"][1]["id"] = "onnx-fp32"
    msg = _invalid(d)
    assert "variants[1].id" in msg and "onnx-fp32" in msg


def test_same_path_with_different_hash() -> None:
    d = valid_doc()
    d["variants"][1]["files"].append({"path": "labels.txt", "size": 3, "sha256": SHA_A})
    assert "labels.txt" in _invalid(d)


def test_same_path_with_same_entry_is_fine() -> None:
    d = valid_doc()
    d["variants"][1]["files"].append(copy.deepcopy(d["files"][0]))
    parse_document(d)


def test_validation_file_not_listed() -> None:
    d = valid_doc()
    d["validation"]["expected"] = "samples/other.npz"
    assert "samples/other.npz" in _invalid(d)


def test_validation_bad_tolerance_and_slo() -> None:
    d = valid_doc()
    d["validation"]["rtol"] = -1
    assert "validation.rtol" in _invalid(d)
    d = valid_doc()
    d["validation"]["max_p95_ms"] = 0
    assert "validation.max_p95_ms" in _invalid(d)
    d["validation"]["max_p95_ms"] = True
    assert "validation.max_p95_ms" in _invalid(d)


def test_too_many_files() -> None:
    d = valid_doc()
    d["files"] += [{"path": f"extra/{i}.bin", "size": 1, "sha256": SHA_A} for i in range(MAX_FILES)]
    assert str(MAX_FILES) in _invalid(d)


def test_io_and_variants_required() -> None:
    d = valid_doc()
    d["io"]["outputs"] = []
    assert "io" in _invalid(d)
    d = valid_doc()
    d["variants"] = []
    assert "no variants" in _invalid(d)
    d = valid_doc()
    d["io"]["inputs"][0]["dtype"] = "complex64"
    assert "io.inputs[0].dtype" in _invalid(d)


def test_bad_timestamps() -> None:
    d = valid_doc()
    d["expires_at"] = "tomorrow"
    assert "expires_at" in _invalid(d)
    d = valid_doc()
    d["expires_at"] = "2036-01-01T00:00:00"  # no zone
    assert "expires_at" in _invalid(d)
    d = valid_doc()
    del d["expires_at"]
    assert "expires_at" in _invalid(d)


def test_not_an_object() -> None:
    _invalid([1, 2])


def test_files_for_includes_variant_common_and_samples() -> None:
    d = valid_doc()
    d["files"] = [{"path": "labels.txt", "size": 3, "sha256": SHA_D}]
    # Samples listed under a variant are still found for any variant.
    d["variants"][0]["files"] += [{"path": "samples/input.npz", "size": 5, "sha256": SHA_E},
                                  {"path": "samples/expected.npz", "size": 6, "sha256": SHA_B}]
    m = parse_document(d)
    ov = {f.path for f in m.files_for(m.variant("openvino-fp16"))}
    assert ov == {"openvino/model.xml", "openvino/model.bin", "labels.txt",
                  "samples/input.npz", "samples/expected.npz"}
    ox = {f.path for f in m.files_for(m.variant("onnx-fp32"))}
    assert ox == {"model.onnx", "labels.txt", "samples/input.npz", "samples/expected.npz"}
    assert "openvino/model.bin" not in ox


# ---------------------------------------------------------------- signed manifests


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def _trust(*keys: Ed25519PrivateKey) -> TrustStore:
    return TrustStore({key_id(k.public_key()): k.public_key() for k in keys})


def test_sign_and_verify_manifest(key: Ed25519PrivateKey) -> None:
    raw = sign_manifest(valid_doc(), [key])
    m = verify_manifest(raw, _trust(key), 1)
    assert (m.name, m.version) == ("detector", 7)


def test_verify_manifest_signature_errors(key: Ed25519PrivateKey) -> None:
    other = Ed25519PrivateKey.generate()
    raw = sign_manifest(valid_doc(), [key])
    with pytest.raises(errors.RejectError) as ei:
        verify_manifest(raw, _trust(other), 1)
    assert ei.value.code == errors.UNTRUSTED_KEY
    with pytest.raises(errors.RejectError) as ei:
        verify_manifest(raw, _trust(key, other), 2)
    assert ei.value.code == errors.THRESHOLD_NOT_MET
    env = json.loads(raw)
    doc = json.loads(base64.b64decode(env["payload"]))
    doc["version"] = 8
    env["payload"] = base64.b64encode(json.dumps(doc).encode()).decode()
    with pytest.raises(errors.RejectError) as ei:
        verify_manifest(json.dumps(env).encode(), _trust(key), 1)
    assert ei.value.code == errors.BAD_SIGNATURE


def test_verify_manifest_over_cap(key: Ed25519PrivateKey) -> None:
    d = valid_doc()
    d["description"] = "x" * MAX_MANIFEST_BYTES
    raw = sign_manifest(d, [key])
    assert len(raw) > MAX_MANIFEST_BYTES
    with pytest.raises(errors.RejectError) as ei:
        verify_manifest(raw, _trust(key), 1)
    assert ei.value.code == errors.INVALID_MANIFEST
    assert "cap" in ei.value.message


def test_verify_manifest_bad_json_payload(key: Ed25519PrivateKey) -> None:
    env = dsse.sign(dsse.MANIFEST_TYPE, b"{not json", [key])
    with pytest.raises(errors.RejectError) as ei:
        verify_manifest(json.dumps(env).encode(), _trust(key), 1)
    assert ei.value.code == errors.INVALID_MANIFEST


def test_verify_manifest_envelope_not_json(key: Ed25519PrivateKey) -> None:
    with pytest.raises(errors.RejectError) as ei:
        verify_manifest(b"<html>not found</html>", _trust(key), 1)
    assert ei.value.code == errors.INVALID_MANIFEST


def test_verify_manifest_wrong_payload_type(key: Ed25519PrivateKey) -> None:
    payload = json.dumps(valid_doc()).encode()
    env = dsse.sign(dsse.COMMAND_TYPE, payload, [key])
    with pytest.raises(errors.RejectError) as ei:
        verify_manifest(json.dumps(env).encode(), _trust(key), 1)
    assert ei.value.code == errors.INVALID_MANIFEST


def test_verify_manifest_schema_error_after_signature(key: Ed25519PrivateKey) -> None:
    d = valid_doc()
    d["variants"][0]["files"][0]["path"] = "../../evil"
    with pytest.raises(errors.RejectError) as ei:
        verify_manifest(sign_manifest(d, [key]), _trust(key), 1)
    assert ei.value.code == errors.INVALID_MANIFEST


@pytest.mark.parametrize(("file_path", "inner"), [("labels", "labels/en.txt"), ("a/b", "a/b/c/d.bin")])
def test_a_path_listed_as_a_file_and_as_a_folder_is_invalid_manifest(file_path: str, inner: str) -> None:
    doc = valid_doc()
    doc["files"] += [{"path": file_path, "size": 1, "sha256": SHA_D}, {"path": inner, "size": 1, "sha256": SHA_E}]
    with pytest.raises(errors.RejectError) as ei:
        parse_document(doc)
    assert ei.value.code == errors.INVALID_MANIFEST
    assert repr(file_path) in ei.value.message and repr(inner) in ei.value.message


def test_a_variant_file_inside_a_common_files_path_is_invalid_manifest() -> None:
    doc = valid_doc()
    doc["files"] += [{"path": "model.onnx/extra", "size": 1, "sha256": SHA_E}]
    with pytest.raises(errors.RejectError) as ei:
        parse_document(doc)
    assert ei.value.code == errors.INVALID_MANIFEST and "'model.onnx/extra'" in ei.value.message


def test_sibling_paths_with_a_common_prefix_are_valid() -> None:
    doc = valid_doc()
    doc["files"] += [{"path": "labels", "size": 1, "sha256": SHA_D}, {"path": "labels2/en.txt", "size": 1, "sha256": SHA_E}]
    parse_document(doc)
