"""Downloads against real servers on loopback: TLS with its own CA, trickling and stalled servers,
bounded retries, FTP (pyftpdlib), and a download resumed across a killed and restarted agent.

The unit tests (tests/unit/test_fetch_store.py) cover the fetcher's basic HTTP behaviour with a
plain server; these cover what needs a real CA, a real FTP server, a server that misbehaves in
time, or the real daemon being killed mid-download.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import re
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import Mosquitto
from security.attacklib import (
    Bundles,
    Device,
    Fleet,
    FtpServer,
    HostileServer,
    Pki,
    make_pki,
    server_context,
    stall,
    status_route,
    trickle,
)

from agent import errors
from agent.bundles.fetch import Fetcher, FetchLimits

pytestmark = pytest.mark.filterwarnings("ignore:The asyn:DeprecationWarning")  # pyftpdlib on 3.11
BODY = os.urandom(96 * 1024)
SHA = hashlib.sha256(BODY).hexdigest()
FAST = FetchLimits(read_timeout_s=1.0, connect_timeout_s=2.0, min_rate_bps=64 * 1024, deadline_base_s=1.0,
                   max_attempts=3, backoff_base_s=0.05, backoff_max_s=0.1)
SLACK_S = 1.5  # a cut-off may land this much after its deadline (one read timeout, thread wake-ups)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def www(tmp_path: Path) -> Path:
    root = tmp_path / "www"
    (root / "b").mkdir(parents=True)
    (root / "b" / "model.bin").write_bytes(BODY)
    return root


@pytest.fixture
def server(www: Path) -> Iterator[HostileServer]:
    s = HostileServer(www)
    yield s
    s.close()


def code_of(fn: object) -> errors.AgentError:
    with pytest.raises(errors.AgentError) as ei:
        fn()  # type: ignore[operator]
    return ei.value


# ---------------------------------------------------------------- TLS with a CA of our own


def test_https_verified_against_the_configured_ca(pki: Pki, www: Path, tmp_path: Path) -> None:
    s = HostileServer(www, server_context(pki.good))
    try:
        part = tmp_path / "x.part"
        Fetcher(FAST, ca_bundle=str(pki.ca)).download(s.url("b/model.bin"), part, len(BODY), SHA)
        assert part.read_bytes() == BODY
        # Without the CA the same server is refused: the system store does not know it.
        e = code_of(lambda: Fetcher(FAST).download(s.url("b/model.bin"), tmp_path / "y.part", len(BODY), SHA))
        assert e.code == errors.DOWNLOAD_FAILED and "TLS verification failed" in e.message
    finally:
        s.close()


@pytest.mark.parametrize("which", ["unknown_ca", "wrong_host", "expired"])
def test_https_refused_unknown_ca_wrong_host_expired(pki: Pki, www: Path, tmp_path: Path, which: str) -> None:
    s = HostileServer(www, server_context(getattr(pki, which)))
    try:
        f = Fetcher(FAST, ca_bundle=str(pki.ca))
        e = code_of(lambda: f.download(s.url("b/model.bin"), tmp_path / "x.part", len(BODY), SHA))
        assert isinstance(e, errors.RejectError) and e.code == errors.DOWNLOAD_FAILED
        assert "TLS verification failed" in e.message
        assert {"unknown_ca": "certificate verify failed", "wrong_host": "mismatch",
                "expired": "expired"}[which] in e.message.lower()
        assert "attempts" not in e.message  # a TLS failure is not retried
        assert not s.requests
        e = code_of(lambda: f.fetch_bytes(s.url("b/manifest.json"), 1024, what="manifest"))
        assert e.code == errors.DOWNLOAD_FAILED
    finally:
        s.close()


# ---------------------------------------------------------------- time: trickle, stall, deadline


def test_trickling_body_is_cut_off_at_the_deadline(server: HostileServer, tmp_path: Path) -> None:
    lim = FetchLimits(read_timeout_s=5.0, min_rate_bps=64 * 1024, deadline_base_s=1.0, max_attempts=3,
                      backoff_base_s=0.05, backoff_max_s=0.1)
    size = 64 * 1024  # deadline 1 s + 1 s = 2 s, for all attempts together
    server.routes["/slow"] = trickle(server, size, 0.05)
    t0 = time.monotonic()
    e = code_of(lambda: Fetcher(lim).download(server.url("slow"), tmp_path / "x.part", size, "0" * 64))
    took = time.monotonic() - t0
    assert e.code == errors.DOWNLOAD_FAILED and "deadline of 2.0 s passed" in e.message, e.message
    assert took < 2.0 + SLACK_S, took  # cut off at the deadline (the message says which), not later
    assert len(server.hits("slow")) == 1  # the deadline is the file's, not the attempt's: no retry


def test_trickling_headers_are_cut_off_by_the_watchdog(server: HostileServer, tmp_path: Path) -> None:
    """The deadline also holds while the server dribbles its headers (no body read yet)."""
    def slow_headers(h: http.server.BaseHTTPRequestHandler) -> None:
        h.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
        for _ in range(400):
            if server.stop_event.wait(0.05):
                return
            h.wfile.write(b"a")
            h.wfile.flush()

    server.routes["/hdr"] = slow_headers
    lim = FetchLimits(read_timeout_s=5.0, min_rate_bps=1024, deadline_base_s=1.0, max_attempts=3)
    t0 = time.monotonic()
    e = code_of(lambda: Fetcher(lim).download(server.url("hdr"), tmp_path / "x.part", 512, "0" * 64))
    took = time.monotonic() - t0
    assert e.code == errors.DOWNLOAD_FAILED and "deadline" in e.message, e.message
    assert took < 1.5 + SLACK_S, took


def test_stalled_server_read_timeout_then_bounded_retries(server: HostileServer, tmp_path: Path) -> None:
    server.routes["/stall"] = stall(server, len(BODY))
    lim = FetchLimits(read_timeout_s=0.5, min_rate_bps=8 * 1024, deadline_base_s=1.0, max_attempts=3,
                      backoff_base_s=0.05, backoff_max_s=0.1)  # a 13 s deadline: the read timeout acts first
    t0 = time.monotonic()
    e = code_of(lambda: Fetcher(lim).download(server.url("stall"), tmp_path / "x.part", len(BODY), SHA))
    took = time.monotonic() - t0
    assert e.code == errors.DOWNLOAD_FAILED and "timed out" in e.message.lower(), e.message
    assert "gave up after 3 attempts" in e.message and len(server.hits("stall")) == 3
    assert took < 1.5 + 0.3 + SLACK_S, took  # three read timeouts and two short backoffs, no more


def test_retries_stop_at_the_deadline_with_jittered_backoff(server: HostileServer, tmp_path: Path) -> None:
    server.routes["/busy"] = status_route(503)
    lim = FetchLimits(read_timeout_s=1.0, min_rate_bps=1e9, deadline_base_s=1.0, max_attempts=1000,
                      backoff_base_s=0.1, backoff_max_s=0.1)
    t0 = time.monotonic()
    e = code_of(lambda: Fetcher(lim).download(server.url("busy"), tmp_path / "x.part", 10, "0" * 64))
    took = time.monotonic() - t0
    n = len(server.hits("busy"))
    m = re.search(r"gave up after (\d+) attempts; its deadline", e.message)
    assert e.code == errors.DOWNLOAD_FAILED and m, e.message
    assert int(m.group(1)) in (n, n + 1)  # the last try may find the deadline passed before sending
    assert 2 <= n < 100, n  # full jitter in [0, 0.1 s]: retried, far fewer times than max_attempts
    assert took < 1.0 + SLACK_S


def test_dropped_connection_resumes_with_range_in_the_next_attempt(server: HostileServer, tmp_path: Path) -> None:
    half = len(BODY) // 2
    state = {"dropped": False}

    def drop_once(h: http.server.BaseHTTPRequestHandler) -> None:
        if state["dropped"]:
            server._static(h)
            return
        state["dropped"] = True
        h.send_response(200)
        h.send_header("Content-Length", str(len(BODY)))
        h.end_headers()
        h.wfile.write(BODY[:half])
        h.wfile.flush()
        h.close_connection = True
        h.connection.shutdown(2)

    server.routes["/b/model.bin"] = drop_once
    part = tmp_path / "x.part"
    Fetcher(FAST).download(server.url("b/model.bin"), part, len(BODY), SHA)
    assert part.read_bytes() == BODY
    ranges = [h.get("Range") for h in server.hits("b/model.bin")]
    assert ranges == [None, f"bytes={half}-"], ranges


def test_resumed_bytes_that_fail_the_hash_are_fetched_again_from_zero(server: HostileServer, tmp_path: Path) -> None:
    part = tmp_path / "x.part"
    part.write_bytes(b"\xee" * 1000)  # e.g. what a power cut left: the right length, wrong bytes
    Fetcher(FAST).download(server.url("b/model.bin"), part, len(BODY), SHA)
    assert part.read_bytes() == BODY
    assert [h.get("Range") for h in server.hits("b/model.bin")] == ["bytes=1000-", None]


# ---------------------------------------------------------------- FTP


@pytest.fixture
def ftp(www: Path) -> Iterator[FtpServer]:
    s = FtpServer(www)
    yield s
    s.close()


def test_ftp_download_and_small_document(ftp: FtpServer, tmp_path: Path) -> None:
    part = tmp_path / "x.part"
    seen: list[int] = []
    Fetcher(FAST).download(ftp.url("b/model.bin"), part, len(BODY), SHA, progress=seen.append)
    assert part.read_bytes() == BODY and seen[-1] == len(BODY)
    assert Fetcher(FAST).fetch_bytes(ftp.url("b/model.bin"), len(BODY)) == BODY
    assert "TYPE I" in ftp.commands and "PASV" in ftp.commands


def test_ftp_resume_with_rest(ftp: FtpServer, tmp_path: Path) -> None:
    part = tmp_path / "x.part"
    part.write_bytes(BODY[:40000])
    Fetcher(FAST).download(ftp.url("b/model.bin"), part, len(BODY), SHA)
    assert part.read_bytes() == BODY
    assert "REST 40000" in ftp.commands


def test_ftp_without_rest_restarts_from_zero(www: Path, tmp_path: Path) -> None:
    s = FtpServer(www, rest=False)
    try:
        part = tmp_path / "x.part"
        part.write_bytes(b"\xee" * 40000)
        Fetcher(FAST).download(s.url("b/model.bin"), part, len(BODY), SHA)
        assert part.read_bytes() == BODY
        rest = s.commands.index("REST 40000")  # refused: RETR is sent once, after it, from zero
        assert s.commands.count("RETR b/model.bin") == 1 and s.commands.index("RETR b/model.bin") > rest
    finally:
        s.close()


def test_ftp_size_cap_missing_file_and_document_cap(ftp: FtpServer, tmp_path: Path) -> None:
    f = Fetcher(FAST)
    listed = 1000
    e = code_of(lambda: f.download(ftp.url("b/model.bin"), tmp_path / "x.part", listed,
                                   hashlib.sha256(BODY[:listed]).hexdigest()))
    assert e.code == errors.SIZE_EXCEEDED and not (tmp_path / "x.part").exists()
    e = code_of(lambda: f.download(ftp.url("b/missing.bin"), tmp_path / "y.part", 10, "0" * 64))
    assert e.code == errors.DOWNLOAD_FAILED and "550" in e.message and "attempts" not in e.message
    e = code_of(lambda: f.fetch_bytes(ftp.url("b/model.bin"), 100, what="manifest"))
    assert e.code == errors.INVALID_MANIFEST


def test_ftp_trickling_server_is_cut_off_at_the_deadline(www: Path, tmp_path: Path) -> None:
    s = FtpServer(www, write_limit_bps=8 * 1024)  # 96 KiB at 8 KiB/s: 12 s
    lim = FetchLimits(read_timeout_s=3.0, min_rate_bps=96 * 1024, deadline_base_s=1.0, max_attempts=3)
    try:
        t0 = time.monotonic()
        e = code_of(lambda: Fetcher(lim).download(s.url("b/model.bin"), tmp_path / "x.part", len(BODY), SHA))
        took = time.monotonic() - t0
        assert e.code == errors.DOWNLOAD_FAILED and "deadline" in e.message, e.message
        assert took < 2.0 + SLACK_S, took
    finally:
        s.close()


# ---------------------------------------------------------------- resume across an agent restart


@dataclass
class Served:
    range_start: int
    status: int
    sent: int = 0


def throttled(server: HostileServer, data: bytes, rate_bps: int, log: list[Served], honour_range: bool) -> object:
    """Serve ``data`` at ``rate_bps`` with (or without) Range support; ``log`` gets each request."""
    chunk = 16 * 1024

    def route(h: http.server.BaseHTTPRequestHandler) -> None:
        m = re.match(r"^bytes=(\d+)-$", h.headers.get("Range", ""))
        start = int(m.group(1)) if m and honour_range else 0
        rec = Served(int(m.group(1)) if m else 0, 206 if start else 200)
        log.append(rec)
        h.send_response(rec.status)
        if start:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.send_header("Content-Length", str(len(data) - start))
        h.end_headers()
        for i in range(start, len(data), chunk):
            if server.stop_event.wait(chunk / rate_bps):
                return
            h.wfile.write(data[i:i + chunk])
            rec.sent += len(data[i:i + chunk])
    return route


BLOB_BYTES = 1536 * 1024
RATE_BPS = 512 * 1024  # 3 s for the blob


def test_download_resumes_across_an_agent_restart(tmp_path: Path, mosquitto: Mosquitto, pki: Pki) -> None:
    """Kill the agent (SIGKILL) mid-download; started again, it resumes the same job:
    first with Range from where the partial file ends (206 continues), then against a server
    that ignores Range (200 restarts from zero). Served over HTTPS verified by [downloads] ca_file."""
    fleet = Fleet()
    (tmp_path / "www").mkdir()
    bundles = Bundles(tmp_path / "www", fleet)
    srv = HostileServer(tmp_path / "www", server_context(pki.good))
    dev = Device(tmp_path / "device", mosquitto, fleet,
                 extra_toml=f'\n[downloads]\nca_file = "{pki.ca}"\n\n[deploy]\nprobation_s = 0.5\n')
    try:
        dev.start()
        for version, honour in ((1, True), (2, False)):
            blob = os.urandom(BLOB_BYTES)
            rel = bundles.write(version, extra={"blob.bin": blob})
            log: list[Served] = []
            srv.routes[f"/{rel}/blob.bin"] = throttled(srv, blob, RATE_BPS, log, honour)  # type: ignore[assignment]
            cid, env = fleet.command("deploy", {"model": "lin", "manifest_url": srv.url(f"{rel}/manifest.json")})
            dev.send(env)
            deadline = time.monotonic() + 20
            while not (log and log[0].sent >= BLOB_BYTES // 3) and time.monotonic() < deadline:
                time.sleep(0.02)
            assert log and log[0].sent >= BLOB_BYTES // 3, dev.log_tail()
            dev.proc.stop(signal.SIGKILL)
            part = dev.store / "partial" / hashlib.sha256(blob).hexdigest()
            have = part.stat().st_size
            assert 0 < have < BLOB_BYTES
            dev.start()
            final = dev.obs.wait(lambda t, d, cid=cid: t == f"edge/dev1/jobs/{cid}" and d.get("state") == "SUCCEEDED",
                                 timeout_s=30, what=f"{cid} resumed to the end")
            assert final["result"]["version"] == version
            assert len(log) == 2 and log[1].range_start == have, log
            if honour:
                assert log[1].status == 206 and log[1].sent == BLOB_BYTES - have
            else:
                assert log[1].status == 200 and log[1].sent == BLOB_BYTES
            dev.expected_serving = bundles.expected_serving
            dev.assert_serving(version)
    finally:
        dev.close()
        srv.close()
