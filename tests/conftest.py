"""Shared fixtures: a real Mosquitto on a free loopback port, free ports, tiny ONNX models."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

BROKER_START_TIMEOUT_S = 10.0
REPO = Path(__file__).resolve().parents[1]
HW_CAPTURES = REPO / "tests" / "data" / "hw-captures"  # real devices' files; see its README.md


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_port(host: str, port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout_s} s")


def stream_and_read(port: int, head: bytes, data: bytes, timeout_s: float) -> tuple[bytes, list[BaseException]]:
    """Send ``head``, then stream ``data`` from a second thread while reading every reply until the
    server closes: what a client still sending its body sees (the bytes, and any reset or broken
    pipe met on either side)."""
    failed: list[BaseException] = []
    got = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as c:

        def send() -> None:
            try:
                c.sendall(data)
            except OSError as e:
                failed.append(e)

        c.sendall(head)
        sender = threading.Thread(target=send)
        sender.start()
        try:
            while more := c.recv(65536):
                got += more
        except OSError as e:
            failed.append(e)
        sender.join(timeout_s)
    return got, failed


@dataclass
class Mosquitto:
    """A real Mosquitto broker process on loopback."""

    host: str
    port: int
    proc: subprocess.Popen[bytes]
    conf: Path

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)

    def start(self) -> None:
        """(Re)start on the same port and persistence file."""
        self.proc = subprocess.Popen(["mosquitto", "-c", str(self.conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.host, self.port, BROKER_START_TIMEOUT_S)


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/bin/mosquitto") if os.path.exists(p)), None)


def start_mosquitto(tmp: Path, extra_conf: str = "") -> Mosquitto:
    binary = mosquitto_binary()
    if binary is None:
        pytest.fail("mosquitto is not installed (apt-get install -y mosquitto); .ci/run installs it")
    port = free_port()
    conf = tmp / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\n"
        "allow_anonymous true\n"
        "user root\n"  # run as root, mosquitto drops to user `mosquitto`, cannot write the persistence file and loses every session on restart; ignored when not root
        "set_tcp_nodelay true\n"
        "persistence true\n"
        f"persistence_location {tmp}/\n"
        "max_queued_messages 100000\n"
        + extra_conf
    )
    m = Mosquitto("127.0.0.1", port, None, conf)  # type: ignore[arg-type]
    m.proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port("127.0.0.1", port, BROKER_START_TIMEOUT_S)
    return m


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    d = tmp_path / "mosquitto"
    d.mkdir()
    m = start_mosquitto(d)
    try:
        yield m
    finally:
        m.stop()


def make_linear_onnx(path: Path, in_dim: int = 4, out_dim: int = 3, seed: int = 0,
                     input_name: str = "x", output_name: str = "y") -> Path:
    """A tiny real ONNX model y = x @ W + b with a dynamic batch dimension."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = rng.standard_normal((in_dim, out_dim)).astype(np.float32)
    b = rng.standard_normal((out_dim,)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", [input_name, "W"], ["xw"]),
         helper.make_node("Add", ["xw", "B"], [output_name])],
        "linear",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["batch", in_dim])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["batch", out_dim])],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path
