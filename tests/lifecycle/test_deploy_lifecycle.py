"""Deployments that survive anything (issue: job state machine, hot swap, rollback, recovery).

Every test drives the real daemon as a process through the real Mosquitto. Crashes and hangs of
a model's worker are produced for real (SIGSEGV / SIGSTOP sent to the worker process), and the
"bad model" of the error-probation test fails inside onnxruntime itself.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from agentproc import AgentProcess
from conftest import Mosquitto
from fleet import (
    Fleet,
    X,
    expected,
    fleet_fixture,  # noqa: F401 - the `fleet` fixture
    infer,
    models,
    pid_alive,
    reshape_model,
    wait_until,
)

SWAPS = 5
CLIENTS = 8
MIN_REQUESTS = 10_000
LOAD_TIME_LIMIT_S = 240.0


def _deploy_ok(fleet: Fleet, version: int, seed: int, model: str = "lin", **kw: object) -> dict:
    job = fleet.deploy(model, fleet.bundle(model, version, seed))
    end = fleet.end_of(job)
    assert end["state"] == "SUCCEEDED", end
    return end


@pytest.mark.timeout(400)
def test_hot_swap_under_load_never_fails_or_mixes_versions(fleet: Fleet, mosquitto: Mosquitto) -> None:
    """≥ 10,000 requests from 8 clients across 5 swaps: zero errors, every response is exactly
    one version's output (each version has different weights)."""
    agent = fleet.agent("dev", mosquitto.url, "\n[deploy]\nprobation_s = 0.3\n")
    agent.start()
    try:
        _deploy_ok(fleet, 1, seed=1)
        want = {v: expected(seed=v) for v in range(1, SWAPS + 2)}
        body = json.dumps({"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32",
                                       "data": X.reshape(-1).tolist()}]})
        stop = threading.Event()
        counts = [0] * CLIENTS
        failures: list[str] = []
        seen_versions: set[int] = set()

        def client(i: int) -> None:
            conn = http.client.HTTPConnection("127.0.0.1", agent.api_port, timeout=30)
            deadline = time.monotonic() + LOAD_TIME_LIMIT_S
            while not stop.is_set() and time.monotonic() < deadline:
                try:
                    conn.request("POST", "/v2/models/lin/infer", body, {"Content-Type": "application/json"})
                    resp = conn.getresponse()
                    data = resp.read()
                except (OSError, http.client.HTTPException) as e:
                    failures.append(f"client {i}: {e!r}")
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", agent.api_port, timeout=30)
                    continue
                if resp.status != 200:
                    failures.append(f"client {i}: HTTP {resp.status} {data[:200]!r}")
                    continue
                doc = json.loads(data)
                v = int(doc["model_version"])
                got = np.asarray(doc["outputs"][0]["data"], dtype=np.float32).reshape(2, 3)
                if v not in want or not np.allclose(got, want[v], rtol=1e-5, atol=1e-6):
                    failures.append(f"client {i}: response says v{v} but outputs are not v{v}'s")
                seen_versions.add(v)
                counts[i] += 1
            conn.close()

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(CLIENTS)]
        for t in threads:
            t.start()
        for v in range(2, SWAPS + 2):
            wait_until(lambda v=v: sum(counts) >= (v - 1) * MIN_REQUESTS // (SWAPS + 1), 120, "load between swaps")
            end = _deploy_ok(fleet, v, seed=v)
            assert end["result"]["version"] == v
        wait_until(lambda: sum(counts) >= MIN_REQUESTS, 120, f"{MIN_REQUESTS} requests")
        stop.set()
        for t in threads:
            t.join(30)
        assert not failures, failures[:5]
        assert sum(counts) >= MIN_REQUESTS
        assert seen_versions == set(range(1, SWAPS + 2)), seen_versions
        assert infer(agent)[0] == SWAPS + 1
    finally:
        agent.stop()


def _worker_pid(agent: AgentProcess, model: str = "lin") -> int:
    pid = models(agent)[model].get("worker_pid")
    assert isinstance(pid, int), "the default isolation runs each model in a worker process"
    return pid


def _kill_next_worker(agent: AgentProcess, sig: int = signal.SIGKILL, timeout_s: float = 30.0) -> threading.Thread:
    """Kill the next worker process the daemon starts (the fresh worker a version is re-checked
    on): what a version whose worker dies again on its golden samples looks like."""
    import psutil

    assert agent.proc is not None
    daemon = psutil.Process(agent.proc.pid)
    before = {c.pid for c in daemon.children()}

    def run() -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for c in daemon.children():
                if c.pid not in before:
                    os.kill(c.pid, sig)
                    return
            time.sleep(0.005)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_worker_crash_in_probation_is_rechecked_and_the_version_stays(fleet: Fleet, mosquitto: Mosquitto) -> None:
    """One crash while serving, with the version passing its golden samples on a fresh worker:
    the traffic's doing, not the version's; it keeps serving and passes probation."""
    agent = fleet.agent("dev", mosquitto.url, "\n[deploy]\nprobation_s = 4\n")
    agent.start()
    try:
        _deploy_ok(fleet, 1, seed=1)
        job = fleet.deploy("lin", fleet.bundle("lin", 2, seed=2))
        wait_until(lambda: models(agent)["lin"]["state"] == "probation", 30, "v2 on probation")
        pid = _worker_pid(agent)
        os.kill(pid, signal.SIGSEGV)
        ev = fleet.obs.wait(lambda t, d: t.endswith("/events") and d.get("event") == "worker_restarted",
                            what="worker restarted")
        assert ev["recheck"] == "passed" and ev["version"] == 2, ev
        end = fleet.end_of(job)
        assert end["state"] == "SUCCEEDED", end
        v, out = infer(agent)
        assert v == 2 and np.allclose(out, expected(2), rtol=1e-5)
        assert _worker_pid(agent) != pid
        assert fleet.events("rollback") == []
    finally:
        agent.stop()


def test_worker_crash_in_probation_rolls_back(fleet: Fleet, mosquitto: Mosquitto) -> None:
    agent = fleet.agent("dev", mosquitto.url, "\n[deploy]\nprobation_s = 30\n")
    agent.start()
    try:
        _deploy_ok(fleet, 1, seed=1)
        job = fleet.deploy("lin", fleet.bundle("lin", 2, seed=2))
        wait_until(lambda: models(agent)["lin"].get("version") == 2 and models(agent)["lin"]["state"] == "probation",
                   30, "v2 on probation")
        assert infer(agent)[0] == 2
        killer = _kill_next_worker(agent, signal.SIGSEGV)  # ... and it crashes again on the re-check
        os.kill(_worker_pid(agent), signal.SIGSEGV)  # a native crash inside the runtime's process
        end = fleet.end_of(job)
        killer.join(1)
        assert end["state"] == "FAILED" and end["error"]["code"] == "worker_crashed", end
        assert "rolled back to v1" in end["error"]["message"] and "re-check" in end["error"]["message"]
        ev = fleet.obs.wait(lambda t, d: t.endswith("/events") and d.get("event") == "rollback", what="rollback event")
        assert (ev["frm"], ev["to"]) == (2, 1)
        v, out = infer(agent)
        assert v == 1 and np.allclose(out, expected(1), rtol=1e-5)
        assert agent.proc is not None and agent.proc.poll() is None, "the daemon survived the crash"
        assert [d["state"] for d in fleet.updates(job)].count("FAILED") == 1
    finally:
        agent.stop()


def test_worker_hang_in_probation_rolls_back(fleet: Fleet, mosquitto: Mosquitto) -> None:
    agent = fleet.agent("dev", mosquitto.url, "\n[deploy]\nprobation_s = 30\n[backends]\ninfer_timeout_s = 1.0\n")
    agent.start()
    try:
        _deploy_ok(fleet, 1, seed=1)
        job = fleet.deploy("lin", fleet.bundle("lin", 2, seed=2))
        wait_until(lambda: models(agent)["lin"]["state"] == "probation", 30, "v2 on probation")
        pid = _worker_pid(agent)
        killer = _kill_next_worker(agent)  # the fresh worker of the re-check does not come up either
        os.kill(pid, signal.SIGSTOP)  # the runtime stops answering
        wait_until(lambda: Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T",
                   10, "worker stopped")  # kill() returns before the process has stopped
        import requests

        body = {"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": X.reshape(-1).tolist()}]}
        t0 = time.monotonic()
        r = requests.post(f"{agent.api}/v2/models/lin/infer", json=body, timeout=30)
        assert r.status_code >= 500 and time.monotonic() - t0 < 10, "a hung call is cut off by infer_timeout_s"
        end = fleet.end_of(job)
        killer.join(1)
        assert end["state"] == "FAILED" and end["error"]["code"] == "worker_hung", end
        assert infer(agent)[0] == 1
        wait_until(lambda: not pid_alive(pid), 10, "hung worker killed")
    finally:
        agent.stop()


