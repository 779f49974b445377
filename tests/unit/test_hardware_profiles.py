"""Profile loading/matching, backend evaluation, runtime probes and detection robustness.

These tests build small synthetic roots under tmp_path and do not need tests/data/hw-captures.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from agent.hardware import (
    detect,
    hw_report,
    load_profiles,
    match_profile,
    probe_runtimes,
    shipped_profiles_dir,
)
from agent.hardware.probe import MAX_FILE_BYTES
from agent.hardware.profiles import BackendSpec, parse_version, version_in_range
from agent.hardware.report import evaluate_backend

REPO = Path(__file__).resolve().parents[2]
SHIPPED_NAMES = {"raspberry-pi", "jetson", "intel-npu", "intel-movidius", "intel-igpu", "coral-edgetpu",
                 "generic-x86_64", "generic-arm64"}


def write(root: Path, rel: str, content: str | bytes) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)


def pi4_root(root: Path) -> Path:
    write(root, "proc/device-tree/model", b"Raspberry Pi 4 Model B Rev 1.4\x00")
    write(root, "proc/device-tree/compatible", b"raspberrypi,4-model-b\x00brcm,bcm2711\x00")
    write(root, "proc/cpuinfo", "processor\t: 0\nFeatures\t: fp asimd evtstrm crc32 cpuid\nCPU implementer\t: 0x41\n"
          "CPU architecture: 8\nCPU part\t: 0xd08\n\nRevision\t: d03114\nModel\t\t: Raspberry Pi 4 Model B Rev 1.4\n")
    write(root, "_commands/uname-m.txt", "aarch64\n")
    return root


def usb_device(root: Path, name: str, vid: str, pid: str) -> None:
    write(root, f"sys/bus/usb/devices/{name}/idVendor", vid + "\n")
    write(root, f"sys/bus/usb/devices/{name}/idProduct", pid + "\n")


@pytest.fixture(scope="module")
def shipped() -> list:
    profiles, problems = load_profiles([shipped_profiles_dir()])
    assert problems == []
    return profiles


# ----------------------------------------------------------------------------- profiles


def test_shipped_profiles_load_cleanly(shipped: list) -> None:
    assert shipped_profiles_dir() == REPO / "hw-profiles"
    assert {p.name for p in shipped} == SHIPPED_NAMES
    for p in shipped:
        assert Path(p.path).stem == p.name
        assert p.backends and all(b.why for b in p.backends)
    prio = {p.name: p.priority for p in shipped}
    accelerators = ("coral-edgetpu", "intel-movidius", "intel-npu", "intel-igpu")
    boards = ("jetson", "raspberry-pi")
    assert min(prio[a] for a in accelerators) > max(prio[b] for b in boards)
    assert min(prio[b] for b in boards) > max(prio["generic-x86_64"], prio["generic-arm64"])
    movidius = next(p for p in shipped if p.name == "intel-movidius")
    assert movidius.notes and "2022.3" in movidius.notes and "2023.0" in movidius.notes


def test_override_from_earlier_directory(tmp_path: Path) -> None:
    override = tmp_path / "etc"
    write(override, "raspberry-pi.toml", """
