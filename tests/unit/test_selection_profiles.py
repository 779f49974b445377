"""Selection tables: real hardware captures × bundle variants → the choice and its explanation.

Each row runs the real detection on a capture from tests/data/hw-captures, the real profile match
and ``policy_from_report``, then ``select``. What cannot exist on this machine — CUDA/TensorRT
providers, an NPU or MYRIAD device in OpenVINO, libedgetpu and an attached Coral — is faked at the
narrowest boundary only: the provider/device/delegate lists handed to the backends' pure verdict
functions (``ort_targets``, ``openvino_targets``, ``tflite_targets``), exactly what
``onnxruntime.get_available_providers()``, ``Core().available_devices`` and the delegate probe
would return on such a device. Nothing else is faked.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import HW_CAPTURES

from agent import errors
from agent.backends import onnxruntime as ortb
from agent.backends import openvino as ovb
from agent.backends import tflite as tfb
from agent.backends.base import Target
from agent.backends.selection import Policy, policy_from_report, select
from agent.bundles.manifest import Manifest, parse_document
from agent.hardware import hw_report, shipped_profiles_dir

CAPTURES = HW_CAPTURES
ORT_CPU_ONLY = ["CPUExecutionProvider"]
ORT_GPU = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def bundle(*variants: str) -> Manifest:
    """variants: ids like ``onnx-fp32`` / ``openvino-fp16`` / ``tflite-int8`` (format-precision)."""
    vs = []
    for i, vid in enumerate(variants):
        fmt, prec = vid.split("-")
        ext = {"onnx": "onnx", "tflite": "tflite", "openvino": "xml"}[fmt]
        vs.append({"id": vid, "format": fmt, "precision": prec,
                   "files": [{"path": f"{vid}/model.{ext}", "size": 1, "sha256": "0123456789abcdef"[i] * 64}]})
    return parse_document({
        "v": 1, "name": "det", "version": 1, "expires_at": "2036-01-01T00:00:00Z",
        "io": {"inputs": [{"name": "x", "dtype": "float32", "shape": [1, 4]}],
               "outputs": [{"name": "y", "dtype": "float32", "shape": [1, 3]}]},
        "variants": vs})


def policy(capture: str) -> Policy:
    return policy_from_report(hw_report(CAPTURES / capture, profiles_dirs=[shipped_profiles_dir()]))


def targets(ort: list[str] | None = None, nvidia: bool = False, trt_libs: bool = False,
            ov: list[str] | None = None, ov_version: str = "2026.4.1", tflite: bool = True,
            edgetpu_lib: str | None = None, coral: bool = False) -> list[Target]:
    """The device's targets from injected runtime answers (the narrowest fake; see the module doc)."""
    out = ortb.ort_targets(ort if ort is not None else ORT_CPU_ONLY, "1.32.0", nvidia, trt_libs)
    out += ovb.openvino_targets(ov if ov is not None else ["CPU"], ov_version)
    out += tfb.tflite_targets("ai-edge-litert 2.3.0" if tflite else None, "no TFLite runtime", edgetpu_lib, coral)
    return out


ALL = ("onnx-fp32", "onnx-fp16", "onnx-int8", "openvino-fp32", "openvino-fp16", "tflite-fp32", "tflite-int8")

