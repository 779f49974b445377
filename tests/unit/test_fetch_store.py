"""Downloads against real loopback HTTP(S) servers and file:// URLs; the content-addressed store."""

from __future__ import annotations

import datetime
import hashlib
import http.server
import ipaddress
import os
import re
import ssl
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agent import errors
from agent.bundles.fetch import Fetcher, FetchLimits, join_url
from agent.bundles.store import Store

FAST = FetchLimits(max_attempts=2, backoff_base_s=0.01, backoff_max_s=0.02, read_timeout_s=5,
                   connect_timeout_s=5)
BODY = bytes(range(256)) * 40  # 10240 bytes
SHA = hashlib.sha256(BODY).hexdigest()


@dataclass
class Behaviour:
    """What the test server does; the handler reads it and records what it saw."""

    files: dict[str, bytes] = field(default_factory=dict)
    range_support: bool = True
    wrong_content_range: bool = False
    status: dict[str, int] = field(default_factory=dict)  # path -> forced status
    redirects: dict[str, str] = field(default_factory=dict)  # path -> Location
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)


def _handler(b: Behaviour) -> type[http.server.BaseHTTPRequestHandler]:
    class H(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            b.requests.append((self.path, dict(self.headers.items())))
            if self.path in b.redirects:
                self.send_response(302)
                self.send_header("Location", b.redirects[self.path])
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if self.path in b.status:
                self.send_response(b.status[self.path])
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = b.files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            m = re.match(r"^bytes=(\d+)-$", self.headers.get("Range", ""))
            try:
                if m and b.range_support:
                    start = int(m.group(1))
                    shown = start + 1 if b.wrong_content_range else start
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {shown}-{len(body) - 1}/{len(body)}")
                    self.send_header("Content-Length", str(len(body) - start))
                    self.end_headers()
                    self.wfile.write(body[start:])
                else:
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass

    return H


class Server:
    def __init__(self, behaviour: Behaviour, tls: ssl.SSLContext | None = None) -> None:
        self.b = behaviour
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(behaviour))
        self.httpd.daemon_threads = True
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.scheme = "https" if tls else "http"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02},
                                       daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"{self.scheme}://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def hits(self, path: str) -> int:
        return sum(1 for p, _ in self.b.requests if p == path)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server(Behaviour(files={"/b/model.bin": BODY}))
    yield s
    s.close()


def _code(fn: Any) -> str:
    with pytest.raises(errors.AgentError) as ei:
        fn()
    return ei.value.code


# ---------------------------------------------------------------- file://


def test_file_url_download_verifies(tmp_path: Path) -> None:
    src = tmp_path / "src" / "model.bin"
    src.parent.mkdir()
    src.write_bytes(BODY)
    part = tmp_path / "dl" / "x.part"
    seen: list[int] = []
    Fetcher(FAST).download(src.as_uri(), part, len(BODY), SHA, progress=seen.append)
    assert part.read_bytes() == BODY
    assert seen and seen[-1] == len(BODY)


def test_file_url_longer_shorter_or_other_hash(tmp_path: Path) -> None:
    src = tmp_path / "model.bin"
    src.write_bytes(BODY)
    part = tmp_path / "x.part"
    f = Fetcher(FAST)
    short = BODY[:-1]
    assert _code(lambda: f.download(src.as_uri(), part, len(short), hashlib.sha256(short).hexdigest())) \
        == errors.SIZE_EXCEEDED
    assert not part.exists()
    assert _code(lambda: f.download(src.as_uri(), part, len(BODY) + 1, SHA)) == errors.HASH_MISMATCH
    assert not part.exists()
    assert _code(lambda: f.download(src.as_uri(), part, len(BODY), "0" * 64)) == errors.HASH_MISMATCH
    assert not part.exists()


def test_unsupported_scheme(tmp_path: Path) -> None:
    assert _code(lambda: Fetcher(FAST).download("gopher://x/y", tmp_path / "p", 1, SHA)) == errors.INVALID_COMMAND


def test_join_url() -> None:
    assert join_url("http://h:1/b/v7/manifest.json", "openvino/model.xml") == "http://h:1/b/v7/openvino/model.xml"
    assert join_url("file:///srv/b/manifest.json", "model.onnx") == "file:///srv/b/model.onnx"


# ---------------------------------------------------------------- http://


def test_http_download(server: Server, tmp_path: Path) -> None:
    part = tmp_path / "p" / "x.part"
    Fetcher(FAST).download(server.url("/b/model.bin"), part, len(BODY), SHA)
    assert part.read_bytes() == BODY
    _, headers = server.b.requests[-1]
    assert "Range" not in headers
    assert headers.get("Accept-Encoding") == "identity"


