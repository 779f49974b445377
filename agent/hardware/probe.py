"""Hardware detection from files under a filesystem root.

`detect(root)` reads /proc, /sys, /etc and /dev below ``root`` (default "/") and returns a
`HardwareFacts`.  The same code runs against the live system and against a captured device tree
(a folder laid out like a filesystem root, with command outputs under ``_commands/``).

Invariants:

* `detect` never raises.  Missing, unreadable, truncated or malformed files degrade to "unknown".
* Every fact that could not be established has an entry in ``facts.unknown`` (fact name -> reason),
  and every fact that was established names where it came from in ``facts.evidence``.
* File reads are bounded to `MAX_FILE_BYTES` bytes per file and globs to `MAX_GLOB_ENTRIES` entries.
* Command captures (``<root>/_commands/*.txt``: lsusb, lspci, uname, dmesg, nvidia-smi, ...) are read
  only when ``root`` is not "/"; anything learnt from them is labelled ``command:<file>``.
* ``os.uname()`` / ``os.cpu_count()`` are used only when ``root`` is "/".
* Device-tree strings may carry NUL terminators; they are split/stripped on NUL.
* Nothing is imported, executed or written: detection only reads files.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
import re
from collections import Counter
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


# --------------------------------------------------------------------------------------------
# small parsers


def _parse_cpuinfo(text: str) -> tuple[list[dict[str, str]], dict[str, str]]:
    """Split /proc/cpuinfo into per-processor blocks and global lines (Hardware/Revision/Model...)."""
    blocks: list[dict[str, str]] = []
    glob_lines: dict[str, str] = {}
    current: dict[str, str] | None = None
    for raw in text.splitlines():
        if ":" not in raw:
            if not raw.strip():
                current = None
            continue
        key, _, value = raw.partition(":")
        key = key.strip()
        value = value.strip()
        if not key:
            continue
        if key == "processor":
            current = {"processor": value}
            blocks.append(current)
        elif current is not None:
            current[key] = value
        else:
            glob_lines.setdefault(key, value)
    return blocks, glob_lines


def _parse_range_list(text: str) -> int | None:
    """Count CPUs in a sysfs range list such as '0-3,8-11'."""
    total = 0
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        lo, _, hi = part.partition("-")
        try:
            total += (int(hi) - int(lo) + 1) if hi else 1
        except ValueError:
            return None
    return total or None


def _kv_lines(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out.setdefault(key.strip(), value.strip())
    return out


def _norm_arch(name: str) -> str:
    name = name.strip().lower()
    return {"arm64": "aarch64", "x86-64": "x86_64", "amd64": "x86_64"}.get(name, name)


def _arch_from_cpuinfo(blocks: list[dict[str, str]], glob_lines: dict[str, str]) -> tuple[str | None, str]:
    first = blocks[0] if blocks else {}
    flags = first.get("flags")
    if flags:
        if "lm" in flags.split():
            return "x86_64", "cpuinfo flags include 'lm' (64-bit long mode)"
        return "i686", "cpuinfo flags lack 'lm' (32-bit x86)"
    features = set((first.get("Features") or glob_lines.get("Features") or "").split())
    arch_num = first.get("CPU architecture") or glob_lines.get("CPU architecture") or ""
    model = first.get("model name") or glob_lines.get("Processor") or ""
    if model.startswith("AArch64") or arch_num.lower() == "aarch64":
        return "aarch64", "cpuinfo names an AArch64 processor"
    if "asimd" in features:
        return "aarch64", "cpuinfo Features use arm64 hwcap names ('asimd')"
    if features & {"neon", "vfp", "thumb", "half", "edsp"}:
        if "(v6l)" in model or arch_num.startswith("6"):
            return "armv6l", "cpuinfo shows 32-bit ARM features and an ARMv6 processor"
        if arch_num == "8" or "(v8l)" in model:
            return "armv8l", "cpuinfo shows 32-bit ARM features on an ARMv8 CPU"
        return "armv7l", f"cpuinfo shows 32-bit ARM features ('neon'/'vfp') and CPU architecture {arch_num or '?'}"
    if arch_num == "8":
        return "aarch64", "cpuinfo 'CPU architecture: 8' without 32-bit features"
    if arch_num == "7" or "ARMv7" in model:
        return "armv7l", "cpuinfo 'CPU architecture: 7' / ARMv7 processor"
    return None, "cpuinfo has neither x86 flags nor ARM Features/CPU architecture lines"


X86_ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                 "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")
ARM_ISA_MAP = (("neon", "neon"), ("asimd", "asimd"), ("asimdhp", "fp16"), ("fphp", "fp16-scalar"),
               ("asimddp", "dotprod"), ("i8mm", "i8mm"), ("bf16", "bf16"), ("sve", "sve"), ("sve2", "sve2"))


def _isa_tags(features: list[str]) -> list[str]:
    """ML-relevant ISA extensions, normalised across x86 flags and ARM hwcaps."""
    fs = set(features)
    tags: list[str] = [f for f in X86_ISA_FLAGS if f in fs]
    if any(f.startswith("avx512") for f in fs) and "avx512" not in tags:
        tags.append("avx512")
    for flag, tag in ARM_ISA_MAP:
        if flag in fs and tag not in tags:
            tags.append(tag)
    if "asimd" in fs and "neon" not in tags:
        tags.insert(0, "neon")  # AArch64 Advanced SIMD is NEON
    return tags


def _decode_rpi_revision(code: str) -> dict[str, Any] | None:
    try:
        value = int(code, 16)
    except ValueError:
        return None
    if value & RPI_NEW_STYLE_FLAG:
        rtype = (value >> 4) & 0xFF
        proc = (value >> 12) & 0xF
        if rtype not in RPI_TYPES or proc not in RPI_PROCESSORS:
            return None
        name, gen = RPI_TYPES[rtype]
        return {
            "code": code.lower(),
            "style": "new",
            "type": name,
            "generation": gen,
            "processor": RPI_PROCESSORS[proc],
            "manufacturer": RPI_MANUFACTURERS.get((value >> 16) & 0xF),
            "memory_mb": RPI_MEMORY_MB.get((value >> 20) & 0x7),
            "board_revision": f"1.{value & 0xF}",
        }
    if (value & 0xFFFF) in RPI_OLD_STYLE_CODES:
        return {"code": code.lower(), "style": "old", "type": "Pi 1 family", "generation": 1,
                "processor": "BCM2835", "manufacturer": None, "memory_mb": None, "board_revision": None}
    return None


def _rpi_generation_from_model(model: str) -> int | None:
    m = re.search(r"Raspberry Pi (?:Compute Module )?(\d{1,3})\b", model)
    if m:
        num = int(m.group(1))
        return {400: 4, 500: 5}.get(num, num if num <= 9 else None)
    if "Zero 2" in model:
        return 3
    if re.search(r"Raspberry Pi (Model [AB]|Zero|Compute Module\b)", model):
        return 1
    return None


# --------------------------------------------------------------------------------------------
# detection


class _Detector:
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

    def run(self) -> HardwareFacts:
        steps = (self._cpuinfo, self._architecture, self._kernel, self._cpu, self._device_tree, self._dmi,
                 self._memory, self._thermal, self._usb, self._pci, self._device_nodes, self._raspberry_pi,
                 self._jetson, self._board, self._accelerators)
        for step in steps:
            try:
                step()
            except Exception as exc:  # detection must never raise
                log.exception("hardware detection step %s failed", step.__name__)
                self.f.notes.append(f"detection step {step.__name__} failed: {exc!r}")
        return self.f

    # -- helpers
    def _src_file(self, rel: str) -> str:
        return f"file:{rel}"

    # -- steps
    def _cpuinfo(self) -> None:
        text = self.r.read_text("proc/cpuinfo")
        if text is None:
            return
        self.cpuinfo_present = True
        self.cpu_blocks, self.cpu_glob = _parse_cpuinfo(text)

    def _architecture(self) -> None:
        f = self.f
        if not self.r.captured:
            f.architecture = _norm_arch(os.uname().machine)
            f.evidence["architecture"] = "os.uname().machine"
            return
        for name in ("uname-m.txt", "arch.txt"):
            text = self.r.command(name)
            if text and text.strip():
                f.architecture = _norm_arch(text.split()[0])
                f.evidence["architecture"] = f"command:{COMMANDS_DIR}/{name}"
                break
        inferred, why = (None, "no proc/cpuinfo")
        if self.cpuinfo_present:
            inferred, why = _arch_from_cpuinfo(self.cpu_blocks, self.cpu_glob)
        if f.architecture is None and inferred:
            f.architecture = inferred
            f.evidence["architecture"] = f"file:proc/cpuinfo ({why})"
        elif f.architecture and inferred and inferred != f.architecture:
            f.notes.append(f"architecture: {f.evidence['architecture']} says {f.architecture} "
                           f"but proc/cpuinfo suggests {inferred} ({why})")
        if f.architecture is None:
            for name, key in (("lscpu.txt", "Architecture"), ("hostnamectl.txt", "Architecture")):
                text = self.r.command(name)
                value = _kv_lines(text).get(key) if text else None
                if value:
                    f.architecture = _norm_arch(value)
                    f.evidence["architecture"] = f"command:{COMMANDS_DIR}/{name}"
                    break
        if f.architecture is None:
            f.unknown["architecture"] = ("no _commands/uname-m.txt and " + why if self.cpuinfo_present
                                         else "no _commands/uname-m.txt, no proc/cpuinfo, no lscpu/hostnamectl capture")

    def _kernel(self) -> None:
        f = self.f
        if not self.r.captured:
            f.kernel_release = os.uname().release
            f.evidence["kernel_release"] = "os.uname().release"
            return
        text = self.r.read_text("proc/version")
        m = re.match(r"Linux version (\S+)", text or "")
        if m:
            f.kernel_release, f.evidence["kernel_release"] = m.group(1), "file:proc/version"
            return
        text = self.r.command("uname-r.txt")
        if text and text.strip():
            f.kernel_release, f.evidence["kernel_release"] = text.split()[0], f"command:{COMMANDS_DIR}/uname-r.txt"
            return
        text = self.r.command("uname-a.txt")
        parts = (text or "").split()
        if len(parts) >= 3 and parts[0] == "Linux":
            f.kernel_release, f.evidence["kernel_release"] = parts[2], f"command:{COMMANDS_DIR}/uname-a.txt"
            return
        text = self.r.command("hostnamectl.txt")
        m = re.search(r"Kernel:\s*Linux\s+(\S+)", text or "")
        if m:
            f.kernel_release, f.evidence["kernel_release"] = m.group(1), f"command:{COMMANDS_DIR}/hostnamectl.txt"
            return
        f.unknown["kernel_release"] = "no proc/version and no uname/hostnamectl command capture"

    def _cpu(self) -> None:
        f = self.f
        blocks, gl = self.cpu_blocks, self.cpu_glob
        first = blocks[0] if blocks else {}
        lscpu = _kv_lines(self.r.command("lscpu.txt") or "")
        # model name
        model = first.get("model name") or gl.get("Processor") or first.get("cpu model")
        if model:
            f.cpu_model, f.evidence["cpu_model"] = model, "file:proc/cpuinfo"
        elif lscpu.get("Model name"):
            f.cpu_model, f.evidence["cpu_model"] = lscpu["Model name"], f"command:{COMMANDS_DIR}/lscpu.txt"
        # ARM core types
        parts = Counter((b.get("CPU implementer", "").lower(), b.get("CPU part", "").lower())
                        for b in blocks if b.get("CPU part"))
        if parts:
            desc = []
            for (impl, part), n in sorted(parts.items(), key=lambda kv: kv[0][1]):
                name = ARM_PARTS.get((impl, part))
                vendor = ARM_IMPLEMENTERS.get(impl, f"implementer {impl}")
                desc.append(f"{n}x {vendor} {name}" if name else f"{n}x {vendor} part {part}")
            f.cpu_cores_desc = " + ".join(desc)
            f.evidence["cpu_cores_desc"] = "file:proc/cpuinfo (CPU implementer/part)"
            if f.cpu_model is None:
                f.cpu_model, f.evidence["cpu_model"] = f.cpu_cores_desc, "file:proc/cpuinfo (CPU implementer/part)"
        if f.cpu_model is None:
            f.unknown["cpu_model"] = ("proc/cpuinfo has no model name / CPU part lines" if self.cpuinfo_present
                                      else "no proc/cpuinfo and no lscpu capture")
        # features
        feats = first.get("flags") or first.get("Features") or gl.get("Features")
        if feats:
            f.cpu_features = sorted(set(feats.split()))
            f.evidence["cpu_features"] = "file:proc/cpuinfo"
        elif lscpu.get("Flags"):
            f.cpu_features = sorted(set(lscpu["Flags"].split()))
            f.evidence["cpu_features"] = f"command:{COMMANDS_DIR}/lscpu.txt"
        else:
            f.unknown["cpu_features"] = ("proc/cpuinfo has no flags/Features line" if self.cpuinfo_present
                                         else "no proc/cpuinfo")
        f.cpu_isa = _isa_tags(f.cpu_features)
        # logical CPU count
        for rel in ("sys/devices/system/cpu/online", "sys/devices/system/cpu/present"):
            text = self.r.read_text(rel)
            online = _parse_range_list(text) if text else None
            if online:
                f.cpu_count, f.evidence["cpu_count"] = online, f"file:{rel}"
                break
        if f.cpu_count is None and blocks:
            f.cpu_count = len(blocks)
            f.evidence["cpu_count"] = "file:proc/cpuinfo (processor entries; a truncated capture under-counts)"
        if f.cpu_count is None and lscpu.get("CPU(s)", "").isdigit():
            f.cpu_count, f.evidence["cpu_count"] = int(lscpu["CPU(s)"]), f"command:{COMMANDS_DIR}/lscpu.txt"
        if f.cpu_count is None and not self.r.captured:
            f.cpu_count, f.evidence["cpu_count"] = os.cpu_count(), "os.cpu_count()"
        if f.cpu_count is None:
            f.unknown["cpu_count"] = ("proc/cpuinfo has no processor entries" if self.cpuinfo_present
                                      else "no sys/devices/system/cpu/online, no proc/cpuinfo")
        # physical cores (x86 exposes physical id / core id)
        cores = {(b.get("physical id"), b.get("core id")) for b in blocks if "core id" in b}
        if cores:
            f.physical_cores, f.evidence["physical_cores"] = len(cores), "file:proc/cpuinfo (physical id, core id)"
        else:
            f.unknown["physical_cores"] = "proc/cpuinfo has no 'physical id'/'core id' lines (not x86, or absent)"

    def _device_tree(self) -> None:
        f = self.f
        for base in ("proc/device-tree", "sys/firmware/devicetree/base"):
            if self.dt_model is None:
                value = self.r.read_value(f"{base}/model")
                if value:
                    self.dt_model, self.dt_model_src = value, f"file:{base}/model"
            if not f.dt_compatible:
                compat = self.r.read_strings(f"{base}/compatible")
                if compat:
                    f.dt_compatible = compat
                    f.evidence["dt_compatible"] = f"file:{base}/compatible"
        if not f.dt_compatible:
            f.unknown["dt_compatible"] = "no proc/device-tree/compatible or sys/firmware/devicetree/base/compatible"

    def _dmi(self) -> None:
        vendor = self.r.read_value("sys/class/dmi/id/sys_vendor")
        product = self.r.read_value("sys/class/dmi/id/product_name")
        if product:
            self.dmi_product = f"{vendor} {product}" if vendor else product

    def _memory(self) -> None:
        f = self.f
        text = self.r.read_text("proc/meminfo")
        m = re.search(r"^MemTotal:\s+(\d+)\s*kB", text or "", re.MULTILINE)
        if m:
            f.memory_total_kib, f.evidence["memory_total_kib"] = int(m.group(1)), "file:proc/meminfo"
            return
        text = self.r.command("free.txt")
        m = re.search(r"^Mem:\s+(\d+)", text or "", re.MULTILINE)
        if m:  # `free` without -m/-g prints KiB
            f.memory_total_kib = int(m.group(1))
            f.evidence["memory_total_kib"] = f"command:{COMMANDS_DIR}/free.txt (KiB)"
            return
        f.unknown["memory_total_kib"] = "no proc/meminfo (and no free capture)"

    def _thermal(self) -> None:
        f = self.f
        for rel in self.r.glob("sys/class/thermal/thermal_zone*"):
            zone = os.path.basename(rel)
            ztype = self.r.read_value(f"{rel}/type")
            raw = self.r.read_value(f"{rel}/temp")
            temp: float | None = None
            if raw is not None:
                try:
                    temp = int(raw) / MILLIDEGREES_PER_DEGREE_C
                except ValueError:
                    temp = None
            f.thermal_zones.append({"zone": zone, "type": ztype, "temp_c": temp})
        if f.thermal_zones:
            f.evidence["thermal_zones"] = "file:sys/class/thermal/thermal_zone*"
        else:
            f.unknown["thermal_zones"] = "no sys/class/thermal/thermal_zone* entries"

    def _usb(self) -> None:
        f = self.f
        if self.r.isdir("sys/bus/usb/devices"):
            self.usb_examined.append("sysfs:sys/bus/usb/devices")
            for rel in self.r.glob("sys/bus/usb/devices/*"):
                if ":" in os.path.basename(rel):
                    continue  # interface entries
                vid = self.r.read_value(f"{rel}/idVendor")
                pid = self.r.read_value(f"{rel}/idProduct")
                if not vid or not pid:
                    continue
                name = " ".join(x for x in (self.r.read_value(f"{rel}/manufacturer"),
                                            self.r.read_value(f"{rel}/product")) if x)
                f.usb_devices.append({"id": f"{vid.lower()}:{pid.lower()}", "name": name or None,
                                      "location": os.path.basename(rel), "source": f"sysfs:{rel}"})
        for rel, text in self.r.commands("lsusb*.txt"):
            found = 0
            for line in text.splitlines():
                m = LSUSB_RE.search(line)
                if not m:
                    continue
                found += 1
                f.usb_devices.append({"id": f"{m.group(3).lower()}:{m.group(4).lower()}",
                                      "name": m.group(5).strip() or None,
                                      "location": f"bus {m.group(1)} device {m.group(2)}",
                                      "source": f"command:{rel}"})
            if not found:
                f.notes.append(f"command:{rel} lists no vendor:product ids (e.g. `lsusb -t`); not used for USB ids")
            elif ELISION_RE.search(text):
                f.notes.append(f"command:{rel} is a fragment (lines elided); devices missing from it may exist")
            else:
                self.usb_examined.append(f"command:{rel}")
        sources = sorted({str(d["source"]) for d in f.usb_devices if str(d["source"]).startswith("command:")})
        if self.usb_examined or sources:
            f.evidence["usb_devices"] = ", ".join(dict.fromkeys(self.usb_examined + sources))
        else:
            f.unknown["usb_devices"] = "no sys/bus/usb/devices and no lsusb capture listing vendor:product ids"

    def _pci(self) -> None:
        f = self.f
        if self.r.isdir("sys/bus/pci/devices"):
            self.pci_examined.append("sysfs:sys/bus/pci/devices")
            for rel in self.r.glob("sys/bus/pci/devices/*"):
                vid = (self.r.read_value(f"{rel}/vendor") or "").lower().removeprefix("0x")
                did = (self.r.read_value(f"{rel}/device") or "").lower().removeprefix("0x")
                if not vid or not did:
                    continue
                cls = (self.r.read_value(f"{rel}/class") or "").lower().removeprefix("0x") or None
                f.pci_devices.append({"slot": os.path.basename(rel), "id": f"{vid}:{did}", "id_source": "sysfs",
                                      "class": cls,
                                      "driver": self.r.link_name(f"{rel}/driver"), "name": None,
                                      "source": f"sysfs:{rel}"})
        elif (text := self.r.read_text("proc/bus/pci/devices")) is not None:
            self.pci_examined.append("file:proc/bus/pci/devices")
            for line in text.splitlines():
                fields = line.split("\t")
                if len(fields) < 2 or len(fields[1]) != 8:
                    continue
                try:
                    busdevfn = int(fields[0], 16)
                except ValueError:
                    continue
                slot = f"{busdevfn >> 8:02x}:{(busdevfn & 0xFF) >> 3:02x}.{busdevfn & 0x7}"
                driver = fields[17].strip() if len(fields) > 17 and fields[17].strip() else None
                f.pci_devices.append({"slot": slot, "id": f"{fields[1][:4].lower()}:{fields[1][4:].lower()}",
                                      "id_source": "proc/bus/pci/devices", "class": None, "driver": driver, "name": None,
                                      "source": "file:proc/bus/pci/devices"})
        for rel, text in self.r.commands("lspci*.txt"):
            self.pci_examined.append(f"command:{rel}")
            for block in self._parse_lspci(text, rel):
                self.lspci_blocks.append(block)
                f.pci_devices.append({k: block[k] for k in ("slot", "id", "id_source", "class", "driver", "name",
                                                            "source")})
        if self.pci_examined:
            f.evidence["pci_devices"] = ", ".join(self.pci_examined)
        else:
            f.unknown["pci_devices"] = "no sys/bus/pci/devices, no proc/bus/pci/devices and no lspci capture"

    @staticmethod
    def _parse_lspci(text: str, rel: str) -> list[dict[str, Any]]:
        blocks: list[dict[str, Any]] = []
        cur: dict[str, Any] | None = None
        for line in text.splitlines():
            if not line.strip():
                continue
            if not line[0].isspace():
                m = LSPCI_HEAD_RE.match(line)
                if not m:
                    cur = None
                    continue
                desc = m.group(5)
                ids = LSPCI_ID_RE.search(desc)
                pci_id = f"{ids.group(1).lower()}:{ids.group(2).lower()}" if ids else None
                id_source = "lspci -n" if ids else None
                if pci_id is None:
                    for pattern, known in LSPCI_NAME_IDS:
                        if pattern.search(desc):
                            pci_id, id_source = known, "inferred from the lspci device name"
                cur = {"slot": m.group(2), "id": pci_id, "id_source": id_source, "class": m.group(3).strip(),
                       "driver": None, "name": desc.strip(), "source": f"command:{rel}",
                       "disabled_regions": False}
                blocks.append(cur)
            elif cur is not None:
                s = line.strip()
                if s.startswith("Kernel driver in use:"):
                    cur["driver"] = s.partition(":")[2].strip() or None
                elif s.startswith("Memory at") and "[disabled]" in s:
                    cur["disabled_regions"] = True
        return blocks

    def _device_nodes(self) -> None:
        f = self.f
        for pattern in ("dev/apex_*", "dev/accel/accel*", "dev/nvidia[0-9]*", "dev/nvidiactl",
                        "dev/nvhost-ctrl-gpu", "dev/nvgpu/*", "dev/dri/renderD*"):
            f.device_nodes.extend("/" + p for p in self.r.glob(pattern))
        if not self.r.isdir("dev"):
            f.unknown["device_nodes"] = "no dev/ directory under the root (captures do not hold /dev)"

    # -- boards
    def _raspberry_pi(self) -> None:
        f = self.f
        gl = self.cpu_glob
        evidence: list[str] = []
        confidence: str | None = None
        model: str | None = None
        generation: int | None = None
        gen_src = ""
        decoded: dict[str, Any] | None = None
        hardware = gl.get("Hardware")
        revision = gl.get("Revision")
        cpu_model_line = gl.get("Model")
        for candidate, src in ((self.dt_model, self.dt_model_src), (cpu_model_line, "file:proc/cpuinfo Model")):
            if candidate and candidate.startswith("Raspberry Pi"):
                model = model or candidate
                evidence.append(f"{src}: {candidate!r}")
                confidence = CONFIRMED
                gen = _rpi_generation_from_model(candidate)
                if gen and generation is None:
                    generation, gen_src = gen, src
        if self.dt_model and cpu_model_line and self.dt_model.startswith("Raspberry Pi") \
                and cpu_model_line.startswith("Raspberry Pi") and self.dt_model != cpu_model_line:
            f.notes.append(f"device-tree model {self.dt_model!r} disagrees with cpuinfo Model {cpu_model_line!r}")
        rpi_compat = [c for c in f.dt_compatible if c.startswith("raspberrypi,")]
        if rpi_compat:
            evidence.append(f"{f.evidence.get('dt_compatible')}: {rpi_compat[0]!r}")
            confidence = CONFIRMED
            m = re.match(r"raspberrypi,(\d)", rpi_compat[0])
            if m and generation is None:
                generation, gen_src = int(m.group(1)), f.evidence.get("dt_compatible", "")
        pi_like_hw = hardware in RPI_HARDWARE_NAMES
        if revision and (pi_like_hw or confidence):
            decoded = _decode_rpi_revision(revision)
            if decoded:
                evidence.append(f"file:proc/cpuinfo Revision {revision} decodes to Raspberry Pi {decoded['type']}")
                confidence = CONFIRMED
                if generation is not None and generation != decoded["generation"]:
                    f.notes.append(f"Raspberry Pi generation from model ({generation}) differs from revision "
                                   f"code {revision} ({decoded['generation']})")
                generation, gen_src = decoded["generation"], f"file:proc/cpuinfo Revision {revision}"
        if pi_like_hw:
            evidence.append(f"file:proc/cpuinfo Hardware {hardware!r} (Broadcom SoC used on Raspberry Pi boards)")
            confidence = confidence or INFERRED
            if generation is None and hardware in RPI_SOC_GENERATION:
                generation, gen_src = RPI_SOC_GENERATION[hardware], f"file:proc/cpuinfo Hardware {hardware}"
        kernel = f.kernel_release or ""
        for pattern, gen, why in RPI_KERNEL_FLAVOURS:
            if kernel and re.search(pattern, kernel):
                evidence.append(f"{f.evidence.get('kernel_release')}: {kernel!r} is a {why}")
                confidence = confidence or INFERRED
                if generation is None and gen is not None:
                    generation, gen_src = gen, f"kernel release {kernel!r}"
                break
        if confidence is None:
            f.unknown["raspberry_pi"] = ("no 'Raspberry Pi' device-tree model/compatible or cpuinfo Model, no "
                                         "Broadcom BCM27xx/BCM283x Hardware line, no Raspberry Pi kernel flavour")
            self._rpi_usb_hint()
            return
        parts = sorted({b.get("CPU part", "").lower() for b in self.cpu_blocks if b.get("CPU part")})
        if generation is None and len(parts) == 1 and parts[0] in RPI_CPU_PART_GENERATION:
            generation = RPI_CPU_PART_GENERATION[parts[0]]
            gen_src = (f"file:proc/cpuinfo CPU part {parts[0]} ({ARM_PARTS.get(('0x41', parts[0]))}) "
                       "on a Raspberry Pi")
            confidence = confidence if confidence == CONFIRMED else INFERRED
        soc = decoded["processor"] if decoded and decoded.get("style") == "new" else None
        if soc is None and hardware in RPI_SOC_GENERATION:
            soc = hardware
        soc = soc or next((c.split(",", 1)[1].upper() for c in f.dt_compatible if c.startswith("brcm,bcm")), None)
        soc = soc or RPI_GENERATION_SOC.get(generation or 0)
        if hardware == "BCM2835" and soc and soc != "BCM2835":
            f.notes.append(f"cpuinfo Hardware 'BCM2835' is the generic name the Raspberry Pi kernel prints for "
                           f"every model; the SoC is {soc}")
        info: dict[str, Any] = {"confidence": confidence, "generation": generation,
                                "generation_source": gen_src or None, "model": model,
                                "revision": revision, "revision_decoded": decoded, "soc": soc,
                                "evidence": evidence}
        f.raspberry_pi = info
        f.board_family = BOARD_FAMILY_RPI
        if generation is None:
            f.unknown["raspberry_pi_generation"] = ("a Raspberry Pi, but neither a model string, a revision code, "
                                                    "a generation-specific SoC/kernel flavour nor the CPU part tells which")
        if model is None:
            f.unknown["raspberry_pi_model"] = ("no device-tree model and no cpuinfo Model line"
                                               + (" (cpuinfo looks truncated before its Revision/Model lines)"
                                                  if self.cpuinfo_present and not revision else ""))

    def _rpi_usb_hint(self) -> None:
        ids = set(self.f.usb_ids())
        if {"0424:9514", "0424:ec00"} <= ids:
            self.f.notes.append("USB shows an SMSC LAN9514 hub + Ethernet (0424:9514, 0424:ec00), the on-board "
                                "chip of Raspberry Pi 1B+/2B/3B (also used on other boards): suggestive of a "
                                "Raspberry Pi, not proof; board left unknown")

    def _jetson(self) -> None:
        f = self.f
        evidence: list[str] = []
        confidence: str | None = None
        soc: str | None = None
        candidates: str | None = None
        model: str | None = None
        l4t: str | None = None
        l4t_board: str | None = None
        text = self.r.read_text("etc/nv_tegra_release")
        if text is not None:
            m = L4T_RE.search(text)
            if m:
                l4t = f"{m.group(1)}.{m.group(2)}"
                evidence.append(f"file:etc/nv_tegra_release: L4T R{m.group(1)} revision {m.group(2)}")
                confidence = CONFIRMED
                f.evidence["l4t_release"] = "file:etc/nv_tegra_release"
            b = L4T_BOARD_RE.search(text)
            if b:
                l4t_board = b.group(1)
                if l4t_board in L4T_BOARDS:
                    soc, candidates = L4T_BOARDS[l4t_board]
        tegra = [c for c in f.dt_compatible if TEGRA_COMPAT_RE.match(c)]
        if tegra:
            evidence.append(f"{f.evidence.get('dt_compatible')}: {tegra[0]!r}")
            confidence = CONFIRMED
            m_soc = TEGRA_COMPAT_RE.match(tegra[0])
            soc = m_soc.group(1) if m_soc else soc
        if self.dt_model and re.search(r"jetson|nvidia", self.dt_model, re.IGNORECASE):
            model = self.dt_model
            evidence.append(f"{self.dt_model_src}: {self.dt_model!r}")
            confidence = confidence or CONFIRMED
        hardware = self.cpu_glob.get("Hardware", "")
        if re.search(r"jetson|tegra", hardware, re.IGNORECASE):
            evidence.append(f"file:proc/cpuinfo Hardware {hardware!r}")
            confidence = confidence or JETSON_LIKE
            if "jetson" in hardware.lower() and model is None:
                model = hardware
        nv_parts = {b.get("CPU part", "").lower() for b in self.cpu_blocks
                    if b.get("CPU implementer", "").lower() == "0x4e"}
        for part in sorted(nv_parts):
            if part in NVIDIA_CPU_SOC:
                psoc, pcand = NVIDIA_CPU_SOC[part]
                evidence.append(f"file:proc/cpuinfo CPU implementer 0x4e part {part} "
                                f"(NVIDIA {ARM_PARTS.get(('0x4e', part))})")
                confidence = confidence or JETSON_LIKE
                soc = soc or psoc
                candidates = candidates or pcand
        if any("MTS version" in b for b in self.cpu_blocks):
            evidence.append("file:proc/cpuinfo 'MTS version' lines (NVIDIA Denver/Carmel firmware)")
            confidence = confidence or JETSON_LIKE
        kernel = f.kernel_release or ""
        if kernel.endswith("-tegra"):
            evidence.append(f"{f.evidence.get('kernel_release')}: kernel {kernel!r} (NVIDIA L4T kernel flavour)")
            confidence = confidence or JETSON_LIKE
        if confidence is None:
            reason = ("no etc/nv_tegra_release, no nvidia,tegra* device-tree compatible, no Jetson/Tegra cpuinfo "
                      "Hardware line, no NVIDIA CPU cores (implementer 0x4e), no -tegra kernel")
            parts = {b.get("CPU part", "").lower() for b in self.cpu_blocks}
            if parts == {"0xd07"} and not self.dt_model and not f.dt_compatible:
                reason += ("; the Cortex-A57 cores are consistent with a Tegra X1 (Jetson Nano/TX1) but are "
                           "also used by other SoCs, so cpuinfo alone cannot tell")
            f.unknown["jetson"] = reason
            return
        f.jetson = {"confidence": confidence, "model": model, "soc": soc, "candidates": candidates,
                    "l4t_release": l4t, "l4t_board": l4t_board, "evidence": evidence}
        f.board_family = f.board_family or BOARD_FAMILY_JETSON
        if confidence == JETSON_LIKE:
            f.notes.append("Jetson inferred from CPU/kernel evidence only ('jetson-like'): no nv_tegra_release "
                           "or device-tree model confirms the module")
        if model is None:
            f.unknown["jetson_model"] = (
                (f"{candidates}; " if candidates else "")
                + "no device-tree model names the module")
        if l4t is None:
            f.unknown["l4t_release"] = ("no etc/nv_tegra_release" if text is None
                                        else "etc/nv_tegra_release has no '# R<n> (release), REVISION: x.y' line")

    def _board(self) -> None:
        f = self.f
        gl = self.cpu_glob
        pi = f.raspberry_pi
        if self.dt_model:
            f.board, f.evidence["board"] = self.dt_model, self.dt_model_src
        elif gl.get("Model"):
            f.board, f.evidence["board"] = gl["Model"], "file:proc/cpuinfo Model"
        elif pi and pi.get("revision_decoded") and pi["revision_decoded"].get("style") == "new":
            d = pi["revision_decoded"]
            f.board = f"Raspberry Pi {d['type']} Rev {d['board_revision']}"
            f.evidence["board"] = f"file:proc/cpuinfo Revision {d['code']} (decoded)"
        elif self.dmi_product:
            f.board, f.evidence["board"] = self.dmi_product, "file:sys/class/dmi/id/{sys_vendor,product_name}"
        elif f.jetson and f.jetson.get("model"):
            f.board, f.evidence["board"] = f.jetson["model"], "jetson detection"
        else:
            why = ["no device-tree model", "no cpuinfo Model line", "no DMI product name"]
            if gl.get("Hardware"):
                why.append(f"cpuinfo Hardware {gl['Hardware']!r} names only the SoC")
            if pi:
                why.append("board family is Raspberry Pi (see raspberry_pi) but the exact model is not recorded")
            elif f.jetson:
                why.append("board family is Jetson (see jetson) but the module is not named")
            f.unknown["board"] = "; ".join(why)
        # SoC
        if pi and pi.get("soc"):
            f.soc, f.evidence["soc"] = pi["soc"], "raspberry_pi detection"
        elif f.jetson and f.jetson.get("soc"):
            f.soc, f.evidence["soc"] = f.jetson["soc"], "jetson detection"
        elif gl.get("Hardware"):
            f.soc, f.evidence["soc"] = gl["Hardware"], "file:proc/cpuinfo Hardware"
        elif len(f.dt_compatible) > 1:
            f.soc, f.evidence["soc"] = f.dt_compatible[-1], f.evidence.get("dt_compatible", "device tree")
        else:
            f.unknown["soc"] = "no cpuinfo Hardware line and no SoC device-tree compatible"
        if f.board_family is None:
            f.unknown["board_family"] = "neither a Raspberry Pi nor a Jetson was detected"

    # -- accelerators
    def _accelerators(self) -> None:
        f = self.f
        self.dmesg = self.r.commands("dmesg*.txt")
        f.accelerators[ACCEL_CORAL] = self._coral()
        f.accelerators[ACCEL_MOVIDIUS] = self._movidius()
        f.accelerators[ACCEL_INTEL_NPU] = self._intel_npu()
        f.accelerators[ACCEL_INTEL_GPU] = self._intel_gpu()
        f.accelerators[ACCEL_NVIDIA_GPU] = self._nvidia_gpu()
        for name, acc in f.accelerators.items():
            if acc["present"] is None:
                f.unknown[name] = acc["reason"]

    @staticmethod
    def _acc(present: bool | None, ready: bool, reason: str, model: str | None = None,
             evidence: list[str] | None = None, **extra: Any) -> dict[str, Any]:
        return {"present": present, "ready": ready, "model": model, "reason": reason,
                "evidence": evidence or [], **extra}

    def _absent(self, what: str, looked: list[str]) -> dict[str, Any]:
        if looked:
            return self._acc(False, False, f"{what}: not found in " + ", ".join(looked))
        return self._acc(None, False, f"{what}: cannot tell, nothing under the root could show it "
                         "(no relevant sysfs, /proc, /dev or command capture)")

    def _coral(self) -> dict[str, Any]:
        ev: list[str] = []
        usb = [d for d in self.f.usb_devices if d["id"] in CORAL_USB_IDS]
        pci = [d for d in self.f.pci_devices if d.get("id") == CORAL_PCI_ID]
        apex_nodes = [n for n in self.f.device_nodes if n.startswith("/dev/apex_")]
        apex_class = self.r.glob("sys/class/apex/apex_*")
        for d in usb:
            ev.append(f"{d['source']}: USB {d['id']} {CORAL_USB_IDS[d['id']]}")
        for d in pci:
            ev.append(f"{d['source']}: PCI {d['slot']} {d['id']}" + (f" {d['name']!r}" if d.get("name") else ""))
        ev.extend(f"device node {n}" for n in apex_nodes)
        ev.extend(f"sysfs:{p}" for p in apex_class)
        if not (usb or pci or apex_nodes or apex_class):
            looked = self.usb_examined + self.pci_examined + (["dev/"] if self.r.isdir("dev") else [])
            return self._absent("Coral Edge TPU (USB 1a6e:089a/18d1:9302, PCI 1ac1:089a, /dev/apex_*)", looked)
        if usb:
            return self._acc(True, True, "Coral USB Accelerator present; it needs no kernel driver "
                             "(libedgetpu loads its firmware over USB on first use)",
                             model="Coral USB Accelerator", evidence=ev, bus="usb")
        driver_bound = bool(apex_nodes or apex_class) or any(d.get("driver") in CORAL_PCI_DRIVERS for d in pci)
        if driver_bound:
            return self._acc(True, True, "Coral PCIe Edge TPU with the apex driver bound", model="Coral PCIe Edge TPU",
                             evidence=ev, bus="pcie")
        disabled = any(b.get("disabled_regions") for b in self.lspci_blocks if b.get("id") == CORAL_PCI_ID)
        why = "Coral PCIe Edge TPU present but the apex (gasket) driver is not bound"
        if disabled:
            why += ": its memory regions are [disabled] and lspci shows no 'Kernel driver in use: apex'"
        else:
            why += ": no /dev/apex_*, no sys/class/apex, no apex driver on the PCI function"
        return self._acc(True, False, why, model="Coral PCIe Edge TPU", evidence=ev, bus="pcie")

    def _movidius(self) -> dict[str, Any]:
        devs = [d for d in self.f.usb_devices if d["id"] in MOVIDIUS_USB_IDS]
        if not devs:
            return self._absent("Movidius VPU (USB 03e7:2485/f63b/2150)", self.usb_examined)
        ev = [f"{d['source']}: USB {d['id']} {MOVIDIUS_USB_IDS[d['id']]}" for d in devs]
        myriadx = [d for d in devs if d["id"] in MYRIADX_USB_IDS]
        if myriadx:
            return self._acc(True, True, "Myriad X VPU present (drivable only by the OpenVINO MYRIAD plugin, "
                             "OpenVINO 2022.3 LTS or older)", model="Myriad X", evidence=ev, chip="myriadx",
                             usb_ids=[d["id"] for d in devs])
        return self._acc(True, False, "Myriad 2 (original Neural Compute Stick, NCS1): no OpenVINO release since "
                         "2020.4 supports it", model="Myriad 2 (NCS1)", evidence=ev, chip="myriad2",
                         usb_ids=[d["id"] for d in devs])

    def _intel_npu(self) -> dict[str, Any]:
        ev: list[str] = []
        bound = False
        model: str | None = None
        looked: list[str] = list(self.pci_examined)
        if self.r.isdir("sys/class/accel"):
            looked.append("sysfs:sys/class/accel")
        for rel in self.r.glob("sys/class/accel/accel*"):
            driver = self.r.link_name(f"{rel}/device/driver")
            if driver == INTEL_NPU_DRIVER:
                ev.append(f"sysfs:{rel}/device/driver -> {driver}")
                bound = True
        for d in self.f.pci_devices:
            if d.get("id") in INTEL_NPU_PCI_IDS or d.get("driver") == INTEL_NPU_DRIVER or (
                    d.get("name") and re.search(r"Intel.*\bNPU\b", str(d["name"]))):
                ev.append(f"{d['source']}: PCI {d['slot']} {d.get('id') or d.get('name')}"
                          + (f" driver {d['driver']}" if d.get("driver") else ""))
                model = model or INTEL_NPU_PCI_IDS.get(str(d.get("id")))
                bound = bound or d.get("driver") == INTEL_NPU_DRIVER
        accel_nodes = [n for n in self.f.device_nodes if n.startswith("/dev/accel/")]
        if accel_nodes and ev:
            ev.extend(f"device node {n}" for n in accel_nodes)
        for rel, text in self.dmesg:
            looked.append(f"command:{rel}")
            for line in text.splitlines():
                if re.search(rf"Initialized {INTEL_NPU_DRIVER}\b", line):
                    ev.append(f"command:{rel}: {line.strip()}")
                    bound = True
                fw = re.search(r"vpu_(\d{2}xx)", line)
                if fw and INTEL_NPU_DRIVER in line:
                    model = model or INTEL_NPU_FIRMWARE.get(fw.group(1), f"NPU {fw.group(1)}")
                    if "MTL" in line:
                        model = "NPU 37xx (Meteor Lake)"
        if not ev:
            if accel_nodes:
                looked.append("dev/accel (nodes present, driver not identified)")
            return self._absent("Intel NPU (intel_vpu driver, PCI 8086:7d1d/ad1d/643e/b03e)", looked)
        if bound:
            return self._acc(True, True, "Intel NPU bound to the intel_vpu driver", model=model, evidence=ev)
        return self._acc(True, False, "Intel NPU PCI function present but the intel_vpu driver is not bound",
                         model=model, evidence=ev)

    def _intel_gpu(self) -> dict[str, Any]:
        ev: list[str] = []
        bound = False
        looked = list(self.pci_examined)
        if self.r.isdir("sys/class/drm"):
            looked.append("sysfs:sys/class/drm")
        for rel in self.r.glob("sys/class/drm/card[0-9]*"):
            if "-" in os.path.basename(rel):
                continue  # connectors such as card0-HDMI-A-1
            vendor = (self.r.read_value(f"{rel}/device/vendor") or "").lower()
            driver = self.r.link_name(f"{rel}/device/driver")
            if vendor == f"0x{PCI_VENDOR_INTEL}" or driver in INTEL_GPU_DRIVERS:
                ev.append(f"sysfs:{rel} vendor {vendor} driver {driver}")
                bound = bound or driver in INTEL_GPU_DRIVERS
        for d in self.f.pci_devices:
            pid = str(d.get("id") or "")
            cls = str(d.get("class") or "")
            is_display = cls.startswith(PCI_CLASS_DISPLAY_PREFIX) or bool(
                re.search(r"VGA|Display|3D controller", cls))
            if (pid.startswith(PCI_VENDOR_INTEL + ":") and is_display) or d.get("driver") in INTEL_GPU_DRIVERS or (
                    not pid and is_display and "Intel" in str(d.get("name"))):
                ev.append(f"{d['source']}: PCI {d['slot']} {pid or d.get('name')}"
                          + (f" driver {d['driver']}" if d.get("driver") else ""))
                bound = bound or d.get("driver") in INTEL_GPU_DRIVERS
        if not ev:
            return self._absent("Intel GPU (i915/xe driver or Intel display-class PCI function)", looked)
        if bound:
            return self._acc(True, True, "Intel GPU bound to i915/xe", model="Intel GPU", evidence=ev)
        return self._acc(True, False, "Intel GPU present but no i915/xe driver evidence", model="Intel GPU",
                         evidence=ev)

    def _nvidia_gpu(self) -> dict[str, Any]:
        f = self.f
        ev: list[str] = []
        models: list[str] = []
        driver_ok = False
        looked = list(self.pci_examined)
        if self.r.isdir("proc/driver/nvidia"):
            looked.append("file:proc/driver/nvidia")
        for rel in self.r.glob("proc/driver/nvidia/gpus/*/information"):
            info = _kv_lines(self.r.read_text(rel) or "")
            ev.append(f"file:{rel}")
            models.append(info.get("Model", "NVIDIA GPU"))
            driver_ok = True
        nodes = [n for n in f.device_nodes if re.match(r"/dev/nvidia\d+$", n)]
        if nodes:
            ev.extend(f"device node {n}" for n in nodes)
            driver_ok = True
        for d in f.pci_devices:
            pid = str(d.get("id") or "")
            cls = str(d.get("class") or "")
            name = str(d.get("name") or "")
            if pid.startswith(PCI_VENDOR_NVIDIA + ":") or (not pid and "NVIDIA" in name):
                if cls and not (cls.startswith(PCI_CLASS_DISPLAY_PREFIX) or re.search(r"VGA|3D|Display", cls)):
                    continue  # the HDMI audio function of a GPU, NVSwitch, ...
                if d.get("driver") and d["driver"] not in NVIDIA_GPU_DRIVERS:
                    continue  # e.g. snd_hda_intel on the audio function, vfio-pci for pass-through
                ev.append(f"{d['source']}: PCI {d['slot']} {pid or name}"
                          + (f" driver {d['driver']}" if d.get("driver") else ""))
                driver_ok = driver_ok or d.get("driver") == "nvidia"
        for rel, text in self.r.commands("nvidia-smi*.txt"):
            looked.append(f"command:{rel}")
            names = re.findall(r"GPU \d+: (.+?) \(UUID", text)
            if names or "NVIDIA-SMI" in text:
                ev.append(f"command:{rel}")
                models.extend(names)
                driver_ok = True
        jet = f.jetson
        if jet is not None:
            soc = jet.get("soc") or "Tegra"
            ev.append(f"integrated GPU of the Jetson SoC ({soc}, {jet['confidence']})")
            models.append(f"{soc} integrated GPU")
            l4t_driver = bool(jet.get("l4t_release")) or (f.kernel_release or "").endswith("-tegra") or any(
                n.startswith(("/dev/nvhost", "/dev/nvgpu")) for n in f.device_nodes)
            if l4t_driver:
                return self._acc(True, True, "Jetson integrated GPU with the L4T GPU driver (L4T release or -tegra "
                                 "kernel)", model=", ".join(models), evidence=ev, integrated=True)
            return self._acc(True, False, "Jetson integrated GPU inferred, but no evidence of the L4T GPU driver "
                             "(no etc/nv_tegra_release, no -tegra kernel, no /dev/nvhost-*)",
                             model=", ".join(models), evidence=ev, integrated=True)
        if not ev:
            return self._absent("NVIDIA GPU (proc/driver/nvidia, /dev/nvidia*, PCI vendor 10de, nvidia-smi)", looked)
        if driver_ok:
            return self._acc(True, True, "NVIDIA GPU with the nvidia driver loaded",
                             model=", ".join(models) or "NVIDIA GPU", evidence=ev, integrated=False)
        return self._acc(True, False, "NVIDIA PCI device present but no evidence that the nvidia driver is loaded",
                         model=", ".join(models) or "NVIDIA GPU", evidence=ev, integrated=False)


def detect(root: str | Path = "/") -> HardwareFacts:
    """Detect hardware facts below `root`.  Never raises; see the module docstring for invariants."""
    try:
        return _Detector(Path(root)).run()
    except Exception as exc:  # pragma: no cover - belt and braces around the per-step guards
        log.exception("hardware detection failed for root %s", root)
        facts = HardwareFacts(root=str(root), captured=str(root) != "/")
        facts.notes.append(f"detection failed: {exc!r}")
        facts.unknown["all"] = f"detection failed: {exc!r}"
        return facts
