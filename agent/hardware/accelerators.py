"""Accelerator detection steps: Coral Edge TPU, Movidius/Myriad, Intel NPU, Intel GPU, NVIDIA GPU."""

from __future__ import annotations

import logging
import os
import re
from typing import Any

from agent.hardware.facts import (
    ACCEL_CORAL,
    ACCEL_INTEL_GPU,
    ACCEL_INTEL_NPU,
    ACCEL_MOVIDIUS,
    ACCEL_NVIDIA_GPU,
    CORAL_PCI_DRIVERS,
    CORAL_PCI_ID,
    CORAL_USB_IDS,
    INTEL_GPU_DRIVERS,
    INTEL_NPU_DRIVER,
    INTEL_NPU_FIRMWARE,
    INTEL_NPU_PCI_IDS,
    MOVIDIUS_USB_IDS,
    MYRIADX_USB_IDS,
    NVIDIA_GPU_DRIVERS,
    PCI_CLASS_DISPLAY_PREFIX,
    PCI_VENDOR_INTEL,
    PCI_VENDOR_NVIDIA,
    DetectionState,
)
from agent.hardware.parsers import (
    _kv_lines,
)

log = logging.getLogger("agent.hardware.probe")  # one logger for all detection steps

class AcceleratorSteps(DetectionState):
    """The accelerators steps of the detector (agent/hardware/probe.py)."""

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

