"""Local inference API: KServe v2 / Open Inference Protocol over HTTP/1.1 (stdlib only).

Endpoints (SURFACE.md, "Local inference API"): ``GET /v2/health/live``, ``GET /v2/health/ready``,
``GET /v2``, ``GET /v2/models/{name}[/versions/{v}]``, ``GET /v2/models/{name}[/versions/{v}]/ready``,
``POST /v2/models/{name}[/versions/{v}]/infer`` (JSON tensors and the binary tensor extension,
``Inference-Header-Content-Length``) and ``GET /metrics``.

Invariants:
- Every response carries ``Content-Length``; connections are HTTP/1.1 keep-alive, and the handler
  disables Nagle's algorithm (FIELD-NOTES: ~44 ms per keep-alive request otherwise).
- An infer request is bound to one serving version for its whole life (``Registry.infer``); a model
  swap never fails an in-flight request.
- Errors are JSON ``{"error": message, "code": stable_code}`` with a status from the code:
  ``invalid_input`` 400, ``unknown_model`` 404, ``size_exceeded`` 413, anything else 500. A failed
  request never stops the server.
- A body larger than ``max_body_bytes`` is refused with 413 before it is buffered; the body is
  discarded (up to ``DISCARD_MAX_BYTES``) so the connection stays usable, or the connection closes.
- Binary tensors are little-endian and packed in the order of the inputs/outputs that name a
  ``binary_data_size``. BYTES tensors are not supported (400).
- Nothing is logged per request above DEBUG; numpy is imported lazily, only when a request needs it.
- ``stop()`` stops accepting, lets in-flight requests finish within its timeout, then closes idle
  keep-alive connections; it is bounded.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import socket
import socketserver
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import unquote

import agent
from agent import errors

if TYPE_CHECKING:
    import numpy as np

from agent.serving.admission import RETRY_AFTER_S
from agent.serving.registry import Registry, ServingVersion

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8470
MAX_BODY_BYTES = 64 * 1024 * 1024  # largest request body accepted (413 above)
DISCARD_MAX_BYTES = 8 * 1024 * 1024  # a refused body up to this size is read and dropped; keep-alive survives
LINGER_MAX_BYTES = 8 * 1024 * 1024  # after a 413 that closes, read at most this much before closing
LINGER_TIMEOUT_S = 1.0  # ... and for at most this long (so the client sees the 413, not a reset)
IDLE_TIMEOUT_S = 120.0  # a connection idle (or a body stalled) this long is closed
POLL_INTERVAL_S = 0.2  # accept loop's shutdown check period; bounds how long stop() waits for it
REQUEST_QUEUE_SIZE = 128  # listen() backlog
CHUNK_BYTES = 64 * 1024  # read/write granularity for discarding and large bodies
WRITE_JOIN_MAX_BYTES = 64 * 1024  # bodies up to this size go out in the same send as the headers
HEADER_LENGTH = "Inference-Header-Content-Length"
HEADER_LENGTH_KEY = HEADER_LENGTH.lower()
MAX_HEADERS = 100  # header lines per request (as the stdlib's http.client)
MAX_HEADER_LINE_BYTES = 65536  # one header line, bytes
JSON_TYPE = "application/json"
BINARY_TYPE = "application/octet-stream"
EXTENSIONS = ("binary_tensor_data",)

# Error codes of the HTTP layer (the agent's codes in agent.errors cover the rest).
NOT_FOUND = "not_found"
METHOD_NOT_ALLOWED = "method_not_allowed"
NOT_READY = "not_ready"

_STATUS_BY_CODE = {errors.INVALID_INPUT: 400, errors.UNKNOWN_MODEL: 404,
                   errors.SIZE_EXCEEDED: 413, NOT_FOUND: 404, METHOD_NOT_ALLOWED: 405,
                   NOT_READY: 503, errors.TOO_LARGE: 413, errors.BUSY: 503}
_RETRY_AFTER = (("Retry-After", str(RETRY_AFTER_S)),)

# KServe v2 datatype ↔ numpy dtype name (the names TensorSpec.dtype uses).
KSERVE_TO_NUMPY = {"BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32",
                   "UINT64": "uint64", "INT8": "int8", "INT16": "int16", "INT32": "int32",
                   "INT64": "int64", "FP16": "float16", "FP32": "float32", "FP64": "float64"}
NUMPY_TO_KSERVE = {v: k for k, v in KSERVE_TO_NUMPY.items()}
_BYTES_DTYPES = {"tensor(string)", "string", "str", "object", "bytes"}

_FRAMING_HEADERS = frozenset({"content-length", "transfer-encoding", HEADER_LENGTH_KEY})
_REASONS = {s.value: s.phrase for s in HTTPStatus}


class ListenAddressError(errors.ConfigError, ValueError):
    """A listen address that does not parse; both a ConfigError and a ValueError."""


def parse_listen(s: str) -> tuple[str, int]:
    """``"127.0.0.1:8470"``, ``"[::1]:8470"``, ``"localhost:0"`` → ``(host, port)``."""
    text = s.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or not text[end + 1:].startswith(":"):
            raise ListenAddressError(f"listen address {s!r}: expected [IPv6]:port")
        host, port_s = text[1:end], text[end + 2:]
    else:
        host, sep, port_s = text.rpartition(":")
        if not sep:
            raise ListenAddressError(f"listen address {s!r}: expected host:port")
        if ":" in host:
            raise ListenAddressError(f"listen address {s!r}: an IPv6 host needs brackets, e.g. [::1]:8470")
    if not host:
        raise ListenAddressError(f"listen address {s!r}: the host is empty")
    if not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise ListenAddressError(f"listen address {s!r}: port must be 0-65535")
    return host, int(port_s)


class _HttpError(Exception):
    """A request that fails at the HTTP layer, with its status and stable code."""

    def __init__(self, status: int, code: str, message: str,
                 headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


def _invalid(message: str) -> errors.RejectError:
    return errors.RejectError(errors.INVALID_INPUT, message)


class _Response:
    __slots__ = ("body", "content_type", "headers", "status")

    def __init__(self, status: int, body: bytes | list[bytes], content_type: str = JSON_TYPE,
                 headers: tuple[tuple[str, str], ...] = ()) -> None:
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers


_ENCODER = json.JSONEncoder(separators=(",", ":"))
_DECODER = json.JSONDecoder()


def _json(obj: Any) -> bytes:
    return _ENCODER.encode(obj).encode()


def _error(status: int, code: str, message: str,
           headers: tuple[tuple[str, str], ...] = ()) -> _Response:
    return _Response(status, _json({"error": message, "code": code}), JSON_TYPE, headers)


def _kserve_dtype(dtype: str) -> str:
    if dtype in NUMPY_TO_KSERVE:
        return NUMPY_TO_KSERVE[dtype]
    if dtype in _BYTES_DTYPES:
        return "BYTES"
    return dtype.upper()


_date_cache: list[Any] = [0, ""]


_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _http_date() -> str:
    """IMF-fixdate (RFC 9110), cached per second."""
    now = int(time.time())
    if _date_cache[0] != now:
        t = time.gmtime(now)
        _date_cache[1] = (f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year} "
                          f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT")
        _date_cache[0] = now
    return cast(str, _date_cache[1])


# ---------------------------------------------------------------------------------------------
# tensor codecs (numpy imported lazily)


def _parse_shape(name: str, shape: Any) -> list[int]:
    if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise _invalid(f"input {name!r}: shape must be a list of non-negative integers, got {shape!r}")
    return shape


def _all_ints(data: Any) -> bool:
    """Whether a nested list holds only integers (the slow path, for error messages only)."""
    if isinstance(data, list):
        return all(_all_ints(d) for d in data)
    return isinstance(data, int) and not isinstance(data, bool)


def _tensor_from_json(name: str, datatype: str, np_dtype: str, shape: list[int],
                      data: Any) -> np.ndarray:
    import numpy as np

    n = math.prod(shape)
    try:
        a = np.asarray(data)
    except (ValueError, TypeError) as e:
        raise _invalid(f"input {name!r}: data is not a rectangular list of numbers ({e})") from e
    if a.size != n:
        raise _invalid(f"input {name!r}: shape {shape} has {n} element(s), data has {a.size}")
    target = np.dtype(np_dtype)
    if a.size:
        kind = a.dtype.kind
        if target.kind == "b":
            ok = kind == "b"
        elif target.kind in "iu":
            ok = kind in "iu"
        else:
            ok = kind in "fiu"
        if not ok and target.kind in "iu" and kind in "fO" and _all_ints(data):
            # numpy turns integers beyond int64 into float64 or object: a range error, not a type one
            raise _invalid(f"input {name!r}: a value is out of the {datatype} range")
        if not ok:
            what = {"b": "booleans", "f": "non-integer numbers", "i": "integers", "u": "integers",
                    "U": "strings"}.get(kind, "non-numeric values")
            raise _invalid(f"input {name!r}: datatype {datatype}, but data holds {what}")
        if target.kind in "iu":
            info = np.iinfo(target)
            if a.min() < info.min or a.max() > info.max:
                raise _invalid(f"input {name!r}: a value is out of the {datatype} range "
                               f"[{info.min}, {info.max}]")
    return a.astype(target, copy=False).reshape(shape)


def _tensor_from_binary(name: str, datatype: str, np_dtype: str, shape: list[int],
                        buf: memoryview) -> np.ndarray:
    import numpy as np

    target = np.dtype(np_dtype).newbyteorder("<")
    need = math.prod(shape) * target.itemsize
    if len(buf) != need:
        raise _invalid(f"input {name!r}: shape {shape} of {datatype} needs {need} byte(s), "
                       f"binary_data_size is {len(buf)}")
    a = np.frombuffer(buf, dtype=target).reshape(shape)
    if not target.isnative:
        a = a.astype(target.newbyteorder("="))
    elif not a.flags.aligned:
        a = a.copy()  # the JSON header's length decides the offset; runtimes want aligned data
    return a


_OUT_DATATYPES: dict[Any, str | None] = {}  # numpy dtype → KServe datatype; str(dtype) is slow


def _out_datatype(dtype: Any) -> str | None:
    dt = _OUT_DATATYPES.get(dtype, "")
    if dt == "":
        dt = _OUT_DATATYPES[dtype] = NUMPY_TO_KSERVE.get(str(dtype))
    return dt


def _tensor_to_binary(a: np.ndarray) -> bytes:
    import numpy as np

    le = a.dtype.newbyteorder("<")
    return np.ascontiguousarray(a, dtype=le).tobytes()


# ---------------------------------------------------------------------------------------------
# connections handed between the daemon and a model's worker process


def infer_target(target: str) -> tuple[str, str | None] | None:
    """``/v2/models/{name}[/versions/{v}]/infer`` → ``(name, v)``; None for any other path."""
    path = target.split("?", 1)[0]
    if len(path) > 1 and path.endswith("/"):
        path = path[:-1]
    parts = path.split("/")
    if "%" in path:
        parts = [unquote(p) for p in parts]
    n = len(parts)
    if n == 5 and parts[4] == "infer" and parts[1] == "v2" and parts[2] == "models" and parts[3]:
        return parts[3], None
    if (n == 7 and parts[6] == "infer" and parts[1] == "v2" and parts[2] == "models" and parts[3]
            and parts[4] == "versions"):
        return parts[3], parts[5]
    return None


class _PrefixRaw(io.RawIOBase):
    """Raw stream: ``prefix`` first, then the socket (its timeout applies). While ``peeking``,
    an empty prefix reads as "nothing available" instead of waiting."""

    def __init__(self, sock: socket.socket, prefix: bytes) -> None:
        self._sock = sock
        self._prefix: memoryview | None = memoryview(prefix) if prefix else None
        self.peeking = False

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int | None:
        p = self._prefix
        if p is not None:
            n = min(len(b), len(p))
            b[:n] = p[:n]
            self._prefix = p[n:] if n < len(p) else None
            return n
        if self.peeking:
            return None
        return self._sock.recv_into(b)

    def rest(self) -> bytes:
        return bytes(self._prefix) if self._prefix is not None else b""


class ConnReader(io.BufferedReader):
    """The ``rfile`` of a connection that arrives with bytes already read from it (handed over
    between the daemon and a worker): those first, then the socket. A C buffered reader (its
    readline is what every request pays) that also tells what it holds unread."""

    def __init__(self, sock: socket.socket, prefix: bytes = b"") -> None:
        self._src = _PrefixRaw(sock, prefix)
        super().__init__(self._src, CHUNK_BYTES)

    def unread(self) -> bytes:
        """What was read from the socket but not consumed (a pipelined request), without blocking."""
        self._src.peeking = True
        try:
            return bytes(self.peek()) + self._src.rest()
        finally:
            self._src.peeking = False


def _unread(rfile: Any, sock: socket.socket) -> bytes:
    """Bytes buffered in ``rfile`` and not consumed yet, without blocking and without consuming."""
    if isinstance(rfile, ConnReader):
        return rfile.unread()
    timeout = sock.gettimeout()
    sock.settimeout(0.0)  # peek() on an empty buffer then reads nothing instead of waiting
    try:
        return bytes(rfile.peek())
    finally:
        sock.settimeout(timeout)


# ---------------------------------------------------------------------------------------------
# HTTP plumbing


class _HTTPServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    """A thread per connection (the stdlib's ThreadingHTTPServer without http.server's imports)."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = REQUEST_QUEUE_SIZE
    app: KServeServer

    def server_bind(self) -> None:
        # (http.server's HTTPServer.server_bind calls getfqdn(), a reverse DNS lookup that can hang.)
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def shutdown_request(self, request: Any) -> None:
        # A connection handed to a worker lives on there: no shutdown(), which would end it for
        # both; the worker's model (IsolatedModel) holds the daemon's copy of the socket.
        if self.app._handed.pop(request, False):
            return
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):  # resets, broken pipes, timeouts: the client went away
            log.debug("kserve: connection %s: %s", client_address, exc)
        else:
            log.warning("kserve: connection %s failed", client_address, exc_info=True)