# capture, injected runtime answers, bundle variants → (chosen backend, chosen variant), a phrase of the why
TABLE: list[tuple[str, dict[str, Any], tuple[str, ...], tuple[str, str], str]] = [
    ("raspberry-pi-4b-8gb-aarch64-buster", {}, ALL, ("tflite:xnnpack", "tflite-int8"), "profile raspberry-pi"),
    ("raspberry-pi-4b-8gb-aarch64-buster", {}, ("onnx-fp32", "onnx-int8"),
     ("onnxruntime:CPUExecutionProvider", "onnx-int8"), "ranked #2"),
    ("raspberry-pi-3b-armv7l-raspbian9", {"tflite": False}, ("onnx-fp32", "tflite-int8"),
     ("onnxruntime:CPUExecutionProvider", "onnx-fp32"), "profile raspberry-pi"),
    # A Pi 3 with a Coral USB stick: the accelerator's profile, the Edge TPU first.
    ("coral-usb-on-raspberry-pi-3-before-firmware-load", {"edgetpu_lib": "libedgetpu.so.1", "coral": True},
     ("onnx-fp32", "tflite-fp32", "tflite-int8"), ("tflite:edgetpu", "tflite-int8"), "profile coral-edgetpu"),
    # Same stick, libedgetpu not installed: the board's CPU path, int8 first.
    ("coral-usb-on-raspberry-pi-3-before-firmware-load", {}, ("onnx-fp32", "tflite-fp32", "tflite-int8"),
     ("tflite:xnnpack", "tflite-int8"), "ranked #2"),
    # Coral PCIe on a Pi 5 whose apex driver is not bound: the profile blocks the Edge TPU even
    # though the delegate would load.
    ("coral-pcie-dual-edgetpu-on-raspberry-pi-5", {"edgetpu_lib": "libedgetpu.so.1", "coral": True},
     ("tflite-int8", "onnx-fp32"), ("tflite:xnnpack", "tflite-int8"), "profile coral-edgetpu"),
    # Jetson Nano with JetPack: TensorRT in fp16.
    ("jetson-nano-l4t-r32.7.6", {"ort": ORT_GPU, "nvidia": True, "trt_libs": True},
     ("onnx-fp32", "onnx-fp16", "tflite-fp32"), ("onnxruntime:TensorrtExecutionProvider", "onnx-fp16"), "profile jetson"),
    # TensorRT libraries missing: CUDA in fp16.
    ("jetson-nano-l4t-r32.7.6", {"ort": ORT_GPU, "nvidia": True, "trt_libs": False},
     ("onnx-fp32", "onnx-fp16"), ("onnxruntime:CUDAExecutionProvider", "onnx-fp16"), "ranked #2"),
    # A Xavier known only from cpuinfo: no evidence of the L4T GPU driver, so no GPU backend even
    # if an onnxruntime-gpu build lists the providers.
    ("jetson-agx-xavier-l4t-5.10-cpuinfo-only", {"ort": ORT_GPU, "nvidia": True, "trt_libs": True},
     ("onnx-fp32", "onnx-fp16", "tflite-fp32"), ("tflite:xnnpack", "tflite-fp32"), "profile jetson"),
    # Meteor Lake with the NPU driver: OpenVINO on the NPU, IR fp16 over ONNX fp16.
    ("intel-meteor-lake-npu-host-no-cpuinfo", {"ov": ["CPU", "NPU"]}, ALL, ("openvino:NPU", "onnx-int8"), "profile intel-npu"),
    ("intel-meteor-lake-npu-host-no-cpuinfo", {"ov": ["CPU", "NPU"]}, ("onnx-fp32", "openvino-fp32", "openvino-fp16"),
     ("openvino:NPU", "openvino-fp16"), "profile intel-npu"),
    # NPU present but OpenVINO does not list it (user-space driver missing): OpenVINO CPU.
    ("intel-meteor-lake-npu-host-no-cpuinfo", {"ov": ["CPU"]}, ("onnx-fp32", "openvino-fp32", "openvino-fp16"),
     ("openvino:CPU", "openvino-fp32"), "ranked #3"),
    # Myriad X with OpenVINO 2026: the MYRIAD plugin is gone, OpenVINO CPU.
    ("intel-myriadx-03e7-2485-lsusb-fragment", {}, ("onnx-fp32", "openvino-fp16"), ("openvino:CPU", "onnx-fp32"),
     "profile intel-movidius"),
    # ... and with OpenVINO 2022.3 that still lists it: the VPU.
    ("intel-myriadx-03e7-2485-lsusb-fragment", {"ov": ["CPU", "MYRIAD"], "ov_version": "2022.3.0"},
     ("onnx-fp32", "openvino-fp16"), ("openvino:MYRIAD", "openvino-fp16"), "profile intel-movidius"),
    ("amd-epyc-7451-server", {}, ("onnx-fp32", "openvino-fp32", "tflite-fp32"), ("openvino:CPU", "openvino-fp32"),
     "profile generic-x86_64"),
    ("amd-epyc-7451-server", {}, ("onnx-fp32",), ("openvino:CPU", "onnx-fp32"), "profile generic-x86_64"),
    ("amd-epyc-7451-server", {"ov": []}, ("onnx-fp32", "tflite-fp32"), ("onnxruntime:CPUExecutionProvider", "onnx-fp32"),
     "ranked #4"),
    ("aws-graviton3-ubuntu20.04", {}, ("onnx-fp32", "tflite-fp32", "openvino-fp32"), ("tflite:xnnpack", "tflite-fp32"),
     "profile generic-arm64"),
    ("rockchip-rk3588-radxa-rock5b-cpuinfo-only", {}, ("onnx-fp32", "tflite-fp16", "tflite-fp32"),
     ("tflite:xnnpack", "tflite-fp16"), "profile generic-arm64"),
]


