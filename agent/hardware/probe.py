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

Layout: this module runs the steps (CPU, kernel, memory, thermal, USB, PCI, device nodes);
boards.py (Raspberry Pi, Jetson, board/SoC) and accelerators.py hold the other steps; facts.py
the constants, `HardwareFacts` and the bounded reader; parsers.py the small text parsers.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

from agent.hardware.accelerators import (
    AcceleratorSteps,
)
from agent.hardware.boards import (
    BoardSteps,
)
from agent.hardware.facts import (
    ACCELERATOR_NAMES,
    ARM_IMPLEMENTERS,
    ARM_PARTS,
    COMMANDS_DIR,
    ELISION_RE,
    LSPCI_HEAD_RE,
    LSPCI_ID_RE,
    LSPCI_NAME_IDS,
    LSUSB_RE,
    MAX_FILE_BYTES,
    MILLIDEGREES_PER_DEGREE_C,
    HardwareFacts,
)
from agent.hardware.parsers import (
    _arch_from_cpuinfo,
    _isa_tags,
    _kv_lines,
    _norm_arch,
    _parse_cpuinfo,
    _parse_range_list,
)

log = logging.getLogger(__name__)

__all__ = ["ACCELERATOR_NAMES", "MAX_FILE_BYTES", "HardwareFacts", "detect"]


class _Detector(BoardSteps, AcceleratorSteps):
    """Runs the detection steps in order; each step that fails is noted, never raised."""

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
