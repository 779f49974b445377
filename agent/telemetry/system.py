"""System figures for the heartbeat, including Pi and Jetson thermal zones.

Read from /proc and /sys as psutil reads them (same figures and formulas), without importing
psutil: ≈ 0.7 MB of an idle daemon's resident memory for five numbers a minute. psutil is still
the fallback where /proc lacks a figure (a kernel before 3.14 has no MemAvailable; not Linux).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

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
    """hwmon sensors (x86 boards), as psutil.sensors_temperatures() lists them: up to four per chip."""
    bases = {str(p).split("_")[0] for p in HWMON_ROOT.glob("hwmon*/temp*_*")}
    bases |= {str(p).split("_")[0] for p in HWMON_ROOT.glob("hwmon*/device/temp*_*")}  # CentOS
    chips: dict[str, list[tuple[str, float]]] = {}
    for base in sorted(bases):
        try:
            current = float(Path(base + "_input").read_bytes()) / 1000.0
            name = (Path(base).parent / "name").read_text().strip()
        except (OSError, ValueError):
            continue
        try:
            label = Path(base + "_label").read_text().strip()
        except OSError:
            label = ""
        chips.setdefault(name, []).append((label, current))
    out: dict[str, float] = {}
    for name, entries in chips.items():
        for label, current in entries[:4]:
            out[f"{name}:{label}" if label else name] = round(current, 1)
    return out


def _meminfo() -> dict[str, int]:
    out = {}
    with open("/proc/meminfo", "rb") as f:
        for line in f:
            key, _, rest = line.partition(b":")
            fields = rest.split()
            if fields:
                out[key.decode()] = int(fields[0]) * 1024
    return out


def _cpu_times() -> tuple[float, float]:
    """(busy, all) jiffies of the whole machine: psutil's cpu_percent arithmetic."""
    with open("/proc/stat", "rb") as f:
        t = [float(x) for x in f.readline().split()[1:]]
    t = (t + [0.0] * 10)[:10]  # user nice system idle iowait irq softirq steal guest guest_nice
    idle, iowait, guest, guest_nice = t[3], t[4], t[8], t[9]
    total = sum(t) - guest - guest_nice  # guest time is already in user and nice
    return total - idle - iowait, total


try:
    _last_cpu: tuple[float, float] | None = _cpu_times()  # cpu_pct: since the agent started, then per heartbeat
except (OSError, ValueError):
    _last_cpu = None


def cpu_percent() -> float:
    """Machine CPU use since the previous call (the first: since this module was imported), %."""
    global _last_cpu
    try:
        busy, total = _cpu_times()
    except (OSError, ValueError):  # no /proc (not Linux)
        import psutil

        return float(psutil.cpu_percent(interval=None))
    last, _last_cpu = _last_cpu, (busy, total)
    if last is None or total - last[1] <= 0:
        return 0.0
    return round(min(100.0, max(0.0, (busy - last[0]) / (total - last[1]) * 100.0)), 1)


def memory() -> tuple[float, int]:
    """(percent used, bytes available), as psutil.virtual_memory()."""
    try:
        info = _meminfo()
    except (OSError, ValueError):  # no /proc (not Linux)
        info = {}
    total, avail = info.get("MemTotal", 0), info.get("MemAvailable")
    if avail is None or not total:
        import psutil  # an old kernel: psutil estimates what is available

        vm = psutil.virtual_memory()
        return float(vm.percent), int(vm.available)
    return round((total - avail) / total * 100.0, 1), avail


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):  # no /proc (not Linux)
        import psutil

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
