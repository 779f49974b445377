"""Bounded state under a flood of signed commands (docs/deployments.md "Retention").

A real daemon behind a real Mosquitto receives 20,000 signed pings, each valid for a few seconds.
The retention sweep (every 0.2 s here, small bounds) must keep the jobs table within its count
bound except for ids still valid (replay protection), the outbox's final-update records within
theirs, and a replay of a still-valid command sent before the flood must still be refused.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import tempfile
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
from conftest import Mosquitto
from paho.mqtt.enums import CallbackAPIVersion
from security.attacklib import DEVICE, TERMINAL, Device, Fleet

SHM = "/dev/shm"
PINGS = 20_000  # signed QoS 1 pings, each with its own id
PING_TTL_S = 2.0  # each ping is valid this long ...
SKEW_S = 1  # ... plus this skew (trust.max_clock_skew_s)
SWEEP_S = 0.2  # retention.sweep_interval_s
JOBS_MAX = 500  # retention.jobs_max
REPORTED_MAX = 500  # retention.reported_max
SAMPLE_S = 0.25  # the tables are read this often during the flood
SWEEP_LAG_S = 5.0  # a row forgettable longer than this (sweeps delayed by load) must be gone
REPORTED_SLACK = 2_000  # final-update records added between two sweeps under load, at most
INFLIGHT = 200  # the publisher's QoS 1 window
PUBACK_S = 120.0  # the broker takes every ping within this
HANDLED_S = 180.0  # the daemon answers every ping within this
DRAIN_PER_S = 10_000  # telemetry.drain_rate_per_s (its maximum)
SETTLE_S = PING_TTL_S + SKEW_S + 10 * SWEEP_S + 2.0  # after the flood, every ping's id is forgettable


def _config(text: str) -> str:
    text = text.replace('keys_dir = "trust"\n', f'keys_dir = "trust"\nmax_clock_skew_s = {SKEW_S}\n', 1)
    # Job updates leave as fast as the link takes them (the default paces a backlog at 50/s).
    text = text.replace("[telemetry]\n", f"[telemetry]\ndrain_rate_per_s = {DRAIN_PER_S}\ndaily_budget_mb = 0\n", 1)
    return text + (f"\n[retention]\nsweep_interval_s = {SWEEP_S}\njobs_max = {JOBS_MAX}\njobs_keep_s = 0\n"
                   f"reported_max = {REPORTED_MAX}\nreported_keep_s = 0\n")


def _sizes(state: Path) -> dict[str, int]:
    """Rows now: jobs, jobs not yet forgettable (valid plus skew plus the sweep lag), final
    updates. Read-only connections next to the daemon's (WAL)."""
    now = time.time()
    with sqlite3.connect(f"file:{state / 'state.db'}?mode=ro", uri=True, timeout=5) as db:
        jobs = db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
        pinned = db.execute("SELECT COUNT(*) FROM jobs WHERE expires_at + ? >= ?",
                            (SKEW_S + SWEEP_LAG_S, now)).fetchone()[0]
        events = db.execute("SELECT COUNT(*) FROM job_events").fetchone()[0]
    with sqlite3.connect(f"file:{state / 'outbox.db'}?mode=ro", uri=True, timeout=5) as ob:
        reported = ob.execute("SELECT COUNT(*) FROM reported").fetchone()[0]
    return {"jobs": jobs, "pinned": pinned, "job_events": events, "reported": reported}


class _Answers:
    """Counts the distinct pings that got a final job update (a light subscriber of its own)."""

    def __init__(self, mosquitto: Mosquitto) -> None:
        self.done: set[str] = set()
        self._lock = threading.Lock()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"answers-{uuid.uuid4().hex[:8]}",
                             protocol=mqtt.MQTTv5)
        self.c.on_message = self._on
        self.c.connect(mosquitto.host, mosquitto.port)
        self.c.subscribe(f"edge/{DEVICE}/jobs/+", qos=1)
        self.c.loop_start()

    def _on(self, c: object, u: object, msg: mqtt.MQTTMessage) -> None:
        if any(f'"state":"{s}"'.encode() in msg.payload for s in TERMINAL):
            with self._lock:
                self.done.add(msg.topic.rsplit("/", 1)[1])

    def count(self, ids: set[str]) -> int:
        with self._lock:
            return len(self.done & ids)

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def _publish(mosquitto: Mosquitto, envelopes: list[bytes]) -> None:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"pinger-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv5)
    c.max_inflight_messages_set(INFLIGHT)
    c.connect(mosquitto.host, mosquitto.port)
    c.loop_start()
    try:
        infos = [c.publish(f"edge/{DEVICE}/cmd", env, qos=1) for env in envelopes]
        deadline = time.monotonic() + PUBACK_S
        for info in infos:
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
            assert info.is_published(), "the broker did not take every ping in time"
    finally:
        c.loop_stop()
        c.disconnect()


