"""fleetctl against real parts: real keys, real ONNX models and onnxruntime, a real HTTP server
and a real Mosquitto broker. A tiny device simulator answers commands where a test follows jobs."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import queue
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import paho.mqtt.client as mqtt
import pytest
from conftest import make_linear_onnx

from agent.bundles import dsse
from agent.bundles.manifest import verify_manifest
from agent.bundles.trust import TrustStore, key_id, load_private_key
from fleetctl import commands, mqttc
from fleetctl.bundle import build_bundle, verify_bundle
from fleetctl.keys import generate_keypair
from fleetctl.main import main
from fleetctl.serve import ArtifactServer
from fleetctl.watch import format_message

MSG_TIMEOUT_S = 10.0
HTTP_TIMEOUT_S = 5.0


@pytest.fixture
def keypair(tmp_path: Path) -> tuple[Path, TrustStore]:
    kp = generate_keypair(tmp_path / "keys", "ops")
    trust_dir = tmp_path / "trust"
    trust_dir.mkdir()
    (trust_dir / "ops.pem").write_bytes(kp.public_path.read_bytes())
    return kp.private_path, TrustStore.load(trust_dir)


@pytest.fixture
def built(tmp_path: Path, keypair: tuple[Path, TrustStore]) -> Path:
    model = make_linear_onnx(tmp_path / "src" / "linear.onnx")
    labels = tmp_path / "src" / "labels.txt"
    labels.write_text("a\nb\nc\n")
    return build_bundle(model, tmp_path / "bundle", "linear", 3, [load_private_key(keypair[0])],
                        samples=5, seed=7, max_p95_ms=50, extra_files=[labels])


# ---------------------------------------------------------------- keys


def test_keygen_writes_private_key_0600_and_prints_key_id(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "k"
    assert main(["keygen", "--out", str(out), "--name", "release"]) == 0
    printed = capsys.readouterr().out.strip()
    priv, pub = out / "release.key", out / "release.pub.pem"
    assert stat.S_IMODE(os.stat(priv).st_mode) == 0o600
    assert printed == key_id(load_private_key(priv).public_key())
    assert list(TrustStore.load(out).key_ids()) == [printed]  # the .pub.pem is a valid trust file
    assert pub.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    # never clobbers an existing key unless asked
    assert main(["keygen", "--out", str(out), "--name", "release"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert load_private_key(priv).public_key() is not None


# ---------------------------------------------------------------- bundles


def test_build_bundle_signed_manifest_files_and_golden_samples(built: Path, keypair: tuple[Path, TrustStore]) -> None:
    root = built.parent
    m = verify_manifest(built.read_bytes(), keypair[1], 1)
    assert (m.name, m.version) == ("linear", 3)
    assert [v.id for v in m.variants] == ["onnx-fp32"]
    assert m.inputs[0].to_dict() == {"name": "x", "dtype": "float32", "shape": [-1, 4]}
    assert m.outputs[0].to_dict() == {"name": "y", "dtype": "float32", "shape": [-1, 3]}
    assert m.validation is not None and m.validation.max_p95_ms == 50
    assert m.requires == {"agent": ">=0.1"}
    listed = {f.path: f for f in (*m.variants[0].files, *m.files)}
    assert set(listed) == {"model.onnx", "labels.txt", "samples/input.npz", "samples/expected.npz"}
    for f in listed.values():
        data = (root / f.path).read_bytes()
        assert len(data) == f.size and hashlib.sha256(data).hexdigest() == f.sha256
    with np.load(root / "samples/input.npz", allow_pickle=False) as npz:
        inputs = {k: npz[k] for k in npz.files}
    with np.load(root / "samples/expected.npz", allow_pickle=False) as npz:
        expected = {k: npz[k] for k in npz.files}
    assert list(inputs) == ["x"] and inputs["x"].shape == (5, 4) and inputs["x"].dtype == np.float32
    sess = ort.InferenceSession(str(root / "model.onnx"), providers=["CPUExecutionProvider"])
    (y,) = sess.run(["y"], inputs)
    assert list(expected) == ["y"]
    np.testing.assert_array_equal(expected["y"], y)


def test_build_bundle_from_given_inputs(tmp_path: Path, keypair: tuple[Path, TrustStore]) -> None:
    model = make_linear_onnx(tmp_path / "m.onnx", in_dim=2, out_dim=2, input_name="img", output_name="out")
    np.savez(tmp_path / "in.npz", img=np.arange(6, dtype=np.float64).reshape(3, 2))
    mpath = build_bundle(model, tmp_path / "b", "m", 1, [load_private_key(keypair[0])],
                         inputs=tmp_path / "in.npz")
    with np.load(mpath.parent / "samples/input.npz") as npz:
        assert npz["img"].dtype == np.float32 and npz["img"].shape == (3, 2)
    report = verify_bundle(mpath.parent, keypair[1])
    assert report.manifest.name == "m"


def test_bundle_verify_cli_ok_then_tampered(built: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = built.parent
    trust = str(tmp_path / "trust")
    assert main(["bundle", "verify", str(root), "--trust", trust]) == 0
    out = capsys.readouterr().out
    assert "linear v3" in out and "onnx-fp32" in out and "4 files OK" in out
    model = root / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    assert main(["bundle", "verify", str(root), "--trust", trust]) == 1
    assert "hash_mismatch" in capsys.readouterr().err


def test_bundle_verify_cli_rejects_untrusted_signer(built: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = generate_keypair(tmp_path / "other", "x")
    trust = tmp_path / "trust2"
    trust.mkdir()
    (trust / "x.pem").write_bytes(other.public_path.read_bytes())
    assert main(["bundle", "verify", str(built.parent), "--trust", str(trust)]) == 1
    assert "untrusted_key" in capsys.readouterr().err


def test_bundle_build_cli_default_out_dir(tmp_path: Path, keypair: tuple[Path, TrustStore],
                                          monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    model = make_linear_onnx(tmp_path / "m.onnx")
    monkeypatch.chdir(tmp_path)
    assert main(["bundle", "build", str(model), "--name", "lin", "--version", "2", "--key", str(keypair[0]),
                 "--samples", "2", "--expires-in", "7d"]) == 0
    assert "sha256" in capsys.readouterr().out
    assert verify_bundle(tmp_path / "bundles/lin/2", keypair[1]).manifest.version == 2
    # usage error: no such version
    assert main(["bundle", "build", str(model), "--name", "lin", "--version", "0", "--key", str(keypair[0])]) == 2


# ---------------------------------------------------------------- artifact server


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[ArtifactServer, bytes]]:
    root = tmp_path / "www"
    (root / "sub").mkdir(parents=True)
    body = bytes(range(256)) * 9000  # > 2 MiB: several streamed chunks
    (root / "sub" / "blob.bin").write_bytes(body)
    (tmp_path / "secret.txt").write_text("TOP-SECRET")
    srv = ArtifactServer(root, "127.0.0.1", 0).start()
    try:
        yield srv, body
    finally:
        srv.stop()


def _get(conn: http.client.HTTPConnection, path: str, headers: dict[str, str] | None = None,
         method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    conn.request(method, path, headers=headers or {})
    r = conn.getresponse()
    return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()


def test_serve_get_range_416_and_keepalive(server: tuple[ArtifactServer, bytes]) -> None:
    srv, body = server
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=HTTP_TIMEOUT_S)
    try:
        status, h, data = _get(conn, "/sub/blob.bin")
        assert status == 200 and data == body and int(h["content-length"]) == len(body)
        assert h["accept-ranges"] == "bytes"
        status, h, data = _get(conn, "/sub/blob.bin", {"Range": "bytes=100-1123"})
        assert status == 206 and data == body[100:1124]
        assert h["content-range"] == f"bytes 100-1123/{len(body)}"
        status, h, data = _get(conn, "/sub/blob.bin", {"Range": f"bytes={len(body) - 10}-"})
        assert status == 206 and data == body[-10:]
        assert h["content-range"] == f"bytes {len(body) - 10}-{len(body) - 1}/{len(body)}"
        status, h, _ = _get(conn, "/sub/blob.bin", {"Range": f"bytes={len(body)}-"})
        assert status == 416 and h["content-range"] == f"bytes */{len(body)}"
        status, h, data = _get(conn, "/sub/blob.bin", method="HEAD")
        assert status == 200 and data == b"" and int(h["content-length"]) == len(body)
        status, _, _ = _get(conn, "/sub/missing.bin")
        assert status == 404
        status, _, data = _get(conn, "/sub/blob.bin", {"Range": "bytes=0-0"})  # same connection still works
        assert status == 206 and data == body[:1]
    finally:
        conn.close()
    assert srv.url == f"http://127.0.0.1:{srv.port}/"


@pytest.mark.parametrize("path", ["/../secret.txt", "/%2e%2e/secret.txt", "/sub/..%2f..%2fsecret.txt",
                                  "/sub/%2E%2E/%2E%2E/secret.txt", "/../../../../etc/passwd",
                                  "/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd", "/sub", "/"])
def test_serve_refuses_traversal_and_directories(server: tuple[ArtifactServer, bytes], path: str) -> None:
    srv, _ = server
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=HTTP_TIMEOUT_S)
    try:
        status, _, data = _get(conn, path)
    finally:
        conn.close()
    assert status in (400, 404)
    assert b"TOP-SECRET" not in data and b"root:" not in data


# ---------------------------------------------------------------- commands


def test_make_command_signed_document(keypair: tuple[Path, TrustStore]) -> None:
    key = load_private_key(keypair[0])
    params = {"model": "linear", "manifest_url": "http://h/m.json"}
    cid, raw = commands.make_command("deploy", params, {"device": "pi-0042"}, [key], ttl_s=600,
                                     issued_at=1_800_000_000.0)
    assert cid.startswith("deploy-") and len(cid) == len("deploy-") + 16
    payload = dsse.verify(dsse.parse_envelope(raw), dsse.COMMAND_TYPE, keypair[1], 1)
    doc = json.loads(payload)
    assert doc == {"v": 1, "id": cid, "type": "deploy", "target": {"device": "pi-0042"},
                   "issued_at": "2027-01-15T08:00:00.000Z", "expires_at": "2027-01-15T08:10:00.000Z",
                   "params": params}
    cid2, _ = commands.make_command("ping", {}, {"group": "cams"}, [key], command_id="my:id-1")
    assert cid2 == "my:id-1"
    with pytest.raises(ValueError):
        commands.make_command("ping", {}, {"device": "a/b"}, [key])


# ---------------------------------------------------------------- MQTT: deploy, wait, ping, watch


class Collector:
    """A plain test client that queues every message on some topics."""

    def __init__(self, url: str, topics: list[str]) -> None:
        self.q: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.client = mqttc.connect(url, "test-collector")
        for t in topics:
            self.client.message_callback_add(t, lambda c, u, m: self.q.put(m))
        mqttc.subscribe(self.client, topics)

    def get(self) -> mqtt.MQTTMessage:
        return self.q.get(timeout=MSG_TIMEOUT_S)

    def close(self) -> None:
        mqttc.disconnect(self.client)


class FakeDevice:
    """Answers signed commands on ``edge/{device}/cmd`` with job updates, after verifying them."""

    def __init__(self, url: str, device: str, trust: TrustStore, final_state: str = "SUCCEEDED") -> None:
        self.device, self.trust, self.final_state = device, trust, final_state
        self.received: list[dict[str, Any]] = []
        self.closed = False
        self.client = mqttc.connect(url, f"fake-{device}")
        self.client.message_callback_add(f"edge/{device}/cmd", self._on_cmd)
        mqttc.subscribe(self.client, [f"edge/{device}/cmd"])

    def _on_cmd(self, c: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
        doc = json.loads(dsse.verify(dsse.parse_envelope(bytes(msg.payload)), dsse.COMMAND_TYPE, self.trust, 1))
        self.received.append(doc)
        threading.Thread(target=self._answer, args=(doc,), daemon=True).start()

    def _answer(self, doc: dict[str, Any]) -> None:
        topic = f"edge/{self.device}/jobs/{doc['id']}"
        base = {"v": 1, "device": self.device, "job": doc["id"], "type": doc["type"], "ts": "2026-01-01T00:00:00.000Z"}
        updates = [{**base, "seq": 1, "state": "IN_PROGRESS", "step": "downloading",
                    "progress": {"done": 512, "total": 1024}}]
        final: dict[str, Any] = {**base, "seq": 2, "state": self.final_state}
        if self.final_state == "SUCCEEDED":
            final["result"] = {"pong": "2026-01-01T00:00:00.000Z"} if doc["type"] == "ping" else {"version": 3}
        else:
            final["error"] = {"code": "hash_mismatch", "message": "model.onnx: sha256 mismatch"}
        updates.append(final)
        try:
            for u in updates:
                mqttc.publish(self.client, topic, json.dumps(u))
            mqttc.publish(self.client, topic, json.dumps(updates[0]))  # a late duplicate is ignored
        except (OSError, TimeoutError):
            if not self.closed:  # a device closed by its test may still be answering: that is fine
                raise

    def close(self) -> None:
        self.closed = True
        mqttc.disconnect(self.client)


def test_deploy_cli_publishes_verifiable_command(mosquitto: Any, keypair: tuple[Path, TrustStore],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    sub = Collector(mosquitto.url, ["edge/dev1/cmd", "edge/dev2/cmd"])
    try:
        sha = "ab" * 32
        rc = main(["deploy", "--device", "dev1,dev2", "--model", "linear", "--manifest-url",
                   "http://127.0.0.1:9/linear/3/manifest.json", "--manifest-sha256", sha,
                   "--backend", "onnxruntime:CPUExecutionProvider", "--key", str(keypair[0]),
                   "--broker", mosquitto.url, "--ttl", "10m"])
        assert rc == 0
        docs = {}
        for _ in range(2):
            msg = sub.get()
            doc = json.loads(dsse.verify(dsse.parse_envelope(bytes(msg.payload)), dsse.COMMAND_TYPE, keypair[1], 1))
            docs[msg.topic] = doc
        assert set(docs) == {"edge/dev1/cmd", "edge/dev2/cmd"}
        d1 = docs["edge/dev1/cmd"]
        assert d1["target"] == {"device": "dev1"} and d1["type"] == "deploy"
        assert d1["params"] == {"model": "linear", "manifest_url": "http://127.0.0.1:9/linear/3/manifest.json",
                                "manifest_sha256": sha, "backend": "onnxruntime:CPUExecutionProvider"}
        assert docs["edge/dev2/cmd"]["id"] == d1["id"] and d1["id"] in capsys.readouterr().out
    finally:
        sub.close()


def test_deploy_group_topic(mosquitto: Any, keypair: tuple[Path, TrustStore]) -> None:
    sub = Collector(mosquitto.url, ["edge/groups/cams/cmd"])
    try:
        assert main(["deploy", "--group", "cams", "--model", "m", "--manifest-url", "https://x/m.json",
                     "--key", str(keypair[0]), "--broker", mosquitto.url]) == 0
        doc = json.loads(dsse.payload_bytes(json.loads(sub.get().payload)))
        assert doc["target"] == {"group": "cams"}
        # waiting needs device targets
        assert main(["deploy", "--group", "cams", "--model", "m", "--manifest-url", "https://x/m.json",
                     "--key", str(keypair[0]), "--broker", mosquitto.url, "--wait"]) == 2
    finally:
        sub.close()


@pytest.mark.parametrize(("final", "rc"), [("SUCCEEDED", 0), ("FAILED", 1)])
def test_deploy_wait_follows_job_updates(mosquitto: Any, keypair: tuple[Path, TrustStore], final: str, rc: int,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    dev = FakeDevice(mosquitto.url, "dev1", keypair[1], final)
    try:
        assert main(["deploy", "--device", "dev1", "--model", "linear", "--manifest-url", "http://h/m.json",
                     "--key", str(keypair[0]), "--broker", mosquitto.url, "--wait", "--timeout", "10"]) == rc
    finally:
        dev.close()
    out = capsys.readouterr()
    lines = [ln for ln in out.out.splitlines() if " job " in ln]
    assert len(lines) == 2, out.out
    assert "IN_PROGRESS downloading" in lines[0] and "50%" in lines[0]
    assert final in lines[1]
    if final == "FAILED":
        assert "hash_mismatch" in lines[1] and "hash_mismatch" in out.err


def test_ping_and_wait_timeout(mosquitto: Any, keypair: tuple[Path, TrustStore], capsys: pytest.CaptureFixture[str]) -> None:
    dev = FakeDevice(mosquitto.url, "dev1", keypair[1])
    try:
        assert main(["ping", "--device", "dev1", "--key", str(keypair[0]), "--broker", mosquitto.url,
                     "--timeout", "10"]) == 0
        assert "dev1 pong 2026-01-01T00:00:00.000Z" in capsys.readouterr().out
        assert dev.received[0]["type"] == "ping" and dev.received[0]["params"] == {}
    finally:
        dev.close()
    # nobody answers: a bounded wait and exit 1
    assert main(["ping", "--device", "ghost", "--key", str(keypair[0]), "--broker", mosquitto.url,
                 "--timeout", "0.3"]) == 1
    assert "ghost: no job update" in capsys.readouterr().err


def test_unreachable_broker_is_one_line_error(keypair: tuple[Path, TrustStore], capsys: pytest.CaptureFixture[str]) -> None:
    from conftest import free_port

    rc = main(["deploy", "--device", "d", "--model", "m", "--manifest-url", "http://h/m.json",
               "--key", str(keypair[0]), "--broker", f"mqtt://127.0.0.1:{free_port()}", "--connect-timeout", "2"])
    err = capsys.readouterr().err
    assert rc == 1 and "cannot connect" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_watch_count_receives_retained_status(mosquitto: Any, capsys: pytest.CaptureFixture[str]) -> None:
    pub = mqttc.connect(mosquitto.url, "test-pub")
    status = {"v": 1, "device": "dev7", "online": True, "ts": "2026-01-01T00:00:00.000Z", "agent": "0.1.0",
              "models": [{"name": "linear", "version": 3, "variant": "onnx-fp32", "state": "serving"}]}
    try:
        mqttc.publish(pub, "edge/dev7/status", json.dumps(status), retain=True)
    finally:
        mqttc.disconnect(pub)
    assert main(["watch", "--broker", mosquitto.url, "--count", "1", "--duration", "10"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "dev7 status online" in out[0] and "linear v3" in out[0]
    assert main(["watch", "--broker", mosquitto.url, "--device", "dev7", "--json", "--count", "1",
                 "--duration", "10"]) == 0
    line = json.loads(capsys.readouterr().out.strip())
    assert line == {"topic": "edge/dev7/status", "payload": status}


# ---------------------------------------------------------------- watch formatting


def test_format_message_each_kind() -> None:
    ts = "2026-01-01T00:00:00.000Z"
    s = format_message("edge/pi-1/status", {"v": 1, "device": "pi-1", "online": True, "ts": ts,
                                            "models": [{"name": "det", "version": 7, "backend": "tflite:xnnpack"}]})
    assert s.startswith(f"{ts} pi-1 status online") and "det v7" in s and "tflite:xnnpack" in s
    assert "OFFLINE" in format_message("edge/pi-1/status", {"online": False})
    j = format_message("edge/pi-1/jobs/deploy-1", {"job": "deploy-1", "state": "FAILED", "step": "verifying",
                                                   "error": {"code": "bad_signature", "message": "nope"}})
    assert "pi-1 job deploy-1 FAILED verifying error bad_signature: nope" in j
    h = format_message("edge/pi-1/heartbeat", {"uptime_s": 3725, "system": {"cpu_pct": 12.5, "mem_used_pct": 40}})
    assert "heartbeat up 1h02m05s cpu 12.5% mem 40.0%" in h
    t = format_message("edge/pi-1/telemetry", {"window_s": 60, "models": {"det": {
        "version": 7, "count": 1200, "errors": 2, "latency_ms": {"p50": 3.1, "p99": 7.7}}}})
    assert "det v7 n=1200 err=2 p50=3.10ms p99=7.70ms" in t
    e = format_message("edge/pi-1/events", {"level": "warning", "event": "backend_fallback", "message": "GPU gone"})
    assert "pi-1 event warning backend_fallback GPU gone" in e
    # odd payloads never raise
    assert "status" in format_message("a/b/c/pi-1/status", {"models": "garbage", "online": "x"})
    assert "pi-1" in format_message("edge/pi-1/telemetry", {"models": {"det": None}, "window_s": "x"})
