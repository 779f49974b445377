"""What hardware detection learns and how it reads: the constants (ids, names, tables), the
`HardwareFacts` record, the bounded file reader and the state the detection steps share."""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MAX_FILE_BYTES = 256 * 1024  # bytes read at most from any single file
MAX_GLOB_ENTRIES = 4096  # directory entries considered at most per glob pattern
MILLIDEGREES_PER_DEGREE_C = 1000  # sysfs thermal_zone*/temp is in millidegrees Celsius
KIB_PER_MIB = 1024

COMMANDS_DIR = "_commands"

# Accelerator names used in facts.accelerators, profile rules and backend `requires`.
ACCEL_NVIDIA_GPU = "nvidia_gpu"
ACCEL_INTEL_NPU = "intel_npu"
ACCEL_INTEL_GPU = "intel_gpu"
ACCEL_MOVIDIUS = "movidius_vpu"
ACCEL_CORAL = "coral_edgetpu"
ACCELERATOR_NAMES = (ACCEL_NVIDIA_GPU, ACCEL_INTEL_NPU, ACCEL_INTEL_GPU, ACCEL_MOVIDIUS, ACCEL_CORAL)

BOARD_FAMILY_RPI = "raspberry-pi"
BOARD_FAMILY_JETSON = "jetson"

CONFIRMED = "confirmed"
INFERRED = "inferred"
JETSON_LIKE = "jetson-like"

# USB ids (vendor:product, lower-case hex).
CORAL_USB_IDS = {
    "1a6e:089a": "Coral USB Accelerator (Global Unichip; before first use, runtime firmware not loaded)",
    "18d1:9302": "Coral USB Accelerator (Google; runtime firmware loaded)",
}
CORAL_PCI_ID = "1ac1:089a"
MOVIDIUS_USB_IDS = {
    "03e7:2485": "Myriad X, not booted (Neural Compute Stick 2, or a Luxonis OAK device in bootloader state)",
    "03e7:f63b": "Myriad X, booted (firmware loaded by the runtime)",
    "03e7:2150": "Myriad 2, not booted (original Neural Compute Stick, NCS1)",
    "040e:f63b": "Myriad 2, booted (original Neural Compute Stick, NCS1)",
}
MYRIADX_USB_IDS = frozenset({"03e7:2485", "03e7:f63b"})
INTEL_NPU_PCI_IDS = {
    "8086:7d1d": "NPU 37xx (Meteor Lake)",
    "8086:ad1d": "NPU 37xx (Arrow Lake)",
    "8086:643e": "NPU 40xx (Lunar Lake)",
    "8086:b03e": "NPU 50xx (Panther Lake)",
}
INTEL_NPU_FIRMWARE = {"37xx": "NPU 37xx (Meteor Lake / Arrow Lake)", "40xx": "NPU 40xx (Lunar Lake)",
                      "50xx": "NPU 50xx (Panther Lake)"}
INTEL_NPU_DRIVER = "intel_vpu"
INTEL_GPU_DRIVERS = frozenset({"i915", "xe"})
NVIDIA_GPU_DRIVERS = frozenset({"nvidia", "nouveau"})
CORAL_PCI_DRIVERS = frozenset({"apex", "gasket"})
PCI_VENDOR_INTEL = "8086"
PCI_VENDOR_NVIDIA = "10de"
PCI_CLASS_DISPLAY_PREFIX = "03"  # PCI base class 0x03: display controller

