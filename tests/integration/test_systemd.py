"""The systemd unit, sysusers and tmpfiles, and the install/uninstall scripts.

There is no systemd as PID 1 here, so the unit is checked offline with the real tools:
``systemd-analyze verify`` (on a copy whose ExecStart names an executable that exists) and
``systemd-analyze security --offline=true`` with the exposure asserted; sysusers and tmpfiles
are applied to a staging root with ``systemd-sysusers --root`` / ``systemd-tmpfiles --root``; and
tools/install.sh installs into a staging root (``--root DIR --no-systemctl``), then
tools/uninstall.sh removes it keeping data, and again with ``--purge``.

Tests use no network, so the staged install runs pip with ``--no-deps`` and the staged venv finds the
package's dependencies (paho-mqtt, cryptography, ...) on PYTHONPATH: a folder of links to exactly
those distributions in the test environment, without edge-agent itself, so the ``agent`` that runs
is the one install.sh put in the staged venv (asserted). ``--system-site-packages`` cannot stand in
for this: a venv is built on the base interpreter, whose packages are not the test environment's.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from conftest import REPO
from packaging.requirements import Requirement

UNIT = REPO / "systemd" / "edge-agent.service"
MAX_EXPOSURE = 2.0
TOOL_TIMEOUT_S = 60.0
INSTALL_TIMEOUT_S = 300.0

needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")


def _unit_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at an executable that exists here (verify checks it)."""
    text = UNIT.read_text()
    text = re.sub(r"^ExecStart=\S+", f"ExecStart={sys.executable}", text, count=1, flags=re.M)
    out = tmp_path / "edge-agent.service"
    out.write_text(text)
    return out


def _directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "[")) and "=" in line:
            k, v = line.split("=", 1)
            out.setdefault(k, []).append(v)
    return out


def test_unit_has_what_the_agent_needs() -> None:
    d = _directives(UNIT.read_text())
    assert d["Type"] == ["notify"] and d["NotifyAccess"] == ["main"]
    assert d["WatchdogSec"] and d["Restart"] == ["on-failure"]
    assert d["StartLimitIntervalSec"] and d["StartLimitBurst"]
    assert d["User"] == ["edge-agent"] and d["Group"] == ["edge-agent"]
    assert d["StateDirectory"] == ["edge-agent"] and d["RuntimeDirectory"] == ["edge-agent"]
    assert d["ConfigurationDirectory"] == ["edge-agent"]
    creds = {c.split(":", 1)[0] for c in d["LoadCredential"]}
    assert {"mqtt-password", "device.key", "device.agekey"} <= creds  # device.agekey: encrypted bundles
    allow = " ".join(d["DeviceAllow"])
    for needed in ("char-nvidia-frontend", "/dev/nvidiactl", "/dev/nvmap", "char-accel", "char-apex", "char-usb_device",
                   "char-drm"):
        assert needed in allow, needed
    assert d["DevicePolicy"] == ["closed"]
    # The trust folder must stay writable for the signed `trust` command under ProtectSystem=strict.
    assert d["ProtectSystem"] == ["strict"] and "-/etc/edge-agent/trust" in d["ReadWritePaths"]
    # Bounds: the descriptor limit leaves the API's connection cap with room for the rest of the
    # daemon (agent/serving/listeners.py connection_cap), and memory is limited for daemon and workers.
    from agent.serving.kserve import FD_RESERVE, MAX_CONNECTIONS

    nofile = int(d["LimitNOFILE"][0])
    assert (nofile - FD_RESERVE) // 2 >= MAX_CONNECTIONS
    assert d["MemoryHigh"] and d["MemoryMax"]
    high, top = (int(d[k][0].rstrip("%")) for k in ("MemoryHigh", "MemoryMax"))
    assert 0 < high < top <= 100
    # The control socket folder is the RuntimeDirectory the config points at by default.
    from agent.config import ApiConfig

    assert ApiConfig().control_socket.startswith("/run/edge-agent/")


