"""No call goes uncounted at a stop: calls a model worker answered itself (the direct path,
agent/serving/adopted.py) reach the daemon's telemetry in batches, and the last batch before a stop
must be in the final window, however soon after the calls the stop comes.
"""

from __future__ import annotations

from pathlib import Path

import requests
from agentproc import AgentProcess
from conftest import Mosquitto
from telemetry_kit import (
    DurableObserver,
    Fleet,
    InferenceLoad,
    outbox_seq_table,
    running,
    seqs,
    write_config,
)

CALLS = 40


def test_calls_answered_just_before_a_stop_are_in_the_final_window(tmp_path: Path, mosquitto: Mosquitto) -> None:
    fleet = Fleet(tmp_path, mosquitto.host, mosquitto.port)
    obs = DurableObserver(mosquitto.host, mosquitto.port)
    agent = AgentProcess(tmp_path / "device", mosquitto.url)
    # One long window: the only telemetry message is the final one, written at the stop.
    write_config(agent, {"heartbeat_s": 30, "window_s": 600, "daily_budget_mb": 0})
    agent.trust_key(fleet.pub_pem)
    try:
        with running(agent):
            fleet.deploy(obs)
            http = requests.Session()  # one keep-alive connection: the daemon hands it to the model's worker
            for _ in range(CALLS):
                r = http.post(f"{agent.api}/v2/models/lin/infer", json=InferenceLoad.GOOD, timeout=10)
                assert r.status_code == 200, r.text
            http.close()
            assert agent.stop() == 0  # at once: the worker has not sent its latest calls on its own yet
        last = outbox_seq_table(agent.root / "state").get("telemetry", 0)  # 0: no window was written
        obs.wait_until(lambda: max(seqs(obs, "dev1", "telemetry"), default=0) == last, what="the final window")
        windows = obs.find(lambda t, d: t == "edge/dev1/telemetry")
        assert sum(m.doc["models"]["lin"]["count"] for m in windows) == CALLS
    finally:
        obs.close()
        fleet.close()