# ARM CPU implementer -> name, and (implementer, part) -> core name.
ARM_IMPLEMENTERS = {"0x41": "ARM", "0x4e": "NVIDIA", "0x51": "Qualcomm", "0x61": "Apple", "0x48": "HiSilicon"}
ARM_PARTS = {
    ("0x41", "0xb76"): "ARM1176", ("0x41", "0xc07"): "Cortex-A7", ("0x41", "0xc08"): "Cortex-A8",
    ("0x41", "0xc09"): "Cortex-A9", ("0x41", "0xc0f"): "Cortex-A15", ("0x41", "0xd03"): "Cortex-A53",
    ("0x41", "0xd04"): "Cortex-A35", ("0x41", "0xd05"): "Cortex-A55", ("0x41", "0xd07"): "Cortex-A57",
    ("0x41", "0xd08"): "Cortex-A72", ("0x41", "0xd09"): "Cortex-A73", ("0x41", "0xd0a"): "Cortex-A75",
    ("0x41", "0xd0b"): "Cortex-A76", ("0x41", "0xd0c"): "Neoverse-N1", ("0x41", "0xd0d"): "Cortex-A77",
    ("0x41", "0xd40"): "Neoverse-V1", ("0x41", "0xd41"): "Cortex-A78", ("0x41", "0xd44"): "Cortex-X1",
    ("0x41", "0xd46"): "Cortex-A510", ("0x41", "0xd47"): "Cortex-A710", ("0x41", "0xd48"): "Cortex-X2",
    ("0x41", "0xd49"): "Neoverse-N2", ("0x41", "0xd4f"): "Neoverse-V2", ("0x41", "0xd80"): "Cortex-A520",
    ("0x41", "0xd81"): "Cortex-A720", ("0x4e", "0x003"): "Denver 2", ("0x4e", "0x004"): "Carmel",
}
NVIDIA_CPU_SOC = {
    "0x004": ("tegra194", "Jetson AGX Xavier or Xavier NX (Tegra194; NVIDIA Carmel CPU cores are used only there)"),
    "0x003": ("tegra186", "Jetson TX2 family (Tegra186; NVIDIA Denver 2 CPU cores)"),
}

# Raspberry Pi revision codes (new style: bit 23 set).  Bits: 0-3 revision, 4-11 type,
# 12-15 processor, 16-19 manufacturer, 20-22 memory size, 23 new-style flag.
RPI_NEW_STYLE_FLAG = 1 << 23
RPI_TYPES: dict[int, tuple[str, int]] = {
    0x00: ("A", 1), 0x01: ("B", 1), 0x02: ("A+", 1), 0x03: ("B+", 1), 0x04: ("2B", 2), 0x06: ("CM1", 1),
    0x08: ("3B", 3), 0x09: ("Zero", 1), 0x0A: ("CM3", 3), 0x0C: ("Zero W", 1), 0x0D: ("3B+", 3),
    0x0E: ("3A+", 3), 0x10: ("CM3+", 3), 0x11: ("4B", 4), 0x12: ("Zero 2 W", 3), 0x13: ("400", 4),
    0x14: ("CM4", 4), 0x15: ("CM4S", 4), 0x17: ("5", 5), 0x18: ("CM5", 5), 0x19: ("500", 5),
    0x1A: ("CM5 Lite", 5),
}
RPI_PROCESSORS = {0: "BCM2835", 1: "BCM2836", 2: "BCM2837", 3: "BCM2711", 4: "BCM2712"}
RPI_MANUFACTURERS = {0: "Sony UK", 1: "Egoman", 2: "Embest", 3: "Sony Japan", 4: "Embest", 5: "Stadium"}
RPI_MEMORY_MB = {0: 256, 1: 512, 2: 1024, 3: 2048, 4: 4096, 5: 8192, 6: 16384}
RPI_OLD_STYLE_CODES = range(0x0002, 0x0016)  # Pi 1 / CM1 codes before the new scheme
RPI_SOC_GENERATION = {"BCM2708": 1, "BCM2709": 2, "BCM2836": 2, "BCM2710": 3, "BCM2837": 3,
                      "BCM2711": 4, "BCM2712": 5}