def test_repeated_errors_in_probation_roll_back(fleet: Fleet, mosquitto: Mosquitto) -> None:
    agent = fleet.agent("dev", mosquitto.url, "\n[deploy]\nprobation_s = 30\nprobation_max_errors = 5\n")
    agent.start()
    try:
        _deploy_ok(fleet, 1, seed=1)
        assert infer(agent)[0] == 1  # v1 answers a batch of 2: v2 failing on it is v2's fault
        bad = reshape_model(fleet.root / "src" / "reshape.onnx")
        samples = fleet.root / "src" / "in3.npz"
        np.savez(samples, x=np.ones((3, 4), np.float32))
        job = fleet.deploy("lin", fleet.bundle("lin", 2, seed=0, model_file=bad, inputs=samples))
        wait_until(lambda: models(agent)["lin"]["state"] == "probation", 30, "v2 on probation")
        import requests

        body = {"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": X.reshape(-1).tolist()}]}
        codes = [requests.post(f"{agent.api}/v2/models/lin/infer", json=body, timeout=30).status_code for _ in range(6)]
        assert all(c >= 500 for c in codes), codes
        end = fleet.end_of(job)
        assert end["state"] == "FAILED" and end["error"]["code"] == "probation_failed", end
        assert infer(agent)[0] == 1
    finally:
        agent.stop()


