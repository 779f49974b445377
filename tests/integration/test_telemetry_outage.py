"""Steady traffic through a cut link, a broker restart and a half-open link (real Mosquitto, the
real daemon, a TCP proxy in between): no job update or event is lost, every stream's ``seq`` is
contiguous after the drain, delivery is in order, the backlog drains at the configured rate and
the live status is not held up behind it.
"""

from __future__ import annotations

import time
from pathlib import Path

import requests
from agentproc import AgentProcess
from conftest import Mosquitto
from telemetry_kit import (
    DurableObserver,
    Fleet,
    InferenceLoad,
    Pinger,
    TcpProxy,
    outbox_rows,
    outbox_seq_table,
    running,
    seqs,
    wait_drained,
    write_config,
)

from agent.mqtt.connection import DRAIN_BURST

STEADY_S = 1.5  # traffic between disturbances
OUTAGE_S = 2.5  # link cut / broker down
HALF_OPEN_S = 1.5  # agent→broker bytes vanish (no PUBACKs) before the link is severed
DRAIN_RATE = 40.0  # telemetry.drain_rate_per_s here (rows/s); steady production is ~18/s
RATE_TOLERANCE = 1.35  # scheduling slack on a loaded 2-core machine
RECONNECT_S = 20.0  # jittered back-off after a few failed attempts


def _online_after(obs: DurableObserver, index: int) -> int:
    """Index of the first ``online: true`` status at or after ``index``."""
    obs.wait(lambda t, d: t == "edge/dev1/status" and d.get("online") is True, timeout_s=RECONNECT_S,
             what="online status after reconnect", after=index)
    return next(i for i, m in enumerate(obs.messages) if i >= index and m.topic == "edge/dev1/status"
                and m.doc.get("online") is True)


def test_no_loss_contiguous_seq_through_cut_restart_and_half_open(tmp_path: Path, mosquitto: Mosquitto) -> None:
    fleet = Fleet(tmp_path, mosquitto.host, mosquitto.port)
    obs = DurableObserver(mosquitto.host, mosquitto.port)
    proxy = TcpProxy(mosquitto.host, mosquitto.port).start()
    agent = AgentProcess(tmp_path / "device", proxy.url)
    write_config(agent, {"heartbeat_s": 0.2, "window_s": 0.5, "drain_rate_per_s": DRAIN_RATE,
                         "error_rate_pct": 50.0, "daily_budget_mb": 0})
    agent.trust_key(fleet.pub_pem)
    try:
        with running(agent):
            obs.wait(lambda t, d: t == "edge/dev1/status" and d.get("online") is True, what="online")
            fleet.deploy(obs)
            # Steady traffic: signed pings (job updates) and local inference alternating good and
            # bad phases, so error-rate events start and end all the time (events).
            pinger = Pinger(fleet, interval_s=0.2).start()
            load = InferenceLoad(agent.api, rate_per_s=100, flip_s=0.7).start()
            time.sleep(STEADY_S)

            # 1. The link is cut: the agent is offline, the broker queues its commands.
            proxy.cut()
            t_cut = time.time()
            time.sleep(OUTAGE_S)
            mark_cut = len(obs)
            proxy.restore()
            back = _online_after(obs, mark_cut)
            time.sleep(STEADY_S)
            # The live status goes out before the backlog: the heartbeats queued during the
            # outage arrive after it, and the backlog drains at the configured rate.
            backlog = [i for i, m in enumerate(obs.messages) if i > mark_cut and m.topic == "edge/dev1/heartbeat"]

            # 2. The broker restarts (persistence on): agent and fleet reconnect.
            mosquitto.stop()
            time.sleep(OUTAGE_S)
            mark = len(obs)
            mosquitto.start()
            _online_after(obs, mark)
            time.sleep(STEADY_S)

            # 3. Half-open link: the agent's publishes vanish (no PUBACK), then the link dies.
            proxy.blackhole = True
            time.sleep(HALF_OPEN_S)
            dropped_bytes = proxy.bytes_dropped
            proxy.blackhole = False
            mark = len(obs)
            proxy.sever()
            _online_after(obs, mark)
            time.sleep(STEADY_S)

            pinger.stop()
            load.stop()
            wait_drained(agent)
            metrics = requests.get(f"{agent.api}/metrics", timeout=5).text
            agent.stop()
        state = agent.root / "state"
        last = outbox_seq_table(state)
        assert outbox_rows(state) == 0, "a clean stop after the drain leaves nothing behind"
        # The final telemetry window and status of the stop are queued and sent too.
        obs.wait_until(lambda: max(seqs(obs, "dev1", "telemetry"), default=0) == last["telemetry"],
                       what="final window")

        # -- no loss of job updates or events; every stream contiguous -------------------------
        assert len(pinger.acked) >= 25 and dropped_bytes > 0
        for stream in ("jobs", "events", "heartbeat", "telemetry"):
            got = seqs(obs, "dev1", stream)
            gaps = sorted(set(range(1, last[stream] + 1)) - set(got))
            assert not gaps and max(got) == last[stream], f"{stream}: seq missing {gaps[:20]} of 1..{last[stream]}"
            first_seen = list(dict.fromkeys(got))
            assert first_seen == sorted(first_seen), f"{stream}: delivered out of order"
        assert last["events"] >= 4, "error-rate events started and ended during the test"
        answered = {m.doc["job"] for m in obs.find(lambda t, d: t.startswith("edge/dev1/jobs/") and d.get("state") == "SUCCEEDED")}
        missing = [cid for cid in pinger.acked if cid not in answered]
        seen = {cid: [m.doc.get("state") for m in obs.find(lambda t, d, c=cid: t == f"edge/dev1/jobs/{c}")] for cid in missing[:5]}
        assert not missing, f"{len(missing)} acknowledged pings never answered: {seen}\n{agent.log.read_text()[-3000:]}"

        # -- the drain after the cut: status first, then the backlog at the bounded rate --------
        assert backlog and back < backlog[0]
        outage_hbs = [obs.messages[i] for i in backlog if obs.messages[i].doc["ts"] < _rfc3339(t_cut + OUTAGE_S)]
        assert len(outage_hbs) >= 8, "heartbeats queued during the outage"
        queued_during = [m for m in obs.messages[back:] if m.topic.startswith("edge/dev1/") and m.topic != "edge/dev1/status"]
        n = min(len(queued_during), 40)
        span = queued_during[n - 1].t - queued_during[0].t
        assert n - DRAIN_BURST <= DRAIN_RATE * span * RATE_TOLERANCE + 1, (n, span)

        # -- /metrics saw it all ------------------------------------------------------------------
        assert 'edge_agent_deploys_total{state="SUCCEEDED"} 1.0' in metrics
        assert 'model="lin",outcome="error"' in metrics and 'model="lin",outcome="ok"' in metrics
        assert "edge_agent_mqtt_connected 1.0" in metrics
        reconnects = float(next(ln.split()[-1] for ln in metrics.splitlines() if ln.startswith("edge_agent_mqtt_reconnects_total")))
        assert reconnects >= 3
    finally:
        proxy.close()
        obs.close()
        fleet.close()


def _rfc3339(t: float) -> str:
    from agent.timeutil import now_rfc3339

    return now_rfc3339(t)
