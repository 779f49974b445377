"""`fleetctl demo` (what `bash tools/demo.sh` runs, minus the venv): it works end to end, its
closing hint is true, and a signal to the demo alone ends everything it started.

The demo runs as a real process in its own process group; the signal goes to the demo's pid only (as
`kill PID` would), so the broker, the agent and the model's worker must be stopped by the demo
itself, not by a signal to the whole group.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

DEMO_TIMEOUT_S = 90.0  # the demo takes about 15 s on 2 idle cores
STOP_TIMEOUT_S = 30.0  # the demo stops the agent (≤ 10 s clean shutdown), its workers and the broker
HINT_TIMEOUT_S = 30.0
WORKER_MARK = "agent.serving.worker"


class DemoProcess:
    """`fleetctl demo --keep-running` as a process, its output collected line by line."""

    def __init__(self, workdir: Path) -> None:
        self.lines: list[str] = []
        self._cv = threading.Condition()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fleetctl.main", "demo", "--keep-running", "--workdir", str(workdir)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=workdir.parent,
            start_new_session=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cv:
                self.lines.append(line.rstrip("\n"))
                self._cv.notify_all()

    @property
    def text(self) -> str:
        with self._cv:
            return "\n".join(self.lines)

    def wait_until(self, pred: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while not pred():
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise AssertionError(f"{what}: not within {timeout_s:.0f} s (exit {self.proc.poll()}):\n"
                                         + "\n".join(self.lines[-40:]))
                self._cv.wait(min(left, 0.2))

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            return []

    def kill_all(self) -> None:
        """Test cleanup only: whatever is left in the demo's process group."""
        for p in self.descendants():
            with contextlib.suppress(psutil.Error):
                p.kill()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def still_running(procs: list[psutil.Process], timeout_s: float) -> list[str]:
    """Command lines of ``procs`` still running at the deadline (an unreaped zombie has exited)."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = []
        for p in procs:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(" ".join(p.cmdline()))
            except psutil.Error:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def agent_log(tmp_path: Path) -> str:
    log = tmp_path / "demo" / "device" / "agent.log"
    return "\nagent log:\n" + (log.read_text(errors="replace")[-4000:] if log.exists() else "(none)")


@pytest.fixture
def demo_proc(tmp_path: Path) -> Iterator[DemoProcess]:
    d = DemoProcess(tmp_path / "demo")
    try:
        yield d
    finally:
        d.kill_all()


def _started(d: DemoProcess) -> tuple[list[psutil.Process], list[str]]:
    procs = d.descendants()
    names = []
    for p in procs:
        try:
            names.append(" ".join(p.cmdline()))
        except psutil.Error:
            names.append("?")
    return procs, names


@pytest.mark.timeout(240)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_demo_keep_running_hint_works_and_a_signal_ends_everything(tmp_path: Path, demo_proc: DemoProcess,
                                                                   sig: signal.Signals) -> None:
    d = demo_proc
    d.wait_until(lambda: any(x.startswith("   $ curl") for x in d.lines), DEMO_TIMEOUT_S, "demo ready")
    out = d.text
    assert "Demo OK" in out and "--keep-running" in out and f"pid {d.proc.pid}" in out, out
    assert "SUCCEEDED" in out and "telemetry" in out and "heartbeat" in out, out

    # The hint's commands work while the demo keeps running (watch stops after one message).
    hints = [x.split("$ ", 1)[1] for x in d.lines if x.startswith("   $ ")]
    assert [h.split()[0].rsplit("/", 1)[-1] for h in hints] == ["agentctl", "fleetctl", "curl"], hints
    results = {}
    for h in hints:
        cmd = h + (" --count 1" if " watch " in h else "")
        r = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=HINT_TIMEOUT_S, cwd=tmp_path)
        assert r.returncode == 0, f"{cmd}: {r.returncode}\n{r.stdout}\n{r.stderr}\n{agent_log(tmp_path)}"
        results[h.split()[0].rsplit("/", 1)[-1]] = r.stdout
    assert "demo-classifier" in results["agentctl"] and "serving" in results["agentctl"], results["agentctl"]
    assert "demo-device status online" in results["fleetctl"], results["fleetctl"]
    assert '"name":"demo-classifier"' in results["curl"].replace(" ", ""), results["curl"]

    # Heartbeats (every 2 s) went on meanwhile, but the hint stays the last thing printed.
    with d._cv:
        ready = next(i for i, x in enumerate(d.lines) if "Everything keeps running" in x)
        assert d.lines[ready + 1:] == [f"   $ {h}" for h in hints], d.lines[ready:]

    procs, names = _started(d)
    assert any(WORKER_MARK in n for n in names) and any("mosquitto" in n for n in names), names
    os.kill(d.proc.pid, sig)
    assert d.proc.wait(STOP_TIMEOUT_S) == 0, d.text + agent_log(tmp_path)
    assert still_running(procs, STOP_TIMEOUT_S) == [], names


@pytest.mark.timeout(240)
def test_demo_sigterm_mid_run_ends_everything(demo_proc: DemoProcess) -> None:
    """SIGTERM to the demo alone while it is still working: no broker, agent or worker left."""
    d = demo_proc
    deadline = time.monotonic() + DEMO_TIMEOUT_S
    while not any(WORKER_MARK in n for n in _started(d)[1]):
        assert d.proc.poll() is None and time.monotonic() < deadline, f"no model worker started:\n{d.text}"
        time.sleep(0.1)
    procs, names = _started(d)
    os.kill(d.proc.pid, signal.SIGTERM)
    assert d.proc.wait(STOP_TIMEOUT_S) == 130, d.text  # interrupted, as after Ctrl-C
    assert still_running(procs, STOP_TIMEOUT_S) == [], names