def test_crash_outside_probation_restarts_then_failed_recheck_rolls_back(fleet: Fleet, mosquitto: Mosquitto) -> None:
    """Deaths whose re-check passes restart the worker on the same version (no strike); a death
    whose re-check fails too rolls back to the previous version."""
    agent = fleet.agent("dev", mosquitto.url, "\n[deploy]\nprobation_s = 0.2\n")
    agent.start()
    try:
        _deploy_ok(fleet, 1, seed=1)
        _deploy_ok(fleet, 2, seed=2)
        for _ in range(3):  # as many as a crash loop used to need: each re-check passes
            pid = _worker_pid(agent)
            os.kill(pid, signal.SIGKILL)
            wait_until(lambda p=pid: models(agent)["lin"].get("worker_pid") not in (None, p), 30, "worker restarted")
            assert infer(agent)[0] == 2, "a restarted worker serves the same version"
        assert len(fleet.events("worker_restarted")) >= 3 and fleet.events("rollback") == []
        killer = _kill_next_worker(agent)
        os.kill(_worker_pid(agent), signal.SIGKILL)
        ev = fleet.obs.wait(lambda t, d: t.endswith("/events") and d.get("event") == "rollback",
                            what="rollback after a failed re-check")
        killer.join(1)
        assert (ev["frm"], ev["to"]) == (2, 1) and "re-check" in ev["reason"], ev
        assert infer(agent)[0] == 1
    finally:
        agent.stop()


def test_load_failure_and_validation_failure_keep_the_previous_version(fleet: Fleet, mosquitto: Mosquitto) -> None:
    agent = fleet.agent("dev", mosquitto.url, "\n[deploy]\nprobation_s = 0.2\n")
    agent.start()
    try:
        _deploy_ok(fleet, 1, seed=1)
        garbage = fleet.root / "src" / "garbage.onnx"
        garbage.parent.mkdir(parents=True, exist_ok=True)
        garbage.write_bytes(b"not an onnx model at all" * 10)
        url = fleet.bundle("lin", 2, seed=1)  # valid bundle, then swap in the garbage and re-sign
        from fleetctl import bundle as fb

        src_ok = fleet.root / "bundles" / "lin" / "2"
        (src_ok / "model.onnx").write_bytes(garbage.read_bytes())
        doc = fb.manifest_document(src_ok / "manifest.json")
        doc["variants"][0]["files"] = [fb.file_entry(src_ok, "model.onnx").to_dict()]
        from agent.bundles.manifest import sign_manifest

        (src_ok / "manifest.json").write_bytes(sign_manifest(doc, [fleet.key]))
        end = fleet.end_of(fleet.deploy("lin", url))
        assert end["state"] == "FAILED" and end["error"]["code"] == "load_failed", end
        assert infer(agent)[0] == 1
        # Wrong golden outputs: validation fails on the serving backend; v1 keeps serving.
        exp = fleet.root / "src" / "bad-expected.npz"
        end = fleet.end_of(fleet.deploy("lin", fleet.bundle("lin", 3, seed=3, inputs=None)))
        assert end["state"] == "SUCCEEDED"
        vdir = fleet.root / "bundles" / "lin" / "4"
        url4 = fleet.bundle("lin", 4, seed=4)
        np.savez(exp, y=np.full((4, 3), 1e6, np.float32))
        (vdir / "samples" / "expected.npz").write_bytes(exp.read_bytes())
        doc = fb.manifest_document(vdir / "manifest.json")
        doc["files"] = [fb.file_entry(vdir, f["path"]).to_dict() for f in doc["files"]]
        (vdir / "manifest.json").write_bytes(sign_manifest(doc, [fleet.key]))
        end = fleet.end_of(fleet.deploy("lin", url4))
        assert end["state"] == "FAILED" and end["error"]["code"] == "validation_failed", end
        assert infer(agent)[0] == 3
        # A failed version does not use up its number: a fixed v4 deploys.
        fixed = fleet.bundle("lin", 4, seed=4)
        end = fleet.end_of(fleet.deploy("lin", fixed))
        assert end["state"] == "SUCCEEDED", end
    finally:
        agent.stop()


