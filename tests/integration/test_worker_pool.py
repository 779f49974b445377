"""A worker serves its connections on a bounded set of threads (agent/serving/connpool.py).

Real parts only: a real KServe server on loopback handing connections to real worker processes
running onnxruntime on models built here; raw sockets for slow senders; the worker's thread
count read from /proc.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from conftest import stream_and_read
from test_worker_handoff import TIMEOUT_S, Env, _body, _post, _wait

from agent.backends.wire import IDLE, INFER, PENDING, QUEUED, DeathReason
from agent.serving.admission import Limits
from agent.serving.guard import ApiPolicy

X = np.arange(8, dtype=np.float32).reshape(2, 4) / 8
LOOP_SIDE = 256  # the slow model multiplies LOOP_SIDE² matrices n times
HEAVY_S = 3.0  # about how long the heavy request runs (calibrated on this machine)
PROMPT_S = 2.0  # "answered promptly": well under what waiting behind a slow client would take (seconds)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    try:
        yield e
    finally:
        e.close()


def _limits(env: Env, **kw: Any) -> None:
    """The admission limits the next served version gets (they reach its worker)."""
    env.registry.limits = Limits(**kw)


def _tasks(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def _answer(doc: dict[str, Any], rows: int = 2) -> np.ndarray:
    return np.asarray(doc["outputs"][0]["data"], np.float32).reshape(rows, -1)


def test_more_connections_than_threads_each_get_their_own_answer(env: Env) -> None:
    _limits(env, max_inflight=2)  # 3 threads in the worker
    m, path = env.serve("lin", 1, seed=1)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    clients, rounds = 12, 8
    errors: list[str] = []

    def client(i: int) -> None:
        c = env.conn()
        try:
            for j in range(rounds):
                x = (X * (i + 1) + j).astype(np.float32)
                status, doc = _post(c, body=_body(x))
                want = sess.run(None, {"x": x})[0]
                if status != 200 or not np.allclose(_answer(doc), want, rtol=1e-5):
                    errors.append(f"client {i} round {j}: {status} {str(doc)[:200]}")
        except Exception as e:  # reported below, with the others
            errors.append(f"client {i}: {e!r}")
        finally:
            c.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT_S * 3)
    assert errors == []
    assert m.alive and m.death_reason is None


def _slow_sender(port: int, body: bytes, pause_s: float, first: int) -> socket.socket:
    """A connection that sent an infer head and the first ``first`` bytes of its body."""
    s = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S)
    s.sendall(b"POST /v2/models/lin/infer HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
              b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body[:first])
    return s


def _read_reply(s: socket.socket) -> tuple[int, dict[str, Any]]:
    f = s.makefile("rb")
    status = int(f.readline().split()[1])
    length = 0
    while (h := f.readline()) not in (b"\r\n", b""):
        if h.lower().startswith(b"content-length:"):
            length = int(h.split(b":")[1])
    return status, json.loads(f.read(length))


def test_slow_senders_hold_no_thread_and_do_not_look_hung(env: Env) -> None:
    """More senders dribbling their bodies than the worker has threads, for longer than the
    hung-worker deadline: another client is answered meanwhile, the slow ones are answered once
    their bodies are in, and the worker is neither killed nor replaced."""
    _limits(env, max_inflight=1)  # 2 threads: one reads, one answers
    m, path = env.serve("lin", 1, seed=1, infer_timeout_s=1.0)
    pid = m.pid
    body = _body()
    slow = [_slow_sender(env.server.port, body, 0.1, 10) for _ in range(4)]
    _wait(lambda: len(m._held) >= 4, "the slow connections handed to the worker")
    c = env.conn()
    rest = body[10:]
    step = max(1, len(rest) // 25)  # ≈ 2.5 s of dribbling, over twice the deadline
    latencies = []
    for k in range(0, len(rest), step):
        for s in slow:
            s.sendall(rest[k:k + step])
        t0 = time.monotonic()
        status, doc = _post(c)
        latencies.append(time.monotonic() - t0)
        assert status == 200 and doc["model_version"] == "1", doc
        time.sleep(0.1)
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": X})[0]
    for s in slow:
        status, doc = _read_reply(s)
        assert status == 200 and np.allclose(_answer(doc), want, rtol=1e-5), doc
        s.close()
    assert max(latencies) < PROMPT_S, latencies  # never behind a slow sender
    assert m.alive and m.death_reason is None and m.pid == pid
    assert env.registry.get("lin").version == 1  # type: ignore[union-attr]


def _loop_model(path: Path) -> Path:
    """y = sum(A^(n+1)) for an orthogonal A: the request's ``n`` sets how long the call runs."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    a = np.linalg.qr(np.random.default_rng(3).standard_normal((LOOP_SIDE, LOOP_SIDE)))[0].astype(np.float32)
    body = helper.make_graph(
        [helper.make_node("MatMul", ["y_in", "A"], ["y_out"]), helper.make_node("Identity", ["cond"], ["cond_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
         helper.make_tensor_value_info("y_in", TensorProto.FLOAT, [LOOP_SIDE, LOOP_SIDE])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("y_out", TensorProto.FLOAT, [LOOP_SIDE, LOOP_SIDE])],
    )
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["n", "scalar"], ["trips"]),
         helper.make_node("Loop", ["trips", "true", "A"], ["y_end"], body=body),
         helper.make_node("ReduceSum", ["y_end", "axes"], ["y"], keepdims=1)],
        "loop",
        [helper.make_tensor_value_info("n", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])],
        initializer=[numpy_helper.from_array(a, "A"), numpy_helper.from_array(np.array([], np.int64), "scalar"),
                     numpy_helper.from_array(np.array(True), "true"),
                     numpy_helper.from_array(np.array([0, 1], np.int64), "axes")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _n_body(n: int) -> bytes:
    return json.dumps({"inputs": [{"name": "n", "shape": [1], "datatype": "INT64", "data": [n]}]}).encode()


def _heavy_trips(path: Path) -> int:
    """Loop trips that take about ``HEAVY_S`` here (measured, as load differs)."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    trips = 200
    t0 = time.perf_counter()
    sess.run(None, {"n": np.array([trips], np.int64)})
    per = (time.perf_counter() - t0) / trips
    return max(trips, int(HEAVY_S / per))


def test_requests_queued_beyond_the_bound_get_busy_not_a_dead_worker(env: Env, tmp_path: Path) -> None:
    """One answering thread held by a long call, a queue of one: of three requests arriving
    meanwhile, two are refused at once and the queued one when its wait is over, all 503 ``busy``
    with Retry-After; the long call is answered, the same worker answers again, nothing hung."""
    _limits(env, max_inflight=1, max_queue=1, queue_wait_s=0.3)
    path = _loop_model(tmp_path / "loop.onnx")
    trips = _heavy_trips(path)
    from agent.backends.base import LoadOptions
    from agent.backends.isolated import IsolatedModel
    from agent.backends.onnxruntime import CPU
    from agent.serving.registry import ServingVersion

    m = IsolatedModel("onnxruntime", CPU, path, LoadOptions(threads=1), infer_timeout_s=30.0)
    env.models.append(m)
    env.registry.activate(ServingVersion("loop", 1, "onnx-fp32", m))
    url = "/v2/models/loop/infer"
    c = env.conn()
    assert _post(c, url, _n_body(1))[0] == 200  # the worker is serving (its pool started)
    heavy: list[tuple[int, dict[str, Any]]] = []
    t = threading.Thread(target=lambda: heavy.append(_post(env.conn(), url, _n_body(trips))))
    t.start()
    _wait(lambda: any(m._slots.get(s)[0] == INFER for s in list(m._held)), "the long call in the runtime")
    got: list[tuple[int, dict[str, str], dict[str, Any]]] = []

    def small() -> None:
        cc = env.conn()
        cc.request("POST", url, body=_n_body(1), headers={"Content-Type": "application/json"})
        r = cc.getresponse()
        got.append((r.status, {k.lower(): v for k, v in r.getheaders()}, json.loads(r.read())))
        cc.close()

    smalls = [threading.Thread(target=small) for _ in range(3)]
    for s in smalls:
        s.start()
    for s in smalls:
        s.join(TIMEOUT_S)
    assert heavy == [], "the long call still runs (else this proves nothing)"
    assert len(got) == 3
    for status, headers, doc in got:
        assert status == 503 and doc["code"] == "busy" and headers.get("retry-after") == "1", (status, doc)
    t.join(TIMEOUT_S * 3)
    assert heavy and heavy[0][0] == 200, heavy
    assert _post(c, url, _n_body(1))[0] == 200
    assert m.alive and m.death_reason is None


def test_worker_threads_stay_bounded_with_many_connections(env: Env) -> None:
    m, _ = env.serve("lin", 1, seed=1)
    first = env.conn()
    assert _post(first)[0] == 200
    before = _tasks(m.pid)
    conns: list[http.client.HTTPConnection] = []
    try:
        for _ in range(48):
            c = env.conn()
            conns.append(c)
            status, doc = _post(c)
            assert status == 200 and doc["model_version"] == "1"
        assert len(m._held) == 49, "every connection lives in the worker"
        assert _tasks(m.pid) <= before, "no thread per connection"
    finally:
        for c in conns:
            c.close()
        first.close()


def test_a_queued_request_is_hung_only_past_the_queue_wait_and_the_deadline(env: Env) -> None:
    """The daemon's rule for ``QUEUED`` (a request read in full, waiting for a worker thread):
    not hung at ``infer_timeout_s``, since the worker itself answers ``busy`` after the queue
    wait; hung once that and the deadline have both passed. The state is written into the
    shared slot table while the worker is stopped (SIGSTOP): nothing else can make a worker
    leave a queued request unanswered."""
    _limits(env, queue_wait_s=1.5)
    m, _ = env.serve("lin", 1, seed=1, infer_timeout_s=0.5)
    c = env.conn()
    assert _post(c)[0] == 200
    slot = next(iter(m._held))
    _wait(lambda: m._slots.get(slot)[0] == IDLE, "the worker back to waiting")
    os.kill(m.pid, signal.SIGSTOP)
    try:
        m._slots.set(slot, QUEUED)
        time.sleep(1.0)  # twice infer_timeout_s, within the queue wait
        assert m.alive and m.death_reason is None, m.death
        _wait(lambda: m.death_reason is not None, "the hung rule for a queued request")
        assert m.death_reason is DeathReason.HUNG and "queued request" in m.death, m.death
    finally:
        if m._proc.poll() is None:
            os.kill(m.pid, signal.SIGCONT)
    c.close()


def test_refused_bodies_dribbling_in_hold_no_thread_and_keep_alive_survives(env: Env) -> None:
    """Requests refused before their body is read (413: over the model's bound), more of them than the worker
    has threads, each body dribbling in for longer than the hung-worker deadline: each is
    answered at once, another client meanwhile too, the bodies are dropped as they arrive and
    each connection then serves an infer request."""
    _limits(env, max_inflight=1)
    m, _ = env.serve("lin", 1, seed=1, infer_timeout_s=1.0)
    junk = b"x" * 100_000  # lin takes at most ≈ 72 KB (admission.body_bound)
    piece = len(junk) // 24
    slow = []
    for _ in range(3):
        s = socket.create_connection(("127.0.0.1", env.server.port), timeout=TIMEOUT_S)
        s.sendall(b"POST /v2/models/lin/infer HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(junk)).encode() + b"\r\n\r\n" + junk[:piece])
        slow.append(s)
    for s in slow:
        status, doc = _read_reply(s)  # before the body is in
        assert status == 413 and doc["code"] == "too_large", doc
    c = env.conn()
    for k in range(piece, len(junk), piece):  # ≈ 2.4 s
        for s in slow:
            s.sendall(junk[k:k + piece])
        t0 = time.monotonic()
        assert _post(c)[0] == 200
        assert time.monotonic() - t0 < PROMPT_S
        time.sleep(0.1)
    body = _body()
    for s in slow:
        s.sendall(b"POST /v2/models/lin/infer HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        status, doc = _read_reply(s)
        assert status == 200 and doc["model_version"] == "1", doc
        s.close()
    assert m.alive and m.death_reason is None


WIDE_OUT = 16384  # outputs per row of the wide model: a reply of megabytes


def test_clients_not_reading_large_replies_hold_no_thread(env: Env, tmp_path: Path) -> None:
    """More clients than answering threads ask for replies of megabytes and do not read them:
    another client is answered meanwhile, each reply arrives whole once its client reads, and
    the worker is neither killed nor replaced."""
    from conftest import make_linear_onnx

    from agent.backends.base import LoadOptions
    from agent.backends.isolated import IsolatedModel
    from agent.backends.onnxruntime import CPU
    from agent.serving.registry import ServingVersion

    _limits(env, max_inflight=1)
    wide = make_linear_onnx(tmp_path / "wide.onnx", out_dim=WIDE_OUT, seed=4)
    m = IsolatedModel("onnxruntime", CPU, wide, LoadOptions(threads=1), infer_timeout_s=1.0)
    env.models.append(m)
    env.registry.activate(ServingVersion("wide", 1, "onnx-fp32", m))
    env.serve("lin", 1, seed=1, infer_timeout_s=1.0)
    x = np.ones((64, 4), np.float32)
    body = _body(x)
    head = (b"POST /v2/models/wide/infer HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
    quiet = []
    for _ in range(3):
        s = socket.create_connection(("127.0.0.1", env.server.port), timeout=TIMEOUT_S)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)  # the kernel holds a few MB of the reply at most
        s.sendall(head + body)
        quiet.append(s)
    _wait(lambda: len(m._held) == 3, "the quiet connections handed to the worker")
    c = env.conn()
    t_end = time.monotonic() + 2.0  # twice the hung-worker deadline
    while time.monotonic() < t_end:
        t0 = time.monotonic()
        status, _ = _post(c, "/v2/models/wide/infer", _body(np.ones((1, 4), np.float32)))
        assert status == 200
        assert time.monotonic() - t0 < PROMPT_S
        time.sleep(0.1)
    want = ort.InferenceSession(str(wide), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    for s in quiet:
        status, doc = _read_reply(s)
        assert status == 200 and np.allclose(_answer(doc, 64), want, rtol=1e-5)
        s.close()
    assert m.alive and m.death_reason is None


HELD_BODY_BYTES = 60_000  # a slow sender's body, of the worker's budget below (lin takes ≈ 72 KB)
WORKER_BUDGET_BYTES = 100_000
STREAMED_BODY_BYTES = 6 * 1024 * 1024  # more than the socket buffers take without the worker reading


def test_a_body_refused_for_the_budget_closes_in_order_not_with_a_reset(tmp_path: Path) -> None:
    """In the worker: while a slow sender's body holds most of the body budget, a chunked infer
    request is refused 503 ``busy`` before its body is read and its connection closes; the
    leader drops what the client still sends first, so a client streaming its body gets it out
    and sees the 503 and an orderly close, not a reset; the worker serves on."""
    env = Env(tmp_path, policy=ApiPolicy(body_inflight_bytes=WORKER_BUDGET_BYTES))
    try:
        m, _ = env.serve("lin", 1, seed=1)
        held = socket.create_connection(("127.0.0.1", env.server.port), timeout=TIMEOUT_S)
        held.sendall(b"POST /v2/models/lin/infer HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(HELD_BODY_BYTES).encode() + b"\r\n\r\n{")
        _wait(lambda: len(m._held) == 1 and all(m._slots.get(s)[0] != PENDING for s in m._held),
              "the worker to take the slow sender (it reserves the body's bytes as it takes it)")
        data = b"x" * STREAMED_BODY_BYTES
        data = (f"{len(data):x}\r\n".encode() + data + b"\r\n0\r\n\r\n"
                + b"POST /v2/models/lin/infer HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n")
        head = (b"POST /v2/models/lin/infer HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n")
        got, failed = stream_and_read(env.server.port, head, data, TIMEOUT_S)
        assert not failed, f"the connection was reset under the client: {failed}"
        head, _, rest = got.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 1" in head, got[:300]
        assert json.loads(rest)["code"] == "busy"  # one reply: the request after the body was never parsed
        held.close()  # its bytes go back to the budget
        c2 = env.conn()
        assert _post(c2)[0] == 200
        c2.close()
        assert m.alive and m.death_reason is None
    finally:
        env.close()
