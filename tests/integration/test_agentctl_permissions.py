"""Who may use the control socket, checked with real unprivileged users (made with useradd).

The daemon runs as root with ``api.control_group`` and ``api.admin_group`` set to groups made
for the test. agentctl runs as each user through ``runuser`` (so the kernel reports that user's
uid and groups through SO_PEERCRED / SO_PEERGROUPS):
- a member of the control group reads (status, config) but is refused every change (exit 1,
  a permission message naming the admin group);
- a member of the admin group may change the device;
- a user in neither group cannot even open the socket (exit 3, what to do about it).
Needs root (useradd, runuser); skipped otherwise.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from agentproc import AgentProcess
from conftest import REPO, Mosquitto

USER_CMD_TIMEOUT_S = 60.0
EXIT_OK, EXIT_FAILED, EXIT_UNREACHABLE = 0, 1, 3

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not all(shutil.which(t) for t in ("useradd", "groupadd", "runuser")),
                                reason="needs root with useradd, groupadd and runuser")


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=USER_CMD_TIMEOUT_S, check=False)


@pytest.fixture
def accounts() -> Iterator[dict[str, str]]:
    """Groups ctl and adm; users reader (ctl), admin (ctl + adm), outsider (neither). Removed afterwards."""
    tag = secrets.token_hex(3)
    names = {"ctl": f"eat-ctl-{tag}", "adm": f"eat-adm-{tag}", "reader": f"eat-rd-{tag}",
             "admin": f"eat-ad-{tag}", "outsider": f"eat-out-{tag}"}
    made_users: list[str] = []
    made_groups: list[str] = []
    try:
        for g in ("ctl", "adm"):
            assert _run("groupadd", "--system", names[g]).returncode == 0
            made_groups.append(names[g])
        for user, groups in (("reader", [names["ctl"]]), ("admin", [names["ctl"], names["adm"]]), ("outsider", [])):
            cmd = ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", names[user]]
            if groups:
                cmd[1:1] = ["--groups", ",".join(groups)]
            r = _run(*cmd)
            assert r.returncode == 0, r.stderr
            made_users.append(names[user])
        yield names
    finally:
        for u in made_users:
            _run("userdel", u)
        for g in made_groups:
            _run("groupdel", g)


def _python_for(user: str) -> list[str]:
    """An interpreter the unprivileged user may execute that can import agentctl (or skip)."""
    env_path = os.pathsep.join([str(REPO), str(REPO / "tools")])
    for exe in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        if not os.path.exists(exe):
            continue
        probe = _run("runuser", "-u", user, "--", "env", f"PYTHONPATH={env_path}", exe, "-c", "import agent.cli.agentctl")
        if probe.returncode == 0:
            return ["env", f"PYTHONPATH={env_path}", exe]
    pytest.skip(f"no Python that {user} may run imports agent.cli.agentctl (the test interpreter lives under /root?)")


def test_read_only_for_the_control_group_changes_for_the_admin_group(mosquitto: Mosquitto, accounts: dict[str, str]) -> None:
    # The socket's folder must be reachable by other users: not under pytest's 0700 tmp folder.
    root = Path(tempfile.mkdtemp(prefix="eat-perm-", dir="/tmp"))
    root.chmod(0o755)
    agent = AgentProcess(root / "device", mosquitto.url, device_id="perm1")
    try:
        agent.write_config()
        agent.root.chmod(0o755)
        conf = agent.config.read_text().replace(
            'control_group = ""', f'control_group = "{accounts["ctl"]}"\nadmin_group = "{accounts["adm"]}"')
        agent.config.write_text(conf)
        agent.start()
        mode = agent.socket.stat()
        assert oct(mode.st_mode & 0o777) == "0o660"
        assert mode.st_gid == int(_run("getent", "group", accounts["ctl"]).stdout.split(":")[2])

        def as_user(user: str, *args: str) -> subprocess.CompletedProcess[str]:
            py = _python_for(accounts[user])
            return _run("runuser", "-u", accounts[user], "--", *py, "-m", "agent.cli.agentctl", *args,
                        "--socket", str(agent.socket))

        # A member of the control group reads...
        r = as_user("reader", "status", "--json")
        assert r.returncode == EXIT_OK, r.stderr
        assert json.loads(r.stdout)["device"] == "perm1"
        assert as_user("reader", "config", "--json").returncode == EXIT_OK
        # ...and is refused every change, with what to do about it.
        for args in (("rollback", "lin"), ("remove", "lin"), ("config", "--set", "telemetry.heartbeat_s=5")):
            r = as_user("reader", *args)
            assert r.returncode == EXIT_FAILED, (args, r.stdout, r.stderr)
            assert "permission_denied" in r.stderr and accounts["adm"] in r.stderr, r.stderr
        r = as_user("reader", "rollback", "lin", "--json")
        assert json.loads(r.stdout)["error"]["code"] == "permission_denied"

        # A member of the admin group may change the device.
        r = as_user("admin", "config", "--set", "telemetry.heartbeat_s=5", "--json")
        assert r.returncode == EXIT_OK, r.stderr
        assert json.loads(r.stdout)["telemetry.heartbeat_s"] == 5
        r = as_user("admin", "rollback", "lin", "--json")  # allowed: refused only because nothing is deployed
        assert r.returncode == EXIT_FAILED and json.loads(r.stdout)["error"]["code"] == "unknown_model"

        # Someone in neither group cannot open the socket at all.
        r = as_user("outsider", "status")
        assert r.returncode == EXIT_UNREACHABLE and "no permission" in r.stderr, r.stderr
        # Root always can.
        assert agent.agentctl("config", "--set", "telemetry.heartbeat_s=6").returncode == EXIT_OK
    finally:
        if agent.proc is not None:
            agent.stop()
        shutil.rmtree(root, ignore_errors=True)
