"""The inference API's HTTP layer over real loopback sockets: framing refused by llhttp, gzip
bodies, Host/Origin/content-type/token checks, the connection cap and the head deadline.

The model is a small in-process stand-in (``Echo``: y = 2x): these tests are about the HTTP layer,
which does not depend on the runtime; tests/integration/test_kserve.py covers real onnxruntime.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import resource
import socket
import stat
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import stream_and_read

from agent.bundles.manifest import TensorSpec
from agent.serving import handler
from agent.serving.guard import ApiPolicy
from agent.serving.kserve import KServeServer
from agent.serving.registry import Registry, ServingVersion

TIMEOUT_S = 10.0
CAP_BYTES = 1024 * 1024  # the body limit of these servers
TOKEN = b"0123456789abcdef0123"


class Echo:
    """y = 2x; ``gate`` (when set) holds each call until released."""

    backend_id = "echo:cpu"
    details: dict[str, Any] = {}  # LoadedModel: nothing to report
    known_shapes: list[Any] = []  # LoadedModel: a golden check assigns it

    def __init__(self) -> None:
        self.inputs = (TensorSpec("x", "float32", (None, 4)),)
        self.outputs = (TensorSpec("y", "float32", (None, 4)),)
        self.gate: threading.Event | None = None

    def infer(self, inputs: dict[str, Any]) -> dict[str, Any]:
        if self.gate is not None:
            self.gate.wait(TIMEOUT_S)
        return {"y": np.asarray(inputs["x"]) * 2}

    def close(self) -> None:
        pass


def serve(**kw: Any) -> tuple[KServeServer, Echo]:
    reg = Registry()
    model = Echo()
    reg.activate(ServingVersion("m", 1, "echo", model))
    s = KServeServer(reg, port=0, max_body_bytes=CAP_BYTES, **kw)
    s.start()
    return s, model


@pytest.fixture(scope="module")
def server() -> Iterator[KServeServer]:
    s, _ = serve()
    try:
        yield s
    finally:
        s.stop()


def body(n: int = 1) -> bytes:
    return json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [n, 4],
                                   "data": [1.0] * (4 * n)}]}).encode()


def infer_head(length: int, extra: str = "", host: str = "localhost") -> bytes:
    return (f"POST /v2/models/m/infer HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n{extra}\r\n").encode()


def exchange(s: KServeServer, raw: bytes, shut: bool = True) -> bytes:
    """Send ``raw`` on a new connection and read until the server closes it."""
    with socket.create_connection(("127.0.0.1", s.port), timeout=TIMEOUT_S) as c:
        c.sendall(raw)
        if shut:
            c.shutdown(socket.SHUT_WR)
        out = []
        while chunk := c.recv(65536):
            out.append(chunk)
        return b"".join(out)


def replies(raw: bytes) -> list[tuple[int, dict[str, Any]]]:
    """Every (status, JSON body) in a stream of replies."""
    out = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")))
        out.append((status, json.loads(rest[:length]) if length else {}))
        raw = rest[length:]
    return out


def closed_by_server(c: socket.socket) -> bool:
    try:
        return c.recv(1) == b""
    except ConnectionResetError:
        return True


def one(s: KServeServer, raw: bytes) -> tuple[int, dict[str, Any]]:
    got = replies(exchange(s, raw))
    assert len(got) == 1, got
    return got[0]


# ---------------------------------------------------------------- framing (llhttp)


@pytest.mark.parametrize("size", [b"1_0", b"0x10", b"+10", b"10 "])
def test_chunk_sizes_that_are_not_plain_hex_are_refused(server: KServeServer, size: bytes) -> None:
    b = body()
    raw = (b"POST /v2/models/m/infer HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
           + size + b"\r\n" + b[:16] + b"\r\n0\r\n\r\n")
    status, doc = one(server, raw)  # one reply, then the server closes: nothing after it is parsed
    assert (status, doc["code"]) == (400, "invalid_input") and "chunk size" in doc["error"]


def test_content_length_beside_transfer_encoding_is_refused(server: KServeServer) -> None:
    b = body()
    raw = (b"POST /v2/models/m/infer HTTP/1.1\r\nHost: localhost\r\nContent-Length: "
           + str(len(b)).encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n" + b"0\r\n\r\n" + b)
    status, doc = one(server, raw)
    assert (status, doc["code"]) == (400, "invalid_input")


def test_transfer_codings_other_than_chunked_are_refused(server: KServeServer) -> None:
    raw = (b"POST /v2/models/m/infer HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
           b"0\r\n\r\n")
    status, doc = one(server, raw)
    assert status == 501 and doc["code"] == "invalid_input"


def test_header_count_and_head_size_are_bounded(server: KServeServer) -> None:
    many = "".join(f"X-{i}: v\r\n" for i in range(101))
    status, doc = one(server, f"GET /v2 HTTP/1.1\r\nHost: localhost\r\n{many}\r\n".encode())
    assert (status, doc["code"]) == (431, "too_large")
    big = "X-Big: " + "a" * (70 * 1024) + "\r\n"
    status, doc = one(server, f"GET /v2 HTTP/1.1\r\nHost: localhost\r\n{big}\r\n".encode())
    assert (status, doc["code"]) == (431, "too_large")


def test_pipelined_requests_after_a_chunked_body_are_answered_in_order(server: KServeServer) -> None:
    b = body()
    chunked = (b"POST /v2/models/m/infer HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
               + f"{len(b):x}\r\n".encode() + b + b"\r\n0\r\n\r\n")
    raw = chunked + b"GET /v2/health/live HTTP/1.1\r\nHost: localhost\r\n\r\n" + infer_head(len(b)) + b
    got = replies(exchange(server, raw))
    assert [s for s, _ in got] == [200, 200, 200]
    assert got[0][1]["outputs"][0]["data"] == [2.0] * 4 and got[1][1] == {"live": True}
    assert got[2][1]["outputs"][0]["data"] == [2.0] * 4


# ---------------------------------------------------------------- encodings


@pytest.mark.parametrize("coding", ["gzip", "deflate"])
def test_compressed_bodies_are_inflated(server: KServeServer, coding: str) -> None:
    b = body(3)
    packed = gzip.compress(b) if coding == "gzip" else zlib.compress(b)
    status, doc = one(server, infer_head(len(packed), f"Content-Encoding: {coding}\r\nConnection: close\r\n") + packed)
    assert status == 200 and doc["outputs"][0]["data"] == [2.0] * 12


def test_gzip_binary_tensors_use_the_inflated_header_length(server: KServeServer) -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    head = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4],
                                   "parameters": {"binary_data_size": x.nbytes}}]}).encode()
    packed = gzip.compress(head + x.tobytes())
    raw = (b"POST /v2/models/m/infer HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/octet-stream\r\n"
           + f"Inference-Header-Content-Length: {len(head)}\r\nContent-Encoding: gzip\r\n"
             f"Content-Length: {len(packed)}\r\nConnection: close\r\n\r\n".encode() + packed)
    status, doc = one(server, raw)
    assert status == 200 and doc["outputs"][0]["data"] == (x * 2).ravel().tolist()


def test_gzip_bomb_stops_at_the_body_limit_without_inflating_it(server: KServeServer) -> None:
    z = zlib.compressobj(wbits=16 + zlib.MAX_WBITS)
    zeros = bytes(1024 * 1024)
    # 32 MiB inflated; packed it stays under the model's own body bound, so inflating is what stops
    packed = b"".join([z.compress(zeros) for _ in range(32)] + [z.flush()])
    limit = server.body_limit("POST", "/v2/models/m/infer")
    assert len(packed) < limit <= CAP_BYTES
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB, the peak so far
    status, doc = one(server, infer_head(len(packed), "Content-Encoding: gzip\r\n") + packed)
    peak_growth_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert (status, doc["code"]) == (413, "too_large") and "inflates past" in doc["error"]
    assert str(limit) in doc["error"]
    assert peak_growth_mib < 64, f"peak memory grew {peak_growth_mib:.0f} MiB"


def test_unknown_or_broken_encodings_are_named_not_called_bad_json(server: KServeServer) -> None:
    b = body()
    status, doc = one(server, infer_head(len(b), "Content-Encoding: br\r\n") + b)
    assert (status, doc["code"]) == (415, "unsupported_media_type") and "br" in doc["error"]
    cut = gzip.compress(b)[:-12]
    status, doc = one(server, infer_head(len(cut), "Content-Encoding: gzip\r\n") + cut)
    assert (status, doc["code"]) == (400, "invalid_input") and "gzip" in doc["error"]
    assert "JSON" not in doc["error"]


# ---------------------------------------------------------------- who may call


def test_host_must_be_a_loopback_name_an_ip_literal_or_configured() -> None:
    s, _ = serve(policy=ApiPolicy(allowed_hosts=frozenset({"edge.lan"})))
    try:
        for host in ("localhost:8470", "127.0.0.1", "[::1]:1", "edge.lan", "EDGE.LAN.", "10.1.2.3"):
            status, _ = one(s, f"GET /v2 HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            assert status == 200, host
        status, doc = one(s, b"GET /v2 HTTP/1.1\r\nHost: attacker.example:8470\r\n\r\n")
        assert (status, doc["code"]) == (421, "host_not_allowed") and "api.allowed_hosts" in doc["error"]
    finally:
        s.stop()


def test_origin_is_refused_unless_configured() -> None:
    s, _ = serve(policy=ApiPolicy(allowed_origins=frozenset({"http://app.local"})))
    try:
        b = body()
        status, doc = one(s, infer_head(len(b), "Origin: http://evil.example\r\n") + b)
        assert (status, doc["code"]) == (403, "origin_not_allowed")
        status, doc = one(s, infer_head(len(b), "Origin: http://app.local\r\n") + b)
        assert status == 200
    finally:
        s.stop()


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; b=x"])
def test_browser_simple_content_types_cannot_infer(server: KServeServer, ctype: str) -> None:
    b = body()
    raw = (f"POST /v2/models/m/infer HTTP/1.1\r\nHost: localhost\r\nContent-Type: {ctype}\r\n"
           f"Content-Length: {len(b)}\r\n\r\n").encode() + b
    status, doc = one(server, raw)
    assert (status, doc["code"]) == (415, "unsupported_media_type")


def test_bearer_token_is_required_except_for_health() -> None:
    s, _ = serve(policy=ApiPolicy(token=TOKEN))
    try:
        b = body()
        status, doc = one(s, infer_head(len(b)) + b)
        assert (status, doc["code"]) == (401, "unauthorized")
        status, doc = one(s, infer_head(len(b), "Authorization: Bearer wrong\r\n") + b)
        assert (status, doc["code"]) == (401, "unauthorized")
        status, _ = one(s, infer_head(len(b), f"Authorization: Bearer {TOKEN.decode()}\r\n") + b)
        assert status == 200
        assert one(s, b"GET /v2/health/live HTTP/1.1\r\nHost: localhost\r\n\r\n")[0] == 200
    finally:
        s.stop()


def test_unix_socket_listener_serves_local_applications(tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    s, _ = serve(policy=ApiPolicy(token=TOKEN), unix_socket=str(path))
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o660
        b = body()
        with socket.socket(socket.AF_UNIX) as c:
            c.settimeout(TIMEOUT_S)
            c.connect(str(path))
            c.sendall(infer_head(len(b), "Connection: close\r\n", host="anything") + b)
            got = b"".join(iter(lambda: c.recv(65536), b""))
        [(status, doc)] = replies(got)
        assert status == 200 and doc["outputs"][0]["data"] == [2.0] * 4
    finally:
        s.stop()
    assert not path.exists()


# ---------------------------------------------------------------- bad input never 500


def test_shape_overflow_and_deep_json_are_invalid_input_not_internal(
        server: KServeServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    cases = [json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2**62, 2**62, 0],
                                     "data": []}]}).encode(),
             json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [0, 2**63], "data": []}]}).encode(),
             b'{"inputs": ' + b"[" * 30_000 + b"]" * 30_000 + b"}"]  # deep, yet within the model's body bound
    for b in cases:
        status, doc = one(server, infer_head(len(b)) + b)
        assert (status, doc["code"]) == (400, "invalid_input"), doc
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


# ---------------------------------------------------------------- bounds


def test_connection_cap_evicts_the_longest_idle_then_refuses_when_all_are_busy() -> None:
    s, model = serve(max_connections=4)
    idle: list[socket.socket] = []
    busy: list[socket.socket] = []
    try:
        for _ in range(4):
            idle.append(socket.create_connection(("127.0.0.1", s.port), timeout=TIMEOUT_S))
            time.sleep(0.02)  # distinct idle-since stamps
        status, _ = one(s, b"GET /v2/health/live HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert status == 200 and s.evicted == 1
        assert idle[0].recv(1) == b""  # the oldest idle connection was closed for it
        model.gate = threading.Event()
        b = body()
        for _ in range(4):  # four requests in flight: nothing left to evict
            c = socket.create_connection(("127.0.0.1", s.port), timeout=TIMEOUT_S)
            c.sendall(infer_head(len(b)) + b)
            busy.append(c)
        deadline = time.monotonic() + TIMEOUT_S
        while sum(not sl.busy for sl in list(s._conns.values())) and time.monotonic() < deadline:
            time.sleep(0.01)
        with socket.create_connection(("127.0.0.1", s.port), timeout=TIMEOUT_S) as c:
            [(status, doc)] = replies(b"".join(iter(lambda: c.recv(65536), b"")))  # at once, unasked
        assert (status, doc["code"]) == (503, "busy") and s.refused == 1
        model.gate.set()
        for c in busy:
            [(st, _)] = replies(c.recv(65536))
            assert st == 200
    finally:
        if model.gate is not None:
            model.gate.set()
        for c in idle + busy:
            c.close()
        s.stop()


def test_a_half_sent_head_is_dropped_at_its_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(handler, "HEAD_TIMEOUT_S", 0.5)
    s, _ = serve()
    try:
        with socket.create_connection(("127.0.0.1", s.port), timeout=TIMEOUT_S) as c:
            c.sendall(b"GET /v2/hea")
            assert closed_by_server(c)  # no reply
        with socket.create_connection(("127.0.0.1", s.port), timeout=TIMEOUT_S) as c:
            try:
                for ch in b"GET /v2/health/live HTTP/1.1\r\nHost: x":  # trickled: the deadline runs from the start
                    c.sendall(bytes([ch]))
                    time.sleep(0.05)
            except OSError:
                pass  # closed while the head trickled in
            assert closed_by_server(c)
    finally:
        s.stop()


def test_connection_cap_follows_the_descriptor_limit() -> None:
    from agent.serving.kserve import FD_RESERVE, MIN_CONNECTIONS, connection_cap

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
        assert connection_cap(10_000) == (1024 - FD_RESERVE) // 2
        assert connection_cap(8) == 8
        resource.setrlimit(resource.RLIMIT_NOFILE, (FD_RESERVE + 8, hard))
        assert connection_cap(10_000) == MIN_CONNECTIONS
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert os.sysconf("SC_OPEN_MAX") == soft


def test_tritonclient_with_request_compression(server: KServeServer) -> None:
    """tritonclient's ``request_compression_algorithm`` (gzip, deflate) and binary tensors."""
    httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is not installed")
    client = httpclient.InferenceServerClient(f"127.0.0.1:{server.port}")
    try:
        x = np.arange(8, dtype=np.float32).reshape(2, 4)
        for algo in ("gzip", "deflate"):
            for binary in (False, True):
                inp = httpclient.InferInput("x", [2, 4], "FP32")
                inp.set_data_from_numpy(x, binary_data=binary)
                out = httpclient.InferRequestedOutput("y", binary_data=binary)
                res = client.infer("m", [inp], outputs=[out], request_compression_algorithm=algo)
                np.testing.assert_array_equal(res.as_numpy("y"), x * 2)
    finally:
        client.close()


