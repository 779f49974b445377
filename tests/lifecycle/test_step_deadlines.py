"""Each deploy step runs under its deadline and is cut off at it (docs/deployments.md).

A real daemon, a real broker, a real artifact server that stalls after its headers, and a real
worker process stopped with SIGSTOP while it loads: the job ends ``TIMED_OUT`` (code ``timeout``)
at the step's deadline and the version that served before keeps answering.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from conftest import Mosquitto
from fleet import (
    Fleet,
    expected,
    fleet_fixture,  # noqa: F401 - the `fleet` fixture
    infer,
)

STEP_DEADLINE_S = 2.0  # the download deadline the daemon runs under here
LOAD_DEADLINE_S = 6.0  # the load deadline: v1 (a worker start, a runtime import) loads well within it
END_WAIT_S = 40.0  # well under the fetcher's own read timeout + deadline: only the step deadline ends it
STALL_CAP_S = 120.0  # a stalled response is held at most this long (the test ends long before)


class _Stalling(BaseHTTPRequestHandler):
    """Serves manifests from ``root``; for any other file sends its headers and then nothing."""

    root: Path
    stop: threading.Event

    def do_GET(self) -> None:
        path = self.root / self.path.lstrip("/")
        if path.name == "manifest.json":
            body = path.read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(path.stat().st_size))
        self.end_headers()
        self.wfile.flush()
        self.stop.wait(STALL_CAP_S)  # accepted, headers sent, then the body never comes

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(name="stalling")
def stalling_fixture(fleet: Fleet) -> Iterator[str]:
    stop = threading.Event()
    handler = type("Handler", (_Stalling,), {"root": fleet.root / "bundles", "stop": stop})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        stop.set()
        server.shutdown()
        server.server_close()


def _serving_v1(fleet: Fleet, agent: object) -> None:
    job = fleet.deploy("lin", fleet.bundle("lin", 1, seed=1))
    assert fleet.end_of(job)["state"] == "SUCCEEDED"


def _assert_v1_answers(agent: object) -> None:
    v, out = infer(agent)  # type: ignore[arg-type]
    assert v == 1 and np.allclose(out, expected(1), rtol=1e-5)


def test_hung_download_times_out_and_v1_serves(fleet: Fleet, mosquitto: Mosquitto, stalling: str) -> None:
    agent = fleet.agent("dev", mosquitto.url, f"\n[deploy]\ndownload_timeout_s = {STEP_DEADLINE_S}\n")
    agent.start()
    try:
        _serving_v1(fleet, agent)
        fleet.bundle("lin", 2, seed=2)
        job = fleet.deploy("lin", f"{stalling}/lin/2/manifest.json")
        end = fleet.end_of(job, timeout_s=END_WAIT_S)
        assert end["state"] == "TIMED_OUT", end
        assert end["step"] == "downloading" and end["error"]["code"] == "timeout", end
        assert f"deadline of {STEP_DEADLINE_S:g} s" in end["error"]["message"]
        _assert_v1_answers(agent)
        assert agent.proc is not None and agent.proc.poll() is None
    finally:
        agent.stop()


def _stop_next_worker(agent: object, timeout_s: float = 30.0) -> tuple[threading.Thread, list[int]]:
    """SIGSTOP the next worker process the daemon starts: a load that never answers."""
    import psutil

    daemon = psutil.Process(agent.proc.pid)  # type: ignore[attr-defined]
    before = {c.pid for c in daemon.children()}
    stopped: list[int] = []

    def run() -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not stopped:
            for c in daemon.children():
                if c.pid not in before:
                    os.kill(c.pid, signal.SIGSTOP)
                    stopped.append(c.pid)
                    return
            time.sleep(0.005)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, stopped


def test_hung_load_in_worker_times_out_and_v1_serves(fleet: Fleet, mosquitto: Mosquitto) -> None:
    agent = fleet.agent("dev", mosquitto.url, f"\n[deploy]\nload_timeout_s = {LOAD_DEADLINE_S}\n")
    agent.start()
    try:
        _serving_v1(fleet, agent)
        stopper, stopped = _stop_next_worker(agent)
        job = fleet.deploy("lin", fleet.bundle("lin", 2, seed=2))
        end = fleet.end_of(job, timeout_s=END_WAIT_S)
        stopper.join(1)
        assert stopped, "a worker was started for v2 and stopped"
        assert end["state"] == "TIMED_OUT", end
        assert end["step"] == "loading" and end["error"]["code"] == "timeout", end
        _assert_v1_answers(agent)
        import psutil

        assert not psutil.pid_exists(stopped[0]) or psutil.Process(stopped[0]).status() == psutil.STATUS_ZOMBIE, \
            "the stopped worker was killed at the deadline"
    finally:
        agent.stop()
