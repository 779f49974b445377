"""agentctl against the real daemon (a process, its control socket, a real broker and real
onnxruntime), and the commands that must work without one (hw, verify, doctor).

Each command of SURFACE.md runs as a process, in its human form and with --json, and its exit
code is checked: 0 ok, 1 the thing failed, 2 usage error, 3 daemon not reachable.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from agentproc import AgentProcess
from conftest import Mosquitto, free_port
from opskit import MODEL, FleetKit, agentctl

from agent.cli.logs import journal_available
from agent.deploy.runner import (
    ACTIVATING,
    DOWNLOADING,
    FETCHING,
    INSTALLING,
    LOADING,
    PROBATION,
    SELECTING,
    VALIDATING,
    VERIFYING,
)
from fleetctl.bundle import pack_bundle

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
PROBATION_TOML = "\n[deploy]\nprobation_s = 0.5\n"  # a replaced version's watch period, short for tests


@pytest.fixture
def kit(tmp_path: Path) -> Iterator[FleetKit]:
    k = FleetKit.make(tmp_path / "fleet", versions=(1, 2, 3))
    try:
        yield k
    finally:
        k.close()


@pytest.fixture
def daemon(tmp_path: Path, mosquitto: Mosquitto, kit: FleetKit) -> Iterator[AgentProcess]:
    agent = AgentProcess(tmp_path / "device", mosquitto.url, extra_toml=PROBATION_TOML)
    agent.write_config()
    agent.trust_key((kit.trust / "fleet.pem").read_bytes())
    agent.start()
    try:
        yield agent
    finally:
        agent.stop()


def ok(r: object) -> None:
    assert getattr(r, "returncode", None) == 0, f"rc={getattr(r, 'returncode', None)}\n{getattr(r, 'stdout', '')}\n{getattr(r, 'stderr', '')}"


def test_every_command_against_a_running_daemon(tmp_path: Path, mosquitto: Mosquitto, kit: FleetKit,
                                                daemon: AgentProcess) -> None:
    kit.deploy(mosquitto.url, ["dev1"], 1)
    kit.deploy(mosquitto.url, ["dev1"], 2)

    # status / models: tables for people, JSON for scripts.
    r = daemon.agentctl("status")
    ok(r)
    assert "dev1" in r.stdout and "connected" in r.stdout and f"{MODEL} " in r.stdout
    st = json.loads(daemon.agentctl("status", "--json").stdout)
    assert st["models"][0]["version"] == 2 and st["mqtt"]["connected"] is True
    r = daemon.agentctl("models")
    ok(r)
    assert r.stdout.splitlines()[0].split()[:3] == ["MODEL", "SERVING", "KEPT"]
    assert json.loads(daemon.agentctl("models", "--json").stdout)[0]["kept"] == [1, 2]

    # jobs / explain: the fleet's deploys with their timelines.
    jobs = json.loads(daemon.agentctl("jobs", "--json").stdout)
    deploy_id = next(j["id"] for j in jobs if j["type"] == "deploy" and j["state"] == "SUCCEEDED")
    r = daemon.agentctl("jobs")
    ok(r)
    assert deploy_id in r.stdout
    r = daemon.agentctl("explain", deploy_id)
    ok(r)
    assert "validating" in r.stdout and "activating" in r.stdout
    doc = json.loads(daemon.agentctl("explain", deploy_id, "--json").stdout)
    assert doc["state"] == "SUCCEEDED"
    tune = doc["result"]["selection"]["autotune"]
    assert tune["state"] in ("measured", "cached"), tune  # the daemon's default objective, both figures each
    assert f"autotune ({tune['state']}, objective latency, 4 callers for throughput)" in r.stdout
    assert f"won: {tune['won']}" in r.stdout
    for row in tune["measured"]:
        assert f"{row['median_ms']:g} ms" in r.stdout and f"{row['throughput_rps']:g} req/s" in r.stdout
    r = daemon.agentctl("explain", "no-such-job")
    assert r.returncode == EXIT_FAILED and "unknown_job" in r.stderr

    # infer: one request through the daemon.
    np.save(tmp_path / "x.npy", np.ones((2, 4), dtype=np.float32))
    r = daemon.agentctl("infer", MODEL, "--input", str(tmp_path / "x.npy"))
    ok(r)
    assert r.stdout.startswith(f"{MODEL} v2 on ") and "round trip" in r.stdout  # the backend autotune picked
    out = json.loads(daemon.agentctl("infer", MODEL, "--input", str(tmp_path / "x.npy"), "--json").stdout)
    assert np.asarray(out["outputs"]["y"]).shape == (2, 3)

    # bench: latency per backend.
    r = daemon.agentctl("bench", MODEL, "-n", "20")
    ok(r)
    assert "onnxruntime:CPUExecutionProvider" in r.stdout

    # rollback (a mutating call: root here) serves v1 again, as a local job the fleet also sees.
    r = daemon.agentctl("rollback", MODEL)
    ok(r)
    assert "now serving v1" in r.stdout and "(was v2)" in r.stdout
    assert json.loads(daemon.agentctl("status", "--json").stdout)["models"][0]["version"] == 1
    r = daemon.agentctl("rollback", MODEL, "--to", "7", "--json")
    assert r.returncode == EXIT_FAILED and json.loads(r.stdout)["error"]["code"] == "rollback_refused"
    assert any(j["type"] == "rollback" and j["id"].startswith("local-rollback-")
               for j in json.loads(daemon.agentctl("jobs", "--json").stdout))

    # config: read, change a remotely settable key, refuse one that is not.
    cfg = json.loads(daemon.agentctl("config", "--json").stdout)
    assert cfg["device_id"] == "dev1"
    r = daemon.agentctl("config", "--set", "telemetry.heartbeat_s=7.5")
    ok(r)
    assert "telemetry.heartbeat_s" in r.stdout and "7.5" in r.stdout
    r = daemon.agentctl("config", "--set", "mqtt.url=mqtt://elsewhere:1883")
    assert r.returncode == EXIT_FAILED and "not remotely settable" in r.stderr

    # install: an offline bundle archive, with progress on stderr.
    archive = pack_bundle(kit.bundles / MODEL / "3", tmp_path / "lin-3.tar.gz")
    r = daemon.agentctl("verify", str(archive), "--trust", str(kit.trust))
    ok(r)
    r = daemon.agentctl("install", str(archive))
    ok(r)
    assert "v3" in r.stdout
    # One line per step the deploy entered, as it entered them (the call waits on the job's progress).
    order = [FETCHING, VERIFYING, SELECTING, DOWNLOADING, INSTALLING, LOADING, VALIDATING, ACTIVATING, PROBATION]
    shown = [line.split(" ", 1)[0] for line in r.stderr.splitlines() if line.split(" ", 1)[0] in order]
    assert shown and shown == sorted(shown, key=order.index) and len(set(shown)) == len(shown), r.stderr
    assert json.loads(daemon.agentctl("status", "--json").stdout)["models"][0]["version"] == 3

    # hw and doctor with the daemon running.
    r = daemon.agentctl("hw")
    ok(r)
    assert "RANK" in r.stdout and "onnxruntime:CPUExecutionProvider" in r.stdout
    doc = json.loads(daemon.agentctl("doctor", "--config", str(daemon.config), "--json").stdout)
    by = {c["name"]: c for c in doc["checks"]}
    assert by["daemon"]["status"] == "PASS" and "admin access" in by["daemon"]["detail"]
    assert by["broker"]["status"] == "PASS" and by["trust"]["status"] == "PASS"
    assert by["smoke onnxruntime:CPUExecutionProvider"]["status"] == "PASS"
    assert {c["status"] for c in doc["checks"]} <= {"PASS", "WARN", "FAIL"}

    # logs: found through the daemon (its stderr is a file here), -n lines.
    r = daemon.agentctl("logs", "-n", "5")
    ok(r)
    assert 0 < len(r.stdout.splitlines()) <= 5 and str(daemon.log) in r.stderr
    lines = [json.loads(x) for x in daemon.agentctl("logs", "-n", "3", "--json").stdout.splitlines()]
    assert len(lines) == 3 and all(x["source"] == str(daemon.log) for x in lines)
    r = daemon.agentctl("logs", "-f", "--duration", "0.5", "-n", "1")
    ok(r)

    # remove: the model is gone.
    r = daemon.agentctl("remove", MODEL)
    ok(r)
    assert "removed" in r.stdout
    r = daemon.agentctl("models")
    ok(r)
    assert "no models deployed" in r.stdout

    # usage errors exit 2.
    assert daemon.agentctl("explain").returncode == EXIT_USAGE
    assert agentctl("no-such-command").returncode == EXIT_USAGE


def test_without_a_daemon(tmp_path: Path, kit: FleetKit) -> None:
    """hw, verify and doctor work offline; the rest say the daemon is not reachable (exit 3)."""
    sock = str(tmp_path / "absent.sock")
    r = agentctl("status", "--socket", sock)
    assert r.returncode == EXIT_UNREACHABLE and "not reachable" in r.stderr
    assert agentctl("rollback", MODEL, "--socket", sock).returncode == EXIT_UNREACHABLE
    r = agentctl("logs", "--socket", sock)
    if journal_available():  # a systemd host: journald is the fallback
        ok(r)
    else:
        assert r.returncode == EXIT_FAILED and "no log to show" in r.stderr and "--file" in r.stderr

    r = agentctl("hw", "--json")
    ok(r)
    assert any(b["name"] == "onnxruntime:CPUExecutionProvider" for b in json.loads(r.stdout)["backends"])

    r = agentctl("verify", str(kit.bundles / MODEL / "1"), "--trust", str(kit.trust))
    ok(r)
    bad_trust = tmp_path / "other-trust"
    bad_trust.mkdir()
    assert agentctl("verify", str(kit.bundles / MODEL / "1"), "--trust", str(bad_trust)).returncode == EXIT_FAILED

    # doctor offline: the config names a broker port nobody listens on and an empty trust folder.
    (tmp_path / "trust").mkdir(mode=0o755)
    conf = tmp_path / "agent.toml"
    conf.write_text(f'device_id = "offline1"\nstate_dir = "state"\n[mqtt]\nurl = "mqtt://127.0.0.1:{free_port()}"\n'
                    f'[trust]\nkeys_dir = "trust"\n[api]\ncontrol_socket = "{sock}"\n')
    t0 = time.monotonic()
    r = agentctl("doctor", "--config", str(conf))
    assert r.returncode == EXIT_FAILED, r.stdout + r.stderr
    assert time.monotonic() - t0 < 60
    lines = r.stdout.splitlines()
    assert any(line.startswith("WARN  daemon") and "not running" in line for line in lines)
    assert any(line.startswith("FAIL  broker") and "refused" in line for line in lines)
    assert any(line.startswith("FAIL  trust") for line in lines)
    assert any(line.startswith("PASS  smoke onnxruntime:CPUExecutionProvider") for line in lines)
    doc = json.loads(agentctl("doctor", "--config", str(conf), "--json", "--no-smoke").stdout)
    assert doc["ok"] is False and doc["config"]["device_id"] == "offline1"
    for c in doc["checks"]:
        assert c["status"] in ("PASS", "WARN", "FAIL")
        if c["status"] != "PASS":
            assert c["hint"], f"{c['name']} has no hint"
    # An untrusted folder permission is a FAIL with the chmod that fixes it.
    (tmp_path / "trust").chmod(0o777)
    doc = json.loads(agentctl("doctor", "--config", str(conf), "--json", "--no-smoke").stdout)
    trust = next(c for c in doc["checks"] if c["name"] == "trust")
    assert trust["status"] == "FAIL" and "chmod go-w" in trust["hint"]
