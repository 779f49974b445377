"""Agent crashes (SIGKILL): the broker publishes the Last Will (retained ``online: false``), and
the messages the agent had queued but that were never acknowledged are re-sent by the next
agent process from the durable outbox, with contiguous ``seq``.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

from agentproc import AgentProcess, Observer
from conftest import Mosquitto
from telemetry_kit import (
    DurableObserver,
    Fleet,
    TcpProxy,
    agent_status,
    outbox_rows,
    outbox_seq_table,
    running,
    seqs,
    wait_drained,
    write_config,
)

PINGS = 12
WILL_TIMEOUT_S = 10.0


def test_sigkill_publishes_the_will_and_a_restart_resends_unacknowledged(tmp_path: Path, mosquitto: Mosquitto) -> None:
    fleet = Fleet(tmp_path, mosquitto.host, mosquitto.port)
    obs = DurableObserver(mosquitto.host, mosquitto.port)
    proxy = TcpProxy(mosquitto.host, mosquitto.port).start()
    agent = AgentProcess(tmp_path / "device", proxy.url)
    write_config(agent, {"heartbeat_s": 0.5, "window_s": 0.5, "daily_budget_mb": 0})
    agent.trust_key(fleet.pub_pem)
    try:
        agent.start()
        obs.wait(lambda t, d: t == "edge/dev1/status" and d.get("online") is True, what="online")
        # Half-open link: commands reach the agent, its answers vanish before the broker.
        proxy.blackhole = True
        acked = [fleet.command("dev1", "ping") for _ in range(PINGS)]
        assert all(ok for _, ok in acked)
        ids = [cid for cid, _ in acked]
        deadline = time.monotonic() + 15
        while agent_status(agent)["outbox"]["depth"] < 2 * PINGS and time.monotonic() < deadline:
            time.sleep(0.1)
        assert agent_status(agent)["outbox"]["depth"] >= 2 * PINGS, "QUEUED + SUCCEEDED per ping, unacknowledged"
        assert proxy.bytes_dropped > 0, "the agent did publish them (into the void)"
        assert not obs.find(lambda t, d: t.startswith("edge/dev1/jobs/ping")), "nothing got through"

        # SIGKILL: no clean DISCONNECT, so the broker publishes the Last Will.
        mark = len(obs)
        agent.stop(signal.SIGKILL)
        will = obs.wait(lambda t, d: t == "edge/dev1/status" and d.get("online") is False,
                        timeout_s=WILL_TIMEOUT_S, what="Last Will", after=mark)
        assert will.doc["reason"] == "connection lost" and will.doc["device"] == "dev1"
        late = Observer(mosquitto.host, mosquitto.port, topics=("edge/dev1/status",))
        try:  # retained: a dashboard that connects later sees the device offline
            retained = late.wait(lambda t, d: True, what="retained status")
            assert retained["online"] is False and retained["reason"] == "connection lost"
        finally:
            late.close()
        state = agent.root / "state"
        assert outbox_rows(state) >= 2 * PINGS, "the unacknowledged rows survived the crash on disk"

        # A new agent process re-sends them (paho's in-memory session died with the old one).
        proxy.blackhole = False
        with running(agent):
            for cid in ids:
                obs.wait(lambda t, d, c=cid: t == f"edge/dev1/jobs/{c}" and d.get("state") == "SUCCEEDED",
                         what=f"re-sent answer to {cid}")
            wait_drained(agent)
        last = outbox_seq_table(state)
        for stream in sorted(set(last) & {"jobs", "heartbeat", "telemetry"}):
            got = seqs(obs, "dev1", stream)
            assert set(got) == set(range(1, last[stream] + 1)), f"{stream} not contiguous"
        assert obs.find(lambda t, d: t == "edge/dev1/status" and d.get("online") is True)[-1].doc["seq"] > will.doc["seq"]
    finally:
        if agent.proc is not None and agent.proc.poll() is None:
            agent.stop(signal.SIGKILL)
        proxy.close()
        obs.close()
        fleet.close()
