"""The outbox stays bounded on disk through a long outage, keeps job updates and events, counts
and reports what it dropped, and replaces a corrupt database (and says so).

Two scales: the Outbox itself pushed far past its bound on real SQLite, and the real daemon
with a tiny outbox (``telemetry.outbox_max_mb``) kept off a real Mosquitto long enough to
overflow it many times over — a day-long outage in seconds.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from agentproc import AgentProcess
from conftest import Mosquitto
from telemetry_kit import (
    DurableObserver,
    Fleet,
    InferenceLoad,
    outbox_seq_table,
    running,
    seqs,
    wait_drained,
    write_config,
)

from agent.telemetry.outbox import (
    HARD_CAP_FACTOR,
    KIND_EVENT,
    KIND_JOB,
    KIND_TELEMETRY,
    PAGE_BYTES,
    WAL_FRACTION,
    WAL_MAX_PAGES,
    WAL_MIN_PAGES,
    Outbox,
)

MIB = 2**20
PAGE = PAGE_BYTES
SQLITE_OVERHEAD = 1.5  # row headers, the (kind, id) index and partly filled pages
FIXED_FILES_BYTES = 96 * 1024  # the -shm file, schema and small tables
OUTAGE_S = 8.0  # 160 heartbeats (2h40 at the default period) and windows: several times the outbox
WAL_OVERSHOOT_PAGES = 16  # the transaction that crosses the checkpoint threshold


def _disk_bound(max_bytes: int) -> int:
    """What outbox.db, -wal and -shm may occupy together for an outbox of ``max_bytes``."""
    wal = (min(WAL_MAX_PAGES, max(WAL_MIN_PAGES, max_bytes // PAGE // WAL_FRACTION)) + WAL_OVERSHOOT_PAGES) * PAGE
    return int(max_bytes * HARD_CAP_FACTOR * SQLITE_OVERHEAD) + wal + FIXED_FILES_BYTES


def test_outbox_file_stays_bounded_while_writing_eight_times_its_size(tmp_path: Path) -> None:
    max_bytes = 1 * MIB
    box = Outbox(tmp_path / "outbox.db", max_bytes)
    pad = "t" * 4000
    peak = 0
    for i in range(2000):  # ~8 MiB of telemetry, with a job update or event every 100 rows
        box.add("edge/d/telemetry", {"pad": pad}, KIND_TELEMETRY)
        if i % 100 == 0:
            kind = KIND_JOB if i % 200 else KIND_EVENT
            box.add("edge/d/x", {"i": i}, kind, stream=kind)
        if i % 50 == 0:
            peak = max(peak, box.disk_bytes())
    st = box.stats()
    assert st["bytes"] <= max_bytes
    assert peak <= _disk_bound(max_bytes), (peak, _disk_bound(max_bytes))
    assert st["dropped_by_kind"][KIND_TELEMETRY] > 1700
    kept = [json.loads(r.payload)["i"] for r in box.peek(0, 10_000) if r.kind in (KIND_JOB, KIND_EVENT)]
    assert kept == list(range(0, 2000, 100)), "no job update or event evicted below the hard cap"
    box.close()


def test_corrupt_outbox_is_quarantined_recreated_and_reported(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """A damaged outbox.db (pages overwritten, header intact) is found by the agent at start,
    moved aside, replaced, and reported as an event with the salvaged ``seq`` counters."""
    agent = AgentProcess(tmp_path / "device", mosquitto.url)
    write_config(agent, {"heartbeat_s": 0.2, "window_s": 1.0, "daily_budget_mb": 0})
    state = agent.root / "state"
    state.mkdir(parents=True)
    box = Outbox(state / "outbox.db", 4 * MIB)
    for i in range(200):
        box.add("edge/dev1/heartbeat", {"pad": "h" * 500, "i": i}, "heartbeat")
    box.add("edge/dev1/events", {"event": "x"}, KIND_EVENT, stream="events")
    box.close()
    raw = bytearray((state / "outbox.db").read_bytes())
    for off in range(3 * PAGE, len(raw) - PAGE, 2 * PAGE):  # leave page 1 (schema) and 2 readable
        raw[off:off + PAGE] = b"\xde\xad\xbe\xef" * (PAGE // 4)
    (state / "outbox.db").write_bytes(bytes(raw))
    for side in ("outbox.db-wal", "outbox.db-shm"):
        (state / side).unlink(missing_ok=True)

    obs = DurableObserver(mosquitto.host, mosquitto.port)
    try:
        with running(agent):
            ev = obs.wait(lambda t, d: t == "edge/dev1/events" and d.get("event") == "outbox_recreated",
                          what="outbox_recreated event")
            hb = obs.wait(lambda t, d: t == "edge/dev1/heartbeat", what="heartbeat")
        assert list(state.glob("outbox.db.corrupt-*"))
        assert ev.doc["quarantined"].startswith("outbox.db.corrupt-")
        assert hb.doc["outbox"]["dropped"] >= 1, "the lost database is counted as dropped"
        if not ev.doc["seq_reset"]:  # the seq table survived: numbering continues, no reuse
            assert ev.doc["seq"] == 2 and hb.doc["seq"] > 200
    finally:
        obs.close()


def test_long_outage_keeps_disk_bounded_and_events_whole(tmp_path: Path, mosquitto: Mosquitto) -> None:
    outbox_mb = 0.02  # ~20 KiB: the outage below produces several times that
    fleet = Fleet(tmp_path, mosquitto.host, mosquitto.port)
    obs = DurableObserver(mosquitto.host, mosquitto.port)
    agent = AgentProcess(tmp_path / "device", mosquitto.url)
    write_config(agent, {"heartbeat_s": 0.05, "window_s": 0.25, "outbox_max_mb": outbox_mb,
                         "error_rate_pct": 50.0, "daily_budget_mb": 0, "drain_rate_per_s": 500.0})
    agent.trust_key(fleet.pub_pem)
    state = agent.root / "state"
    try:
        with running(agent):
            fleet.deploy(obs)
            load = InferenceLoad(agent.api, rate_per_s=120, flip_s=0.6).start()
            time.sleep(0.5)
            mosquitto.stop()
            sizes: list[int] = []
            db_sizes: list[int] = []
            t_end = time.monotonic() + OUTAGE_S
            while time.monotonic() < t_end:
                sizes.append(sum(p.stat().st_size for p in state.glob("outbox.db*") if p.is_file()))
                db_sizes.append((state / "outbox.db").stat().st_size)
                time.sleep(0.1)
            load.stop()
            mark = len(obs)
            mosquitto.start()
            wait_drained(agent)
            report = obs.wait(lambda t, d: t == "edge/dev1/heartbeat" and d["outbox"]["dropped"] > 0,
                              what="heartbeat reporting drops", after=mark)
        last = outbox_seq_table(state)
        # Disk: bounded, and flat by the end of the outage while drops kept growing.
        bound = _disk_bound(int(outbox_mb * MIB))
        assert max(sizes) <= bound, (max(sizes), bound)
        third = len(db_sizes) // 3  # the last third of the outage adds (almost) no pages
        assert max(db_sizes[2 * third:]) <= max(db_sizes[third:2 * third]) + 2 * PAGE, db_sizes
        assert report.doc["outbox"]["dropped"] >= 50
        # Events (durable) all delivered, in order; heartbeats thinned out by eviction.
        got = seqs(obs, "dev1", "events")
        assert last["events"] >= 4 and set(got) == set(range(1, last["events"] + 1))
        first = list(dict.fromkeys(got))
        assert first == sorted(first)
        assert len(set(seqs(obs, "dev1", "heartbeat"))) < last["heartbeat"]
    finally:
        obs.close()
        fleet.close()
