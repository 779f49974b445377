"""Small parsers of /proc and device-tree text used by hardware detection."""

from __future__ import annotations

import re
from typing import Any

from agent.hardware.facts import (
    RPI_MANUFACTURERS,
    RPI_MEMORY_MB,
    RPI_NEW_STYLE_FLAG,
    RPI_OLD_STYLE_CODES,
    RPI_PROCESSORS,
    RPI_TYPES,
)

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
