"""System figures for the heartbeat (psutil), including Pi and Jetson thermal zones."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

THERMAL_ROOT = Path("/sys/class/thermal")
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
        try:
            import psutil

            for name, entries in (psutil.sensors_temperatures() or {}).items():
                for e in entries[:4]:
                    out[f"{name}:{e.label}" if e.label else name] = round(float(e.current), 1)
        except (AttributeError, OSError):
            pass
    return out


def system_figures(state_dir: str) -> dict[str, Any]:
    import psutil

    vm = psutil.virtual_memory()
    try:
        free_mb = shutil.disk_usage(state_dir).free // 2**20
    except OSError:
        free_mb = -1
    fig: dict[str, Any] = {
        "cpu_pct": psutil.cpu_percent(interval=None),
        "mem_used_pct": round(vm.percent, 1),
        "mem_available_mb": vm.available // 2**20,
        "disk_free_mb": free_mb,
        "load1": round(os.getloadavg()[0], 2),
    }
    temps = temperatures_c()
    if temps:
        sensors = [v for k, v in temps.items() if k not in DERIVED] or list(temps.values())
        fig["temp_c"] = max(sensors)
        fig["temps_c"] = temps
    proc = psutil.Process()
    fig["agent_rss_mb"] = round(proc.memory_info().rss / 2**20, 1)
    return fig
