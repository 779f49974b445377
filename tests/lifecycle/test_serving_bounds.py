"""Traffic does not decide what serves: bursts, oversized and hostile requests against a real daemon.

Each test runs the real daemon as a process (process isolation, real onnxruntime in a real worker)
with a small ``backends.infer_timeout_s`` so that the timeouts involved pass in seconds, and
drives it over the real KServe v2 HTTP API on loopback. Each asserts the refusal code or the
bound, and that the serving version (and, where it matters, the very worker process) is unchanged.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from typing import Any

import numpy as np
from agentproc import AgentProcess
from conftest import Mosquitto
from fleet import (
    Fleet,
    X,
    expected,
    fleet_fixture,  # noqa: F401 - the `fleet` fixture
    infer,
    models,
)

INFER_TIMEOUT_S = 2.0  # the hung-worker deadline in these tests
PAUSE_S = INFER_TIMEOUT_S + 1.0  # a quiet spell longer than the deadline
BURSTS = 3
CLIENTS = 32  # concurrent clients per burst: half keep their connection, half open one per request
REQUESTS_PER_CLIENT = 15
HTTP_TIMEOUT_S = 20.0
JOB_TIMEOUT_S = 60.0


def _start(fleet: Fleet, mosquitto: Mosquitto, toml: str = "", version: int = 1) -> AgentProcess:
    """A daemon serving ``lin`` v``version`` (seed = version) in a worker process."""
    agent = fleet.agent("dev", mosquitto.url,
                        f"\n[backends]\nisolation = \"process\"\nautotune = false\n"
                        f"infer_timeout_s = {INFER_TIMEOUT_S}\n{toml}")
    agent.start()
    job = fleet.deploy("lin", fleet.bundle("lin", version, seed=version))
    done = fleet.end_of(job, timeout_s=JOB_TIMEOUT_S)
    assert done["state"] == "SUCCEEDED", (done, agent.log.read_text()[-3000:])
    return agent


def _body(x: np.ndarray = X) -> bytes:
    return json.dumps({"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.ravel().tolist()}]}).encode()


def _post(c: http.client.HTTPConnection, body: bytes, model: str = "lin",
          headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], dict[str, Any]]:
    c.request("POST", f"/v2/models/{model}/infer", body=body,
              headers={"Content-Type": "application/json", **(headers or {})})
    r = c.getresponse()
    raw = r.read()
    return r.status, {k.lower(): v for k, v in r.getheaders()}, (json.loads(raw) if raw else {})


def _conn(agent: AgentProcess) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", agent.api_port, timeout=HTTP_TIMEOUT_S)


def test_idle_then_burst_keeps_the_worker(fleet: Fleet, mosquitto: Mosquitto) -> None:
    """Bursts of keep-alive and fresh connections, with quiet spells longer than the hung-worker
    deadline between them: the same worker answers every request (no restart, no failure)."""
    agent = _start(fleet, mosquitto)
    try:
        pid = models(agent)["lin"]["worker_pid"]
        assert pid
        want = expected(1)
        keep = [_conn(agent) for _ in range(CLIENTS // 2)]  # kept across the quiet spells
        failures: list[str] = []

        def client(i: int) -> None:
            for _ in range(REQUESTS_PER_CLIENT):
                c = keep[i] if i < len(keep) else _conn(agent)
                try:
                    status, _, doc = _post(c, _body())
                    if status != 200 or doc.get("model_version") != "1":
                        failures.append(f"{status} {doc}")
                    elif not np.allclose(np.asarray(doc["outputs"][0]["data"]).reshape(want.shape), want, rtol=1e-5):
                        failures.append(f"wrong outputs {doc}")
                except (OSError, http.client.HTTPException) as e:
                    failures.append(repr(e))
                finally:
                    if i >= len(keep):
                        c.close()

        for burst in range(BURSTS):
            threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(HTTP_TIMEOUT_S * REQUESTS_PER_CLIENT)
            assert not failures, (burst, failures[:5], agent.log.read_text()[-3000:])
            time.sleep(PAUSE_S)  # quiet for longer than infer_timeout_s
        for c in keep:
            c.close()
        m = models(agent)["lin"]
        assert m["worker_pid"] == pid, agent.log.read_text()[-3000:]
        assert m["version"] == 1
        assert "hung" not in agent.log.read_text()
        assert fleet.events("worker_restarted") == []
        assert infer(agent)[0] == 1
    finally:
        agent.stop()