def test_supersede_cancel_rollback_remove(fleet: Fleet, mosquitto: Mosquitto) -> None:
    agent = fleet.agent("dev", mosquitto.url, "\n[deploy]\nprobation_s = 0.2\n[downloads]\nmin_rate_bps = 1\n")
    agent.start()
    try:
        _deploy_ok(fleet, 1, seed=1)
        # A big bundle served slowly: the deploy is still downloading when a newer one arrives.
        big = fleet.root / "src" / "pad.bin"
        big.parent.mkdir(parents=True, exist_ok=True)
        big.write_bytes(os.urandom(8 * 1024 * 1024))
        slow_url = fleet.bundle("lin", 2, seed=2, extra_files=[big])
        assert fleet.server is not None
        fleet.server.throttle_bps = 512 * 1024  # type: ignore[attr-defined]
        j2 = fleet.deploy("lin", slow_url)
        fleet.obs.wait(lambda t, d: t.endswith(f"/jobs/{j2}") and d.get("step") == "downloading", what="v2 downloading")
        fleet.server.throttle_bps = 0  # type: ignore[attr-defined]
        j3 = fleet.deploy("lin", fleet.bundle("lin", 3, seed=3))
        e2, e3 = fleet.end_of(j2), fleet.end_of(j3)
        assert e2["state"] == "CANCELED" and e2["error"]["code"] == "superseded", e2
        assert e3["state"] == "SUCCEEDED"
        assert infer(agent)[0] == 3
        # cancel: a deploy that is downloading slowly, canceled by id.
        fleet.server.throttle_bps = 256 * 1024  # type: ignore[attr-defined]
        j4 = fleet.deploy("lin", fleet.bundle("lin", 4, seed=4, extra_files=[big]))
        fleet.obs.wait(lambda t, d: t.endswith(f"/jobs/{j4}") and d.get("step") == "downloading", what="v4 downloading")
        jc = fleet.send("cancel", {"job": j4})
        assert fleet.end_of(jc)["state"] == "SUCCEEDED"
        e4 = fleet.end_of(j4)
        assert e4["state"] == "CANCELED" and e4["error"]["code"] == "canceled"
        fleet.server.throttle_bps = 0  # type: ignore[attr-defined]
        assert infer(agent)[0] == 3
        # rollback to the kept previous version, then remove the model.
        end = fleet.end_of(fleet.send("rollback", {"model": "lin"}))
        assert end["state"] == "SUCCEEDED" and end["result"]["version"] == 1, end
        v, out = infer(agent)
        assert v == 1 and np.allclose(out, expected(1), rtol=1e-5)
        end = fleet.end_of(fleet.send("rollback", {"model": "lin", "to_version": 9}))
        assert end["state"] == "REJECTED" and end["error"]["code"] == "rollback_refused"
        end = fleet.end_of(fleet.send("remove", {"model": "lin"}))
        assert end["state"] == "SUCCEEDED"
        import requests

        assert requests.get(f"{agent.api}/v2/models/lin/ready", timeout=5).status_code in (404, 503)
        store = agent.root / "state" / "store" / "objects"
        assert not list(store.glob("*/*")), "remove deletes the model's files"
        # The high-water mark stays: an old signed bundle cannot come back after a remove.
        end = fleet.end_of(fleet.deploy("lin", fleet.bundle("lin", 1, seed=1)))
        assert end["state"] == "REJECTED" and end["error"]["code"] == "rollback_refused"
    finally:
        agent.stop()


