"""Parts of the attack suite: a fleet's keys, a bundle builder, hostile servers, a device.

Everything is real: the daemon runs as a process, commands go through a real Mosquitto, bundles
come from real HTTP(S)/FTP servers on loopback (some of them built to misbehave), and the serving
model is checked through the KServe v2 HTTP API. Nothing of the agent is mocked.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import http.server
import io
import ipaddress
import json
import logging
import re
import shutil
import sqlite3
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import requests
from agentproc import AgentProcess, Observer
from conftest import Mosquitto, make_linear_onnx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.bundles.manifest import sign_manifest
from agent.bundles.trust import key_id, public_pem
from agent.timeutil import now_rfc3339
from fleetctl.commands import command_document, sign_document

DEVICE = "dev1"
GROUP = "cams"
MODEL = "lin"
TERMINAL = ("SUCCEEDED", "FAILED", "REJECTED", "CANCELED", "TIMED_OUT")
JOB_TIMEOUT_S = 30.0  # one scenario's job reaches a final state within this
X_IN = (np.arange(8, dtype=np.float32).reshape(2, 4) - 3.0) / 7.0  # the inference the serving check runs
HTTP_TIMEOUT_S = 5.0
SERVER_STOP_S = 5.0
HOSTILE_MAX_S = 30.0  # a misbehaving handler gives up after this, so no test server thread leaks
ENDLESS_CAP_BYTES = 256 * 1024 * 1024
LABELS_BYTES = 64


# ---------------------------------------------------------------- keys and commands


@dataclass
class Fleet:
    """Signing keys: a, b, c are trusted by the device (threshold 2); x, y are not."""

    a: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    b: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    c: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    x: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    y: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)

    @property
    def trusted(self) -> list[Ed25519PrivateKey]:
        return [self.a, self.b, self.c]

    @property
    def ok(self) -> list[Ed25519PrivateKey]:
        """Two distinct trusted keys: meets the threshold."""
        return [self.a, self.b]

    def command(self, type_: str, params: dict[str, Any], keys: list[Ed25519PrivateKey] | None = None,
                target: dict[str, str] | None = None, ttl_s: float = 600.0, issued_at: float | None = None,
                cid: str | None = None, mutate: Callable[[dict[str, Any]], None] | None = None) -> tuple[str, bytes]:
        """A signed command envelope; ``mutate`` edits the document before it is signed."""
        doc = command_document(type_, params, target or {"device": DEVICE}, ttl_s, cid, issued_at)
        if mutate is not None:
            mutate(doc)
        return str(doc["id"]), sign_document(doc, keys if keys is not None else self.ok)


def garbage_signature(env: bytes, key: Ed25519PrivateKey) -> bytes:
    """``env`` plus a signature naming ``key`` that does not verify."""
    d = json.loads(env)
    d["signatures"].append({"keyid": key_id(key.public_key()), "sig": base64.b64encode(b"\x01" * 64).decode()})
    return json.dumps(d).encode()


def alter_payload(env: bytes, change: Callable[[dict[str, Any]], None]) -> bytes:
    """``env`` with its payload document changed after signing (signatures kept)."""
    d = json.loads(env)
    doc = json.loads(base64.b64decode(d["payload"]))
    change(doc)
    d["payload"] = base64.b64encode(json.dumps(doc, separators=(",", ":")).encode()).decode()
    return json.dumps(d).encode()


# ---------------------------------------------------------------- bundles


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def entry(path: str, data: bytes) -> dict[str, Any]:
    return {"path": path, "size": len(data), "sha256": sha256(data)}


def npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


class Bundles:
    """Writes bundle folders under ``root`` (one folder per call), served by the test servers."""

    def __init__(self, root: Path, fleet: Fleet) -> None:
        import onnxruntime as ort

        self.root = root
        self.fleet = fleet
        self._n = 0
        self.labels_of: dict[str, bytes] = {}
        work = root.parent / f"{root.name}-models"
        self.model = make_linear_onnx(work / "m0.onnx", seed=0).read_bytes()
        self.other_model = make_linear_onnx(work / "m1.onnx", seed=1).read_bytes()  # "another version"
        assert len(self.model) == len(self.other_model) and self.model != self.other_model
        sess = ort.InferenceSession(str(work / "m0.onnx"), providers=["CPUExecutionProvider"])
        x = np.random.default_rng(7).standard_normal((3, 4)).astype(np.float32)
        self.expected_serving = sess.run(["y"], {"x": X_IN})[0]
        self.inputs = npz(x=x)
        self.expected = npz(y=sess.run(["y"], {"x": x})[0])

    def labels(self) -> bytes:
        """A common file unique to one bundle, always the same size: a bundle always has at least
        one file the device's store does not hold yet, and another version's copy fits its size."""
        return f"labels {uuid.uuid4().hex}\n".encode().ljust(LABELS_BYTES, b"#")

    def doc(self, version: int, name: str = MODEL, extra: dict[str, bytes] | None = None,
            expires_in_s: float = 3600.0, labels: bytes | None = None) -> dict[str, Any]:
        """A valid manifest document for the standard files (plus ``extra`` common files)."""
        now = time.time()
        extra = {"labels.txt": labels or self.labels(), **(extra or {})}
        return {
            "v": 1, "name": name, "version": version,
            "created_at": now_rfc3339(now - 60), "expires_at": now_rfc3339(now + expires_in_s),
            "io": {"inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 4]}],
                   "outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 3]}]},
            "variants": [{"id": "onnx-fp32", "format": "onnx", "precision": "fp32",
                          "files": [entry("model.onnx", self.model)]}],
            "files": [*(entry(p, d) for p, d in extra.items()),
                      entry("samples/input.npz", self.inputs), entry("samples/expected.npz", self.expected)],
            "validation": {"inputs": "samples/input.npz", "expected": "samples/expected.npz",
                           "rtol": 1e-4, "atol": 1e-5},
        }

    def write(self, version: int, *, keys: list[Ed25519PrivateKey] | None = None, name: str = MODEL,
              extra: dict[str, bytes] | None = None, mutate: Callable[[dict[str, Any]], None] | None = None,
              serve: dict[str, bytes | None] | None = None, manifest: bytes | None = None,
              expires_in_s: float = 3600.0) -> str:
        """Write a bundle folder; returns its path relative to ``root`` (e.g. ``b7``).

        ``mutate`` edits the document before signing; ``serve`` replaces (or with None, leaves out)
        what the folder holds for some paths after the manifest listed the real bytes;
        ``manifest`` replaces manifest.json's bytes outright.
        """
        self._n += 1
        rel = f"b{self._n}"
        folder = self.root / rel
        labels = self.labels()
        self.labels_of[rel] = labels
        files = {"model.onnx": self.model, "samples/input.npz": self.inputs,
                 "samples/expected.npz": self.expected, "labels.txt": labels, **(extra or {})}
        doc = self.doc(version, name, extra, expires_in_s, labels)
        if mutate is not None:
            mutate(doc)
        for p, d in {**files, **(serve or {})}.items():
            if d is None:
                continue
            (folder / p).parent.mkdir(parents=True, exist_ok=True)
            (folder / p).write_bytes(d)
        raw = manifest if manifest is not None else sign_manifest(doc, keys if keys is not None else self.fleet.ok)
        (folder / "manifest.json").write_bytes(raw)
        return rel

    def folder(self, rel: str) -> Path:
        return self.root / rel


# ---------------------------------------------------------------- TLS


@dataclass
class Pki:
    """A CA the device trusts, one it does not, and server certificates that must be refused."""

    ca: Path  # the device's [downloads] ca_file
    good: tuple[Path, Path]  # 127.0.0.1, signed by the trusted CA
    unknown_ca: tuple[Path, Path]  # 127.0.0.1, signed by another CA
    wrong_host: tuple[Path, Path]  # wrong.example only, trusted CA
    expired: tuple[Path, Path]  # 127.0.0.1, trusted CA, expired yesterday


def make_pki(folder: Path) -> Pki:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    hour = datetime.timedelta(hours=1)

    def ca(name: str) -> tuple[Any, Any]:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - hour)
                .not_valid_after(now + 24 * hour)
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                             crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
                .sign(key, hashes.SHA256()))
        return key, cert

    def leaf(stem: str, issuer: tuple[Any, Any], san: Any, not_before: datetime.datetime,
             not_after: datetime.datetime) -> tuple[Path, Path]:
        ikey, icert = issuer
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, stem)]))
                .issuer_name(icert.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(not_before).not_valid_after(not_after)
                .add_extension(x509.SubjectAlternativeName([san]), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                .sign(ikey, hashes.SHA256()))
        cert_path, key_path = folder / f"{stem}.crt", folder / f"{stem}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + icert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return cert_path, key_path

    trusted, rogue = ca("edge test CA"), ca("rogue CA")
    ca_path = folder / "ca.pem"
    ca_path.write_bytes(trusted[1].public_bytes(serialization.Encoding.PEM))
    loop = x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
    return Pki(ca=ca_path,
               good=leaf("good", trusted, loop, now - hour, now + 24 * hour),
               unknown_ca=leaf("unknown-ca", rogue, loop, now - hour, now + 24 * hour),
               wrong_host=leaf("wrong-host", trusted, x509.DNSName("wrong.example"), now - hour, now + 24 * hour),
               expired=leaf("expired", trusted, loop, now - 48 * hour, now - 24 * hour))


def server_context(cert_key: tuple[Path, Path]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*cert_key)
    return ctx


# ---------------------------------------------------------------- HTTP(S) servers

Route = Callable[[http.server.BaseHTTPRequestHandler], None]
_RANGE = re.compile(r"^bytes=(\d+)-$")


class HostileServer:
    """Static files from ``root`` (with Range) plus per-path misbehaviour in ``routes``."""

    def __init__(self, root: Path, tls: ssl.SSLContext | None = None) -> None:
        self.root = root
        self.routes: dict[str, Route] = {}
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.stop_event = threading.Event()
        self.range_support = True
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True
            timeout = HOSTILE_MAX_S

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                server.requests.append((self.path, dict(self.headers.items())))
                with contextlib.suppress(BrokenPipeError, ConnectionResetError, TimeoutError, ssl.SSLError):
                    route = server.routes.get(self.path)
                    if route is not None:
                        route(self)
                    else:
                        server._static(self)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.scheme = "https" if tls is not None else "http"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def url(self, path: str) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}/{path.lstrip('/')}"

    def hits(self, path: str) -> list[dict[str, str]]:
        return [h for p, h in self.requests if p == "/" + path.lstrip("/")]

    def _static(self, h: http.server.BaseHTTPRequestHandler) -> None:
        rel = h.path.split("?", 1)[0].lstrip("/")
        p = (self.root / rel)
        if ".." in rel.split("/") or not p.is_file():
            send_status(h, 404)
            return
        body = p.read_bytes()
        m = _RANGE.match(h.headers.get("Range", ""))
        if m and self.range_support and int(m.group(1)) < len(body):
            start = int(m.group(1))
            h.send_response(206)
            h.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            body = body[start:]
        else:
            h.send_response(200)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def close(self) -> None:
        self.stop_event.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(SERVER_STOP_S)


def send_status(h: http.server.BaseHTTPRequestHandler, status: int, headers: dict[str, str] | None = None) -> None:
    h.send_response(status)
    for k, v in (headers or {}).items():
        h.send_header(k, v)
    h.send_header("Content-Length", "0")
    h.end_headers()


def trickle(server: HostileServer, total: int, interval_s: float) -> Route:
    """Announce ``total`` bytes, then send one every ``interval_s``."""
    def route(h: http.server.BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(total))
        h.end_headers()
        end = time.monotonic() + HOSTILE_MAX_S
        for _ in range(total):
            if server.stop_event.wait(interval_s) or time.monotonic() > end:
                return
            h.wfile.write(b"\x00")
            h.wfile.flush()
    return route


def stall(server: HostileServer, total: int) -> Route:
    """Announce ``total`` bytes, send a few, then nothing."""
    def route(h: http.server.BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(total))
        h.end_headers()
        h.wfile.write(b"\x00" * 16)
        h.wfile.flush()
        server.stop_event.wait(HOSTILE_MAX_S)
    return route


def endless(server: HostileServer, record: list[int]) -> Route:
    """Zeros without a length until the client goes away; ``record`` gets the bytes written."""
    def route(h: http.server.BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Connection", "close")
        h.end_headers()
        h.close_connection = True
        sent = 0
        chunk = b"\x00" * 65536
        try:
            while sent < ENDLESS_CAP_BYTES and not server.stop_event.is_set():
                h.wfile.write(chunk)
                sent += len(chunk)
        finally:
            record.append(sent)
    return route


def status_route(code: int, headers: dict[str, str] | None = None) -> Route:
    return lambda h: send_status(h, code, headers)


# ---------------------------------------------------------------- FTP


class FtpServer:
    """A real FTP server (pyftpdlib), anonymous and read-only, over ``root`` on loopback.

    ``write_limit_bps`` throttles what it sends; ``rest=False`` makes it refuse REST (resume);
    ``commands`` records every command it received.
    """

    def __init__(self, root: Path, write_limit_bps: int = 0, rest: bool = True) -> None:
        from pyftpdlib.authorizers import DummyAuthorizer
        from pyftpdlib.handlers import FTPHandler, ThrottledDTPHandler
        from pyftpdlib.servers import ThreadedFTPServer

        logging.getLogger("pyftpdlib").setLevel(logging.WARNING)
        auth = DummyAuthorizer()
        auth.add_anonymous(str(root))
        self.commands: list[str] = []
        record = self.commands

        class Handler(FTPHandler):  # type: ignore[misc]
            authorizer = auth
            timeout = HOSTILE_MAX_S
            banner = "edge test ftp"
            if write_limit_bps:
                dtp_handler = type("Dtp", (ThrottledDTPHandler,), {"write_limit": write_limit_bps})

            def pre_process_command(self, line: str, cmd: str, arg: str) -> None:
                record.append(line)
                super().pre_process_command(line, cmd, arg)

            if not rest:
                def ftp_REST(self, line: str) -> None:
                    self.respond("502 REST not implemented here.")

        handler = Handler
        self.server = ThreadedFTPServer(("127.0.0.1", 0), handler)
        self.port = int(self.server.address[1])
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"timeout": 0.1, "blocking": True, "handle_exit": False}, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"ftp://127.0.0.1:{self.port}/{path.lstrip('/')}"

    def close(self) -> None:
        self.server.close_all()
        self.thread.join(SERVER_STOP_S)


# ---------------------------------------------------------------- the device


class Device:
    """One real daemon (threshold 2 over fleet keys a, b, c), its broker and an observer."""

    def __init__(self, root: Path, broker: Mosquitto, fleet: Fleet, extra_toml: str = "",
                 threshold: int = 2) -> None:
        self.root = root
        self.fleet = fleet
        self.broker = broker
        self.proc = AgentProcess(root, broker.url, device_id=DEVICE, groups=(GROUP,), extra_toml=extra_toml)
        self.proc.write_config()
        text = self.proc.config.read_text()
        assert text.count('keys_dir = "trust"\n') == 1
        self.proc.config.write_text(text.replace('keys_dir = "trust"\n', f'keys_dir = "trust"\nthreshold = {threshold}\n'))
        for name, k in (("a", fleet.a), ("b", fleet.b), ("c", fleet.c)):
            self.proc.trust_key(public_pem(k.public_key()), name)
        self.obs = Observer(broker.host, broker.port)
        self.http = requests.Session()
        self.expected_serving: np.ndarray | None = None

    # -- lifecycle
    def start(self) -> None:
        self.proc.start()

    def stop(self) -> int:
        return self.proc.stop()

    def restart(self) -> None:
        assert self.stop() == 0, self.log_tail()
        self.start()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if self.proc.proc is not None and self.proc.proc.poll() is None:
                self.proc.stop()
        self.obs.close()
        self.http.close()

    def log_tail(self, n: int = 4000) -> str:
        return self.proc.log.read_text(errors="replace")[-n:]

    @property
    def trust_dir(self) -> Path:
        return self.root / "trust"

    @property
    def store(self) -> Path:
        return self.root / "state" / "store"

    # -- commands
    def updates(self, cid: str) -> list[dict[str, Any]]:
        return self.obs.find(lambda t, d: t == f"edge/{DEVICE}/jobs/{cid}")

    def send(self, envelope: bytes | str, topic: str | None = None) -> None:
        self.obs.publish(topic or f"edge/{DEVICE}/cmd", envelope)

    def run(self, cid: str, envelope: bytes | str, topic: str | None = None,
            timeout_s: float = JOB_TIMEOUT_S) -> dict[str, Any]:
        """Send a command and return its next final job update."""
        seen = {id(d) for d in self.updates(cid)}
        self.send(envelope, topic)
        return self.obs.wait(lambda t, d: t == f"edge/{DEVICE}/jobs/{cid}" and d.get("state") in TERMINAL
                             and id(d) not in seen, timeout_s=timeout_s, what=f"final update of {cid}")

    def refused_counts(self) -> dict[str, int]:
        """Messages refused before their signatures checked, by code (`agentctl status --json`)."""
        r = self.agentctl("status", "--json")
        assert r.returncode == 0, r.stderr
        return dict(json.loads(r.stdout)["commands"]["refused_unauthenticated"])

    def send_unanswered(self, cid: str, envelope: bytes | str, topic: str | None = None) -> None:
        """Send a message that must be refused before its signatures check: no job update goes
        out under ``cid``. A signed ping sent right after (same worker, handled in order) proves
        the message was handled, and it succeeds."""
        before = len(self.updates(cid))
        self.send(envelope, topic)
        pid, ping = self.fleet.command("ping", {})
        assert self.run(pid, ping)["state"] == "SUCCEEDED", self.log_tail()
        assert len(self.updates(cid)) == before, self.updates(cid)

    def deploy(self, manifest_url: str, model: str = MODEL, keys: list[Ed25519PrivateKey] | None = None,
               timeout_s: float = JOB_TIMEOUT_S, **params: Any) -> dict[str, Any]:
        cid, env = self.fleet.command("deploy", {"model": model, "manifest_url": manifest_url, **params}, keys)
        return self.run(cid, env, timeout_s=timeout_s)

    def status(self) -> dict[str, Any]:
        """The latest retained status document."""
        docs = self.obs.find(lambda t, d: t == f"edge/{DEVICE}/status")
        assert docs, "no status seen"
        return docs[-1]

    # -- local
    def agentctl(self, *args: str, timeout_s: float = 60) -> Any:
        return self.proc.agentctl(*args, timeout_s=timeout_s)

    def install(self, archive: Path) -> tuple[int, dict[str, Any]]:
        """``agentctl install ARCHIVE --json``: exit code and its JSON (a job or an error)."""
        r = self.agentctl("install", str(archive), "--json")
        try:
            doc = json.loads(r.stdout) if r.stdout.strip() else {}
        except ValueError:
            doc = {"_stdout": r.stdout}
        doc.setdefault("_stderr", r.stderr)
        return r.returncode, doc

    def set_kv(self, key: str, value: Any) -> None:
        """Write the daemon's state database directly, as a record it made earlier."""
        with contextlib.closing(sqlite3.connect(self.root / "state" / "state.db", timeout=10)) as db:
            db.execute("INSERT OR REPLACE INTO kv(key, value) VALUES (?, ?)", (key, json.dumps(value)))
            db.commit()

    def store_snapshot(self) -> tuple[frozenset[str], frozenset[str]]:
        """(objects, partial files) in the content-addressed store."""
        objs = frozenset(p.name for p in (self.store / "objects").glob("*/*"))
        parts = frozenset(p.name for p in (self.store / "partial").glob("*"))
        return objs, parts

    def infer(self) -> dict[str, Any]:
        body = {"inputs": [{"name": "x", "shape": list(X_IN.shape), "datatype": "FP32",
                            "data": X_IN.reshape(-1).tolist()}]}
        r = self.http.post(f"{self.proc.api}/v2/models/{MODEL}/infer", json=body, timeout=HTTP_TIMEOUT_S)
        assert r.status_code == 200, r.text
        return dict(r.json())

    def assert_serving(self, version: int) -> None:
        """The model still answers over KServe v2 with ``version`` and that version's outputs."""
        doc = self.infer()
        assert doc["model_version"] == str(version), f"serving v{doc['model_version']}, expected v{version}"
        out = doc["outputs"][0]
        got = np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
        assert self.expected_serving is not None
        np.testing.assert_allclose(got, self.expected_serving, rtol=1e-5, atol=1e-6)


def assert_refused(update: dict[str, Any], state: str, code: str, message: str | None = None) -> None:
    """A final job update says ``state`` with the stable ``code`` (and ``message`` in its text)."""
    err = update.get("error") or {}
    assert update.get("state") == state and err.get("code") == code, json.dumps(update)[:1500]
    if message is not None:
        assert message in str(err.get("message", "")), err


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, dirs_exist_ok=True)
    return dst


@contextlib.contextmanager
def servers(*items: Any) -> Iterator[None]:
    try:
        yield
    finally:
        for s in items:
            with contextlib.suppress(Exception):
                s.close()

