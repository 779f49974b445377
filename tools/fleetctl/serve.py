"""A static artifact server for development: serves a bundle folder over HTTP with Range support.

Not a production CDN: no TLS, no auth. It exists so a device (or a test) can fetch bundles the way
it would from S3 or a CDN, including resumable downloads.

Invariants:
- Only regular files under the root are served: the request path is percent-decoded, any ``..``
  segment is refused, and the resolved path (symlinks followed) must stay under the resolved root.
- HTTP/1.1 keep-alive with Nagle disabled (FIELD-NOTES: ~44 ms per request otherwise), an exact
  Content-Length on every response, and bodies streamed from disk in fixed chunks.
- One ``Range: bytes=a-b`` / ``bytes=a-`` / ``bytes=-n`` gives 206 with Content-Range; a start past
  the end gives 416; multiple ranges or a malformed header are ignored (200, whole file), as
  RFC 9110 allows.
"""

from __future__ import annotations

import contextlib
import email.utils
import logging
import mimetypes
import os
import re
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

log = logging.getLogger(__name__)

CHUNK_BYTES = 1024 * 1024
THROTTLE_SLICE_S = 0.05  # a throttled response sends rate × this many bytes, then sleeps this long
IDLE_TIMEOUT_S = 60.0  # a keep-alive connection idle this long is closed, freeing its thread
STOP_TIMEOUT_S = 5.0
SHUTDOWN_POLL_S = 0.1  # serve loop wake-up: bounds how long stop() waits, costs 10 idle wake-ups/s
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")


def parse_range(header: str | None, size: int) -> tuple[int, int] | bool | None:
    """The inclusive byte range asked for: ``(start, end)``, ``None`` (serve it all) or ``False``
    (unsatisfiable: 416)."""
    if not header:
        return None
    m = RANGE_RE.match(header.strip())
    if not m or (not m.group(1) and not m.group(2)):
        return None  # malformed or multi-range: ignore it
    first, last = m.group(1), m.group(2)
    if not first:  # suffix range: the last n bytes
        n = int(last)
        if n == 0:
            return False
        return (max(0, size - n), size - 1) if size else False
    start = int(first)
    end = int(last) if last else size - 1
    if last and end < start:
        return None
    if start >= size:
        return False
    return start, min(end, size - 1)


class _Handler(BaseHTTPRequestHandler):
    """GET/HEAD of files under ``server.root``."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    timeout = IDLE_TIMEOUT_S
    server_version = "fleetctl-serve"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        log.info("%s %s", self.address_string(), format % args)

    def _resolve(self) -> Path | None:
        """The file under the root this request names, or None (404)."""
        raw = urlsplit(self.path).path
        rel = unquote(raw)
        if "\x00" in rel or "\\" in rel:
            return None
        parts = [p for p in rel.split("/") if p not in ("", ".")]
        if any(p == ".." for p in parts):
            return None
        root = self.server.root
        try:
            p = root.joinpath(*parts).resolve()
        except (OSError, RuntimeError):
            return None
        if not p.is_relative_to(root) or not p.is_file():
            return None
        return p

    def _error(self, status: HTTPStatus, headers: dict[str, str] | None = None) -> None:
        body = f"{status.value} {status.phrase}\n".encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _serve(self, body: bool) -> None:
        path = self._resolve()
        if path is None:
            self._error(HTTPStatus.NOT_FOUND)
            return
        try:
            f = open(path, "rb")  # noqa: SIM115 (closed below, after streaming)
        except OSError:
            self._error(HTTPStatus.NOT_FOUND)
            return
        with f:
            st = os.fstat(f.fileno())
            size = st.st_size
            rng = parse_range(self.headers.get("Range"), size)
            if rng is False:
                self._error(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE,
                            {"Content-Range": f"bytes */{size}"})
                return
            ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            if isinstance(rng, tuple):
                start, end = rng
                self.send_response(HTTPStatus.PARTIAL_CONTENT)
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            else:
                start, end = 0, size - 1
                self.send_response(HTTPStatus.OK)
            length = end - start + 1
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(length))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Last-Modified", email.utils.formatdate(st.st_mtime, usegmt=True))
            self.send_header("ETag", f'"{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}"')
            self.end_headers()
            if not body or length <= 0:
                return
            f.seek(start)
            left = length
            while left > 0:
                rate = getattr(self.server, "throttle_bps", 0)
                chunk = f.read(min(CHUNK_BYTES if not rate else max(1, int(rate * THROTTLE_SLICE_S)), left))
                if not chunk:  # the file shrank under us: the length promised can't be kept
                    self.close_connection = True
                    return
                self.wfile.write(chunk)
                left -= len(chunk)
                if rate:
                    time.sleep(THROTTLE_SLICE_S)

    def do_GET(self) -> None:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self._serve(body=True)

    def do_HEAD(self) -> None:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self._serve(body=False)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False

    def __init__(self, addr: tuple[str, int], root: Path) -> None:
        self.root = root
        self.throttle_bps = 0.0  # 0: full speed; else bytes/s per response (simulates a slow link)
        super().__init__(addr, _Handler)


class ArtifactServer:
    """Serve ``root`` on ``host:port`` (port 0: any free port) in a background thread."""

    def __init__(self, root: Path | str, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise NotADirectoryError(f"{root}: not a directory")
        self.host = host
        self._port = port
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (the real one once started, also when asked for 0)."""
        return int(self._httpd.server_address[1]) if self._httpd else self._port

    @property
    def throttle_bps(self) -> float:
        """Bytes per second per response; 0 is full speed (`fleetctl serve --rate`)."""
        return self._httpd.throttle_bps if self._httpd else 0.0

    @throttle_bps.setter
    def throttle_bps(self, rate: float) -> None:
        if self._httpd is not None:
            self._httpd.throttle_bps = rate

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def start(self) -> ArtifactServer:
        """Bind and serve in a daemon thread; OSError if the address is taken."""
        if self._httpd is not None:
            return self
        self._httpd = _Server((self.host, self._port), self.root)
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(SHUTDOWN_POLL_S,),
                                        name="fleetctl-serve", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting and close the listening socket (open connections are daemon threads)."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(STOP_TIMEOUT_S)
            self._thread = None

    def serve_forever(self) -> None:
        """Serve in the calling thread until KeyboardInterrupt (the CLI)."""
        self.start()
        assert self._thread is not None
        try:
            while self._thread.is_alive():
                self._thread.join(1.0)
        finally:
            self.stop()

    def __enter__(self) -> ArtifactServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