def test_http_more_bytes_than_listed(server: Server, tmp_path: Path) -> None:
    part = tmp_path / "x.part"
    listed = 1000
    code = _code(lambda: Fetcher(FAST).download(server.url("/b/model.bin"), part, listed,
                                                hashlib.sha256(BODY[:listed]).hexdigest()))
    assert code == errors.SIZE_EXCEEDED
    assert not part.exists()
    assert server.hits("/b/model.bin") == 1  # content errors are not retried


def test_http_wrong_hash(server: Server, tmp_path: Path) -> None:
    part = tmp_path / "x.part"
    assert _code(lambda: Fetcher(FAST).download(server.url("/b/model.bin"), part, len(BODY), "f" * 64)) \
        == errors.HASH_MISMATCH
    assert not part.exists()


def test_http_resume_with_range(server: Server, tmp_path: Path) -> None:
    part = tmp_path / "x.part"
    half = len(BODY) // 2 + 7
    part.write_bytes(BODY[:half])
    Fetcher(FAST).download(server.url("/b/model.bin"), part, len(BODY), SHA)
    assert part.read_bytes() == BODY
    assert server.hits("/b/model.bin") == 1
    _, headers = server.b.requests[-1]
    assert headers.get("Range") == f"bytes={half}-"


def test_http_server_ignoring_range_restarts_from_zero(server: Server, tmp_path: Path) -> None:
    server.b.range_support = False
    part = tmp_path / "x.part"
    part.write_bytes(b"\xee" * 3000)  # garbage: appending to it would fail the hash
    Fetcher(FAST).download(server.url("/b/model.bin"), part, len(BODY), SHA)
    assert part.read_bytes() == BODY
    assert server.b.requests[-1][1].get("Range") == "bytes=3000-"


def test_http_wrong_content_range_restarts_from_zero(server: Server, tmp_path: Path) -> None:
    server.b.wrong_content_range = True
    part = tmp_path / "x.part"
    part.write_bytes(b"\xee" * 100)
    Fetcher(FAST).download(server.url("/b/model.bin"), part, len(BODY), SHA)
    assert part.read_bytes() == BODY
    assert [h.get("Range") for _, h in server.b.requests] == ["bytes=100-", None]


def test_http_part_longer_than_listed_is_discarded(server: Server, tmp_path: Path) -> None:
    part = tmp_path / "x.part"
    part.write_bytes(b"\xee" * (len(BODY) + 5))
    Fetcher(FAST).download(server.url("/b/model.bin"), part, len(BODY), SHA)
    assert part.read_bytes() == BODY
    assert "Range" not in server.b.requests[-1][1]


def test_http_to_http_redirect_followed(server: Server, tmp_path: Path) -> None:
    server.b.redirects["/old/model.bin"] = "/b/model.bin"
    part = tmp_path / "x.part"
    Fetcher(FAST).download(server.url("/old/model.bin"), part, len(BODY), SHA)
    assert part.read_bytes() == BODY
    assert [p for p, _ in server.b.requests] == ["/old/model.bin", "/b/model.bin"]


def test_redirect_loop_is_bounded(server: Server, tmp_path: Path) -> None:
    server.b.redirects["/loop"] = "/loop"
    assert _code(lambda: Fetcher(FAST).download(server.url("/loop"), tmp_path / "p", 1, SHA)) \
        == errors.DOWNLOAD_FAILED
    assert server.hits("/loop") <= 10


def test_http_404_fails_without_retry(server: Server, tmp_path: Path) -> None:
    assert _code(lambda: Fetcher(FAST).download(server.url("/b/missing.bin"), tmp_path / "p", 10, SHA)) \
        == errors.DOWNLOAD_FAILED
    assert server.hits("/b/missing.bin") == 1


def test_http_500_retried_then_fails(server: Server, tmp_path: Path) -> None:
    server.b.status["/b/model.bin"] = 500
    with pytest.raises(errors.RejectError) as ei:
        Fetcher(FAST).download(server.url("/b/model.bin"), tmp_path / "p", len(BODY), SHA)
    assert ei.value.code == errors.DOWNLOAD_FAILED
    assert "gave up after 2 attempts" in ei.value.message
    assert server.hits("/b/model.bin") == FAST.max_attempts


