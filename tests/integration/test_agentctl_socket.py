"""The control socket itself: one daemon per socket, symlinks refused, the access rules, progress
lines for long calls — with real Unix sockets and, for the daemon-level rules, real daemons."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from agentproc import AgentProcess
from conftest import Mosquitto

from agent import errors
from agent.serving.control import ControlClient, ControlServer, Peer

DAEMON_EXIT_TIMEOUT_S = 20.0


def test_progress_lines_then_the_result(tmp_path: Path) -> None:
    server = ControlServer(str(tmp_path / "c.sock"))

    def long_op(params: dict[str, Any], emit: Any) -> dict[str, Any]:
        for i in range(3):
            emit({"step": "downloading", "done": i + 1, "total": 3})
        return {"n": params["n"]}

    server.register("long", long_op, mutating=False, streaming=True)
    server.start()
    try:
        seen: list[dict[str, Any]] = []
        assert ControlClient(str(server.path)).call("long", on_progress=seen.append, n=7) == {"n": 7}
        assert [p["done"] for p in seen] == [1, 2, 3]
        hello = ControlClient(str(server.path)).call("hello")
        assert hello["pid"] == os.getpid() and hello["access"] == "admin"
        with pytest.raises(errors.AgentError) as e:
            ControlClient(str(server.path)).call("nope")
        assert e.value.code == "unknown_op" and "hello" in e.value.message
    finally:
        server.stop()
    assert not server.path.exists()  # the lock file stays: removing it would let two starters race


def test_access_rules_from_peer_credentials(tmp_path: Path) -> None:
    """The decision table, fed with the credentials the kernel would report."""
    import grp

    gid = os.getgid()
    group = grp.getgrgid(gid).gr_name
    server = ControlServer(str(tmp_path / "c.sock"), group="", admin_group=group)
    server.register("read", lambda p: "read")
    server.register("config", lambda p: "changed" if p.get("set") else "shown", mutating=lambda p: bool(p.get("set")))
    server.start()
    try:
        nobody = Peer(pid=1, uid=65534, gid=65534, groups=frozenset({65534}))
        admin = Peer(pid=1, uid=65534, gid=65534, groups=frozenset({gid}))

        def handle(peer: Peer, op: str, **params: Any) -> dict[str, Any]:
            import json

            return server._handle(json.dumps({"op": op, "params": params}).encode(), peer, lambda d: None)

        assert handle(nobody, "read")["result"] == "read"  # no control group: whoever can open the socket reads
        assert handle(nobody, "config")["result"] == "shown"
        refused = handle(nobody, "config", set={"groups": ["x"]})
        assert refused["ok"] is False and refused["error"]["code"] == "permission_denied"
        assert group in refused["error"]["message"]
        assert handle(admin, "config", set={"groups": ["x"]})["result"] == "changed"
        assert server.is_admin(Peer(1, 0, 0, frozenset())) and server.is_admin(Peer(1, os.geteuid(), 0, frozenset()))
        server.group = "a-group-that-does-not-exist"
        server._group_gid = None
        assert handle(nobody, "read")["error"]["code"] == "permission_denied"
        assert handle(admin, "read")["result"] == "read"  # admins may always read
    finally:
        server.stop()


def test_one_server_per_socket_stale_socket_reused(tmp_path: Path) -> None:
    path = str(tmp_path / "c.sock")
    first = ControlServer(path)
    first.start()
    try:
        with pytest.raises(errors.AgentError) as e:
            ControlServer(path).start()
        assert e.value.code == "already_running"
        assert first.path.exists(), "a refused second server must not remove the live socket"
        assert ControlClient(path).call("hello")["pid"] == os.getpid()
    finally:
        first.stop()
    # A socket file left by a crash (nobody listening) is replaced.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()
    again = ControlServer(path)
    again.start()
    try:
        assert ControlClient(path).call("hello")["access"] == "admin"
    finally:
        again.stop()


def test_unsafe_paths_are_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.sock"
    link = tmp_path / "c.sock"
    link.symlink_to(target)
    with pytest.raises(errors.AgentError) as e:
        ControlServer(str(link)).start()
    assert e.value.code == "unsafe_socket" and "symlink" in e.value.message
    assert not target.exists()
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    with pytest.raises(errors.AgentError) as e:
        ControlServer(str(open_dir / "c.sock")).start()
    assert "writable by others" in e.value.message
    (tmp_path / "file.sock").write_text("not a socket")
    with pytest.raises(errors.AgentError) as e:
        ControlServer(str(tmp_path / "file.sock")).start()
    assert "not a socket" in e.value.message


def _wait_exit(agent: AgentProcess) -> int:
    assert agent.proc is not None
    deadline = time.monotonic() + DAEMON_EXIT_TIMEOUT_S
    while agent.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    rc = agent.proc.poll()
    assert rc is not None, "the daemon should have refused to start"
    return rc


def test_second_daemon_and_symlinked_socket_refuse_to_start(tmp_path: Path, mosquitto: Mosquitto) -> None:
    first = AgentProcess(tmp_path / "one", mosquitto.url, device_id="one")
    first.start()
    try:
        second = AgentProcess(tmp_path / "two", mosquitto.url, device_id="two")
        second.write_config()
        second.config.write_text(second.config.read_text().replace(str(second.socket), str(first.socket)))
        second.start(wait=False)
        assert _wait_exit(second) == 3
        second.stop()
        assert "already" in second.log.read_text()
        assert first.agentctl("status").returncode == 0, "the first daemon keeps its socket"

        third = AgentProcess(tmp_path / "three", mosquitto.url, device_id="three")
        third.write_config()
        third.socket.symlink_to(tmp_path / "target.sock")
        third.start(wait=False)
        assert _wait_exit(third) == 3
        third.stop()
        assert "symlink" in third.log.read_text()
    finally:
        first.stop()