@pytest.mark.parametrize(("capture", "runtime", "variants", "expected", "phrase"), TABLE,
                         ids=[f"{r[0]}:{r[3][0]}:{r[3][1]}" for r in TABLE])
def test_selection_table(capture: str, runtime: dict[str, Any], variants: tuple[str, ...],
                         expected: tuple[str, str], phrase: str) -> None:
    pol = policy(capture)
    d = select(bundle(*variants), targets(**runtime), policy=pol)
    assert (d.chosen.target.id, d.chosen.variant.id) == expected, d.explain()
    ex = d.explain()
    assert ex["profile"] == pol.profile
    assert phrase in ex["chosen"]["why"], ex["chosen"]
    assert ex["chosen"]["rationale"].startswith(f"{pol.profile}:") or "ranked #" in ex["chosen"]["why"]
    # Every usable target that is not chosen either ranks below or says why it is unusable.
    seen = {c["backend"] for c in ex["ranked"]} | {u["backend"] for u in ex["unusable"]}
    assert seen == {t.id for t in targets(**runtime)}
    assert all(u["reason"] for u in ex["unusable"])


def test_blocked_accelerator_is_explained_with_the_hardware_reason() -> None:
    pol = policy("coral-pcie-dual-edgetpu-on-raspberry-pi-5")
    d = select(bundle("tflite-int8"), targets(edgetpu_lib="libedgetpu.so.1", coral=True), policy=pol)
    reason = {u["backend"]: u["reason"] for u in d.explain()["unusable"]}["tflite:edgetpu"]
    assert reason.startswith("profile coral-edgetpu: hardware:") and "apex" in reason


def test_missing_runtime_device_is_explained() -> None:
    pol = policy("intel-myriadx-03e7-2485-lsusb-fragment")
    d = select(bundle("onnx-fp32", "openvino-fp16"), targets(), policy=pol)
    reason = {u["backend"]: u["reason"] for u in d.explain()["unusable"]}["openvino:MYRIAD"]
    assert "2022.3" in reason and "2026.4.1" in reason


def test_pi_with_coral_takes_accelerator_profile_then_board_backends() -> None:
    rep = hw_report(CAPTURES / "coral-pcie-dual-edgetpu-on-raspberry-pi-5", profiles_dirs=[shipped_profiles_dir()])
    assert rep["profile"] == "coral-edgetpu"
    pol = policy_from_report(rep)
    names = [n for n, _ in pol.ranking]
    assert names[0] == "tflite:edgetpu"
    assert names.index("tflite:xnnpack") < names.index("onnxruntime:CPUExecutionProvider")
    assert pol.why["onnxruntime:CPUExecutionProvider"].startswith("coral-edgetpu:")


def test_pin_overrides_profile_and_unusable_pin_is_refused() -> None:
    pol = policy("raspberry-pi-4b-8gb-aarch64-buster")
    d = select(bundle(*ALL), targets(), pin="onnxruntime:CPUExecutionProvider", policy=pol)
    assert {c.target.id for c in d.candidates} == {"onnxruntime:CPUExecutionProvider"}
    assert d.chosen.variant.id == "onnx-int8"  # the profile's precision order still applies
    assert "pinned" in d.chosen.why
    with pytest.raises(errors.RejectError) as ei:
        select(bundle(*ALL), targets(), pin="tflite:edgetpu", policy=pol)
    assert ei.value.code == errors.NO_COMPATIBLE_BACKEND and "libedgetpu" in ei.value.message