def test_Q05_signed_ping_flood_keeps_every_table_bounded(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """20,000 signed pings: jobs within their bound (but for still-valid ids), final-update
    records within theirs, `agentctl status` shows both, and a replay is still refused."""
    fleet = Fleet()
    # The daemon's folder on tmpfs: the sweep is what is measured, not the disk's fsync latency.
    shm = Path(tempfile.mkdtemp(prefix="retention-", dir=SHM)) if Path(SHM).is_dir() else tmp_path
    dev = Device(shm / "device", mosquitto, fleet)
    answers = _Answers(mosquitto)
    try:
        dev.proc.config.write_text(_config(dev.proc.config.read_text()))
        dev.start()
        kept_id, kept = fleet.command("ping", {}, ttl_s=600.0)  # valid through the whole test
        assert dev.run(kept_id, kept)["state"] == "SUCCEEDED", dev.log_tail()
        samples: list[dict[str, int]] = []
        stop = threading.Event()
        state = dev.root / "state"

        def sample() -> None:
            while not stop.wait(SAMPLE_S):
                samples.append(_sizes(state))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.monotonic()
        ids: set[str] = set()
        for start in range(0, PINGS, 1000):  # signed just before they go, so each is still valid
            batch = [fleet.command("ping", {}, ttl_s=PING_TTL_S) for _ in range(min(1000, PINGS - start))]
            ids.update(cid for cid, _ in batch)
            _publish(mosquitto, [env for _, env in batch])
        deadline = time.monotonic() + HANDLED_S
        while answers.count(ids) < PINGS:
            assert time.monotonic() < deadline, (answers.count(ids), dev.log_tail())
            time.sleep(0.2)
        flood_s = time.monotonic() - t0
        time.sleep(SETTLE_S)
        stop.set()
        sampler.join(5)
        final = _sizes(state)
        assert samples, "no sample taken"
        over = [s for s in samples if s["jobs"] > JOBS_MAX + s["pinned"]]
        assert not over, over[:5]
        assert max(s["reported"] for s in samples) <= REPORTED_MAX + REPORTED_SLACK, samples
        assert final["jobs"] <= JOBS_MAX and final["reported"] <= REPORTED_MAX, final
        assert final["job_events"] <= 3 * final["jobs"], final  # timelines went with their jobs

        status = dev.agentctl("status", "--json")
        assert status.returncode == 0, status.stderr
        ret = json.loads(status.stdout)["retention"]
        assert ret["jobs"] <= ret["jobs_max"] == JOBS_MAX and ret["forgotten"]["jobs"] >= PINGS - JOBS_MAX, ret
        assert sum(ret["reported"].values()) <= ret["reported_max"] == REPORTED_MAX, ret
        human = dev.agentctl("status")
        assert f"kept (bound {JOBS_MAX} once expired)" in human.stdout, human.stdout
        assert f"final updates (bound {REPORTED_MAX})" in human.stdout, human.stdout

        # The command sent before the flood is still valid: its id was not forgotten.
        replay = dev.run(kept_id, kept)
        assert replay["state"] == "REJECTED" and replay["error"]["code"] == "replayed", replay
        print(f"{PINGS} signed pings handled in {flood_s:.1f} s; peak jobs {max(s['jobs'] for s in samples)}, "
              f"peak final updates {max(s['reported'] for s in samples)}")
    finally:
        answers.close()
        dev.close()
        if shm != tmp_path:
            shutil.rmtree(shm, ignore_errors=True)