RPI_GENERATION_SOC = {4: "BCM2711", 5: "BCM2712"}  # generations with a single SoC
RPI_HARDWARE_NAMES = frozenset({"BCM2835", *RPI_SOC_GENERATION})
RPI_CPU_PART_GENERATION = {"0xb76": 1, "0xc07": 2, "0xd03": 3, "0xd08": 4, "0xd0b": 5}
RPI_KERNEL_FLAVOURS: tuple[tuple[str, int | None, str], ...] = (
    (r"rpi-2712", 5, "Raspberry Pi OS kernel flavour 'rpi-2712' (built for BCM2712)"),
    (r"-v7l\+$|rpi-v7l", 4, "Raspberry Pi kernel flavour 'v7l' (built for BCM2711)"),
    (r"-v8(-16k)?\+$|rpi-v8", None, "Raspberry Pi kernel flavour 'v8' (64-bit, Pi 3/4/5)"),
    (r"-v7\+$|rpi-v7$", None, "Raspberry Pi kernel flavour 'v7' (Pi 2/3)"),
    (r"-raspi$", None, "Ubuntu 'raspi' kernel flavour"),
)

L4T_RE = re.compile(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*([0-9.]+)", re.IGNORECASE)
L4T_BOARD_RE = re.compile(r"BOARD:\s*([\w.-]+)")
L4T_BOARDS = {
    "t210ref": ("tegra210", "Jetson Nano or Jetson TX1 (Tegra X1, board t210ref)"),
    "t186ref": ("tegra186/tegra194", "Jetson TX2, AGX Xavier or Xavier NX (board t186ref)"),
}
TEGRA_COMPAT_RE = re.compile(r"nvidia,(tegra\d+)")
ELISION_RE = re.compile(r"^\s*\.{3,}\s*$", re.MULTILINE)  # "......" lines a poster used to elide output
LSUSB_RE = re.compile(r"Bus\s+(\d+)\s+Device\s+(\d+):\s+ID\s+([0-9a-fA-F]{4}):([0-9a-fA-F]{4})\s*(.*)")
LSPCI_HEAD_RE = re.compile(
    r"^(?:([0-9a-fA-F]{4}):)?([0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7])\s+([^:]+?)(?:\s\[([0-9a-fA-F]{4})\])?:\s+(.*)$")
LSPCI_ID_RE = re.compile(r"\[([0-9a-fA-F]{4}):([0-9a-fA-F]{4})\]")
LSPCI_NAME_IDS = ((re.compile(r"Coral Edge TPU", re.IGNORECASE), CORAL_PCI_ID),)


@dataclass
class HardwareFacts:
    """Everything `detect` learnt about a machine.  JSON-able through `to_dict`."""

    root: str
    captured: bool
    architecture: str | None = None
    kernel_release: str | None = None
    cpu_model: str | None = None
    cpu_cores_desc: str | None = None
    cpu_features: list[str] = field(default_factory=list)
    cpu_isa: list[str] = field(default_factory=list)
    cpu_count: int | None = None
    physical_cores: int | None = None
    board: str | None = None
    board_family: str | None = None
    soc: str | None = None
    dt_compatible: list[str] = field(default_factory=list)
    raspberry_pi: dict[str, Any] | None = None
    jetson: dict[str, Any] | None = None
    usb_devices: list[dict[str, Any]] = field(default_factory=list)
    pci_devices: list[dict[str, Any]] = field(default_factory=list)
    device_nodes: list[str] = field(default_factory=list)
    accelerators: dict[str, dict[str, Any]] = field(default_factory=dict)
    memory_total_kib: int | None = None
    thermal_zones: list[dict[str, Any]] = field(default_factory=list)
    evidence: dict[str, str] = field(default_factory=dict)
    unknown: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # Helpers used by profile matching.
    def usb_ids(self) -> list[str]:
        return [str(d["id"]) for d in self.usb_devices if d.get("id")]

    def pci_ids(self) -> list[str]:
        return [str(d["id"]) for d in self.pci_devices if d.get("id")]

    def accelerator_present(self, name: str) -> bool:
        return bool(self.accelerators.get(name, {}).get("present"))

    def accelerator_ready(self, name: str) -> tuple[bool, str]:
        """(hardware ready, reason) for an accelerator name."""
        acc = self.accelerators.get(name)
        if acc is None:
            return False, f"{name}: not examined"
        if acc.get("present") is None:
            return False, f"{name}: {acc.get('reason', 'cannot tell: no evidence either way')}"
        if not acc.get("present"):
            return False, f"{name}: not detected ({acc.get('reason', '')})"
        return bool(acc.get("ready")), str(acc.get("reason", ""))


class _Reader:
    """Bounded, exception-free access to files below a root."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.captured = os.path.abspath(str(root)) != os.path.abspath(os.sep)

    def path(self, rel: str) -> str:
        return os.path.join(str(self.root), rel.lstrip("/"))

    def exists(self, rel: str) -> bool:
        try:
            return os.path.lexists(self.path(rel))
        except (OSError, ValueError):
            return False

    def isdir(self, rel: str) -> bool:
        try:
            return os.path.isdir(self.path(rel))
        except (OSError, ValueError):
            return False

    def read_bytes(self, rel: str) -> bytes | None:
        try:
            with open(self.path(rel), "rb") as fh:
                return fh.read(MAX_FILE_BYTES)
        except (OSError, ValueError) as exc:
            log.debug("cannot read %s: %s", rel, exc)
            return None

    def read_text(self, rel: str) -> str | None:
        data = self.read_bytes(rel)
        if data is None:
            return None
        return data.decode("utf-8", errors="replace")

    def read_value(self, rel: str) -> str | None:
        """A one-value sysfs/device-tree file: NULs and surrounding whitespace removed."""
        text = self.read_text(rel)
        if text is None:
            return None
        value = text.replace("\x00", " ").strip()
        return value or None

    def read_strings(self, rel: str) -> list[str]:
        """A NUL-separated device-tree string list."""
        text = self.read_text(rel)
        if text is None:
            return []
        return [s.strip() for s in text.split("\x00") if s.strip()]

    def glob(self, pattern: str) -> list[str]:
        """Relative paths matching pattern, sorted, bounded."""
        base = str(self.root)
        out: list[str] = []
        try:
            for i, p in enumerate(glob.iglob(self.path(pattern))):
                if i >= MAX_GLOB_ENTRIES:
                    log.warning("glob %s truncated at %d entries", pattern, MAX_GLOB_ENTRIES)
                    break
                out.append(os.path.relpath(p, base))
        except (OSError, ValueError) as exc:
            log.debug("glob %s failed: %s", pattern, exc)
        return sorted(out)

    def link_name(self, rel: str) -> str | None:
        """Basename of a symlink target (sysfs `driver` links); a regular file's content also works."""
        p = self.path(rel)
        try:
            if os.path.islink(p):
                return os.path.basename(os.readlink(p).rstrip("/")) or None
            if os.path.isfile(p):
                return self.read_value(rel)
            if os.path.isdir(p):
                return os.path.basename(os.path.realpath(p)) or None
        except (OSError, ValueError):
            return None
        return None

    def command(self, name: str) -> str | None:
        if not self.captured:
            return None
        return self.read_text(f"{COMMANDS_DIR}/{name}")

    def commands(self, pattern: str) -> list[tuple[str, str]]:
        """(relative path, text) of command captures matching a glob; empty on the live system."""
        if not self.captured:
            return []
        out = []
        for rel in self.glob(f"{COMMANDS_DIR}/{pattern}"):
            text = self.read_text(rel)
            if text is not None:
                out.append((rel, text))
        return out



class DetectionState:
    """What the detection steps share: the reader, the facts being built and interim findings."""

    def __init__(self, root: Path) -> None:
        self.r = _Reader(root)
        self.f = HardwareFacts(root=str(root), captured=self.r.captured)
        self.cpu_blocks: list[dict[str, str]] = []
        self.cpu_glob: dict[str, str] = {}
        self.cpuinfo_present = False
        self.dt_model: str | None = None
        self.dt_model_src = ""
        self.usb_examined: list[str] = []
        self.pci_examined: list[str] = []
        self.lspci_blocks: list[dict[str, Any]] = []
        self.dmesg: list[tuple[str, str]] = []
        self.dmi_product: str | None = None


    # -- helpers
    def _src_file(self, rel: str) -> str:
        return f"file:{rel}"