def test_connection_refused_retried_then_fails(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(errors.RejectError) as ei:
        Fetcher(FAST).download(f"http://127.0.0.1:{port}/x", tmp_path / "p", 1, SHA)
    assert ei.value.code == errors.DOWNLOAD_FAILED
    assert "2 attempts" in ei.value.message


def test_fetch_bytes_caps(server: Server) -> None:
    f = Fetcher(FAST)
    assert f.fetch_bytes(server.url("/b/model.bin"), len(BODY)) == BODY
    assert _code(lambda: f.fetch_bytes(server.url("/b/model.bin"), 100, what="manifest")) \
        == errors.INVALID_MANIFEST
    assert _code(lambda: f.fetch_bytes(server.url("/b/model.bin"), 100, what="labels")) \
        == errors.SIZE_EXCEEDED
    assert _code(lambda: f.fetch_bytes(server.url("/nope"), 100)) == errors.DOWNLOAD_FAILED


# ---------------------------------------------------------------- https


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[Server, Path]]:
    cert, key = _self_signed(tmp_path)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    s = Server(Behaviour(files={"/b/model.bin": BODY}), tls=ctx)
    yield s, cert
    s.close()


def test_https_download_with_ca_bundle(tls_server: tuple[Server, Path], tmp_path: Path) -> None:
    srv, cert = tls_server
    part = tmp_path / "x.part"
    Fetcher(FAST, ca_bundle=str(cert)).download(srv.url("/b/model.bin"), part, len(BODY), SHA)
    assert part.read_bytes() == BODY


def test_https_unverified_certificate_refused(tls_server: tuple[Server, Path], tmp_path: Path) -> None:
    srv, _ = tls_server
    with pytest.raises(errors.RejectError) as ei:
        Fetcher(FAST).download(srv.url("/b/model.bin"), tmp_path / "x.part", len(BODY), SHA)
    assert ei.value.code == errors.DOWNLOAD_FAILED
    assert "TLS" in ei.value.message


def test_https_to_http_redirect_refused(tls_server: tuple[Server, Path], server: Server, tmp_path: Path) -> None:
    srv, cert = tls_server
    srv.b.redirects["/b/model.bin"] = server.url("/b/model.bin")
    with pytest.raises(errors.RejectError) as ei:
        Fetcher(FAST, ca_bundle=str(cert)).download(srv.url("/b/model.bin"), tmp_path / "x.part", len(BODY), SHA)
    assert ei.value.code == errors.DOWNLOAD_FAILED
    assert "leaves https" in ei.value.message
    assert server.hits("/b/model.bin") == 0  # the plain-http URL was never fetched


# ---------------------------------------------------------------- store


def _commit(store: Store, data: bytes) -> str:
    sha = hashlib.sha256(data).hexdigest()
    store.partial_path(sha).write_bytes(data)
    store.commit_partial(sha)
    return sha


def test_store_commit_has_link_and_collect(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    a, b, c = b"model bytes", b"labels\n", b"old model"
    sa, sb, sc = _commit(store, a), _commit(store, b), _commit(store, c)
    assert not store.partial_path(sa).exists()
    assert store.has(sa, len(a)) and store.has(sb, len(b))
    assert not store.has(sa, len(a) + 1)  # wrong size is not "have"
    assert not store.has("0" * 64, 1)
    obj = store.object_path(sa)
    assert obj.read_bytes() == a
    assert obj.parent.name == sa[:2]
    assert stat.S_IMODE(obj.stat().st_mode) == 0o444

    v1 = store.link_version("det", 1, {"old/model.onnx": sc})
    v2 = store.link_version("det", 2, {"model.onnx": sa, "meta/labels.txt": sb})
    assert v2 == store.version_dir("det", 2)
    assert (v2 / "model.onnx").read_bytes() == a
    assert (v2 / "model.onnx").stat().st_ino == obj.stat().st_ino
    assert (v2 / "meta" / "labels.txt").stat().st_ino == store.object_path(sb).stat().st_ino
    assert os.path.samefile(v1 / "old" / "model.onnx", store.object_path(sc))
    assert not list((store.versions / "det").glob(".*tmp"))

    # Relinking a version replaces its folder.
    store.link_version("det", 2, {"model.onnx": sa})
    assert not (v2 / "meta").exists()

    store.remove_version("det", 1)
    assert not v1.exists()
    freed = store.collect({sa, sb})
    assert freed == len(c)
    assert not store.object_path(sc).exists()
    assert store.has(sa, len(a)) and store.has(sb, len(b))
    assert store.usage_bytes() == len(a) + len(b)
    assert (v2 / "model.onnx").read_bytes() == a  # links of kept versions still work
