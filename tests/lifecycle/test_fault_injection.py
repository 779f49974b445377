"""Crash safety: the daemon is SIGKILLed at ≥ 200 random points across deploys.

After every restart these invariants are checked: exactly one version serves the model (and it
is the right one: the new version if its job SUCCEEDED, else the one that served before); the
job ended in exactly one terminal state, reported once (duplicate deliveries of the same update
carry the same ``seq``); no orphaned files (store objects = files of the kept versions, no
partial downloads, no stray version folders); the state database passes integrity_check and
its serving/previous versions exist on disk.

Speed: agents are forked from a multiprocessing forkserver that has the agent, numpy and
onnxruntime already imported, so a restart costs milliseconds instead of an interpreter start;
the agent runs its model in-process here (backends.isolation = "none") for the same reason.
A power cut (writes not yet fsynced lost) cannot be produced from user space here; it relies on
the same mechanisms (SQLite synchronous=FULL, fsync before rename) and is not simulated.
"""

from __future__ import annotations

import multiprocessing
import random
import sqlite3
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import Mosquitto
from fleet import (
    TERMINAL,
    Fleet,
    expected,
    fleet_fixture,  # noqa: F401 - the `fleet` fixture
    infer,
    run_agent_in_child,
    wait_until,
)

from agent.serving.control import ControlClient

KILLS = 200
SETTLE_TIMEOUT_S = 60.0
SEED = 20261126


def _db_rows(db_path: Path, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
    try:
        return con.execute(sql, args).fetchall()
    finally:
        con.close()


@pytest.mark.timeout(600)
def test_sigkill_at_random_points_keeps_every_invariant(fleet: Fleet, mosquitto: Mosquitto) -> None:
    rng = random.Random(SEED)
    agent = fleet.agent("dev", mosquitto.url,
                        "\n[backends]\nisolation = \"none\"\nautotune = false\n[deploy]\nprobation_s = 0.2\nmax_resumes = 3\n")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["agent.daemon", "agent.backends.onnxruntime", "onnxruntime", "numpy",
                                "paho.mqtt.client", "requests", "psutil", "fleet"])
    state = agent.root / "state"
    db_path = state / "state.db"
    procs: list[Any] = []

    def start() -> Any:
        p = ctx.Process(target=run_agent_in_child, args=(str(agent.config), str(agent.log)), daemon=True)
        p.start()
        procs.append(p)
        return p

    def ready() -> bool:
        import requests

        try:
            status = ControlClient(str(agent.socket), timeout_s=2).call("status")
            return (bool(status["mqtt"].get("subscribed"))
                    and requests.get(f"{agent.api}/v2/health/ready", timeout=2).status_code == 200)
        except (OSError, requests.RequestException):
            return False

    def kill(p: Any) -> None:
        p.kill()
        p.join(10)

    def terminal_updates(job: str) -> dict[int, str]:
        return {d["seq"]: d["state"] for d in fleet.updates(job) if d.get("state") in TERMINAL
                and "recorded" not in d}

    def check(job: str, version: int, last_good: int) -> int:
        """Wait for the job's end, then check every invariant; returns the version now serving."""
        wait_until(lambda: bool(terminal_updates(job)), SETTLE_TIMEOUT_S, f"end of {job}")
        time.sleep(0.05)
        ends = terminal_updates(job)
        assert len(ends) == 1, f"{job} reported {len(ends)} ends: {ends}"
        final = next(iter(ends.values()))
        serving = version if final == "SUCCEEDED" else last_good
        wait_until(ready, 20, "agent answering")
        ms = [m for m in ControlClient(str(agent.socket)).call("models") if m["name"] == "lin"]
        assert len(ms) == 1 and ms[0]["version"] == serving, (job, final, ms)
        v, out = infer(agent)
        assert v == serving and np.allclose(out, expected(serving), rtol=1e-5, atol=1e-6)
        # No deploy running: the store must hold exactly the kept versions' files.
        wait_until(lambda: not ControlClient(str(agent.socket)).call("status").get("deploying"), 20, "idle")
        assert _db_rows(db_path, "PRAGMA integrity_check")[0][0] == "ok"
        rows = _db_rows(db_path, "SELECT serving, previous FROM models WHERE name = 'lin'")
        assert rows and rows[0][0] == serving
        kept = {r[0] for r in _db_rows(db_path, "SELECT version FROM versions WHERE name = 'lin'")}
        assert {x for x in rows[0] if x is not None} <= kept
        files = [r[0] for r in _db_rows(db_path, "SELECT files FROM versions")]
        import json

        referenced = {sha for f in files for sha in json.loads(f).values()}
        objects = {p.name for p in (state / "store" / "objects").glob("*/*")}
        assert objects == referenced, f"orphans {objects - referenced}, missing {referenced - objects}"
        assert not list((state / "store" / "partial").iterdir())
        vdirs = {int(p.name) for p in (state / "store" / "versions" / "lin").iterdir()}
        assert vdirs == kept, (vdirs, kept)
        return serving

    try:
        proc = start()
        wait_until(ready, 30, "first start")
        first = fleet.deploy("lin", fleet.bundle("lin", 1, seed=1))
        t0 = time.monotonic()
        assert fleet.end_of(first)["state"] == "SUCCEEDED"
        last_good = check(first, 1, 1)
        deploy_s = max(0.3, time.monotonic() - t0)
        kills, version = 0, 2
        outcomes: dict[str, int] = {}
        while kills < KILLS:
            job = fleet.deploy("lin", fleet.bundle("lin", version, seed=version))
            time.sleep(rng.uniform(0, deploy_s * 1.5))
            kill(proc)
            kills += 1
            proc = start()
            while kills < KILLS and rng.random() < 0.3:  # also die while recovering
                time.sleep(rng.uniform(0, 0.3))
                kill(proc)
                kills += 1
                proc = start()
            last_good = check(job, version, last_good)
            final = next(iter(terminal_updates(job).values()))
            outcomes[final] = outcomes.get(final, 0) + 1
            version += 1
        kill(proc)
        # The kills landed across the whole deploy: both finished and interrupted deploys occur.
        assert outcomes.get("SUCCEEDED", 0) > 0 and sum(outcomes.values()) >= KILLS // 2, outcomes
        print(f"\n{kills} kills over {version - 2} deploys: {outcomes}")
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
