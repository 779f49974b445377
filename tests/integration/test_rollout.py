"""Staged rollouts over the real broker to 26 devices: two real agent daemons (the canary) and 24
simulated devices in three processes (``fleetctl sim``: real MQTT clients that verify every
command with the agent's own verifier and remember command ids like the agent).

- One wave fails on purpose (four simulated devices fail validation): the rollout aborts once
  failures pass the threshold, starts no further wave, and rolls back every device it upgraded —
  the real agents serve v1 again.
- fleetctl itself is interrupted (SIGINT, then SIGKILL in the middle of a wave) and resumed from
  its state file: the rollout completes and no device executes the deploy twice (a re-sent
  command is answered ``replayed``).
- ``fleetctl status --group`` and ``fleetctl watch --live --json`` see the whole fleet.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agentproc import AgentProcess
from conftest import Mosquitto
from opskit import MODEL, FleetKit, env, fleetctl

SIM_READY_TIMEOUT_S = 60.0
ROLLOUT_TIMEOUT_S = 120.0
EVENT_TIMEOUT_S = 60.0
PROBATION_TOML = "\n[deploy]\nprobation_s = 0.5\n"  # a replaced version's watch period, short for tests
GROUP = "cams"


class Proc:
    """A CLI process whose stdout lines arrive on a queue (every read has a deadline)."""

    def __init__(self, args: list[str], cwd: Path | None = None) -> None:
        self.p = subprocess.Popen([sys.executable, "-m", "fleetctl.main", *args], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, cwd=cwd, env=env())
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_line(self, pred: Any, timeout_s: float = EVENT_TIMEOUT_S) -> str:
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no matching line within {timeout_s} s; saw:\n" + "\n".join(self.seen[-30:]))
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                err = self.p.stderr.read() if self.p.stderr else ""
                raise RuntimeError(f"process ended (rc {self.p.wait()}) before the line; saw:\n" + "\n".join(self.seen[-30:]) + err)
            self.seen.append(line)
            if pred(line):
                return line

    def event(self, pred: Any, timeout_s: float = EVENT_TIMEOUT_S) -> dict[str, Any]:
        def match(line: str) -> bool:
            try:
                return bool(pred(json.loads(line)))
            except ValueError:
                return False
        return json.loads(self.wait_line(match, timeout_s))

    def finish(self, timeout_s: float = ROLLOUT_TIMEOUT_S) -> int:
        rc = self.p.wait(timeout_s)
        while True:  # drain what is left for the assertions
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                break
            if line is None:
                break
            self.seen.append(line)
        return rc

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(15)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(15)


def sims(kit: FleetKit, broker: str, log: Path, *extra: str, devices: int = 24, processes: int = 3) -> Proc:
    p = Proc(["sim", "--devices", str(devices), "--processes", str(processes), "--trust", str(kit.trust),
              "--broker", broker, "--log", str(log), "--group", GROUP, "--model", f"{MODEL}:1",
              "--heartbeat", "0.5", "--window", "0.5", *extra])
    p.wait_line(lambda line: line.startswith(f"ready {devices} devices"), SIM_READY_TIMEOUT_S)
    return p


def executions(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


@pytest.fixture
def kit(tmp_path: Path) -> Iterator[FleetKit]:
    k = FleetKit.make(tmp_path / "fleet")
    try:
        yield k
    finally:
        k.close()


def test_staged_rollout_aborts_on_a_failing_wave_and_rolls_back(tmp_path: Path, mosquitto: Mosquitto, kit: FleetKit) -> None:
    real = [AgentProcess(tmp_path / name, mosquitto.url, device_id=name, groups=(GROUP,), extra_toml=PROBATION_TOML)
            for name in ("real-a", "real-b")]
    sim_log = tmp_path / "sim.jsonl"
    sim: Proc | None = None
    live: Proc | None = None
    try:
        for a in real:
            a.write_config()
            a.trust_key((kit.trust / "fleet.pem").read_bytes())
            a.start()
        kit.deploy(mosquitto.url, ["real-a", "real-b"], 1)
        sim = sims(kit, mosquitto.url, sim_log, "--fail", "sim-01[0-3]")
        sim_ids = [f"sim-{i:03d}" for i in range(24)]

        # The whole group answers a group status command (members are whoever answers).
        r = fleetctl("status", "--group", GROUP, "--json", "--key", str(kit.key), "--broker", mosquitto.url)
        assert r.returncode == 0, r.stderr
        answered = {json.loads(line)["device"] for line in r.stdout.splitlines()}
        assert answered == {"real-a", "real-b", *sim_ids}

        # A live view follows the rollout (job updates are not retained: it must watch while it happens).
        live = Proc(["watch", "--live", "--json", "--interval", "0.5", "--broker", mosquitto.url])

        # Canary: the two real agents; then waves of 8 simulated devices; wave 2 holds the failing four.
        state = tmp_path / "rollout.json"
        t0 = time.monotonic()
        r = fleetctl("rollout", "--model", MODEL, "--manifest-url", kit.url(2), "--devices", ",".join(["real-a", "real-b", *sim_ids]),
                     "--canary-devices", "real-a,real-b", "--wave-size", "8", "--max-failures", "3", "--rollback-on-abort",
                     "--job-timeout", "60", "--key", str(kit.key), "--broker", mosquitto.url, "--state", str(state),
                     "--id", "ro-test1", timeout_s=ROLLOUT_TIMEOUT_S)
        elapsed = time.monotonic() - t0
        assert r.returncode == 1, r.stdout + r.stderr
        out = r.stdout
        assert "rollout ro-test1: lin to 26 devices in waves 2+8+8+8" in out
        assert "ABORT: 4 failure(s) > 3 allowed" in out and "rolling back 14 devices" in out
        doc = json.loads(state.read_text())
        assert doc["status"] == "aborted"
        devs = doc["devices"]
        waves = doc["plan"]["waves"]
        assert waves[0] == ["real-a", "real-b"] and waves[2] == sim_ids[8:16]
        assert all(devs[d]["state"] == "SUCCEEDED" for d in waves[0] + waves[1])
        assert {d for d in waves[2] if devs[d]["state"] == "FAILED"} == {"sim-010", "sim-011", "sim-012", "sim-013"}
        assert all(devs[d]["error"]["code"] == "validation_failed" for d in ("sim-010", "sim-013"))
        assert all(devs[d]["state"] == "pending" for d in waves[3]), "no wave starts after the abort"
        upgraded = [d for d, v in devs.items() if v["state"] == "SUCCEEDED"]
        assert len(upgraded) == 14 and all(devs[d]["rollback"] == "SUCCEEDED" for d in upgraded)

        # The devices agree: the real agents serve v1 again; simulated ones executed what the state says.
        for a in real:
            st = json.loads(a.agentctl("status", "--json").stdout)
            assert st["models"][0]["version"] == 1, st
        ran = Counter((e["device"], e["type"]) for e in executions(sim_log) if e.get("executed"))
        for d in sim_ids[:16]:
            assert ran[(d, "deploy")] == 1, d
        for d in sim_ids[16:]:
            assert ran[(d, "deploy")] == 0, f"{d} is in the wave after the abort"
        assert sum(ran[(d, "rollback")] for d in sim_ids) == 12
        assert elapsed < ROLLOUT_TIMEOUT_S

        # The live view saw every device, their versions, the jobs and p50/p99 per model.
        def settled(snap: dict[str, Any]) -> bool:
            per = snap.get("per_device", {})
            return (snap.get("online") == 26 and (per.get("sim-012", {}).get("job") or {}).get("state") == "FAILED"
                    and all(((per.get(d) or {}).get("job") or {}).get("type") == "rollback" for d in upgraded)
                    and all((per.get(d) or {}).get("models", {}).get(MODEL) == 1 for d in per))
        snap = live.event(settled)
        live.stop()
        assert snap["devices"] == 26 and snap["offline"] == 0
        lin1 = next(m for m in snap["models"] if m["model"] == MODEL and m["version"] == 1)
        assert lin1["devices"] == 26 and lin1["requests"] > 0 and 0 < lin1["p50_ms"] <= lin1["p99_ms"]
        assert snap["per_device"]["sim-012"]["job"]["error"]["code"] == "validation_failed"
        r = fleetctl("watch", "--live", "--duration", "1.5", "--interval", "5", "--broker", mosquitto.url)
        assert "26 devices, 26 online, 0 offline" in r.stdout and "P50_MS" in r.stdout
    finally:
        for p in (live, sim):
            if p is not None:
                p.stop()
        for a in real:
            if a.proc is not None:
                a.stop()


def test_rollout_resumes_after_sigint_and_sigkill_without_deploying_twice(tmp_path: Path, mosquitto: Mosquitto,
                                                                           kit: FleetKit) -> None:
    sim_log = tmp_path / "sim.jsonl"
    sim = sims(kit, mosquitto.url, sim_log, "--step-time", "0.1", devices=22, processes=2)
    ids = [f"sim-{i:03d}" for i in range(22)]
    state = tmp_path / "ro.json"
    base = ["--key", str(kit.key), "--broker", mosquitto.url, "--json"]
    try:
        first = Proc(["rollout", "--model", MODEL, "--manifest-url", kit.url(2), "--devices", ",".join(ids), "--canary", "2",
                      "--wave-size", "5", "--state", str(state), "--id", "ro-resume", "--job-timeout", "60", *base], cwd=tmp_path)
        first.event(lambda e: e.get("event") == "wave_done" and e["wave"] == 1)
        first.p.send_signal(signal.SIGINT)
        assert first.finish() == 130
        doc = json.loads(state.read_text())
        assert doc["status"] == "interrupted"
        assert sum(v["state"] == "SUCCEEDED" for v in doc["devices"].values()) >= 7

        # Resume, and kill -9 it while a wave is on the devices (its commands sent, no results yet).
        second = Proc(["rollout", "--resume", str(state), *base], cwd=tmp_path)
        start = second.event(lambda e: e.get("event") == "start")
        assert start["resumed"] is True
        sent = second.event(lambda e: e.get("event") == "sent")
        second.p.send_signal(signal.SIGKILL)
        second.finish()
        killed_wave = sent["wave"]
        doc = json.loads(state.read_text())
        in_flight = [d for d, v in doc["devices"].items() if v["state"] == "sent"]
        assert in_flight and all(doc["devices"][d]["wave"] == killed_wave for d in in_flight)

        third = Proc(["rollout", "--resume", str(state), *base], cwd=tmp_path)
        assert third.finish() == 0, "\n".join(third.seen)
        doc = json.loads(state.read_text())
        assert doc["status"] == "completed" and doc["runs"] == 3
        assert all(v["state"] == "SUCCEEDED" for v in doc["devices"].values())
        ends = [json.loads(line) for line in third.seen if '"event":"end"' in line]
        assert ends and ends[-1]["states"] == {"SUCCEEDED": 22}

        log = executions(sim_log)
        ran = Counter(e["device"] for e in log if e.get("executed") and e["type"] == "deploy")
        assert all(ran[d] == 1 for d in ids), f"deployed more or less than once: {dict(ran)}"
        replayed = {e["device"] for e in log if e.get("replay")}
        assert set(in_flight) <= replayed, "the re-sent commands were answered from the devices' records"
    finally:
        sim.stop()
        for f in tmp_path.glob("rollout-*.json"):
            os.unlink(f)