def test_upgrade_is_never_honoured(server: KServeServer) -> None:
    """``Upgrade: h2c`` is answered as a plain request; with a chunked body (which llhttp would
    skip, leaving it to be read as the next request) it is refused."""
    got = replies(exchange(server, b"GET /v2/health/live HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\n"
                                   b"Upgrade: h2c\r\n\r\nGET /v2 HTTP/1.1\r\nHost: localhost\r\n\r\n"))
    assert [s for s, _ in got] == [200, 200] and got[0][1] == {"live": True}
    inner = b"GET /v2 HTTP/1.1\r\nHost: localhost\r\n\r\n"
    raw = (b"POST /v2/models/m/infer HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n"
           b"Transfer-Encoding: chunked\r\n\r\n" + f"{len(inner):x}\r\n".encode() + inner + b"\r\n0\r\n\r\n")
    status, doc = one(server, raw)
    assert (status, doc["code"]) == (400, "invalid_input")


def test_expect_continue_gets_100_or_a_prompt_refusal(server: KServeServer) -> None:
    b = body()
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT_S) as c:
        c.sendall(infer_head(len(b), "Expect: 100-continue\r\n"))
        assert c.recv(65536).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        c.sendall(b)
        head = c.recv(65536)
        assert head.startswith(b"HTTP/1.1 200 ")
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT_S) as c:
        c.sendall(infer_head(len(b), "Expect: 100-continue\r\nOrigin: http://evil.example\r\n"))  # no body sent
        [(status, doc)] = replies(b"".join(iter(lambda: c.recv(65536), b"")))  # answered and closed
        assert (status, doc["code"]) == (403, "origin_not_allowed")


