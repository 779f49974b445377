"""The serving owner in the real daemon, driven through the real Mosquitto while clients keep
asking KServe. Every answer is exactly the version it names, every job ends once (one terminal
update per job id on MQTT), and afterwards the registry's view (`agentctl models`) and KServe agree.

- A deploy, a rollback and a remove sent at once.
- The same three sent while a probation verdict is in flight: v2 fails its probation for real
  (onnxruntime errors on every request) and the verdict's rollback is held while its worker
  starts (that worker is stopped with SIGSTOP until the three commands settled), so the verdict
  lands after them and must not overwrite what they left serving: it is refused with
  ``serving_moved`` unless v2 still serves.
The finer interleavings are driven in-process against the same owner in
tests/integration/test_serving_owner.py.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from typing import Any

import numpy as np
import psutil
import pytest
import requests
from agentproc import AgentProcess
from conftest import Mosquitto
from fleet import (
    TERMINAL,
    Fleet,
    X,
    expected,
    fleet_fixture,  # noqa: F401 - the `fleet` fixture
    infer,
    models,
    reshape_model,
)

REQUEST_TIMEOUT_S = 30
MAX_REQUESTS = 20_000  # each client's bound
CLIENTS = 2
# What a racing command may end with besides success: its model moved or went away meanwhile.
RACE_CODES = {"serving_moved", "unknown_model", "rollback_refused"}
PROBATION_S = 6.0  # v3's probation, after the race (v2's verdict comes from errors, long before)
FREEZE_WAIT_S = 30.0
BODY = {"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": X.reshape(-1).tolist()}]}


class Clients:
    """Keep-alive clients asking KServe until stopped; every 200 is checked against the outputs
    of the version it names. ``failing`` names versions whose errors are expected (a bad bundle's
    runtime error, ``inference_failed``); any other answer but 404 (removed) is a failure."""

    def __init__(self, agent: AgentProcess, versions: tuple[int, ...], failing: tuple[int, ...] = ()) -> None:
        self.agent = agent
        self.want = {v: expected(seed=v) for v in versions if v not in failing}
        self.failing = failing
        self.stop = threading.Event()
        self.failures: list[str] = []
        self.answers: dict[int, int] = {}
        self.errors = 0
        self._lock = threading.Lock()  # guards failures, answers and errors
        self.threads = [threading.Thread(target=self._ask) for _ in range(CLIENTS)]

    def __enter__(self) -> Clients:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(REQUEST_TIMEOUT_S)

    def check(self) -> None:
        self.__exit__()
        assert not any(t.is_alive() for t in self.threads), "a client hung"
        assert not self.failures, self.failures[:5]

    def _ask(self) -> None:
        with requests.Session() as s:
            for _ in range(MAX_REQUESTS):
                if self.stop.is_set():
                    return
                r = s.post(f"{self.agent.api}/v2/models/lin/infer", json=BODY, timeout=REQUEST_TIMEOUT_S)
                if r.status_code == 404:
                    continue  # removed: nothing serves
                with self._lock:
                    self._judge(r)

    def _judge(self, r: requests.Response) -> None:
        if r.status_code != 200:
            if self.failing and r.status_code >= 500 and "inference_failed" in r.text:
                self.errors += 1
            else:
                self.failures.append(f"{r.status_code}: {r.text[:200]}")
            return
        doc = r.json()
        v = int(doc["model_version"])
        self.answers[v] = self.answers.get(v, 0) + 1
        out = np.asarray(doc["outputs"][0]["data"], dtype=np.float32).reshape(2, 3)
        if v not in self.want or not np.allclose(out, self.want[v], rtol=1e-5):
            self.failures.append(f"answer named v{v} but another version computed it")


def _ends_once(fleet: Fleet, jobs: list[str]) -> None:
    fleet.end_of(fleet.send("ping", {}))  # a round trip through the ops worker first
    for j in jobs:
        ends = [u for u in fleet.updates(j) if u.get("state") in TERMINAL]
        assert len(ends) == 1, (j, fleet.updates(j))


def _agree(agent: AgentProcess) -> int | None:
    """The version `agentctl models` names, checked against KServe's answer; returned."""
    view = models(agent).get("lin")
    r = requests.post(f"{agent.api}/v2/models/lin/infer", json=BODY, timeout=REQUEST_TIMEOUT_S)
    if view is None or view.get("version") is None:
        assert r.status_code == 404, r.text
        return None
    assert r.status_code == 200 and int(r.json()["model_version"]) == view["version"], (view, r.text)
    return int(view["version"])


def _racing_end(end: dict[str, Any]) -> None:
    assert end["state"] == "SUCCEEDED" or end.get("error", {}).get("code") in RACE_CODES, end


