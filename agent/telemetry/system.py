"""System figures for the heartbeat, including Pi and Jetson thermal zones.

CPU, memory, hwmon sensors and the agent's own RSS come from psutil; thermal zones are read from
/sys here because Pi and Jetson zones need sorting and filtering (trip flags, derived zones,
disabled sensors) that psutil does not do.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import psutil

THERMAL_ROOT = Path("/sys/class/thermal")
HWMON_ROOT = Path("/sys/class/hwmon")
MAX_ZONES = 16
PLAUSIBLE_C = (-40.0, 150.0)  # outside this a zone is disabled or broken (Jetson: -256 °C)
# Jetson zones that are not sensors: PMIC-Die reads a fixed 100 °C (a trip flag), and
# thermal-fan-est is the fan driver's estimate made from the other zones.
NOT_SENSORS = {"PMIC-Die"}
DERIVED = {"thermal-fan-est"}


def _zone_number(p: Path) -> int:
    digits = p.name.removeprefix("thermal_zone")
    return int(digits) if digits.isdigit() else 1 << 30


def temperatures_c() -> dict[str, float]:
    """Thermal zones (Pi: cpu-thermal; Jetson: CPU-therm, GPU-therm, ...) in °C."""
    out: dict[str, float] = {}
    for zone in sorted(THERMAL_ROOT.glob("thermal_zone*"), key=_zone_number)[:MAX_ZONES]:
        try:
            kind = (zone / "type").read_text().strip() or zone.name
            milli = int((zone / "temp").read_text().strip())
        except (OSError, ValueError):
            continue  # a disabled zone answers EINVAL/ENODATA
        c = milli / 1000.0
        if kind in NOT_SENSORS or not PLAUSIBLE_C[0] <= c <= PLAUSIBLE_C[1]:
            continue
        if kind in out:  # e.g. two "acpitz" zones
            kind = f"{kind}.{zone.name.removeprefix('thermal_zone')}"
        out[kind] = round(c, 1)
    if not out:
        out = _hwmon_temperatures_c()
    return out


def _hwmon_temperatures_c() -> dict[str, float]:
    """hwmon sensors (x86 boards), up to four per chip."""
    sensors = getattr(psutil, "sensors_temperatures", None)  # absent where psutil has no sensors
    try:
        chips = sensors() if sensors else {}
    except OSError:
        chips = {}
    out: dict[str, float] = {}
    for name, entries in chips.items():
        for e in entries[:4]:
            out[f"{name}:{e.label}" if e.label else name] = round(e.current, 1)
    return out


psutil.cpu_percent(interval=None)  # cpu_pct: since the agent started, then per heartbeat


def cpu_percent() -> float:
    """Machine CPU use since the previous call (the first: since this module was imported), %."""
    return round(float(psutil.cpu_percent(interval=None)), 1)


def memory() -> tuple[float, int]:
    """(percent used, bytes available) of the machine."""
    vm = psutil.virtual_memory()
    return round(float(vm.percent), 1), int(vm.available)


def rss_bytes() -> int:
    """The agent process's resident memory."""
    return int(psutil.Process().memory_info().rss)


def release_free_memory() -> bool:
    """Hand the heap's free pages back to the OS (glibc ``malloc_trim``); False where there is none.

    After start-up (and any burst of work) CPython's heap keeps pages that held transient objects:
    compiling modules without .pyc files alone leaves ≈ 3 MB resident for the life of the process.
    """
    try:
        import ctypes

        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
    return True


def system_figures(state_dir: str) -> dict[str, Any]:
    used_pct, available = memory()
    try:
        free_mb = shutil.disk_usage(state_dir).free // 2**20
    except OSError:
        free_mb = -1
    fig: dict[str, Any] = {
        "cpu_pct": cpu_percent(),
        "mem_used_pct": round(used_pct, 1),
        "mem_available_mb": available // 2**20,
        "disk_free_mb": free_mb,
        "load1": round(os.getloadavg()[0], 2),
    }
    temps = temperatures_c()
    if temps:
        sensors = [v for k, v in temps.items() if k not in DERIVED] or list(temps.values())
        fig["temp_c"] = max(sensors)
        fig["temps_c"] = temps
    fig["agent_rss_mb"] = round(rss_bytes() / 2**20, 1)
    return fig