@needs_analyze
def test_systemd_analyze_verify_and_security_score(tmp_path: Path) -> None:
    unit = _unit_copy(tmp_path)
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=TOOL_TIMEOUT_S)
    assert r.returncode == 0, r.stdout + r.stderr
    problems = [line for line in r.stderr.splitlines() if "edge-agent.service" in line]
    assert not problems, "\n".join(problems)
    r = subprocess.run(["systemd-analyze", "security", "--offline=true", str(unit)], capture_output=True, text=True,
                       timeout=TOOL_TIMEOUT_S)
    m = re.search(r"Overall exposure level for edge-agent\.service: (\d+(?:\.\d+)?)", r.stdout)
    assert m, r.stdout[-2000:] + r.stderr
    score = float(m.group(1))
    assert score <= MAX_EXPOSURE, f"exposure {score} > {MAX_EXPOSURE}:\n{r.stdout}"


@pytest.mark.skipif(not (shutil.which("systemd-sysusers") and shutil.which("systemd-tmpfiles")),
                    reason="systemd-sysusers / systemd-tmpfiles are not installed")
def test_sysusers_and_tmpfiles_apply_to_a_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    r = subprocess.run(["systemd-sysusers", f"--root={root}", str(REPO / "systemd" / "edge-agent.sysusers")],
                       capture_output=True, text=True, timeout=TOOL_TIMEOUT_S)
    assert r.returncode == 0, r.stderr
    passwd = (root / "etc" / "passwd").read_text()
    groups = {line.split(":")[0]: line.split(":")[3] for line in (root / "etc" / "group").read_text().splitlines()}
    assert re.search(r"^edge-agent:x:\d+:\d+:[^:]*:/var/lib/edge-agent:", passwd, re.M)
    assert "edge-agent-admin" in groups
    for g in ("video", "render", "plugdev", "apex", "users"):
        assert "edge-agent" in groups[g].split(","), g
    r = subprocess.run(["systemd-tmpfiles", f"--root={root}", "--create", str(REPO / "systemd" / "edge-agent.tmpfiles")],
                       capture_output=True, text=True, timeout=TOOL_TIMEOUT_S)
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE((root / "etc/edge-agent/credentials").stat().st_mode) == 0o700
    assert stat.S_IMODE((root / "etc/edge-agent/credentials/mqtt-password").stat().st_mode) == 0o600
    trust = (root / "etc/edge-agent/trust").stat()
    assert stat.S_IMODE(trust.st_mode) == 0o755, "never group/other-writable: the daemon refuses that"
    assert stat.S_IMODE((root / "var/lib/edge-agent").stat().st_mode) == 0o750


@pytest.mark.parametrize("script", ["install.sh", "uninstall.sh"])
def test_help_prints_the_usage_and_every_option_only(script: str) -> None:
    path = REPO / "tools" / script
    r = subprocess.run(["bash", str(path), "--help"], capture_output=True, text=True, timeout=TOOL_TIMEOUT_S)
    assert r.returncode == 0 and not r.stderr, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("Install edge-agent" if script == "install.sh" else "Remove edge-agent"), lines[0]
    code = [line for line in lines if re.match(r"\s*(set|if|case|while|sed|cat|echo)\b", line)]
    assert not code and not any(line.startswith("#") for line in lines), r.stdout
    for option in set(re.findall(r"^\s+(--[a-z-]+)[)=|]", path.read_text(), re.M)) - {"--help"}:
        assert option in r.stdout, f"{script} --help does not mention {option}"


def _dependency_dir(dest: Path) -> Path:
    """Links to the installed distributions edge-agent depends on (transitively), and nothing else."""
    dest.mkdir()
    todo, seen = ["edge-agent"], set()
    while todo:
        dist = metadata.distribution(todo.pop())
        for spec in dist.requires or []:
            req = Requirement(spec)
            name = req.name.lower().replace("_", "-")
            if name not in seen and (req.marker is None or req.marker.evaluate({"extra": ""})):
                seen.add(name)
                todo.append(name)
        if dist.metadata["Name"] == "edge-agent":
            continue
        for f in dist.files or []:
            top = f.parts[0]
            if top != ".." and not (dest / top).exists():
                (dest / top).symlink_to(Path(str(dist.locate_file(top))))
    return dest


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("systemd-sysusers") is None,
                    reason="needs root and systemd-sysusers to stage users")