@pytest.mark.timeout(180)
def test_deploy_rollback_remove_at_once(fleet: Fleet, mosquitto: Mosquitto) -> None:
    agent = fleet.agent("dev", mosquitto.url, "\n[deploy]\nprobation_s = 0.2\n")
    agent.start()
    try:
        for v in (1, 2):
            end = fleet.end_of(fleet.deploy("lin", fleet.bundle("lin", v, seed=v)))
            assert end["state"] == "SUCCEEDED", end
        url3 = fleet.bundle("lin", 3, seed=3)
        with Clients(agent, (1, 2, 3)) as clients:
            jobs = [fleet.deploy("lin", url3), fleet.send("rollback", {"model": "lin"}),
                    fleet.send("remove", {"model": "lin"})]
            ends = [fleet.end_of(j) for j in jobs]
        clients.check()
        for end in ends:
            _racing_end(end)
        _ends_once(fleet, jobs)
        _agree(agent)
    finally:
        agent.stop()


class NextWorkerFreezer:
    """Stops (SIGSTOP) the next worker process the daemon starts, until ``release()``: the
    worker a verdict's rollback loads its version on, held before it is ready."""

    def __init__(self, agent: AgentProcess) -> None:
        assert agent.proc is not None
        self.daemon = psutil.Process(agent.proc.pid)
        self.before = {c.pid for c in self.daemon.children()}
        self.pid: int | None = None
        self.found = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        deadline = time.monotonic() + FREEZE_WAIT_S
        while time.monotonic() < deadline:
            for c in self.daemon.children():
                if c.pid not in self.before:
                    os.kill(c.pid, signal.SIGSTOP)
                    self.pid = c.pid
                    self.found.set()
                    return
            time.sleep(0.002)

    def wait(self) -> int:
        assert self.found.wait(FREEZE_WAIT_S), "the verdict started no worker to roll back on"
        assert self.pid is not None
        return self.pid

    def release(self) -> None:
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):  # ended with the daemon
                os.kill(self.pid, signal.SIGCONT)


@pytest.mark.timeout(180)
def test_probation_verdict_races_deploy_rollback_remove(fleet: Fleet, mosquitto: Mosquitto) -> None:
    agent = fleet.agent("dev", mosquitto.url, f"\n[deploy]\nprobation_s = {PROBATION_S}\n"
                        "probation_max_errors = 5\n")
    agent.start()
    freezer: NextWorkerFreezer | None = None
    try:
        end = fleet.end_of(fleet.deploy("lin", fleet.bundle("lin", 1, seed=1)))
        assert end["state"] == "SUCCEEDED", end
        assert infer(agent)[0] == 1  # v1 answers a batch of 2: v2 failing on it is v2's fault
        samples = fleet.root / "src" / "in3.npz"
        np.savez(samples, x=np.ones((3, 4), np.float32))
        url2 = fleet.bundle("lin", 2, seed=0, model_file=reshape_model(fleet.root / "src" / "bad.onnx"), inputs=samples)
        url3 = fleet.bundle("lin", 3, seed=3)
        job2 = fleet.deploy("lin", url2)  # passes its golden samples (a batch of 3), fails every request
        fleet.obs.wait(lambda t, d: d.get("job") == job2 and d.get("step") == "probation", 30, "v2 on probation")
        freezer = NextWorkerFreezer(agent)
        with Clients(agent, (1, 2, 3), failing=(2,)) as clients:
            freezer.wait()  # v2 failed its probation; the verdict's rollback to v1 is held
            assert not [u for u in fleet.updates(job2) if u.get("state") in TERMINAL]
            jobs = [fleet.deploy("lin", url3), fleet.send("rollback", {"model": "lin"}),
                    fleet.send("remove", {"model": "lin"})]
            for j in jobs[1:]:
                _racing_end(fleet.end_of(j))
            # v3 is either refused or activated (on probation, behind the held verdict).
            fleet.obs.wait(lambda t, d: d.get("job") == jobs[0] and (d.get("state") in TERMINAL
                                                                     or d.get("step") == "probation"),
                           60, "v3 refused or activated")
            settled = _agree(agent)  # what the three commands left serving
            freezer.release()
            end2 = fleet.end_of(job2)
            _racing_end(fleet.end_of(jobs[0], timeout_s=PROBATION_S + 30))
            final = _agree(agent)
        clients.check()
        assert clients.errors >= 5, "v2 was not failing"

        rolled = [e for e in fleet.events("rollback") if str(e.get("reason", "")).startswith("probation")]
        refused = [e for e in fleet.events("rollback_failed") if e.get("frm") == 2]
        assert end2["state"] == "FAILED" and end2["error"]["code"] == "probation_failed", end2
        if settled == 2:  # nothing moved v2 away: the verdict applies (unless v1 was pruned meanwhile)
            applied = len(rolled) == 1 and not refused and final == 1
            failed = not rolled and len(refused) == 1 and refused[0]["error"]["code"] != "serving_moved" and final == 2
            assert applied or failed, (rolled, refused, final)
        else:  # the verdict must not overwrite what the commands left serving
            assert not rolled and len(refused) == 1, (rolled, refused)
            assert refused[0]["error"]["code"] == "serving_moved", refused
            assert "not rolled back" in end2["error"]["message"], end2
            assert final == settled, (settled, final)
        _ends_once(fleet, [job2, *jobs])
    finally:
        if freezer is not None:
            freezer.release()
        agent.stop()
