"""Frugal by default: bytes per device per day at the default periods, measured from the real
daemon's messages; and the daily byte budget thinning heartbeats and telemetry (never job
updates or events) once it is spent, without losing a single counted call.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from agentproc import AgentProcess
from conftest import Mosquitto
from telemetry_kit import (
    DurableObserver,
    Fleet,
    InferenceLoad,
    Pinger,
    TcpProxy,
    outbox_seq_table,
    running,
    seqs,
    write_config,
)

from agent.config import TelemetryConfig
from agent.mqtt.queue import mqtt_publish_bytes

MIB = 2**20
DAY_S = 86400
MEASURE_S = 6.0
THIN_PERIOD_S = 2.0
WINDOW_S = 1.0  # long enough for MIN_CALLS (agent/telemetry/events.py) even on a slow, loaded machine
EVENT_WAIT_S = 20.0  # for each error-rate edge


def _mean_mqtt_bytes(obs: DurableObserver, topic: str) -> float:
    return statistics.mean(mqtt_publish_bytes(m.topic, m.size) for m in obs.find(lambda t, d: t == topic))


def test_bytes_per_day_at_default_periods(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """Message sizes of the real daemon (short periods, real traffic), scaled to the defaults.

    The figures are printed (pytest -s) and written up in docs/telemetry.md.
    """
    fleet = Fleet(tmp_path, mosquitto.host, mosquitto.port)
    obs = DurableObserver(mosquitto.host, mosquitto.port)
    proxy = TcpProxy(mosquitto.host, mosquitto.port).start()
    agent = AgentProcess(tmp_path / "device", proxy.url, device_id="pi-0042")
    write_config(agent, {"heartbeat_s": 0.5, "window_s": 2.0}, keepalive_s=60)
    agent.trust_key(fleet.pub_pem)
    try:
        with running(agent):
            fleet.deploy(obs, "pi-0042")
            load = InferenceLoad(agent.api, rate_per_s=100).start()
            up0, down0, n0 = proxy.bytes_up, proxy.bytes_down, len(obs)
            time.sleep(MEASURE_S)
            up, down = proxy.bytes_up - up0, proxy.bytes_down - down0
            published = len([m for m in obs.messages[n0:] if m.topic.startswith("edge/pi-0042/")])
            load.stop()
        defaults = TelemetryConfig()
        hb = _mean_mqtt_bytes(obs, "edge/pi-0042/heartbeat")
        tel = _mean_mqtt_bytes(obs, "edge/pi-0042/telemetry")
        status = _mean_mqtt_bytes(obs, "edge/pi-0042/status")
        per_msg_wire = (up + down) / max(1, published)  # MQTT both ways: PUBLISH + PUBACK
        idle_day = DAY_S / defaults.heartbeat_s * hb + 2 * status
        busy_day = idle_day + DAY_S / defaults.window_s * tel
        print(f"\nMQTT bytes: heartbeat {hb:.0f}, telemetry window (1 model) {tel:.0f}, status {status:.0f}; "
              f"on the wire both ways {per_msg_wire:.0f} per message\n"
              f"per day at defaults: idle {idle_day / MIB:.3f} MiB, one busy model {busy_day / MIB:.3f} MiB "
              f"(budget {defaults.daily_budget_mb} MiB)")
        assert idle_day <= 0.5 * MIB, "an idle device stays far below the budget"
        assert busy_day <= 1.15 * defaults.daily_budget_mb * MIB, "a busy one needs at most light thinning"
        assert defaults.daily_budget_mb <= 1.0
    finally:
        proxy.close()
        obs.close()
        fleet.close()


def test_budget_thins_heartbeats_and_telemetry_but_not_jobs_or_events(tmp_path: Path, mosquitto: Mosquitto) -> None:
    fleet = Fleet(tmp_path, mosquitto.host, mosquitto.port)
    obs = DurableObserver(mosquitto.host, mosquitto.port)
    agent = AgentProcess(tmp_path / "device", mosquitto.url)
    write_config(agent, {"heartbeat_s": 0.1, "window_s": WINDOW_S, "daily_budget_mb": 0.004,
                         "thin_period_s": THIN_PERIOD_S, "error_rate_pct": 50.0})
    agent.trust_key(fleet.pub_pem)
    try:
        with running(agent):
            fleet.deploy(obs)  # the deploy's job updates alone spend the tiny budget
            thinned = obs.wait(lambda t, d: t == "edge/dev1/events" and d.get("event") == "telemetry_thinned"
                               and d.get("active") is True, what="thinning event")
            load = InferenceLoad(agent.api, rate_per_s=100).start()
            pinger = Pinger(fleet, interval_s=0.2).start()
            mark = len(obs)
            t0 = time.monotonic()
            # Error-rate phases follow the agent's verdicts, not a clock: bad calls until it reports
            # the condition, good ones until it reports the end, bad again: three edges while thinned.
            for active in (True, False, True):
                since = len(obs)
                load.bad = active
                obs.wait(lambda t, d, a=active: t == "edge/dev1/events" and d.get("event") == "error_rate"
                         and d.get("active") is a, timeout_s=EVENT_WAIT_S, after=since,
                         what=f"error_rate active={active}")
            window = time.monotonic() - t0
            pinger.stop()
            load.stop()
            for cid in pinger.acked:  # job updates are never thinned: every ping answered now
                obs.wait(lambda t, d, c=cid: t == f"edge/dev1/jobs/{c}" and d.get("state") == "SUCCEEDED",
                         timeout_s=5, what=f"answer to {cid}")
            late = obs.messages[mark:]
            hbs = [m for m in late if m.topic == "edge/dev1/heartbeat"]
            tels = [m for m in late if m.topic == "edge/dev1/telemetry"]
            events = [m for m in late if m.topic == "edge/dev1/events"]
        last = outbox_seq_table(agent.root / "state")
        obs.wait_until(lambda: max(seqs(obs, "dev1", "telemetry"), default=0) == last["telemetry"], what="last window")
        assert thinned.doc["limit_bytes"] == int(0.004 * MIB)
        # Thinned: about one heartbeat and one merged window per THIN_PERIOD_S instead of 10 and 1 a second.
        allowed = window / THIN_PERIOD_S + 1
        assert 1 <= len(hbs) <= allowed, len(hbs)
        assert len(tels) <= allowed, len(tels)
        assert all(m.doc["budget"]["thinned"] for m in hbs)
        assert all(m.doc["window_s"] >= THIN_PERIOD_S - 0.01 for m in tels)
        # Events are not thinned: the error-rate edges all came through (waited for above), in order.
        edges = [m.doc["active"] for m in events if m.doc.get("event") == "error_rate"]
        assert edges == [True, False, True], edges
        # Merging windows loses no call: every request is counted once.
        counted = sum(m.doc["models"]["lin"]["count"] for m in obs.find(lambda t, d: t == "edge/dev1/telemetry"))
        assert counted == load.sent
    finally:
        obs.close()
        fleet.close()