SPIN_SERVER = """
import sys, time
from agent.serving import kserve
from agent.serving.registry import Registry
kserve.connection_cap = lambda configured: configured  # let the API itself run out of descriptors
s = kserve.KServeServer(Registry(), port=0, max_connections=1000)
s.start()
print(s.port, flush=True)
time.sleep(60)
"""
SPIN_NOFILE = 64  # the server's descriptor limit in this test
SPIN_CPU_MAX_S = 0.25  # CPU the server may burn in SPIN_WINDOW_S while out of descriptors
SPIN_WINDOW_S = 2.0


def test_accept_backs_off_when_descriptors_run_out(tmp_path: Path) -> None:
    """With the cap lifted, the server runs out of descriptors: accept fails with EMFILE and the
    listening socket stays readable. The loop must back off, not spin a core."""
    import subprocess
    import sys

    import psutil

    proc = subprocess.Popen(["prlimit", f"--nofile={SPIN_NOFILE}", "--", sys.executable, "-c", SPIN_SERVER],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    conns: list[socket.socket] = []
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        for _ in range(SPIN_NOFILE + 20):  # beyond its limit: the rest wait in the backlog
            conns.append(socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S))
        p = psutil.Process(proc.pid)
        time.sleep(0.5)
        before = sum(p.cpu_times()[:2])
        time.sleep(SPIN_WINDOW_S)
        burnt = sum(p.cpu_times()[:2]) - before
        assert burnt < SPIN_CPU_MAX_S, f"{burnt:.2f} s of CPU in {SPIN_WINDOW_S} s: the accept loop spins"
        for c in conns:  # descriptors come back: the server answers again
            c.close()
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as c:
            c.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            assert c.recv(65536).startswith(b"HTTP/1.1 200 ")
    finally:
        for c in conns:
            c.close()
        proc.kill()
        proc.wait()