class _HTTPServer6(_HTTPServer):
    address_family = socket.AF_INET6


class _Handler(socketserver.StreamRequestHandler):
    """KServe's request handler: the request loop of the stdlib's BaseHTTPRequestHandler without
    importing http.server (html entities, mimetypes: ≈ 0.7 MB of the daemon's RSS), a header
    parser without the email module, and one send per response."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    timeout = IDLE_TIMEOUT_S
    default_request_version = "HTTP/0.9"
    close_connection: bool
    raw_requestline: bytes
    requestline: str
    request_version: str
    command: str
    path: str

    def handle(self) -> None:
        self.close_connection = True
        self.handle_one_request()
        while not self.close_connection:
            self.handle_one_request()

    def handle_one_request(self) -> None:
        try:
            self.raw_requestline = self.rfile.readline(65537)
            if len(self.raw_requestline) > 65536:
                self.requestline = self.request_version = self.command = ""
                self.send_error(414)
                return
            if not self.raw_requestline:
                self.close_connection = True
                return
            if not self.parse_request():
                return
            method = getattr(self, "do_" + self.command, None)
            if method is None:
                self.send_error(501, f"unsupported method {self.command!r}")
                return
            method()
            self.wfile.flush()
        except TimeoutError as e:
            self.log_message("request timed out: %r", e)
            self.close_connection = True

    def address_string(self) -> str:
        return str(self.client_address[0])

    _app: KServeServer
    _unread_body: bool
    hdrs: dict[str, str]

    def setup(self) -> None:
        super().setup()
        self._app = cast(_HTTPServer, self.server).app
        self._unread_body = False
        self._handed = False
        self._head: list[bytes] = []
        self.hdrs = {}
        prefix = self._app._prefixes.pop(self.connection, None)
        if prefix is not None:  # a connection given back by a worker, with the bytes it had read
            self.rfile.close()
            self.rfile = ConnReader(self.connection, prefix)
        self._app._track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self._app._track(self.connection, False)

    # -- quiet: nothing per request above DEBUG
    def log_message(self, format: str, *args: Any) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("kserve %s: " + format, self.address_string(), *args)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # Used by BaseHTTPRequestHandler for malformed request lines/headers and unknown methods.
        self.close_connection = True
        text = message or _REASONS.get(code, "error")
        if code == 501:
            code, err = 405, METHOD_NOT_ALLOWED
        else:
            err = NOT_FOUND if code == 404 else errors.INVALID_INPUT
        self._write(_error(code, err, text))

    def parse_request(self) -> bool:
        """The request line and headers, without the stdlib's email parser (~40 µs a request).

        Headers land in ``self.hdrs`` keyed by lower-case name; a repeated framing header
        (Content-Length, Transfer-Encoding, the binary header length) is refused (smuggling).
        """
        self.command = None  # type: ignore[assignment]  # read by send_error before a command exists
        self.request_version = self.default_request_version
        self.close_connection = True
        line = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        self.requestline = line
        words = line.split()
        if not words:
            return False
        if len(words) != 3:
            self.send_error(400, f"bad request line {line!r}")
            return False
        command, path, version = words
        if version == "HTTP/1.1":
            self.close_connection = False
        elif version != "HTTP/1.0":
            self.send_error(505 if version.startswith("HTTP/") else 400,
                            f"unsupported HTTP version {version!r}")
            return False
        self.command, self.path, self.request_version = command, path, version
        if path.startswith("//"):
            self.path = "/" + path.lstrip("/")
        hdrs: dict[str, str] = {}
        rfile = self.rfile
        head = self._head = [self.raw_requestline]  # the raw bytes, to hand the request on unparsed
        for _ in range(MAX_HEADERS + 1):
            raw = rfile.readline(MAX_HEADER_LINE_BYTES + 1)
            head.append(raw)
            if len(raw) > MAX_HEADER_LINE_BYTES:
                self.send_error(431, "header line too long")
                return False
            if raw in (b"\r\n", b"\n", b""):
                break
            key, sep, value = str(raw, "iso-8859-1").partition(":")
            key = key.lower()
            if not sep or not key or key != key.strip() or key[0] in " \t":
                self.send_error(400, f"malformed header line {raw[:80]!r}")
                return False
            value = value.strip()
            if key in hdrs:
                if key in _FRAMING_HEADERS:
                    self.send_error(400, f"repeated {key} header")
                    return False
                value = f"{hdrs[key]}, {value}"
            hdrs[key] = value
        else:
            self.send_error(431, f"more than {MAX_HEADERS} headers")
            return False
        self.hdrs = hdrs
        conn = hdrs.get("connection", "").lower()
        if "close" in conn:
            self.close_connection = True
        elif "keep-alive" in conn:
            self.close_connection = False
        if version == "HTTP/1.1" and hdrs.get("expect", "").lower() == "100-continue":
            return self.handle_expect_100()
        return True

    def handle_expect_100(self) -> bool:
        length = self.hdrs.get("content-length")
        limit = self._app.body_limit(self.command, self.path)
        if length is not None and length.strip().isdigit() and int(length) > limit:
            self.close_connection = True  # the client may send the body anyway: do not parse it
            self._write(self._too_large(int(length), limit))
            return False
        self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return True

    def do_GET(self) -> None:
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_GET

    def _dispatch(self) -> None:
        app = self._app
        if self.command == "POST" and "expect" not in self.hdrs and app._hand_off(self):
            return
        app._enter()
        try:
            got = self._read_body()
            if isinstance(got, _Response):
                resp = got
            else:
                resp = app._respond(self.command, self.path, self.hdrs, got)
            if app._stopping:
                self.close_connection = True
            self._write(resp)
            if self._unread_body:
                self._linger()
        finally:
            app._leave()

    def _too_large(self, length: int, limit: int) -> _Response:
        if limit < self._app.max_body_bytes:  # the model's own bound (agent/serving/admission.py)
            return _error(413, errors.TOO_LARGE, f"request body is {length} bytes; this model takes at most {limit}")
        return _error(413, errors.SIZE_EXCEEDED, f"request body is {length} bytes; the limit is {limit}")

    def _read_body(self) -> bytes | _Response:
        headers = self.hdrs
        te = headers.get("transfer-encoding")
        if te is not None:
            if te.strip().lower() != "chunked":
                self.close_connection = True
                return _error(400, errors.INVALID_INPUT, f"Transfer-Encoding {te!r} is not supported")
            return self._read_chunked()
        cl = headers.get("content-length")
        if cl is None:
            return b""
        cl = cl.strip()
        if not cl.isdigit():
            self.close_connection = True
            return _error(400, errors.INVALID_INPUT, f"bad Content-Length {cl!r}")
        n = int(cl)
        limit = self._app.body_limit(self.command, self.path)
        if n > limit:
            if n <= DISCARD_MAX_BYTES:
                left = n
                while left > 0:
                    chunk = self.rfile.read(min(left, CHUNK_BYTES))
                    if not chunk:
                        self.close_connection = True
                        break
                    left -= len(chunk)
            else:
                self.close_connection = True
                self._unread_body = True
            return self._too_large(n, limit)
        body = self.rfile.read(n) if n else b""
        if len(body) != n:
            self.close_connection = True
            return _error(400, errors.INVALID_INPUT, f"request body ended after {len(body)} of {n} bytes")
        return body

    def _read_chunked(self) -> bytes | _Response:
        cap = self._app.body_limit(self.command, self.path)
        parts: list[bytes] = []
        total = 0
        rfile = self.rfile
        while True:
            line = rfile.readline(1024)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                self.close_connection = True
                return _error(400, errors.INVALID_INPUT, "malformed chunked body")
            if size == 0:
                while rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                    pass  # trailers, ignored
                return b"".join(parts)
            total += size
            if total > cap:
                self.close_connection = True
                self._unread_body = True
                return _error(413, errors.TOO_LARGE if cap < self._app.max_body_bytes else errors.SIZE_EXCEEDED,
                              f"chunked request body exceeds the limit of {cap} bytes")
            data = rfile.read(size)
            rfile.readline(3)
            if len(data) != size:
                self.close_connection = True
                return _error(400, errors.INVALID_INPUT, "chunked body ended early")
            parts.append(data)

    def _write(self, resp: _Response) -> None:
        body = resp.body
        length = len(body) if isinstance(body, bytes) else sum(len(p) for p in body)
        head = [f"HTTP/1.1 {resp.status} {_REASONS.get(resp.status, '')}\r\n"
                f"Server: {self._app.server_header}\r\n"
                f"Date: {_http_date()}\r\n"
                f"Content-Type: {resp.content_type}\r\n"
                f"Content-Length: {length}\r\n"]
        for k, v in resp.headers:
            head.append(f"{k}: {v}\r\n")
        if self.close_connection:
            head.append("Connection: close\r\n")
        elif self.request_version == "HTTP/1.0":
            head.append("Connection: keep-alive\r\n")
        head.append("\r\n")
        head_b = "".join(head).encode("latin-1")
        if getattr(self, "command", None) == "HEAD":
            self.wfile.write(head_b)
            return
        parts = [body] if isinstance(body, bytes) else body
        if length <= WRITE_JOIN_MAX_BYTES:
            self.wfile.write(b"".join([head_b, *parts]))
        else:
            self.wfile.write(head_b)
            for p in parts:
                self.wfile.write(p)

    def _linger(self) -> None:
        """After a refusal that closes: read what the client still sends so it sees the reply."""
        try:
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(LINGER_TIMEOUT_S)
            deadline = time.monotonic() + LINGER_TIMEOUT_S
            got = 0
            while got < LINGER_MAX_BYTES and time.monotonic() < deadline:
                chunk = self.rfile.read1(CHUNK_BYTES)
                if not chunk:
                    break
                got += len(chunk)
        except OSError:
            pass


# ---------------------------------------------------------------------------------------------
# the server


class KServeServer:
    """KServe v2 HTTP front end of a Registry; ``start()`` serves on a background thread."""

    def __init__(self, registry: Registry, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                 server_name: str = "edge-agent", server_version: str = agent.__version__,
                 ready_fn: Callable[[], bool] | None = None,
                 metrics_fn: Callable[[], tuple[bytes, str]] | None = None,
                 max_body_bytes: int = MAX_BODY_BYTES) -> None:
        self.registry = registry
        self.host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        self._port = port
        self.server_name = server_name
        self.server_version = server_version
        self.server_header = f"{server_name}/{server_version}"
        self.max_body_bytes = max_body_bytes
        self._ready_fn = ready_fn
        self._metrics_fn = metrics_fn
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._cv = threading.Condition()
        self._inflight = 0
        self._conns: set[socket.socket] = set()
        self._prefixes: dict[socket.socket, bytes] = {}  # resumed connections → bytes already read
        self._handed: dict[socket.socket, bool] = {}  # connections now served by a worker
        self._meta_cache: dict[str, tuple[weakref.ref[ServingVersion], bytes]] = {}
        self._server_meta = _json({"name": server_name, "version": server_version,
                                   "extensions": list(EXTENSIONS)})

    # -- lifecycle

    @property
    def port(self) -> int:
        """The bound port once started (port 0 picks one), else the configured one."""
        return self._httpd.server_port if self._httpd is not None else self._port

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> None:
        """Bind and listen, then serve on a daemon thread; returns once the socket listens."""
        if self._httpd is not None:
            raise RuntimeError("KServeServer already started")
        cls = _HTTPServer6 if ":" in self.host else _HTTPServer
        try:
            httpd = cls((self.host, self._port), _Handler)
        except OSError as e:
            raise errors.ConfigError(f"inference API: cannot listen on {self.host}:{self._port}: {e}") from e
        httpd.app = self
        self._stopping = False
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, args=(POLL_INTERVAL_S,),
                                        name="kserve-http", daemon=True)
        self._thread.start()
        log.info("inference API (KServe v2) listening on %s", self.url)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop accepting, let in-flight requests finish (bounded by ``timeout_s``), close."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        deadline = time.monotonic() + timeout_s
        self._stopping = True
        httpd.shutdown()  # the accept loop ends within POLL_INTERVAL_S
        httpd.server_close()
        with self._cv:
            if not self._cv.wait_for(lambda: self._inflight == 0,
                                     timeout=max(0.0, deadline - time.monotonic())):
                log.warning("inference API: %d request(s) still in flight after %.1f s; closing",
                            self._inflight, timeout_s)
            conns = list(self._conns)
        for c in conns:  # wakes handlers idle in keep-alive reads
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
            self._thread = None
        log.info("inference API stopped")

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._cv:
            if add:
                self._conns.add(conn)
            else:
                self._conns.discard(conn)

    def _enter(self) -> None:
        with self._cv:
            self._inflight += 1

    def _leave(self) -> None:
        with self._cv:
            self._inflight -= 1
            if self._inflight == 0:
                self._cv.notify_all()

    def body_limit(self, method: str, target: str) -> int:
        """The largest body read for this request: an infer's model bound, else ``max_body_bytes``."""
        t = infer_target(target) if method == "POST" else None
        return self.max_body_bytes if t is None else self.registry.body_limit(t[0], self.max_body_bytes)

    # -- connections served by a model's worker (process isolation)

    def _hand_off(self, h: _Handler) -> bool:
        """Give the connection to the worker that runs the model it asks for: the worker answers
        this and the following infer requests itself, without a second hop through the daemon
        (agent/backends/isolated.py). False when no worker can take it: the daemon serves it."""
        t = infer_target(h.path)
        if t is None or self._stopping:
            return False
        sv = self.registry.get(t[0])
        adopt = getattr(sv.model, "adopt", None) if sv is not None else None
        if adopt is None or sv is None or (t[1] is not None and t[1] != str(sv.version)):
            return False
        prefix = b"".join(h._head) + _unread(h.rfile, h.connection)
        self._handed[h.connection] = True
        if not adopt(h.connection, prefix, self):
            self._handed.pop(h.connection, None)
            return False
        h._handed = True
        h.close_connection = True
        return True

    def resume_connection(self, sock: socket.socket, prefix: bytes) -> None:
        """Serve a connection a worker gave back (a request it does not serve, a swap, its death),
        starting with the bytes it had already read."""
        httpd = self._httpd
        if httpd is None or self._stopping:
            sock.close()
            return
        self._prefixes[sock] = prefix
        try:
            addr = sock.getpeername()
        except OSError:
            addr = ("", 0)
        httpd.process_request(sock, addr)  # a handler thread, as for an accepted connection

    def fail_connection(self, sock: socket.socket, code: str, message: str) -> None:
        """Answer the request a dead worker left unanswered with an error, then close."""
        resp = _error(_STATUS_BY_CODE.get(code, 500), code, message)
        body = resp.body if isinstance(resp.body, bytes) else b"".join(resp.body)
        head = (f"HTTP/1.1 {resp.status} {_REASONS.get(resp.status, '')}\r\nServer: {self.server_header}\r\n"
                f"Date: {_http_date()}\r\nContent-Type: {resp.content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode("latin-1")
        with contextlib.suppress(OSError):
            sock.settimeout(1.0)
            sock.sendall(head + body)
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()

    # -- routing

    def _respond(self, method: str, target: str, headers: dict[str, str], body: bytes) -> _Response:
        """One request → one response; never raises."""
        try:
            return self._route(method, target, headers, body)
        except _HttpError as e:
            return _error(e.status, e.code, e.message, e.headers)
        except errors.AgentError as e:
            return _error(_STATUS_BY_CODE.get(e.code, 500), e.code, e.message,
                          _RETRY_AFTER if e.code == errors.BUSY else ())
        except Exception as e:
            log.exception("inference API: %s %s failed", method, target)
            return _error(500, errors.INTERNAL, f"internal error: {type(e).__name__}: {e}")

    def _route(self, method: str, target: str, headers: dict[str, str], body: bytes) -> _Response:
        path = target.split("?", 1)[0]
        if len(path) > 1 and path.endswith("/"):
            path = path[:-1]
        parts = path.split("/")[1:] if path.startswith("/") else [""]  # "*", absolute-form: 404
        if "%" in path:
            parts = [unquote(p) for p in parts]
        n = len(parts)
        get = method in ("GET", "HEAD")

        if parts[0] == "v2":
            if n == 1:
                self._allow(get, "GET")
                return _Response(200, self._server_meta)
            if parts[1] == "health" and n == 3:
                if parts[2] == "live":
                    self._allow(get, "GET")
                    return _Response(200, b'{"live":true}')
                if parts[2] == "ready":
                    self._allow(get, "GET")
                    if self._ready():
                        return _Response(200, b'{"ready":true}')
                    return _Response(503, b'{"ready":false}')
            if parts[1] == "models" and n >= 3 and parts[2]:
                name = parts[2]
                rest = parts[3:]
                version: str | None = None
                if len(rest) >= 2 and rest[0] == "versions":
                    version, rest = rest[1], rest[2:]
                if not rest:
                    self._allow(get, "GET")
                    return _Response(200, self._metadata(self._serving(name, version)))
                if len(rest) == 1 and rest[0] == "ready":
                    self._allow(get, "GET")
                    sv = self._serving(name, version)
                    return _Response(200, _json({"name": sv.name, "ready": True}))
                if len(rest) == 1 and rest[0] == "infer":
                    self._allow(method == "POST", "POST")
                    with self.registry.admit(name):  # decoding and answering count in the model's bound
                        return self._infer(name, self._version(name, version), headers, body)
        elif parts[0] == "metrics" and n == 1:
            self._allow(get, "GET")
            if self._metrics_fn is None:
                raise _HttpError(404, NOT_FOUND, "metrics are not enabled")
            data, ctype = self._metrics_fn()
            return _Response(200, data, ctype)
        raise _HttpError(404, NOT_FOUND, f"no such endpoint: {path}")

    @staticmethod
    def _allow(ok: bool, allowed: str) -> None:
        if not ok:
            allow = "GET, HEAD" if allowed == "GET" else allowed
            raise _HttpError(405, METHOD_NOT_ALLOWED, f"method not allowed; use {allowed}",
                             (("Allow", allow),))

    def _ready(self) -> bool:
        if self._ready_fn is None:
            return True
        try:
            return bool(self._ready_fn())
        except Exception:
            log.warning("inference API: ready_fn failed", exc_info=True)
            return False

    @staticmethod
    def _version(name: str, version: str | None) -> int | None:
        if version is None:
            return None
        if not version.isdigit():
            raise errors.RejectError(errors.UNKNOWN_MODEL, f"model {name!r} version {version!r} is not serving")
        return int(version)

    def _serving(self, name: str, version: str | None) -> ServingVersion:
        sv = self.registry.get(name)
        if sv is None:
            raise errors.RejectError(errors.UNKNOWN_MODEL, f"model {name!r} is not serving")
        v = self._version(name, version)
        if v is not None and v != sv.version:
            raise errors.RejectError(errors.UNKNOWN_MODEL,
                                     f"model {name!r} version {v} is not serving (serving: {sv.version})")
        return sv

    def _metadata(self, sv: ServingVersion) -> bytes:
        cached = self._meta_cache.get(sv.name)
        if cached is not None and cached[0]() is sv:
            return cached[1]

        def tensors(specs: Iterable[Any]) -> list[dict[str, Any]]:
            return [{"name": t.name, "datatype": _kserve_dtype(t.dtype),
                     "shape": [-1 if d is None else d for d in t.shape]} for t in specs]

        data = _json({"name": sv.name, "versions": [str(sv.version)], "platform": sv.backend,
                      "inputs": tensors(sv.model.inputs), "outputs": tensors(sv.model.outputs)})
        self._meta_cache[sv.name] = (weakref.ref(sv), data)
        return data

    # -- inference

    def _infer(self, name: str, version: int | None, headers: dict[str, str], body: bytes) -> _Response:
        hlen_s = headers.get(HEADER_LENGTH_KEY)
        binary: memoryview | None = None
        if hlen_s is not None:
            hlen_s = hlen_s.strip()
            if not hlen_s.isdigit() or int(hlen_s) > len(body):
                raise _invalid(f"{HEADER_LENGTH} {hlen_s!r} is not a length within the {len(body)}-byte body")
            hlen = int(hlen_s)
            view = memoryview(body)
            header_b: bytes | memoryview = view[:hlen]
            binary = view[hlen:]
        else:
            header_b = body
        try:  # UTF-8 (RFC 8259): decoded here rather than by json.loads' encoding sniffing
            req = _DECODER.decode(str(header_b, "utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise _invalid(f"request body is not valid JSON: {e}") from e
        if not isinstance(req, dict):
            raise _invalid("request body must be a JSON object with \"inputs\"")
        raw_inputs = req.get("inputs")
        if not isinstance(raw_inputs, list) or not raw_inputs:
            raise _invalid("\"inputs\" must be a non-empty list of tensors")

        feed: dict[str, Any] = {}
        offset = 0
        for i, t in enumerate(raw_inputs):
            if not isinstance(t, dict) or not isinstance(t.get("name"), str):
                raise _invalid(f"inputs[{i}] must be an object with a \"name\"")
            tname: str = t["name"]
            if tname in feed:
                raise _invalid(f"input {tname!r} is given twice")
            datatype = t.get("datatype")
            if datatype == "BYTES":
                raise _invalid(f"input {tname!r}: datatype BYTES is not supported by this server")
            if not isinstance(datatype, str) or datatype not in KSERVE_TO_NUMPY:
                raise _invalid(f"input {tname!r}: unknown datatype {datatype!r}; "
                               f"expected one of {', '.join(KSERVE_TO_NUMPY)}")
            np_dtype = KSERVE_TO_NUMPY[datatype]
            shape = _parse_shape(tname, t.get("shape"))
            params = t.get("parameters") or {}
            if not isinstance(params, dict):
                raise _invalid(f"input {tname!r}: \"parameters\" must be an object")
            bsize = params.get("binary_data_size")
            if bsize is not None:
                if not isinstance(bsize, int) or isinstance(bsize, bool) or bsize < 0:
                    raise _invalid(f"input {tname!r}: binary_data_size must be a non-negative integer")
                if binary is None:
                    raise _invalid(f"input {tname!r}: binary_data_size given without the "
                                   f"{HEADER_LENGTH} header")
                if offset + bsize > len(binary):
                    raise _invalid(f"input {tname!r}: binary_data_size {bsize} runs past the end of "
                                   f"the binary data ({len(binary) - offset} byte(s) left)")
                feed[tname] = _tensor_from_binary(tname, datatype, np_dtype, shape,
                                                  binary[offset:offset + bsize])
                offset += bsize
            else:
                if "data" not in t:
                    raise _invalid(f"input {tname!r} has neither \"data\" nor binary_data_size")
                feed[tname] = _tensor_from_json(tname, datatype, np_dtype, shape, t["data"])
        if binary is not None and offset != len(binary):
            raise _invalid(f"{len(binary) - offset} byte(s) of binary data are not claimed by any input")

        rparams = req.get("parameters") or {}
        binary_default = bool(rparams.get("binary_data_output", False)) if isinstance(rparams, dict) else False
        wanted: list[tuple[str, bool]] | None = None
        raw_outputs = req.get("outputs")
        if raw_outputs is not None:
            if not isinstance(raw_outputs, list):
                raise _invalid("\"outputs\" must be a list")
            wanted = []
            for i, o in enumerate(raw_outputs):
                if not isinstance(o, dict) or not isinstance(o.get("name"), str):
                    raise _invalid(f"outputs[{i}] must be an object with a \"name\"")
                op = o.get("parameters") or {}
                b = op.get("binary_data", binary_default) if isinstance(op, dict) else binary_default
                wanted.append((o["name"], bool(b)))

        sv, results = self.registry.infer(name, feed, version)

        if wanted is None:
            wanted = [(k, binary_default) for k in results]
        else:
            missing = [k for k, _ in wanted if k not in results]
            if missing:
                raise _invalid(f"unknown output(s) {missing}; the model gives {list(results)}")
        out_meta: list[dict[str, Any]] = []
        blobs: list[bytes] = []
        for oname, as_binary in wanted:
            a = results[oname]
            dt = _out_datatype(a.dtype)
            if dt is None:
                raise errors.AgentError(errors.INTERNAL,
                                        f"output {oname!r} has dtype {a.dtype}, which this server cannot send")
            if as_binary:
                blob = _tensor_to_binary(a)
                blobs.append(blob)
                out_meta.append({"name": oname, "datatype": dt, "shape": list(a.shape),
                                 "parameters": {"binary_data_size": len(blob)}})
            else:
                out_meta.append({"name": oname, "datatype": dt, "shape": list(a.shape),
                                 "data": a.ravel().tolist()})
        resp: dict[str, Any] = {"model_name": sv.name, "model_version": str(sv.version)}
        rid = req.get("id")
        if rid is not None:
            resp["id"] = rid
        resp["outputs"] = out_meta
        head = _json(resp)
        if not blobs:
            return _Response(200, head)
        return _Response(200, [head, *blobs], BINARY_TYPE, ((HEADER_LENGTH, str(len(head))),))