def test_install_and_uninstall_into_a_staging_root(tmp_path: Path) -> None:
    root = tmp_path / "stage"
    env = {**os.environ, "PYTHONPATH": str(_dependency_dir(tmp_path / "deps"))}
    r = subprocess.run(["bash", str(REPO / "tools" / "install.sh"), "--root", str(root), "--no-systemctl",
                        "--python", sys.executable, "--system-site-packages", "--pip-arg=--no-deps", "--extras", ""],
                       capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "not starting the service" in r.stdout
    assert "--system-site-packages shows the packages of its base" in r.stdout  # sys.executable is a venv's
    venv = root / "opt/edge-agent/venv"
    assert "include-system-site-packages = true" in (venv / "pyvenv.cfg").read_text()
    # The package runs from the staged venv, not from this checkout or the test environment.
    r = subprocess.run([str(venv / "bin/python"), "-c", "import agent; print(agent.__file__)"], capture_output=True,
                       text=True, timeout=TOOL_TIMEOUT_S, env=env, cwd=tmp_path)
    assert r.returncode == 0 and Path(r.stdout.strip()).is_relative_to(venv), r.stdout + r.stderr
    unit = (root / "etc/systemd/system/edge-agent.service").read_text()
    assert "ExecStart=/opt/edge-agent/venv/bin/edge-agent run --config /etc/edge-agent/agent.toml" in unit
    assert (root / "usr/lib/sysusers.d/edge-agent.conf").exists() and (root / "usr/lib/tmpfiles.d/edge-agent.conf").exists()
    assert os.readlink(root / "usr/local/bin/agentctl") == "/opt/edge-agent/venv/bin/agentctl"
    assert any((root / "usr/share/edge-agent/hw-profiles").glob("*.toml"))
    conf = root / "etc/edge-agent/agent.toml"
    assert stat.S_IMODE(conf.stat().st_mode) == 0o640
    assert "edge-agent:" in (root / "etc/passwd").read_text()
    # The installed programs run, and the starter config is valid as it would be on the device: its
    # absolute paths (the trust folder the install made) are read inside the staging root.
    trust = root / "etc/edge-agent/trust"
    assert trust.is_dir() and not stat.S_IMODE(trust.stat().st_mode) & 0o022
    staged = tmp_path / "agent-staged.toml"
    staged.write_text(conf.read_text() + f'\n[trust]\nkeys_dir = "{trust}"\n')
    r = subprocess.run([str(venv / "bin/edge-agent"), "check-config", "--config", str(staged)], capture_output=True,
                       text=True, timeout=TOOL_TIMEOUT_S, env=env)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([str(venv / "bin/agentctl"), "--help"], capture_output=True, text=True, timeout=TOOL_TIMEOUT_S,
                       env=env)
    assert r.returncode == 0 and "doctor" in r.stdout
    # Running it again upgrades in place and keeps the edited config.
    conf.write_text(conf.read_text().replace("groups = []", 'groups = ["kept"]'))
    r = subprocess.run(["bash", str(REPO / "tools" / "install.sh"), "--root", str(root), "--no-systemctl",
                        "--python", sys.executable, "--system-site-packages", "--pip-arg=--no-deps", "--extras", ""],
                       capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S, env=env)
    assert r.returncode == 0, r.stderr
    assert 'groups = ["kept"]' in conf.read_text()

    # Uninstall keeps config, keys and state by default...
    (root / "var/lib/edge-agent/state.db").write_text("state")
    r = subprocess.run(["bash", str(REPO / "tools" / "uninstall.sh"), "--root", str(root), "--no-systemctl"],
                       capture_output=True, text=True, timeout=TOOL_TIMEOUT_S)
    assert r.returncode == 0, r.stderr
    assert not venv.exists() and not (root / "etc/systemd/system/edge-agent.service").exists()
    assert not (root / "usr/local/bin/agentctl").is_symlink()
    assert conf.exists() and (root / "var/lib/edge-agent/state.db").exists()
    assert "edge-agent:" in (root / "etc/passwd").read_text()
    # ...and --purge deletes them and the user.
    r = subprocess.run(["bash", str(REPO / "tools" / "uninstall.sh"), "--root", str(root), "--no-systemctl", "--purge"],
                       capture_output=True, text=True, timeout=TOOL_TIMEOUT_S)
    assert r.returncode == 0, r.stderr
    assert not (root / "etc/edge-agent").exists() and not (root / "var/lib/edge-agent").exists()
    assert "edge-agent:" not in (root / "etc/passwd").read_text()
    assert "edge-agent-admin" not in (root / "etc/group").read_text()
