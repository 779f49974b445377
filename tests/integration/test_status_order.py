"""Status documents ordered across connects (docs/protocol.md, "Ordering status documents").

A real daemon on a real Mosquitto is SIGKILLed, so the broker publishes its Last Will (stamped at
connect time: an older ``seq`` and ``ts`` than the online status it replaces), then restarted, then
stopped cleanly. At each point a consumer applying the documented rule — in any arrival order —
holds the right state, and ``fleetctl watch``'s ordering (``status_order``, ``FleetView``) agrees.
"""

from __future__ import annotations

import itertools
import signal
from pathlib import Path
from typing import Any

from agentproc import AgentProcess, Observer
from conftest import Mosquitto

from fleetctl.watch import FleetView, status_order

TOPIC = "edge/dev1/status"
WAIT_S = 20.0


def documented_key(doc: dict[str, Any]) -> tuple[int, int, int]:
    """The rule as docs/protocol.md words it: session, then offline after online, then seq."""
    return (doc.get("session", 0), 1 if doc["online"] is False else 0, doc["seq"])


def held_by_consumer(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """A consumer keeping one status: replace what it holds when the new key is not smaller."""
    held: dict[str, Any] | None = None
    for d in docs:
        if held is None or documented_key(d) >= documented_key(held):
            held = d
    assert held is not None
    return held


def check_every_order(docs: list[dict[str, Any]], expected: dict[str, Any]) -> None:
    """Whatever order the documents arrive in, the consumer and ``fleetctl watch`` end on ``expected``."""
    for perm in itertools.permutations(docs):
        assert held_by_consumer(list(perm)) == expected
        view = FleetView()
        for d in perm:
            view.apply(TOPIC, d)
        assert view.devices["dev1"].status == expected
        assert view.devices["dev1"].online is expected["online"]
    assert max(docs, key=status_order) == expected


def test_will_after_kill_and_online_after_restart_order_by_session(tmp_path: Path, mosquitto: Mosquitto) -> None:
    obs = Observer(mosquitto.host, mosquitto.port, topics=(TOPIC,))
    agent = AgentProcess(tmp_path / "device", mosquitto.url)
    try:
        agent.start()
        online = obs.wait(lambda t, d: t == TOPIC and d.get("online") is True, WAIT_S, "online status")
        assert isinstance(online["session"], int) and online["session"] >= 1
        assert online["groups"] == list(agent.groups)  # what a fleet collector labels the device by

        agent.stop(signal.SIGKILL)
        will = obs.wait(lambda t, d: t == TOPIC and d.get("online") is False, WAIT_S, "the Last Will")
        assert will["reason"] == "connection lost" and will["session"] == online["session"]
        assert will["groups"] == list(agent.groups)
        # Why seq/ts cannot order them: the Will was stamped when the connection opened.
        assert will["seq"] < online["seq"] and will["ts"] <= online["ts"]
        check_every_order([online, will], will)

        agent.start()
        again = obs.wait(lambda t, d: t == TOPIC and d.get("online") is True and d["session"] > will["session"],
                         WAIT_S, "online status after the restart")
        seen = [online, will, again]
        check_every_order(seen, again)

        assert agent.stop() == 0
        final = obs.wait(lambda t, d: t == TOPIC and d.get("online") is False and d["session"] == again["session"],
                         WAIT_S, "the final status of a clean stop")
        assert final["reason"] == "shutdown"
        check_every_order([*seen, final], final)
    finally:
        obs.close()
        if agent.proc is not None and agent.proc.poll() is None:
            agent.stop()


def test_documents_without_session_keep_arrival_order() -> None:
    """An agent before ``session``: nothing to order by, so the later arrival wins (as MQTT delivers
    one publisher's messages in order) — a reconnect's online status replaces the earlier Will."""
    will = {"device": "dev1", "online": False, "seq": 5, "reason": "connection lost"}
    online = {"device": "dev1", "online": True, "seq": 7}
    view = FleetView()
    for d in (will, online):
        view.apply(TOPIC, d)
    assert view.devices["dev1"].online is True
    view.apply(TOPIC, {**will, "seq": 8})
    assert view.devices["dev1"].online is False
    mixed = {"device": "dev1", "online": True, "seq": 1, "session": 3}
    view.apply(TOPIC, mixed)  # the agent upgraded: its first document with a session replaces the old one
    assert view.devices["dev1"].status == mixed