class Busy(Echo):
    def infer(self, inputs: dict[str, Any]) -> dict[str, Any]:
        from agent import errors

        raise errors.RetryableError(errors.BUSY, "model m: 4 requests in flight, queue full")


def test_busy_is_503_with_retry_after() -> None:
    reg = Registry()
    reg.activate(ServingVersion("m", 1, "busy", Busy()))
    s = KServeServer(reg, port=0)
    s.start()
    try:
        b = body()
        raw = exchange(s, infer_head(len(b)) + b)
        [(status, doc)] = replies(raw)
        assert (status, doc["code"]) == (503, "busy") and b"\r\nRetry-After: 1\r\n" in raw
    finally:
        s.stop()


def test_a_stalled_body_is_answered_408_at_its_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.serving import httpconn

    monkeypatch.setattr(httpconn, "BODY_BASE_S", 0.5)
    s, _ = serve()
    try:
        b = body()
        with socket.create_connection(("127.0.0.1", s.port), timeout=TIMEOUT_S) as c:
            c.sendall(infer_head(len(b)) + b[:10])  # and nothing more
            [(status, doc)] = replies(b"".join(iter(lambda: c.recv(65536), b"")))
        assert (status, doc["code"]) == (408, "timeout")
    finally:
        s.stop()


def test_bodies_beyond_the_budget_are_refused_busy_unread() -> None:
    """While other bodies hold the process's budget, a request is answered 503 ``busy`` with
    Retry-After without its body being parsed: a small Content-Length body is dropped and
    keep-alive goes on; an Expect client gets no 100 and a chunked one the connection closed.
    Answered requests give their bytes back."""
    s, _ = serve(policy=ApiPolicy(body_inflight_bytes=1000))
    try:
        b = body()
        assert s.body_budget.reserve(990)  # another request's body being read
        with socket.create_connection(("127.0.0.1", s.port), timeout=TIMEOUT_S) as c:
            c.sendall(infer_head(len(b)) + b)
            head = c.recv(65536)
            assert head.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 1\r\n" in head, head
            assert replies(head)[0][1]["code"] == "busy"
            s.body_budget.release(990)
            c.sendall(infer_head(len(b)) + b)  # the same connection: the refused body was skipped
            assert c.recv(65536).startswith(b"HTTP/1.1 200 ")
        assert s.body_budget.used == 0
        assert s.body_budget.reserve(990)
        raw = exchange(s, infer_head(len(b), "Expect: 100-continue\r\n"), shut=False)  # no body sent
        [(status, doc)] = replies(raw)  # no 100 first; answered, then closed
        assert (status, doc["code"]) == (503, "busy")
        chunked = (b"POST /v2/models/m/infer HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                   b"Transfer-Encoding: chunked\r\n\r\n" + f"{len(b):x}\r\n".encode() + b + b"\r\n0\r\n\r\n")
        [(status, doc)] = replies(exchange(s, chunked))  # answered, then closed
        assert (status, doc["code"]) == (503, "busy")
        s.body_budget.release(990)
        assert s.body_budget.used == 0
    finally:
        s.stop()




STREAMED_BODY_BYTES = 6 * 1024 * 1024  # more than the socket buffers take without the server reading


@pytest.mark.parametrize("framing", ["chunked", "content-length"])
def test_a_body_refused_for_the_budget_and_left_unread_is_lingered_over(framing: str) -> None:
    """A body the budget refuses and the server does not drop (chunked, or longer than
    ``DISCARD_MAX_BYTES``) closes the connection after the 503; the server first reads what the
    client is still sending, so a client streaming its body gets it out and sees the 503 and an
    orderly close, not a reset, and the request pipelined after the body is never parsed."""
    s, _ = serve(policy=ApiPolicy(body_inflight_bytes=1000))
    try:
        assert s.body_budget.reserve(990)  # another request's body being read
        data = b"x" * STREAMED_BODY_BYTES
        if framing == "chunked":
            head = (b"POST /v2/models/m/infer HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n")
            data = (f"{len(data):x}\r\n".encode() + data + b"\r\n0\r\n\r\n"
                    + b"GET /v2 HTTP/1.1\r\nHost: localhost\r\n\r\n")
        else:
            head = infer_head(handler.DISCARD_MAX_BYTES + 1)  # of which only ``data`` is sent
        got, failed = stream_and_read(s.port, head, data, TIMEOUT_S)
        assert not failed, f"the connection was reset under the client: {failed}"
        [(status, doc)] = replies(got)  # the 503 and nothing else
        assert (status, doc["code"]) == (503, "busy")
        s.body_budget.release(990)
        assert s.body_budget.used == 0
    finally:
        s.stop()


def test_a_small_body_refused_for_the_budget_is_dropped_and_the_pipelined_request_answered() -> None:
    """A Content-Length body the budget refuses is read and dropped, not parsed: the request
    pipelined right behind it on the keep-alive connection is answered as itself."""
    s, _ = serve(policy=ApiPolicy(body_inflight_bytes=1000))
    try:
        assert s.body_budget.reserve(990)  # another request's body being read
        junk = b"GET /v2/health/ready HTTP/1.1\r\nHost: localhost\r\n\r\n" * 40  # a body that reads as requests
        raw = infer_head(len(junk)) + junk + b"GET /v2 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        got = replies(exchange(s, raw))
        assert [st for st, _ in got] == [503, 200], got
        assert got[0][1]["code"] == "busy" and got[1][1]["name"] == "edge-agent"
        s.body_budget.release(990)
        assert s.body_budget.used == 0
    finally:
        s.stop()