def test_prefer_comes_before_profile() -> None:
    pol = policy("raspberry-pi-4b-8gb-aarch64-buster")
    d = select(bundle(*ALL), targets(), prefer=["openvino:CPU"], policy=pol)
    assert d.chosen.target.id == "openvino:CPU"
    assert "prefer" in d.chosen.why


def test_no_profile_uses_default_ranking(tmp_path: Path) -> None:
    pol = policy_from_report(hw_report(tmp_path, profiles_dirs=[shipped_profiles_dir()]))
    assert pol.profile is None and not pol.ranking
    d = select(bundle("onnx-fp32", "tflite-fp32"), targets(ov=[]), policy=pol)
    assert d.chosen.target.id == "onnxruntime:CPUExecutionProvider"
    assert "default ranking" in d.chosen.why


def test_nothing_runs_is_no_compatible_backend_with_reasons() -> None:
    pol = policy("raspberry-pi-4b-8gb-aarch64-buster")
    with pytest.raises(errors.RejectError) as ei:
        select(bundle("openvino-fp16"), targets(ov=[]), policy=pol)
    assert ei.value.code == errors.NO_COMPATIBLE_BACKEND
    assert "openvino:CPU" in ei.value.message


@pytest.mark.parametrize("capture", sorted(p.name for p in CAPTURES.iterdir() if p.is_dir()))
def test_agentctl_hw_root_json_contract(capture: str) -> None:
    r = subprocess.run([sys.executable, "-m", "agent.cli.agentctl", "hw", "--root", str(CAPTURES / capture), "--json"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["profile"] in {"raspberry-pi", "jetson", "intel-npu", "intel-movidius", "intel-igpu", "coral-edgetpu",
                              "generic-x86_64", "generic-arm64"}
    assert doc["backends"] and [b["rank"] for b in doc["backends"]] == list(range(1, len(doc["backends"]) + 1))
    for b in doc["backends"]:
        assert isinstance(b["name"], str) and ":" in b["name"]
        assert isinstance(b["usable"], bool) and isinstance(b["reason"], str) and b["reason"]


def test_verdict_functions_explain_every_target() -> None:
    ort = {t.target: t.availability for t in ortb.ort_targets(ORT_GPU, "1.20", nvidia_gpu=False, tensorrt_libs=False)}
    assert not ort["CUDAExecutionProvider"].usable and "no NVIDIA GPU" in ort["CUDAExecutionProvider"].reason
    assert not ort["OpenVINOExecutionProvider"].usable and "not in this onnxruntime" in ort["OpenVINOExecutionProvider"].reason
    ort = {t.target: t.availability for t in ortb.ort_targets(ORT_GPU, "1.20", nvidia_gpu=True, tensorrt_libs=False)}
    assert ort["CUDAExecutionProvider"].usable and "libnvinfer" in ort["TensorrtExecutionProvider"].reason
    ov = {t.target: t.availability for t in ovb.openvino_targets(["CPU", "GPU.0", "GPU.1"], "2025.1")}
    assert ov["GPU"].usable and "GPU.0, GPU.1" in ov["GPU"].reason and not ov["NPU"].usable
    tf = {t.target: t.availability for t in tfb.tflite_targets("ai-edge-litert 2.3.0", "", "libedgetpu.so.1", False)}
    assert not tf["edgetpu"].usable and "no Coral is attached" in tf["edgetpu"].reason
    none = tfb.tflite_targets(None, "no TFLite runtime: tflite-runtime failed to import: _ARRAY_API not found", None, False)
    assert all(not t.availability.usable and "_ARRAY_API" in t.availability.reason for t in none)
    assert ovb.compute_precision("CPU", "fp32", ["BF16", "FP32"]) == "fp32"  # never the bf16 default
    assert ovb.compute_precision("CPU", "fp16", ["BF16", "FP32"]) == "fp32"
    assert ovb.compute_precision("CPU", "fp16", ["FP16", "FP32"]) == "fp16"
    assert ovb.compute_precision("GPU.0", "fp16") == "fp16" and ovb.compute_precision("NPU", "int8") == "fp16"
    opts, prec = ortb.provider_options("TensorrtExecutionProvider", "fp16", Path("/c"), {})
    assert opts["trt_fp16_enable"] is True and opts["trt_engine_cache_path"] == "/c/tensorrt" and prec == "fp16"
    opts, prec = ortb.provider_options("TensorrtExecutionProvider", "fp32", None, {})
    assert opts["trt_fp16_enable"] is False and "trt_engine_cache_enable" not in opts and prec == "fp32"
    opts, prec = ortb.provider_options("OpenVINOExecutionProvider", "fp16", None, {"device_type": "GPU"})
    assert opts["precision"] == "FP16" and prec == "fp16"


class DictKV(dict):  # type: ignore[type-arg]
    """The state database's kv interface on a dict (autotune only needs get/put)."""

    def put(self, key: str, value: Any) -> None:
        self[key] = value


def samples_bundle(*variants: str) -> Manifest:
    m = bundle(*variants)
    raw = dict(m.raw)
    raw["files"] = [{"path": "s/in.npz", "size": 1, "sha256": "a" * 64}, {"path": "s/out.npz", "size": 1, "sha256": "b" * 64}]
    raw["validation"] = {"inputs": "s/in.npz", "expected": "s/out.npz"}
    return parse_document(raw)


def test_autotune_plan_spans_targets_and_reuses_fresh_verdicts() -> None:
    from agent.backends import autotune

    pol = policy("amd-epyc-7451-server")
    m = samples_bundle("onnx-int8", "onnx-fp32", "openvino-fp32", "tflite-fp32")
    d = select(m, targets(), policy=pol)
    assert [c.target.id for c in d.candidates[:3]] == ["openvino:CPU"] * 3
    kv = DictKV()
    picked = autotune.plan(d, m, kv, "k", enabled=True, pinned=False)
    assert [(d.candidates[i].target.id, d.candidates[i].variant.id) for i in picked] == [
        ("openvino:CPU", "onnx-int8"), ("openvino:CPU", "openvino-fp32"), ("onnxruntime:CPUExecutionProvider", "onnx-fp32")]
    assert d.autotune == {"state": "planned", "key": "k", "candidates": 3}
    kv["k"] = {"winner": {"variant": "onnx-int8", "backend": "onnxruntime:CPUExecutionProvider"}, "measured": [], "at": 1000.0}
    d2 = select(m, targets(), policy=pol)
    assert autotune.plan(d2, m, kv, "k", enabled=True, pinned=False, now=2000.0) == []
    assert (d2.chosen.target.id, d2.chosen.variant.id) == ("onnxruntime:CPUExecutionProvider", "onnx-int8")
    assert d2.autotune is not None and d2.autotune["state"] == "cached"
    d3 = select(m, targets(), policy=pol)  # a month later the verdict is measured again
    assert autotune.plan(d3, m, kv, "k", enabled=True, pinned=False, now=1000.0 + autotune.CACHE_TTL_S + 1)
    for kw, why in (({"enabled": False, "pinned": False}, "off"), ({"enabled": True, "pinned": True}, "pins")):
        d4 = select(m, targets(), policy=pol)
        assert autotune.plan(d4, m, kv, "k", **kw) == [] and why in d4.autotune["why"]  # type: ignore[index]
    d5 = select(bundle("onnx-fp32", "onnx-int8"), targets(), policy=pol)
    assert autotune.plan(d5, bundle("onnx-fp32"), kv, "k", enabled=True, pinned=False) == []
    assert "golden inputs" in d5.autotune["why"]  # type: ignore[index]


def test_fingerprint_changes_with_hardware_and_targets() -> None:
    from agent.backends.autotune import fingerprint

    facts = {"architecture": "aarch64", "cpu_model": "Cortex-A72", "cpu_count": 4, "accelerators": {}}
    base = fingerprint(facts, targets())
    assert base == fingerprint(dict(facts), targets())
    assert fingerprint({**facts, "accelerators": {"coral_edgetpu": {"present": True}}}, targets()) != base
    assert fingerprint(facts, targets(edgetpu_lib="libedgetpu.so.1", coral=True)) != base
