"""The local inference API attacked as a neighbour would: raw sockets against a real daemon.

One daemon (process isolation, a real onnxruntime model in its worker, a real Mosquitto) started
under ``prlimit --nofile=1024``, with a bearer token, one extra allowed host name and a Unix-socket
listener. Each scenario asserts the status, the stable code, the bound, and that the model still
serves the same version (docs/security.md, "Local threat model", L01–L12).
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import resource
import socket
import stat
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import start_mosquitto
from security.attacklib import X_IN, Bundles, Device, Fleet, HostileServer

SERVING = 1
NOFILE = 1024  # the daemon's descriptor limit, soft and hard (where 1024/1024 were once exhausted)
FLOOD_CONNECTIONS = 1100  # idle connections, each with half a request line
TOKEN = "s3cret-token-for-the-local-api"
ALLOWED_HOST = "edge.test"
TIMEOUT_S = 10.0
BOMB_MIB = 32  # what the gzip bomb inflates to; packed (≈ 32 KiB) it is within the model's body bound
RSS_GROWTH_MAX_MIB = 200


@dataclass
class Env:
    dev: Device
    unix_socket: Path

    @property
    def port(self) -> int:
        return self.dev.proc.api_port

    def still_serving(self) -> None:
        self.dev.assert_serving(SERVING)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("localapi")
    (tmp / "mosquitto").mkdir()
    broker = start_mosquitto(tmp / "mosquitto")
    fleet = Fleet()
    www = tmp / "www"
    www.mkdir()
    bundles = Bundles(www, fleet)
    http = HostileServer(www)
    token_file = tmp / "api-token"
    token_file.write_text(TOKEN + "\n")
    usock = tmp / "api.sock"
    toml = (f'token_file = "{token_file}"\nallowed_hosts = ["{ALLOWED_HOST}"]\nunix_socket = "{usock}"\n')
    dev = Device(tmp / "device", broker, fleet)
    dev.proc.wrap = ("prlimit", f"--nofile={NOFILE}", "--")
    dev.proc.write_config()
    text = dev.proc.config.read_text()
    dev.proc.config.write_text(text.replace("[api]\n", "[api]\n" + toml, 1))
    dev.http.headers["Authorization"] = f"Bearer {TOKEN}"
    try:
        dev.start()
        done = dev.deploy(http.url(f"{bundles.write(SERVING)}/manifest.json"))
        assert done["state"] == "SUCCEEDED", (done, dev.log_tail())
        dev.expected_serving = bundles.expected_serving
        dev.assert_serving(SERVING)
        yield Env(dev, usock)
    finally:
        dev.close()
        http.close()
        broker.stop()


def body(extra: dict[str, Any] | None = None) -> bytes:
    return json.dumps({"inputs": [{"name": "x", "shape": list(X_IN.shape), "datatype": "FP32",
                                   "data": X_IN.reshape(-1).tolist(), **(extra or {})}]}).encode()


def request(method: str, path: str, data: bytes = b"", headers: dict[str, str] | None = None,
            host: str = "127.0.0.1", token: bool = True) -> bytes:
    h = {"Host": host, "Connection": "close", **({"Authorization": f"Bearer {TOKEN}"} if token else {}),
         **({"Content-Length": str(len(data))} if method == "POST" and "Transfer-Encoding" not in (headers or {})
            else {}), **(headers or {})}
    return (f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items()) + "\r\n").encode() + data


def send(env: Env, raw: bytes) -> tuple[int, dict[str, Any]]:
    """One exchange on a new connection: the reply's status and JSON body."""
    with socket.create_connection(("127.0.0.1", env.port), timeout=TIMEOUT_S) as c:
        c.sendall(raw)
        got = b"".join(iter(lambda: c.recv(65536), b""))
    head, _, rest = got.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), (json.loads(rest) if rest else {})


INFER = "/v2/models/lin/infer"


def assert_refused(env: Env, raw: bytes, status: int, code: str) -> dict[str, Any]:
    got, doc = send(env, raw)
    assert (got, doc.get("code")) == (status, code), doc
    env.still_serving()
    return doc