def test_store_shares_files_reuses_them_and_refuses_over_budget(fleet: Fleet, mosquitto: Mosquitto) -> None:
    agent = fleet.agent("dev", mosquitto.url, "\n[deploy]\nprobation_s = 0.2\n[storage]\nkeep_versions = 3\nmax_disk_mb = 1\n")
    agent.start()
    try:
        e1 = _deploy_ok(fleet, 1, seed=1)
        assert e1["result"]["figures"]["downloaded_bytes"] > 0
        # v2 has the very same model file (same weights): only the new samples are fetched.
        e2 = _deploy_ok(fleet, 2, seed=1)
        fig = e2["result"]["figures"]
        assert fig["reused_files"] >= 1
        model_size = (fleet.root / "bundles" / "lin" / "2" / "model.onnx").stat().st_size
        assert fig["downloaded_bytes"] < model_size + 4096
        objects = list((agent.root / "state" / "store" / "objects").glob("*/*"))
        names = [p.name for p in objects]
        assert len(names) == len(set(names))
        import hashlib

        model_sha = hashlib.sha256((fleet.root / "bundles" / "lin" / "2" / "model.onnx").read_bytes()).hexdigest()
        assert names.count(model_sha) == 1, "two versions sharing a file store it once"
        # Over the disk budget: refused before anything is downloaded.
        big = fleet.root / "src" / "pad.bin"
        big.write_bytes(os.urandom(2 * 1024 * 1024))
        job = fleet.deploy("lin", fleet.bundle("lin", 3, seed=3, extra_files=[big]))
        end = fleet.end_of(job)
        assert end["state"] == "FAILED" and end["error"]["code"] == "disk_full", end
        assert not any(d.get("progress") for d in fleet.updates(job)), "nothing was downloaded"
        assert not list((agent.root / "state" / "store" / "partial").iterdir())
        assert infer(agent)[0] == 2
    finally:
        agent.stop()


def test_remote_config_is_validated_and_persisted(fleet: Fleet, mosquitto: Mosquitto) -> None:
    agent = fleet.agent("dev", mosquitto.url)
    agent.start()
    try:
        end = fleet.end_of(fleet.send("config", {"set": {"storage.keep_versions": 4, "telemetry.heartbeat_s": 30}}))
        assert end["state"] == "SUCCEEDED" and end["result"]["storage.keep_versions"] == 4
        end = fleet.end_of(fleet.send("config", {"set": {"storage.keep_versions": "many"}}))
        assert end["state"] == "REJECTED" and "storage.keep_versions" in end["error"]["message"]
        end = fleet.end_of(fleet.send("config", {"set": {"mqtt.url": "mqtt://evil:1883"}}))
        assert end["state"] == "REJECTED" and "not remotely settable" in end["error"]["message"]
        agent.stop()
        agent.start()
        cfg = json.loads(agent.agentctl("status", "--json").stdout)
        assert cfg["device"] == "dev1"
        persisted = json.loads((agent.root / "state" / "remote-config.json").read_text())
        assert persisted == {"storage.keep_versions": 4, "telemetry.heartbeat_s": 30}
    finally:
        agent.stop()


def test_daemon_stays_without_numpy_cryptography_and_runtime_with_process_isolation(
        fleet: Fleet, mosquitto: Mosquitto) -> None:
    """Signed commands, a verified manifest, validation, swaps and inference over HTTP: none of
    it loads numpy, cryptography or the runtime into the daemon (they live in the worker, or are
    not needed: agent/bundles/ed25519.py, agent/backends/golden.py, agent/serving/adopted.py)."""
    agent = fleet.agent("dev", mosquitto.url, "\n[deploy]\nprobation_s = 0\n")
    agent.start()
    try:
        _deploy_ok(fleet, 1, seed=1)
        _deploy_ok(fleet, 2, seed=2)
        for _ in range(3):
            assert infer(agent)[0] == 2
        assert agent.proc is not None
        maps = Path(f"/proc/{agent.proc.pid}/maps").read_text()
        for lib in ("numpy", "cryptography", "onnxruntime", "openvino", "ai_edge_litert"):
            assert lib not in maps, f"{lib} is mapped into the daemon"
        worker = Path(f"/proc/{_worker_pid(agent)}/maps").read_text()
        assert "onnxruntime" in worker or "openvino" in worker, "the model runs in its worker"
    finally:
        agent.stop()
