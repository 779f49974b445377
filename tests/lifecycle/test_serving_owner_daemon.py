"""The serving owner in the real daemon: a deploy, a rollback and a remove sent at once through the
real Mosquitto while clients keep asking KServe. Every answer is exactly the version it names,
every job ends once, and afterwards the registry's view (`agentctl models`) and KServe agree.
The finer interleavings (and a probation verdict racing a deploy) are driven in-process against
the same owner in tests/integration/test_serving_owner.py.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import requests
from conftest import Mosquitto
from fleet import (
    TERMINAL,
    Fleet,
    X,
    expected,
    fleet_fixture,  # noqa: F401 - the `fleet` fixture
    models,
)

REQUEST_TIMEOUT_S = 30
MAX_REQUESTS = 5000  # the load loop's bound
# What a racing command may end with besides success: its model moved or went away meanwhile.
RACE_CODES = {"serving_moved", "unknown_model", "rollback_refused"}


@pytest.mark.timeout(180)
def test_deploy_rollback_remove_at_once(fleet: Fleet, mosquitto: Mosquitto) -> None:
    agent = fleet.agent("dev", mosquitto.url, "\n[deploy]\nprobation_s = 0.2\n")
    agent.start()
    try:
        for v in (1, 2):
            end = fleet.end_of(fleet.deploy("lin", fleet.bundle("lin", v, seed=v)))
            assert end["state"] == "SUCCEEDED", end
        url3 = fleet.bundle("lin", 3, seed=3)
        want = {v: expected(seed=v) for v in (1, 2, 3)}
        body = {"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": X.reshape(-1).tolist()}]}
        stop = threading.Event()
        failures: list[str] = []

        def ask() -> None:
            with requests.Session() as s:
                for _ in range(MAX_REQUESTS):
                    if stop.is_set():
                        return
                    r = s.post(f"{agent.api}/v2/models/lin/infer", json=body, timeout=REQUEST_TIMEOUT_S)
                    if r.status_code == 404:
                        continue  # removed: nothing serves
                    if r.status_code != 200:
                        failures.append(f"{r.status_code}: {r.text[:200]}")
                        continue
                    doc = r.json()
                    v = int(doc["model_version"])
                    out = np.asarray(doc["outputs"][0]["data"], dtype=np.float32).reshape(2, 3)
                    if not np.allclose(out, want[v], rtol=1e-5):
                        failures.append(f"answer named v{v} but another version computed it")

        client = threading.Thread(target=ask)
        client.start()
        jobs = [fleet.deploy("lin", url3), fleet.send("rollback", {"model": "lin"}),
                fleet.send("remove", {"model": "lin"})]
        ends = [fleet.end_of(j) for j in jobs]
        stop.set()
        client.join(REQUEST_TIMEOUT_S)
        assert not client.is_alive() and not failures, failures[:5]
        for end in ends:
            assert end["state"] == "SUCCEEDED" or end.get("error", {}).get("code") in RACE_CODES, end
        # A status round trip through the ops worker, then every job has reported exactly one end.
        fleet.end_of(fleet.send("ping", {}))
        for j in jobs:
            assert sum(1 for u in fleet.updates(j) if u.get("state") in TERMINAL) == 1, fleet.updates(j)
        view = models(agent).get("lin")
        r = requests.post(f"{agent.api}/v2/models/lin/infer", json=body, timeout=REQUEST_TIMEOUT_S)
        if view is None or view.get("version") is None:
            assert r.status_code == 404, r.text
        else:
            assert r.status_code == 200 and int(r.json()["model_version"]) == view["version"], (view, r.text)
    finally:
        agent.stop()
