"""The README's "By hand on one machine" section, run as written.

The commands are read from the README's fenced block (so the README cannot drift from what works)
and typed, one line at a time, into one real bash shell in an empty folder standing in for the
user's: the same `export`s, the same background jobs with `&`, the same `kill %1 %2 %3` at the
end. What the test changes, and why:

- it runs twice: with the broker line as written (Mosquitto), and with that line's
  "or, without Mosquitto:" alternative, the fallback broker;
- the ports 1883, 8470 and 8080 become free loopback ports (others may use those here);
- the venv line is not run (it installs from PyPI for minutes); `source .venv/bin/activate`
  activates the venv running these tests instead, which was installed the same way;
- after each background line the test waits, with a deadline, for what a person would wait for
  before typing on: the broker's port, the daemon subscribed (`agentctl status` says connected),
  the artifact server's port.

It ends with a successful deploy of the sample model, an inference over curl equal to
onnxruntime called directly on the same model and input, and every process the shell started
(broker, daemon, model worker, server) gone after the README's `kill`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import psutil
import pytest
from conftest import REPO, free_port, mosquitto_binary

from agent.errors import AgentError

SECTION = "## By hand on one machine"
COMMAND_TIMEOUT_S = 120.0  # one foreground line (the deploy's --wait included)
READY_TIMEOUT_S = 60.0  # under load from others the daemon's start can take tens of seconds
STOP_TIMEOUT_S = 15.0  # after `kill %1 %2 %3`: the daemon's clean shutdown fits well inside
README_PORTS = {"broker": "1883", "api": "8470", "serve": "8080"}
FALLBACK_RE = re.compile(r"#\s*or, without Mosquitto:\s*(.+)$")


def readme_commands() -> list[str]:
    """The section's first ```bash block, one entry per command (``\\`` continuations joined)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    start = text.index(SECTION)
    block = re.search(r"```bash\n(.*?)```", text[start:], re.S)
    assert block, f"no ```bash block after {SECTION!r} in README.md"
    return [c.strip() for c in block.group(1).replace("\\\n", " ").splitlines() if c.strip()]


def strip_comment(line: str) -> str:
    return re.sub(r"\s+#\s.*$", "", line).strip()


@dataclass
class Shell:
    """One bash process fed lines on stdin, like a terminal; output goes to a file."""

    cwd: Path
    env: dict[str, str]
    proc: subprocess.Popen[bytes] = field(init=False)
    n: int = 0

    def __post_init__(self) -> None:
        self.out_path = self.cwd / ".shell-output"
        self.out = open(self.out_path, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(["bash", "--norc", "--noprofile"], stdin=subprocess.PIPE, stdout=self.out,
                                     stderr=subprocess.STDOUT, cwd=self.cwd, env=self.env, start_new_session=True)

    def run(self, line: str, timeout_s: float = COMMAND_TIMEOUT_S) -> tuple[int, str]:
        """Type ``line``; return its exit status and what the shell printed meanwhile."""
        self.n += 1
        marker = f"@@rc-{self.n}@@"
        start = self.out_path.stat().st_size
        assert self.proc.stdin is not None
        self.proc.stdin.write(f'{line}\necho "{marker}$?"\n'.encode())
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout_s
        while True:
            with open(self.out_path, "rb") as f:
                f.seek(start)
                text = f.read().decode(errors="replace")
            m = re.search(re.escape(marker) + r"(\d+)", text)
            if m:
                return int(m.group(1)), text[:m.start()]
            if self.proc.poll() is not None:
                raise AssertionError(f"the shell ended ({self.proc.returncode}) during {line!r}:\n{text[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{line!r} still running after {timeout_s:.0f} s:\n{text[-3000:]}")
            time.sleep(0.05)

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            return []

    def close(self) -> None:
        """End the shell and anything still running in its process group."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                continue
        self.out.close()


def wait_listening(shell: Shell, port: int, timeout_s: float) -> None:
    """A process this shell started listens on ``port`` (not someone else's that took the port)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for p in shell.descendants():
            try:
                conns = p.net_connections("tcp") if hasattr(p, "net_connections") else p.connections("tcp")
            except psutil.Error:
                continue
            if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in conns):
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing this shell started listens on port {port} after {timeout_s:.0f} s "
                       f"(output so far:\n{shell.out_path.read_text(errors='replace')[-3000:]})")