def tree_rss_mib(pid: int) -> float:
    p = psutil.Process(pid)
    return sum(q.memory_info().rss for q in [p, *p.children(recursive=True)]) / 2**20


# ---------------------------------------------------------------- floods and slow clients


def test_L01_descriptor_exhaustion_by_half_sent_request_lines(env: Env) -> None:
    """Once, 1,100 idle connections with half a request line each exhausted 1024/1024
    descriptors and stopped the watchdog. Now the API holds at most its cap; health, inference,
    agentctl and heartbeats go on while the flood is open."""
    dev = env.dev
    assert dev.proc.proc is not None
    pid = dev.proc.proc.pid
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = FLOOD_CONNECTIONS + 256
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))
    flood: list[socket.socket] = []
    try:
        sent = 0
        for _ in range(FLOOD_CONNECTIONS):
            c = socket.socket()
            c.settimeout(TIMEOUT_S)
            flood.append(c)
            with contextlib.suppress(OSError):  # refused or already evicted
                c.connect(("127.0.0.1", env.port))
                c.sendall(b"GET /v2/health/li")
                sent += 1
        assert sent > NOFILE, f"only {sent} connections got their half request line out"
        beats = {id(d) for d in dev.obs.find(lambda t, d: t == "edge/dev1/heartbeat")}
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        assert fds < NOFILE - 100, f"daemon holds {fds} descriptors"
        r = dev.http.get(f"{dev.proc.api}/v2/health/live", timeout=TIMEOUT_S)
        assert r.status_code == 200
        env.still_serving()
        st = dev.agentctl("status", "--json", timeout_s=30)
        assert st.returncode == 0, st.stderr
        dev.obs.wait(lambda t, d: t == "edge/dev1/heartbeat" and id(d) not in beats, timeout_s=TIMEOUT_S,
                     what="a heartbeat during the flood")
        assert len(os.listdir(f"/proc/{pid}/fd")) < NOFILE - 100
    finally:
        for c in flood:
            c.close()
    log = dev.log_tail(200_000)
    assert "Too many open files" not in log and "EMFILE" not in log
    env.still_serving()


def test_L02_slow_head_is_dropped_and_does_not_hold_the_api(env: Env) -> None:
    """A head trickled one byte at a time never completes; meanwhile other clients are served."""
    with socket.create_connection(("127.0.0.1", env.port), timeout=TIMEOUT_S) as c:
        c.sendall(b"POST " + INFER.encode())
        for _ in range(3):
            env.still_serving()
            c.sendall(b"/")
        assert send(env, request("GET", "/v2/health/live"))[0] == 200


# ---------------------------------------------------------------- framing


@pytest.mark.parametrize("size", ["1_0", "0x10"])
def test_L03_chunk_sizes_beyond_plain_hex(env: Env, size: str) -> None:
    """Once accepted: chunk sizes ``1_0`` and ``0x10``."""
    b = body()
    raw = request("POST", INFER, f"{size}\r\n".encode() + b[:16] + b"\r\n0\r\n\r\n",
                  {"Transfer-Encoding": "chunked", "Content-Type": "application/json"})
    doc = assert_refused(env, raw, 400, "invalid_input")
    assert "chunk size" in doc["error"]


def test_L04_content_length_with_transfer_encoding(env: Env) -> None:
    """Once accepted: a request with both framings (a smuggling shape)."""
    b = body()
    raw = request("POST", INFER, b"0\r\n\r\n" + b, {"Transfer-Encoding": "chunked", "Content-Length": str(len(b) + 5)})
    assert_refused(env, raw, 400, "invalid_input")


def test_L05_header_flood(env: Env) -> None:
    raw = request("GET", "/v2", headers={f"X-{i}": "y" * 100 for i in range(150)})
    assert_refused(env, raw, 431, "too_large")


# ---------------------------------------------------------------- bodies


