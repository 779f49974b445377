"""HttpConn's non-blocking mode (agent/serving/httpconn.py), on a real socket pair: a request that
arrives in pieces raises NeedMore until it is complete, keeps what was parsed and its deadline,
and ends up exactly as read in one go."""

from __future__ import annotations

import socket
import time

import pytest

from agent.serving.httpconn import HttpConn, HttpFail, NeedMore, ReadTimeout

BODY = b'{"inputs": []}'
HEAD = (b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nContent-Length: " + str(len(BODY)).encode() + b"\r\n\r\n")
CHUNKED = b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"


def _pair() -> tuple[HttpConn, socket.socket]:
    a, b = socket.socketpair()
    a.settimeout(1.0)  # O_NONBLOCK underneath, as the pool sets it
    conn = HttpConn(a, max_body=1 << 20)
    conn.nonblocking = True
    return conn, b


def _byte_by_byte(conn: HttpConn, peer: socket.socket, data: bytes, read: object) -> object:
    for i, byte in enumerate(data):
        peer.sendall(bytes([byte]))  # in the receiving queue once sendall returns (AF_UNIX)
        try:
            return read()  # type: ignore[operator]
        except NeedMore:
            assert i < len(data) - 1, "complete, yet NeedMore"
    raise AssertionError("never complete")


def test_head_and_body_dribbled_byte_by_byte_parse_as_one() -> None:
    conn, peer = _pair()
    deadline = time.monotonic() + 10
    req = _byte_by_byte(conn, peer, HEAD, lambda: conn.read_head(deadline))
    assert req is not None and req.target == "/v2/models/m/infer"  # type: ignore[attr-defined]
    assert req.raw_head == HEAD  # type: ignore[attr-defined]
    body = _byte_by_byte(conn, peer, BODY, lambda: conn.read_body(req))  # type: ignore[arg-type]
    assert body == BODY and conn.body_deadline is None


def test_chunked_body_dribbled_parses_and_what_follows_stays_unread() -> None:
    conn, peer = _pair()
    peer.sendall(CHUNKED)
    req = conn.read_head(time.monotonic() + 10)
    assert req is not None
    chunks = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    body = _byte_by_byte(conn, peer, chunks, lambda: conn.read_body(req))
    assert body == b"hello world"
    peer.sendall(b"GET /")
    with pytest.raises(NeedMore):
        conn.read_head(time.monotonic() + 10)
    assert conn.unread() == b"GET /" and conn.in_message


def test_a_partial_head_is_given_back_whole_and_a_late_one_times_out() -> None:
    conn, peer = _pair()
    peer.sendall(b"\r\n\r\nGET /v2 HTTP/1.1\r\nHo")  # leading blank lines are fed before the head
    with pytest.raises(NeedMore):
        conn.read_head(time.monotonic() + 10)
    assert conn.unread() == b"\r\n\r\nGET /v2 HTTP/1.1\r\nHo", "nothing read is lost"
    with pytest.raises(ReadTimeout):
        conn.read_head(time.monotonic() - 1)


def test_body_deadline_is_fixed_when_reading_begins() -> None:
    conn, peer = _pair()
    peer.sendall(HEAD + BODY[:3])
    req = conn.read_head(time.monotonic() + 10)
    assert req is not None
    with pytest.raises(NeedMore):
        conn.read_body(req)
    first = conn.body_deadline
    assert first is not None
    with pytest.raises(NeedMore):
        conn.read_body(req)
    assert conn.body_deadline == first, "a later call does not extend it"


def test_oversized_head_is_refused_without_waiting() -> None:
    conn, peer = _pair()
    peer.sendall(b"GET / HTTP/1.1\r\nX: " + b"a" * (70 * 1024))
    for _ in range(10):  # a read is at most 64 KiB: one NeedMore at most before the refusal
        try:
            conn.read_head(time.monotonic() + 10)
        except NeedMore:
            continue
        except HttpFail as e:
            assert e.status == 431
            return
    raise AssertionError("not refused")