name = "raspberry-pi"
description = "site override: ONNX Runtime only"
priority = 55
[match]
any_of = [ { board_family = "raspberry-pi" } ]
[[backends]]
runtime = "onnxruntime"
target = "CPUExecutionProvider"
precisions = ["fp32"]
why = "site policy"
""")
    profiles, problems = load_profiles([override, shipped_profiles_dir()])
    assert problems == []
    pi = next(p for p in profiles if p.name == "raspberry-pi")
    assert pi.description == "site override: ONNX Runtime only"
    assert Path(pi.path).parent == override
    assert len([p for p in profiles if p.name == "raspberry-pi"]) == 1
    facts = detect(pi4_root(tmp_path / "root"))
    match = match_profile(facts, profiles)
    assert match.name == "raspberry-pi"
    assert match.backends[0].spec.name == "onnxruntime:CPUExecutionProvider"
    assert all(b.profile in ("raspberry-pi", "generic-arm64") for b in match.backends)
    # Order matters: the shipped directory first means the shipped file wins.
    profiles, _ = load_profiles([shipped_profiles_dir(), override])
    assert next(p for p in profiles if p.name == "raspberry-pi").description != "site override: ONNX Runtime only"


@pytest.mark.parametrize(("content", "reason"), [
    ("name = 'broken\n", "invalid TOML"),
    ("name = 'x'\ndescription = 'd'\npriority = 1\n[match]\nany_of = [{ bogus = 'y' }]\n"
     "[[backends]]\nruntime = 'onnxruntime'\ntarget = 'CPUExecutionProvider'\nprecisions = ['fp32']\nwhy = 'w'\n",
     "unknown predicate"),
    ("name = 'x'\ndescription = 'd'\npriority = 1\n[match]\nany_of = [{ arch = 'x86_64' }]\n"
     "[[backends]]\nruntime = 'pytorch'\ntarget = 'CPU'\nprecisions = ['fp32']\nwhy = 'w'\n", "runtime"),
    ("name = 'x'\ndescription = 'd'\npriority = 'high'\n[match]\nany_of = [{ arch = 'x86_64' }]\n"
     "[[backends]]\nruntime = 'onnxruntime'\ntarget = 'CPUExecutionProvider'\nprecisions = ['fp32']\nwhy = 'w'\n",
     "priority"),
    ("name = 'x'\ndescription = 'd'\npriority = 1\n[match]\n"
     "[[backends]]\nruntime = 'onnxruntime'\ntarget = 'CPUExecutionProvider'\nprecisions = ['fp32']\nwhy = 'w'\n",
     "no rules"),
    ("name = 'x'\ndescription = 'd'\npriority = 1\n[match]\nany_of = [{ arch = 'x86_64' }]\n"
     "[[backends]]\nruntime = 'onnxruntime'\ntarget = 'CPUExecutionProvider'\nprecisions = ['fp32']\n", "why"),
    ("name = 'x'\ndescription = 'd'\npriority = 1\n[match]\nany_of = [{ board = '(' }]\n"
     "[[backends]]\nruntime = 'onnxruntime'\ntarget = 'CPUExecutionProvider'\nprecisions = ['fp32']\nwhy = 'w'\n",
     "regular expression"),
])
def test_malformed_profile_is_reported_not_fatal(tmp_path: Path, content: str, reason: str) -> None:
    local = tmp_path / "etc"
    write(local, "zz-bad.toml", content)
    profiles, problems = load_profiles([local, shipped_profiles_dir()])
    assert {p.name for p in profiles} == SHIPPED_NAMES
    assert len(problems) == 1
    assert problems[0].path == str(local / "zz-bad.toml")
    assert reason in problems[0].reason
    report = hw_report(pi4_root(tmp_path / "root"), profiles_dirs=[local, shipped_profiles_dir()])
    assert report["profile"] == "raspberry-pi"
    assert report["profile_problems"] == [{"path": str(local / "zz-bad.toml"), "reason": problems[0].reason}]


def test_missing_directory_is_skipped(tmp_path: Path) -> None:
    profiles, problems = load_profiles([tmp_path / "nope", shipped_profiles_dir()])
    assert {p.name for p in profiles} == SHIPPED_NAMES and problems == []


def test_forced_profile(tmp_path: Path, shipped: list) -> None:
    facts = detect(pi4_root(tmp_path))
    match = match_profile(facts, shipped, forced="intel-npu")
    assert match.name == "intel-npu" and match.forced
    assert "do not match" in match.reason
    assert {b.profile for b in match.backends} == {"intel-npu"}
    fallback = match_profile(facts, shipped, forced="no-such-profile")
    assert fallback.name == "raspberry-pi" and not fallback.forced
    assert "no-such-profile" in fallback.reason and "fell back" in fallback.reason
    report = hw_report(tmp_path, profiles_dirs=[shipped_profiles_dir()], forced="generic-arm64")
    assert report["profile"] == "generic-arm64" and report["profile_forced"] is True


def test_pi_with_usb_coral_synthetic(tmp_path: Path, shipped: list) -> None:
    root = pi4_root(tmp_path)
    usb_device(root, "1-1.2", "18d1", "9302")
    usb_device(root, "1-1", "2109", "3431")
    facts = detect(root)
    assert facts.accelerators["coral_edgetpu"]["present"] is True
    assert facts.accelerators["movidius_vpu"]["present"] is False  # sysfs USB was examined
    match = match_profile(facts, shipped)
    assert [n for n, _ in match.matched] == ["coral-edgetpu", "raspberry-pi", "generic-arm64"]
    names = [b.spec.name for b in match.backends]
    assert names[0] == "tflite:edgetpu"
    assert len(names) == len(set(names))


def test_no_profile_matches_gives_cpu_fallback(tmp_path: Path) -> None:
    write(tmp_path, "_commands/uname-m.txt", "riscv64\n")
    report = hw_report(tmp_path, profiles_dirs=[shipped_profiles_dir()])
    assert report["profile"] is None and "no profile matched" in report["profile_reason"]
    assert [b["name"] for b in report["backends"]] == ["onnxruntime:CPUExecutionProvider"]


def test_precision_requires_drops_fp16_without_cpu_support(tmp_path: Path) -> None:
    report = hw_report(pi4_root(tmp_path), profiles_dirs=[shipped_profiles_dir()])
    xnn = next(b for b in report["backends"] if b["name"] == "tflite:xnnpack")
    assert "fp16" not in xnn["precisions"]  # Cortex-A72 has no asimdhp
    assert xnn["precisions_dropped"] == ["fp16: CPU lacks fp16"]


# ----------------------------------------------------------------------------- backend evaluation


def test_myriad_backend_gated_by_openvino_version(tmp_path: Path, shipped: list) -> None:
    usb_device(tmp_path, "1-3", "03e7", "2485")
    write(tmp_path, "_commands/uname-m.txt", "x86_64\n")
    facts = dataclasses.replace(detect(tmp_path), captured=False)  # pretend it is the live system
    spec = next(b for p in shipped if p.name == "intel-movidius" for b in p.backends if b.target == "MYRIAD")
    new = {"openvino": {"available": True, "version": "2024.6.0-17404", "devices": ["CPU"]}}
    usable, reason = evaluate_backend(spec, facts, new)
    assert not usable and "2023.0" in reason
    old = {"openvino": {"available": True, "version": "2022.3.1", "devices": ["CPU", "MYRIAD"]}}
    assert evaluate_backend(spec, facts, old)[0] is True
    missing = {"openvino": {"available": False, "reason": "openvino not installed"}}
    assert evaluate_backend(spec, facts, missing) == (False, "openvino not installed")


def test_cuda_backend_needs_gpu_and_provider(tmp_path: Path) -> None:
    write(tmp_path, "_commands/uname-m.txt", "x86_64\n")
    write(tmp_path, "proc/driver/nvidia/gpus/0000:01:00.0/information", "Model: \t\t NVIDIA RTX A2000\n")
    facts = dataclasses.replace(detect(tmp_path), captured=False)
    assert facts.accelerators["nvidia_gpu"]["ready"] is True
    spec = BackendSpec(runtime="onnxruntime", target="CUDAExecutionProvider", precisions=("fp16",),
                       why="w", requires=("nvidia_gpu",))
    cpu_only = {"onnxruntime": {"available": True, "version": "1.20", "providers": ["CPUExecutionProvider"]}}
    usable, reason = evaluate_backend(spec, facts, cpu_only)
    assert not usable and "CUDAExecutionProvider not in onnxruntime" in reason
    gpu = {"onnxruntime": {"available": True, "version": "1.20",
                           "providers": ["CUDAExecutionProvider", "CPUExecutionProvider"]}}
    assert evaluate_backend(spec, facts, gpu)[0] is True


def test_version_helpers() -> None:
    assert parse_version("2024.4.0-16579-c3152d32c9c-releases/2024/4") == (2024, 4, 0)
    assert version_in_range("2022.3.1", None, "2023.0") == (True, "")
    assert version_in_range("2023.0.0", None, "2023.0")[0] is False
    assert version_in_range(None, "1.0", None)[0] is False


# ----------------------------------------------------------------------------- live system


@pytest.mark.skipif(platform.machine() != "x86_64", reason="expects an x86_64 test machine")
def test_hw_report_on_this_machine() -> None:
    report = hw_report("/")
    assert report["captured"] is False and report["runtimes_probed"] is True
    assert report["profile"] == "generic-x86_64", report["profile_reason"]
    assert report["facts"]["architecture"] == "x86_64"
    cpu = next(b for b in report["backends"] if b["name"] == "onnxruntime:CPUExecutionProvider")
    assert cpu["usable"] is True, cpu
    assert "CPUExecutionProvider listed by onnxruntime" in cpu["reason"]
    for b in report["backends"]:
        if "nvidia_gpu" in b["requires"]:
            assert b["usable"] is False and b["reason"].startswith("hardware:")
    assert report["selected_backend"] is not None


def test_probe_runtimes_shape() -> None:
    rt = probe_runtimes()
    assert set(rt) == {"onnxruntime", "openvino", "tflite"}
    for info in rt.values():
        assert isinstance(info["available"], bool) and info["reason"]
    assert rt["onnxruntime"]["available"] is True  # a test dependency
    assert "CPUExecutionProvider" in rt["onnxruntime"]["providers"]
    assert "edgetpu" in rt["tflite"]["delegates"]


def test_runtime_probe_writes_nothing_under_home(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORT_", "CI"))}
    env["HOME"] = str(home)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    code = ("import sys, agent.hardware.runtimes as r\n"
            "assert 'onnxruntime' not in sys.modules and 'openvino' not in sys.modules\n"
            "out = r.probe_runtimes()\n"
            "assert out['onnxruntime']['available'], out\n")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120, cwd=tmp_path)
    assert list(home.rglob("*")) == []


# ----------------------------------------------------------------------------- robustness


def test_detect_never_raises_on_odd_roots(tmp_path: Path) -> None:
    facts = detect(tmp_path / "does-not-exist")
    assert facts.architecture is None and facts.unknown["architecture"]
    (tmp_path / "proc" / "cpuinfo").mkdir(parents=True)  # a directory where a file is expected
    write(tmp_path, "proc/meminfo", b"\xff\xfe\x00garbage")
    write(tmp_path, "proc/device-tree/model", b"\x00\x00")
    write(tmp_path, "proc/bus/pci/devices", "zz\tnot-hex\n0000\t\n")
    write(tmp_path, "_commands/lsusb.txt", b"\x00\xff random bytes")
    write(tmp_path, "sys/class/thermal/thermal_zone0/temp", "not a number\n")
    facts = detect(tmp_path)
    assert facts.board is None and facts.unknown["board"]
    assert facts.thermal_zones == [{"zone": "thermal_zone0", "type": None, "temp_c": None}]
    facts.to_dict()


def test_reads_are_bounded(tmp_path: Path) -> None:
    block = "processor\t: {n}\nflags\t\t: fpu lm avx2\n\n"
    text = "".join(block.format(n=i) for i in range(20000))
    assert len(text) > MAX_FILE_BYTES
    write(tmp_path, "proc/cpuinfo", text)
    facts = detect(tmp_path)
    assert facts.architecture == "x86_64"
    assert facts.cpu_count is not None and facts.cpu_count < 20000


def test_live_root_sources(tmp_path: Path) -> None:
    facts = detect("/")
    assert facts.captured is False
    assert facts.evidence["architecture"] == "os.uname().machine"
    assert facts.architecture == platform.machine()
