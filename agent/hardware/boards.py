"""Board detection steps: Raspberry Pi (revision codes, device tree), Jetson (L4T, tegra), the board and SoC."""

from __future__ import annotations

import logging
import re
from typing import Any

from agent.hardware.facts import (
    ARM_PARTS,
    BOARD_FAMILY_JETSON,
    BOARD_FAMILY_RPI,
    CONFIRMED,
    INFERRED,
    JETSON_LIKE,
    L4T_BOARD_RE,
    L4T_BOARDS,
    L4T_RE,
    NVIDIA_CPU_SOC,
    RPI_CPU_PART_GENERATION,
    RPI_GENERATION_SOC,
    RPI_HARDWARE_NAMES,
    RPI_KERNEL_FLAVOURS,
    RPI_SOC_GENERATION,
    TEGRA_COMPAT_RE,
    DetectionState,
)
from agent.hardware.parsers import (
    _decode_rpi_revision,
    _rpi_generation_from_model,
)

log = logging.getLogger("agent.hardware.probe")  # one logger for all detection steps

class BoardSteps(DetectionState):
    """The boards steps of the detector (agent/hardware/probe.py)."""

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
        soc = self._rpi_soc(decoded, hardware, generation)
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

    def _rpi_soc(self, decoded: dict[str, Any] | None, hardware: str | None, generation: int | None) -> str | None:
        """The Pi's SoC: from a new-style revision code, the cpuinfo Hardware line, the device tree
        or the generation, in that order."""
        f = self.f
        soc = decoded["processor"] if decoded and decoded.get("style") == "new" else None
        if soc is None and hardware in RPI_SOC_GENERATION:
            soc = hardware
        soc = soc or next((c.split(",", 1)[1].upper() for c in f.dt_compatible if c.startswith("brcm,bcm")), None)
        soc = soc or RPI_GENERATION_SOC.get(generation or 0)
        if hardware == "BCM2835" and soc and soc != "BCM2835":
            f.notes.append(f"cpuinfo Hardware 'BCM2835' is the generic name the Raspberry Pi kernel prints for "
                           f"every model; the SoC is {soc}")
        return soc

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