def wait_subscribed(sock: Path, timeout_s: float) -> None:
    """The daemon answers on its control socket and the broker acknowledged its subscriptions."""
    from agent.serving.control import ControlClient

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if sock.exists():
            try:
                if ControlClient(str(sock), timeout_s=2).call("status").get("mqtt", {}).get("subscribed"):
                    return
            except (OSError, ValueError, AgentError):
                pass
        time.sleep(0.1)
    log = sock.parent / "agent.log"
    raise TimeoutError(f"the daemon was not connected and subscribed after {timeout_s:.0f} s; its log:\n"
                       + (log.read_text(errors="replace")[-4000:] if log.exists() else "(none)"))


def all_gone(procs: list[psutil.Process], timeout_s: float) -> list[str]:
    """Wait until every process has exited (a zombie waiting for its reaper counts as exited);
    returns the command lines of those still running at the deadline."""
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


@pytest.fixture
def shell(tmp_path: Path) -> Iterator[Shell]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEETCTL_", "EDGE_AGENT_"))}
    binary = mosquitto_binary()
    if binary and not shutil.which("mosquitto"):  # Debian puts it in /usr/sbin, off a user's PATH
        env["PATH"] = f"{os.path.dirname(binary)}{os.pathsep}{env.get('PATH', '')}"
    sh = Shell(tmp_path, env)
    try:
        yield sh
    finally:
        sh.close()


@pytest.mark.parametrize("broker", ["mosquitto", "fallback"])
def test_readme_by_hand_deploys_and_infers(tmp_path: Path, shell: Shell, broker: str) -> None:
    if broker == "mosquitto" and mosquitto_binary() is None:
        pytest.fail("mosquitto is not installed (apt-get install -y mosquitto)")
    ports = {k: str(free_port()) for k in README_PORTS}
    commands = readme_commands()
    text = "\n".join(commands)
    for what, port in README_PORTS.items():
        assert port in text, f"the README's block no longer uses port {port} ({what}); update this test"
    outputs: dict[str, str] = {}
    started: list[psutil.Process] = []
    names: list[str] = []
    assert commands[0].startswith("python3 -m venv .venv"), commands[0]
    for raw in commands[1:]:
        line = raw
        if broker == "fallback" and (m := FALLBACK_RE.search(raw)):
            line = m.group(1)
        for what, port in README_PORTS.items():
            line = line.replace(port, ports[what])
        if line.startswith("source .venv/bin/activate"):
            assert sys.prefix != sys.base_prefix, "run the tests from the venv (.venv/bin/python -m pytest)"
            line = line.replace(".venv", sys.prefix, 1)
        cmd = strip_comment(line)
        if cmd.startswith("kill "):
            started = shell.descendants()
            names = [" ".join(p.cmdline()) for p in started]
        rc, out = shell.run(line)
        assert rc == 0, f"README line failed ({rc}): {line}\n{out[-3000:]}"
        outputs[" ".join(cmd.split()[:2])] = out
        if cmd.endswith("&"):
            if cmd.startswith(("mosquitto", "python -m fleetctl.devbroker")):
                wait_listening(shell, int(ports["broker"]), READY_TIMEOUT_S)
            elif cmd.startswith("edge-agent run"):
                wait_subscribed(tmp_path / "dev" / "control.sock", READY_TIMEOUT_S)
                wait_listening(shell, int(ports["api"]), READY_TIMEOUT_S)
            elif cmd.startswith("fleetctl serve"):
                wait_listening(shell, int(ports["serve"]), READY_TIMEOUT_S)
            else:
                raise AssertionError(f"a background line this test does not know how to wait for: {line}")

    assert "SUCCEEDED" in outputs["fleetctl deploy"], outputs["fleetctl deploy"]
    answer = json.loads(next(x for x in outputs["curl -s"].splitlines() if x.startswith("{")))
    request = json.loads((tmp_path / "model.request.json").read_text())["inputs"][0]
    image = np.asarray(request["data"], dtype=np.float32).reshape(request["shape"])
    direct = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {request["name"]: image})[0]
    got = np.asarray(answer["outputs"][0]["data"], dtype=np.float32).reshape(direct.shape)
    np.testing.assert_allclose(got, direct, rtol=1e-5, atol=1e-6)
    status = outputs["agentctl status"]
    assert re.search(r"mqtt\s+connected", status) and re.search(r"mymodel\s+1\s.*serving", status), status
    assert "dev-device status online" in outputs["fleetctl watch"], outputs["fleetctl watch"]

    # `kill %1 %2 %3` ends the broker, the daemon with its model worker, and the server.
    assert any("agent.serving.worker" in n for n in names), names
    assert all_gone(started, STOP_TIMEOUT_S) == [], names
