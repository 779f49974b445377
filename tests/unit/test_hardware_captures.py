"""Hardware detection and profile matching against real captured device trees.

The captures live in tests/data/hw-captures (one folder per published device,
laid out like a filesystem root; see its README.md and each SOURCE.md).  Every folder there must have an
entry in EXPECTED, so a new capture cannot slip in untested.  Expectations follow what each capture can
honestly show: where a capture cannot tell something, the fact is asserted unknown with a reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from conftest import HW_CAPTURES

from agent.hardware import detect, hw_report, load_profiles, match_profile, shipped_profiles_dir

CAPTURES = HW_CAPTURES

UNSET: Any = object()


@dataclass(frozen=True)
class Expect:
    profile: str
    matched: tuple[str, ...]
    arch: str | None
    board: str | None = None
    family: str | None = None
    soc: str | None = None
    pi_gen: int | None = None
    pi_confidence: str | None = None
    jetson: str | None = None  # jetson confidence, None when not a Jetson
    l4t: str | None = None
    cpu_count: int | None = None
    cpu_model: Any = UNSET
    isa: tuple[str, ...] = ()  # tags that must be in cpu_isa
    present: dict[str, bool | None] = field(default_factory=dict)  # accelerator -> present
    usable: dict[str, bool] = field(default_factory=dict)  # backend name -> usable
    unknown: tuple[str, ...] = ()  # facts that must be unknown, with a reason
    note: str | None = None  # substring that must appear in facts.notes


NOT_ACCEL: dict[str, bool | None] = {"coral_edgetpu": None, "movidius_vpu": None, "intel_npu": None, "nvidia_gpu": None}

EXPECTED: dict[str, Expect] = {
    "amd-epyc-7451-server": Expect(
        profile="generic-x86_64", matched=("generic-x86_64",), arch="x86_64",
        cpu_count=96, cpu_model="AMD EPYC 7451 24-Core Processor", isa=("avx2", "fma", "f16c"),
        # /proc/bus/pci/devices lists 195 functions, none NVIDIA / Coral; the Intel 8086:1572 is an X710 NIC.
        present={"nvidia_gpu": False, "coral_edgetpu": False, "intel_npu": False, "intel_gpu": False,
                 "movidius_vpu": None},
        usable={"onnxruntime:CPUExecutionProvider": True, "onnxruntime:CUDAExecutionProvider": False},
        unknown=("board", "kernel_release", "memory_total_kib", "raspberry_pi", "jetson", "movidius_vpu"),
    ),
    "aws-graviton3-ubuntu20.04": Expect(
        profile="generic-arm64", matched=("generic-arm64",), arch="aarch64",
        cpu_count=1,  # the author pasted processor 0 only
        cpu_model="1x ARM Neoverse-V1", isa=("neon", "fp16", "dotprod", "i8mm", "bf16", "sve"),
        present=NOT_ACCEL, usable={"tflite:xnnpack": True},
        unknown=("board", "soc", "raspberry_pi", "jetson", "usb_devices", "pci_devices"),
    ),
    "coral-pcie-dual-edgetpu-on-raspberry-pi-5": Expect(
        # Pi with a Coral: the accelerator profile first, the Pi's (and generic arm64) backends appended.
        profile="coral-edgetpu", matched=("coral-edgetpu", "raspberry-pi", "generic-arm64"), arch="aarch64",
        family="raspberry-pi", soc="BCM2712", pi_gen=5, pi_confidence="inferred",  # from the rpi-2712 kernel
        present={"coral_edgetpu": True},
        # The apex driver is not bound (memory [disabled], no "Kernel driver in use"): present, not usable.
        usable={"tflite:edgetpu": False, "tflite:xnnpack": True, "onnxruntime:CPUExecutionProvider": True},
        unknown=("board", "raspberry_pi_model", "cpu_model", "cpu_count", "usb_devices"),
    ),
    "coral-usb-on-raspberry-pi-3-before-firmware-load": Expect(
        # lsusb only: the SMSC LAN9514 hints at a Pi 3 but proves nothing, and the architecture is unknown.
        profile="coral-edgetpu", matched=("coral-edgetpu",), arch=None,
        present={"coral_edgetpu": True, "movidius_vpu": False, "intel_npu": None},
        usable={"tflite:edgetpu": True},
        unknown=("architecture", "board", "raspberry_pi", "cpu_model", "pci_devices"),
        note="SMSC LAN9514",
    ),
    "intel-meteor-lake-npu-host-no-cpuinfo": Expect(
        profile="intel-npu", matched=("intel-npu", "generic-x86_64"), arch="x86_64",
        present={"intel_npu": True, "intel_gpu": None},
        # The iGPU every Meteor Lake has is not visible in this capture: GPU backend unusable for lack of evidence.
        usable={"openvino:NPU": True, "openvino:GPU": False, "openvino:CPU": True},
        unknown=("cpu_model", "cpu_count", "board", "intel_gpu", "pci_devices"),
    ),
    "intel-myriadx-03e7-2485-lsusb-fragment": Expect(
        profile="intel-movidius", matched=("intel-movidius",), arch=None,
        # A fragment: devices absent from it may exist, so Coral presence is "cannot tell", not "absent".
        present={"movidius_vpu": True, "coral_edgetpu": None},
        usable={"openvino:MYRIAD": True, "openvino:CPU": True},
        unknown=("architecture", "board", "coral_edgetpu"),
        note="fragment",
    ),
    "intel-ncs1-myriad2-host-lsusb-only": Expect(
        profile="intel-movidius", matched=("intel-movidius",), arch=None,
        present={"movidius_vpu": True, "coral_edgetpu": False},
        # Myriad 2 (NCS1): no OpenVINO since 2020.4 drives it, whatever the runtime.
        usable={"openvino:MYRIAD": False, "openvino:CPU": True},
        unknown=("architecture", "board", "cpu_model"),
    ),
    "jetson-agx-xavier-l4t-5.10-cpuinfo-only": Expect(
        profile="jetson", matched=("jetson", "generic-arm64"), arch="aarch64", family="jetson",
        soc="tegra194", jetson="jetson-like", cpu_count=8, isa=("fp16",),
        present={"nvidia_gpu": True},
        # cpuinfo shows Carmel cores (Tegra194) but nothing shows the L4T GPU driver.
        usable={"onnxruntime:TensorrtExecutionProvider": False, "onnxruntime:CUDAExecutionProvider": False,
                "tflite:xnnpack": True},
        unknown=("jetson_model", "l4t_release", "board", "kernel_release"),
        note="jetson-like",
    ),
    "jetson-nano-l4t-r32.7.6": Expect(
        profile="jetson", matched=("jetson", "generic-arm64"), arch="aarch64", family="jetson",
        soc="tegra210", jetson="confirmed", l4t="32.7.6",
        present={"nvidia_gpu": True},
        usable={"onnxruntime:TensorrtExecutionProvider": True, "onnxruntime:CUDAExecutionProvider": True},
        # nv_tegra_release says BOARD t210ref: Jetson Nano or TX1; nothing names the module.
        unknown=("jetson_model", "board", "cpu_model", "cpu_count"),
    ),
    "jetson-nano-mainline-5.15-cpuinfo-only": Expect(
        # Mainline kernel, cpuinfo only: 4x Cortex-A57 does not identify a Tegra X1, and without L4T there
        # is no CUDA anyway -- a generic arm64 machine, with the reason recorded.
        profile="generic-arm64", matched=("generic-arm64",), arch="aarch64", cpu_count=4,
        cpu_model="4x ARM Cortex-A57", present=NOT_ACCEL,
        usable={"tflite:xnnpack": True},
        unknown=("jetson", "board", "raspberry_pi"),
    ),
    "raspberry-pi-3b-armv7l-raspbian9": Expect(
        profile="raspberry-pi", matched=("raspberry-pi",), arch="armv7l", board="Raspberry Pi 3B Rev 1.2",
        family="raspberry-pi", soc="BCM2837", pi_gen=3, pi_confidence="confirmed", cpu_count=4, isa=("neon",),
        usable={"tflite:xnnpack": True},
        unknown=("raspberry_pi_model", "memory_total_kib", "jetson"),
    ),
    "raspberry-pi-3b-armv7l-rev1.2-a32082": Expect(
        profile="raspberry-pi", matched=("raspberry-pi",), arch="armv7l",  # inferred from cpuinfo (no uname)
        board="Raspberry Pi 3 Model B Rev 1.2", family="raspberry-pi", soc="BCM2837", pi_gen=3,
        pi_confidence="confirmed", cpu_count=4,
        unknown=("kernel_release", "jetson"),
    ),
    "raspberry-pi-4b-8gb-aarch64-buster": Expect(
        # cpuinfo truncated before Revision/Model: Pi from the -v8+ kernel flavour, Pi 4 from the Cortex-A72.
        profile="raspberry-pi", matched=("raspberry-pi", "generic-arm64"), arch="aarch64", family="raspberry-pi",
        soc="BCM2711", pi_gen=4, pi_confidence="inferred",
        usable={"tflite:xnnpack": True},
        unknown=("board", "raspberry_pi_model"),
    ),
    "raspberry-pi-4b-armv7l-canonical-fixture-composite": Expect(
        profile="raspberry-pi", matched=("raspberry-pi",), arch="armv7l",
        board="Raspberry Pi 4 Model B Rev 1.5",  # device-tree model wins over the cpuinfo Model line
        family="raspberry-pi", soc="BCM2711", pi_gen=4, pi_confidence="confirmed", cpu_count=4,
        note="disagrees with cpuinfo Model",
        unknown=("jetson",),
    ),
    "raspberry-pi-4b-armv7l-raspbian10": Expect(
        # cpuinfo truncated after Hardware: BCM2835 (generic name); the v7l+ kernel flavour says BCM2711.
        profile="raspberry-pi", matched=("raspberry-pi",), arch="armv7l", family="raspberry-pi", soc="BCM2711",
        pi_gen=4, pi_confidence="inferred", cpu_count=4,
        unknown=("board", "raspberry_pi_model"),
        note="generic name",
    ),
    "raspberry-pi-4b-rev1.1-aarch64-cpuinfo-only": Expect(
        profile="raspberry-pi", matched=("raspberry-pi", "generic-arm64"), arch="aarch64",
        board="Raspberry Pi 4 Model B Rev 1.1", family="raspberry-pi", soc="BCM2711", pi_gen=4,
        pi_confidence="confirmed", cpu_count=4, cpu_model="4x ARM Cortex-A72",
        unknown=("kernel_release",),
    ),
    "raspberry-pi-5-aarch64-trixie-raspinfo": Expect(
        profile="raspberry-pi", matched=("raspberry-pi", "generic-arm64"), arch="aarch64",
        board="Raspberry Pi 5 Model B Rev 1.0", family="raspberry-pi", soc="BCM2712", pi_gen=5,
        pi_confidence="confirmed",
        # `cpuinfo | tail -3` only: no processor blocks; `lsusb -t` has no ids.
        unknown=("cpu_count", "cpu_model", "cpu_features", "usb_devices"),
        note="no vendor:product ids",
    ),
    "rockchip-rk3588-radxa-rock5b-cpuinfo-only": Expect(
        profile="generic-arm64", matched=("generic-arm64",), arch="aarch64", cpu_count=8,
        cpu_model="4x ARM Cortex-A55 + 4x ARM Cortex-A76", isa=("fp16", "dotprod"), present=NOT_ACCEL,
        unknown=("board", "soc", "raspberry_pi", "jetson"),
    ),
}

FOLDERS = sorted(p.name for p in CAPTURES.iterdir() if p.is_dir())


@pytest.fixture(scope="module")
def shipped() -> list[Any]:
    profiles, problems = load_profiles([shipped_profiles_dir()])
    assert problems == []
    return profiles


def test_every_capture_has_an_expectation() -> None:
    missing = sorted(set(FOLDERS) - set(EXPECTED))
    stale = sorted(set(EXPECTED) - set(FOLDERS))
    assert not missing, f"captures without an expectation row: {missing}"
    assert not stale, f"expectation rows without a capture: {stale}"


@pytest.mark.parametrize("folder", FOLDERS)
def test_capture(folder: str, shipped: list[Any]) -> None:
    exp = EXPECTED.get(folder)
    if exp is None:
        pytest.fail(f"no expectation row for capture {folder}")
    facts = detect(CAPTURES / folder)
    assert facts.captured

    match = match_profile(facts, shipped)
    assert match.name == exp.profile, match.reason
    assert tuple(name for name, _ in match.matched) == exp.matched, match.reason

    assert facts.architecture == exp.arch
    if exp.arch is None:
        assert facts.unknown["architecture"]
    assert facts.board == exp.board
    assert facts.board_family == exp.family
    if exp.soc is not None:
        assert facts.soc == exp.soc
    if exp.cpu_count is not None:
        assert facts.cpu_count == exp.cpu_count
    if exp.cpu_model is not UNSET:
        assert facts.cpu_model == exp.cpu_model
    assert set(exp.isa) <= set(facts.cpu_isa), facts.cpu_isa

    if exp.pi_gen is None:
        assert facts.raspberry_pi is None or exp.family == "raspberry-pi"
    else:
        assert facts.raspberry_pi is not None
        assert facts.raspberry_pi["generation"] == exp.pi_gen
        assert facts.raspberry_pi["confidence"] == exp.pi_confidence
        assert facts.raspberry_pi["evidence"]

    if exp.jetson is None:
        assert facts.jetson is None
    else:
        assert facts.jetson is not None
        assert facts.jetson["confidence"] == exp.jetson
        assert facts.jetson["l4t_release"] == exp.l4t
        assert facts.jetson["evidence"]

    for name, present in exp.present.items():
        acc = facts.accelerators[name]
        assert acc["present"] is present, (name, acc)
        assert acc["reason"]

    for name in exp.unknown:
        assert facts.unknown.get(name), f"{name} should be unknown with a reason; unknown={facts.unknown}"

    if exp.note:
        assert any(exp.note in n for n in facts.notes), facts.notes

    report = hw_report(CAPTURES / folder, profiles_dirs=[shipped_profiles_dir()])
    assert report["profile"] == exp.profile
    assert report["captured"] is True and report["runtimes"] is None
    by_name = {b["name"]: b for b in report["backends"]}
    for name, usable in exp.usable.items():
        assert by_name[name]["usable"] is usable, by_name[name]
    for b in report["backends"]:
        assert b["reason"]
        if b["usable"]:
            assert "runtime not probed (captured root)" in b["reason"]
    assert [b["rank"] for b in report["backends"]] == list(range(1, len(report["backends"]) + 1))
    assert len({b["name"] for b in report["backends"]}) == len(report["backends"])


SCALAR_FACTS = ("architecture", "kernel_release", "cpu_model", "cpu_count", "board", "soc",
                "memory_total_kib", "board_family")


@pytest.mark.parametrize("folder", FOLDERS)
def test_every_absent_fact_has_a_reason(folder: str) -> None:
    facts = detect(CAPTURES / folder).to_dict()
    for key in SCALAR_FACTS:
        if facts[key] is None:
            assert facts["unknown"].get(key), f"{key} is None without a reason"
        else:
            assert facts["evidence"].get(key) or key == "board_family", f"{key} has no evidence"
    for name, acc in facts["accelerators"].items():
        assert acc["present"] in (True, False, None)
        assert acc["reason"], name
        if acc["present"] is None:
            assert facts["unknown"].get(name)
    for key in ("board", "cpu_model"):
        assert "\x00" not in str(facts[key])


def test_pi_with_coral_appends_board_backends_after_accelerator(shipped: list[Any]) -> None:
    facts = detect(CAPTURES / "coral-pcie-dual-edgetpu-on-raspberry-pi-5")
    match = match_profile(facts, shipped)
    names = [(rb.spec.name, rb.profile) for rb in match.backends]
    assert names[0] == ("tflite:edgetpu", "coral-edgetpu")
    # tflite:xnnpack is in both the coral and raspberry-pi profiles: kept once, at the coral rank.
    assert [n for n, _ in names].count("tflite:xnnpack") == 1
    assert ("tflite:xnnpack", "coral-edgetpu") in names
    assert any(profile == "generic-arm64" for _, profile in names)


def test_jetson_nano_l4t_release_parsed() -> None:
    facts = detect(CAPTURES / "jetson-nano-l4t-r32.7.6")
    assert facts.jetson is not None
    assert facts.jetson["l4t_release"] == "32.7.6"
    assert facts.jetson["l4t_board"] == "t210ref"
    assert "Jetson Nano" in facts.unknown["jetson_model"]
    assert facts.kernel_release == "4.9.337-tegra"


def test_rpi_revision_codes_decoded() -> None:
    facts = detect(CAPTURES / "raspberry-pi-4b-armv7l-canonical-fixture-composite")
    assert facts.raspberry_pi is not None
    decoded = facts.raspberry_pi["revision_decoded"]
    assert decoded["type"] == "4B" and decoded["memory_mb"] == 8192 and decoded["processor"] == "BCM2711"
    pi5 = detect(CAPTURES / "raspberry-pi-5-aarch64-trixie-raspinfo").raspberry_pi
    assert pi5 is not None and pi5["revision_decoded"]["type"] == "5"
    assert pi5["revision_decoded"]["memory_mb"] == 8192


def test_epyc_counts_and_pci() -> None:
    facts = detect(CAPTURES / "amd-epyc-7451-server")
    assert facts.cpu_count == 96 and facts.physical_cores == 48
    assert len(facts.pci_devices) == 195
    assert "8086:1572" in facts.pci_ids()  # an Intel NIC, which must not read as an Intel GPU
    assert facts.accelerators["intel_gpu"]["present"] is False


def test_meteor_lake_npu_from_dmesg_capture() -> None:
    facts = detect(CAPTURES / "intel-meteor-lake-npu-host-no-cpuinfo")
    npu = facts.accelerators["intel_npu"]
    assert npu["ready"] is True and npu["model"] == "NPU 37xx (Meteor Lake)"
    assert all(e.startswith("command:_commands/") for e in npu["evidence"])