def test_L06_gzip_bodies_are_served_and_a_gzip_bomb_stops_at_the_limit(env: Env) -> None:
    """Gzip bodies (tritonclient's compression) failed as "not valid JSON"; now inflated, never past 64 MiB."""
    packed = gzip.compress(body())
    got, doc = send(env, request("POST", INFER, packed, {"Content-Encoding": "gzip",
                                                         "Content-Type": "application/json"}))
    assert got == 200 and doc["model_version"] == str(SERVING)
    assert env.dev.proc.proc is not None
    before = tree_rss_mib(env.dev.proc.proc.pid)
    z = zlib.compressobj(wbits=16 + zlib.MAX_WBITS)
    zeros = bytes(2**20)
    bomb = b"".join([z.compress(zeros) for _ in range(BOMB_MIB)] + [z.flush()])
    doc = assert_refused(env, request("POST", INFER, bomb, {"Content-Encoding": "gzip"}), 413, "too_large")
    assert "inflates past" in doc["error"]
    growth = tree_rss_mib(env.dev.proc.proc.pid) - before
    assert growth < RSS_GROWTH_MAX_MIB, f"daemon and workers grew {growth:.0f} MiB"


def test_L07_unknown_content_encoding(env: Env) -> None:
    doc = assert_refused(env, request("POST", INFER, body(), {"Content-Encoding": "zstd"}), 415,
                         "unsupported_media_type")
    assert "zstd" in doc["error"]


def test_L08_shape_overflow_and_deep_json(env: Env) -> None:
    """Both once gave 500 ``internal`` with a traceback at ERROR."""
    mark = len(env.dev.log_tail(10**9))
    overflow = body({"shape": [2**62, 2**62, 0], "data": []})
    assert_refused(env, request("POST", INFER, overflow), 400, "invalid_input")
    deep = b'{"inputs": ' + b"[" * 30_000 + b"]" * 30_000 + b"}"  # within the model's body bound
    assert_refused(env, request("POST", INFER, deep), 400, "invalid_input")
    new = env.dev.log_tail(10**9)[mark:]
    assert "Traceback" not in new and " ERROR " not in new, new[-2000:]


# ---------------------------------------------------------------- browsers and neighbours


def test_L09_dns_rebinding_host(env: Env) -> None:
    """A page on attacker.example rebinds its name to 127.0.0.1: its requests carry its Host."""
    doc = assert_refused(env, request("POST", INFER, body(), host="attacker.example:8470"), 421, "host_not_allowed")
    assert "api.allowed_hosts" in doc["error"]
    got, _ = send(env, request("POST", INFER, body(), {"Content-Type": "application/json"}, host=ALLOWED_HOST))
    assert got == 200


def test_L10_cross_origin_simple_posts(env: Env) -> None:
    """Once accepted: a page's form post (text/plain), with Origin ignored."""
    assert_refused(env, request("POST", INFER, body(), {"Origin": "http://evil.example",
                                                         "Content-Type": "text/plain"}), 403, "origin_not_allowed")
    assert_refused(env, request("POST", INFER, body(), {"Content-Type": "text/plain"}), 415,
                   "unsupported_media_type")


def test_L11_token_required(env: Env) -> None:
    assert_refused(env, request("POST", INFER, body(), token=False), 401, "unauthorized")
    raw = request("POST", INFER, body(), token=False).replace(b"Connection: close\r\n",
                                                               b"Connection: close\r\nAuthorization: Bearer nope\r\n")
    assert_refused(env, raw, 401, "unauthorized")
    got, _ = send(env, request("GET", "/v2/health/ready", token=False))
    assert got == 200


def test_L12_unix_socket_for_local_applications(env: Env) -> None:
    assert stat.S_IMODE(env.unix_socket.stat().st_mode) == 0o660
    with socket.socket(socket.AF_UNIX) as c:
        c.settimeout(TIMEOUT_S)
        c.connect(str(env.unix_socket))
        c.sendall(request("POST", INFER, body(), {"Content-Type": "application/json"}, host="localhost", token=False))
        got = b"".join(iter(lambda: c.recv(65536), b""))
    head, _, rest = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and json.loads(rest)["model_version"] == str(SERVING)
    env.still_serving()
