"""Messages as a newcomer meets them: the real daemon, a real Mosquitto and the CLIs run as
processes. Each test asserts that the message names the thing at fault and the fix."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from agentproc import AgentProcess
from conftest import Mosquitto, start_mosquitto
from opskit import MODEL, FleetKit, agentctl, env, fleetctl

from agent.bundles.trust import key_id, load_private_key
from fleetctl import mqttc
from fleetctl.bundle import pack_bundle
from fleetctl.keys import generate_keypair

EXIT_FAILED, EXIT_CONFIG, EXIT_UNREACHABLE, EXIT_UNSAFE = 1, 2, 3, 3
PROBATION_S = 7  # longer than the countdown's 5 s line interval, so a deploy --wait shows two lines
SILENT_TIMEOUT = "2s"  # how long a test waits for a device that will not answer


@pytest.fixture
def kit(tmp_path: Path) -> Iterator[FleetKit]:
    k = FleetKit.make(tmp_path / "fleet", versions=(1, 2))
    try:
        yield k
    finally:
        k.close()


@pytest.fixture
def daemon(tmp_path: Path, mosquitto: Mosquitto, kit: FleetKit) -> Iterator[AgentProcess]:
    agent = AgentProcess(tmp_path / "device", mosquitto.url, extra_toml=f"\n[deploy]\nprobation_s = {PROBATION_S}\n")
    agent.write_config()
    agent.trust_key((kit.trust / "fleet.pem").read_bytes())
    agent.start()
    try:
        yield agent
    finally:
        agent.stop()


def _subscribed(kit: FleetKit, mosquitto: Mosquitto) -> None:
    client = mqttc.connect(mosquitto.url)
    try:
        kit.wait_subscribed(client, ["dev1"])
    finally:
        mqttc.disconnect(client)


def _short(kid: str) -> str:
    return kid[:16] + "…"


def test_deploy_signed_by_an_untrusted_key_names_both_key_ids_and_the_trust_folder(
        tmp_path: Path, mosquitto: Mosquitto, kit: FleetKit, daemon: AgentProcess) -> None:
    _subscribed(kit, mosquitto)
    stranger = generate_keypair(tmp_path / "stranger", "other")
    # Refused before any signature vouches for it: no job update goes out under its id (the
    # fleet sees a commands_refused event), so --wait runs out; the device's log says why.
    r = fleetctl("deploy", "--model", MODEL, "--manifest-url", kit.url(1), "--device", "dev1", "--wait",
                 "--timeout", "3s", "--key", str(stranger.private_path), "--broker", mosquitto.url)
    assert r.returncode != 0, r.stdout + r.stderr
    line = next(x for x in daemon.log.read_text().splitlines() if "untrusted_key" in x)
    trusted = key_id(load_private_key(kit.key).public_key())
    folder = daemon.root / "trust"
    assert f"signed by key id {_short(stranger.key_id)} which is not in {folder}" in line, line
    assert f"(trusted: {_short(trusted)})" in line, line
    assert f"copy the signer's public key (.pub.pem) into {folder}" in line, line


def test_agentctl_verify_with_the_wrong_trust_folder_names_the_key_ids(tmp_path: Path, kit: FleetKit) -> None:
    archive = pack_bundle(kit.bundles / MODEL / "1", tmp_path / "lin-1.tar.gz")
    other = generate_keypair(tmp_path / "other", "ops")
    trust = tmp_path / "other-trust"
    trust.mkdir()
    (trust / "ops.pub.pem").write_bytes(other.public_path.read_bytes())
    r = agentctl("verify", str(archive), "--trust", str(trust))
    assert r.returncode == EXIT_FAILED, r.stdout + r.stderr
    signer = key_id(load_private_key(kit.key).public_key())
    assert "untrusted_key" in r.stderr
    assert f"signed by key id {_short(signer)} which is not in {trust} (trusted: {_short(other.key_id)})" in r.stderr
    assert ".pub.pem" in r.stderr


def test_deploy_wait_counts_down_probation(mosquitto: Mosquitto, kit: FleetKit, daemon: AgentProcess) -> None:
    kit.deploy(mosquitto.url, ["dev1"], 1)  # v1 serves; v2 replaces it and goes on probation
    r = fleetctl("deploy", "--model", MODEL, "--manifest-url", kit.url(2), "--device", "dev1", "--wait",
                 "--timeout", "60s", "--key", str(kit.key), "--broker", mosquitto.url)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    countdown = [(i, int(m.group(1))) for i, x in enumerate(lines) if (m := re.fullmatch(r"dev1: probation: (\d+) s left", x))]
    assert len(countdown) >= 2, r.stdout
    lefts = [n for _, n in countdown]
    assert lefts[0] <= PROBATION_S and lefts == sorted(lefts, reverse=True) and lefts[-1] < lefts[0], r.stdout
    done = next(i for i, x in enumerate(lines) if "SUCCEEDED" in x)
    assert countdown[-1][0] < done, r.stdout


def test_no_job_update_says_unknown_or_offline_device(tmp_path: Path, mosquitto: Mosquitto, kit: FleetKit,
                                                      daemon: AgentProcess) -> None:
    _subscribed(kit, mosquitto)
    r = fleetctl("ping", "--device", "dev-typo", "--timeout", SILENT_TIMEOUT, "--key", str(kit.key),
                 "--broker", mosquitto.url)
    assert r.returncode == EXIT_FAILED
    assert "dev-typo: no job update for" in r.stderr
    assert "no status ever seen for device dev-typo under topic prefix 'edge'" in r.stderr
    assert "`fleetctl watch` lists the devices seen" in r.stderr
    assert daemon.stop() == 0  # a clean stop leaves the retained status offline, reason shutdown
    r = fleetctl("deploy", "--model", MODEL, "--manifest-url", kit.url(1), "--device", "dev1", "--wait",
                 "--timeout", SILENT_TIMEOUT, "--key", str(kit.key), "--broker", mosquitto.url)
    assert r.returncode == EXIT_FAILED
    assert re.search(r"device dev1 is offline since \d{4}-\d\d-\d\dT[\d:.]+Z \(shutdown\)", r.stderr), r.stderr


def test_a_broker_withholding_the_status_topics_costs_the_explanation_not_the_command(tmp_path: Path,
                                                                                    kit: FleetKit) -> None:
    """The status subscription only explains silence: an ACL that withholds status must not fail a command."""
    acl = tmp_path / "acl"
    acl.write_text("topic readwrite edge/+/cmd\ntopic readwrite edge/+/jobs/#\ntopic readwrite edge/groups/#\n"
                   "topic write edge/+/status\ntopic write edge/+/heartbeat\ntopic write edge/+/telemetry\n"
                   "topic write edge/+/events\n")
    broker = start_mosquitto(tmp_path, extra_conf=f"acl_file {acl}\n")
    agent = AgentProcess(tmp_path / "device", broker.url)
    try:
        agent.write_config()
        agent.trust_key((kit.trust / "fleet.pem").read_bytes())
        agent.start()
        ok = fleetctl("ping", "--device", "dev1", "--timeout", "20s", "--key", str(kit.key), "--broker", broker.url)
        assert ok.returncode == 0 and "dev1 pong" in ok.stdout, ok.stdout + ok.stderr
        r = fleetctl("ping", "--device", "dev-typo", "--timeout", SILENT_TIMEOUT, "--key", str(kit.key),
                     "--broker", broker.url)
        assert r.returncode == EXIT_FAILED
        assert "Is the device id right" in r.stderr and "may not read status topics" in r.stderr, r.stderr
    finally:
        if agent.proc is not None:
            agent.stop()
        broker.stop()


def _check_config(cfg: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", "check-config", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=30, env=env())


def test_check_config_refuses_a_missing_or_writable_trust_folder(tmp_path: Path, kit: FleetKit) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text('device_id = "d1"\nstate_dir = "state"\n[trust]\nkeys_dir = "trust"\n')
    trust = tmp_path / "trust"
    r = _check_config(cfg)
    assert r.returncode == EXIT_CONFIG
    assert f"trust folder {trust} does not exist" in r.stderr and f"install -d -m 0755 {trust}" in r.stderr
    trust.mkdir()
    os.chmod(trust, 0o755)
    r = _check_config(cfg)
    assert r.returncode == 0 and "holds no Ed25519 public key" in r.stderr  # runs, but refuses everything: a warning
    (trust / "fleet.pem").write_bytes((kit.trust / "fleet.pem").read_bytes())
    r = _check_config(cfg)
    assert r.returncode == 0 and r.stderr == ""
    os.chmod(trust, 0o775)
    r = _check_config(cfg)
    assert r.returncode == EXIT_CONFIG
    assert f"{trust} is group-writable" in r.stderr and "world" not in r.stderr and f"chmod go-w {trust}" in r.stderr
    os.chmod(trust, 0o757)
    r = _check_config(cfg)
    assert r.returncode == EXIT_CONFIG and f"{trust} is world-writable" in r.stderr


def test_daemon_refuses_a_group_writable_trust_folder_and_says_so(tmp_path: Path, mosquitto: Mosquitto) -> None:
    agent = AgentProcess(tmp_path / "device", mosquitto.url)
    agent.write_config()
    os.chmod(agent.root / "trust", 0o775)
    agent.start(wait=False)
    assert agent.proc is not None
    rc = agent.proc.wait(30)
    agent.stop()
    log = agent.log.read_text(errors="replace")
    assert rc == EXIT_UNSAFE, log[-2000:]
    assert f"{agent.root / 'trust'} is group-writable" in log and "chmod go-w" in log, log[-2000:]


def test_check_config_unknown_section_lists_the_known_ones(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text('device_id = "d1"\n[mqqt]\nurl = "mqtt://127.0.0.1:1883"\n')
    r = _check_config(cfg)
    assert r.returncode == EXIT_CONFIG
    assert f"{cfg}: unknown section [mqqt] (did you mean [mqtt]?); known sections: [mqtt], [trust]" in r.stderr


def test_sim_with_a_missing_trust_folder_is_one_line(tmp_path: Path) -> None:
    for processes in ("1", "2"):
        r = fleetctl("sim", "--trust", "missing", "--devices", "2", "--processes", processes, "--duration", "1s",
                     "--broker", "mqtt://127.0.0.1:1", cwd=tmp_path, timeout_s=60)
        assert r.returncode == EXIT_FAILED
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert f"--trust missing: does not exist (resolved: {tmp_path / 'missing'})" in r.stderr
        assert "fleetctl keygen" in r.stderr


def test_agentctl_unreachable_says_how_the_socket_was_found(tmp_path: Path) -> None:
    sock = tmp_path / "run" / "control.sock"
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'device_id = "d1"\n[api]\ncontrol_socket = "{sock}"\n')
    via_env = subprocess.run([sys.executable, "-m", "agent.cli.agentctl", "status"], capture_output=True, text=True,
                             timeout=30, env={**env(), "EDGE_AGENT_CONFIG": str(cfg)})
    via_flag = agentctl("status", "--config", str(cfg))
    via_socket = agentctl("status", "--socket", str(tmp_path / "other.sock"))
    for r, how in ((via_env, f"api.control_socket of {cfg} (config found via $EDGE_AGENT_CONFIG)"),
                   (via_flag, f"api.control_socket of {cfg} (config found via --config)"),
                   (via_socket, "given with --socket")):
        assert r.returncode == EXIT_UNREACHABLE, r.stderr
        assert "daemon not reachable at" in r.stderr and f"socket path: {how}" in r.stderr, r.stderr
        assert "config search order: --config FILE, then $EDGE_AGENT_CONFIG, then /etc/edge-agent/agent.toml" in r.stderr
        assert "systemctl status edge-agent" in r.stderr and "edge-agent run --config FILE" in r.stderr
    assert str(sock) in via_env.stderr and str(tmp_path / "other.sock") in via_socket.stderr

