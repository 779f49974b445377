"""The daemon↔worker messages (agent/backends/wire.py) are typed records that survive the trip."""

from __future__ import annotations

import dataclasses
import pickle
import socket

import pytest

from agent import errors
from agent.backends import wire

RECORDS = [
    wire.Preload("onnxruntime"),
    wire.Load("onnxruntime", "CPUExecutionProvider", "/m/model.onnx", 2, False, {"precision": "fp16"}),
    wire.Ready("onnxruntime:CPUExecutionProvider", (), (), 1234),
    wire.Golden("/g/in.npz", "/g/out.npz", 1e-3, 1e-4, {"runs": 3}),
    wire.Ok({"y": [1.0]}),
    wire.Err(errors.INFERENCE_FAILED, "the runtime said no"),
    wire.Serve("m", 3, 128, 1 << 20, "edge-agent", "1.0", None, {"limits": {}, "shapes": []}),
    wire.Adopt(5, b"POST /v2/models/m/infer HTTP/1.1\r\n\r\n"),
    wire.Retire(),
    wire.Retired(),
    wire.Back(5, b"GET / HTTP/1.1\r\n\r\n"),
    wire.Done(5),
    wire.Stats(3, 1, b"\0" * 8, b"", ((("x", (1, 4)),),)),
]


@pytest.mark.parametrize("msg", RECORDS, ids=lambda m: type(m).__name__)
def test_each_record_round_trips_as_itself(msg: object) -> None:
    back = pickle.loads(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))
    assert type(back) is type(msg) and back == msg
    assert not hasattr(back, "__dict__")  # slotted: nothing but its fields
    for f in dataclasses.fields(back):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(back, f.name, None)


def test_control_records_cross_the_control_socket_with_a_descriptor() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r, w = socket.socketpair()
    try:
        wire.send_ctl(a, wire.Back(7, b"rest"), r.fileno())
        msg, fds = wire.recv_ctl(b)
        assert msg == wire.Back(7, b"rest") and len(fds) == 1
        socket.socket(fileno=fds[0]).close()
        a.close()
        assert wire.recv_ctl(b) == (None, [])
    finally:
        for s in (a, b, r, w):
            s.close()


def test_death_reasons_name_their_codes() -> None:
    assert wire.DeathReason.HUNG.code == errors.WORKER_HUNG
    assert wire.DeathReason.CRASHED.code == errors.WORKER_CRASHED
    assert wire.DeathReason.RETIRED.code == errors.TIMEOUT
