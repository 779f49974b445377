"""Downloads that cannot be starved or tricked (BUNDLE.md "How a device handles it").

Invariants:
- Reading stops at the listed size + 1 byte; sha256 is computed while streaming (over http(s)
  and file://, on a helper thread for large files, so hashing overlaps the network and the disk;
  the bytes are not read back), and a file counts only after its size and hash matched and it
  was fsynced. A download whose digest is not known from the stream (FTP, a part file already
  complete) is hashed by reading it back.
- Each read has a timeout (``read_timeout_s``). Each file has one total deadline, fixed when its
  download starts: ``deadline_base_s + size / min_rate_bps``. Retries never extend it, and a
  watchdog shuts the attempt's sockets down when it passes, so not even a server trickling its
  headers or its FTP replies one byte at a time can hold the agent past it.
- Partial downloads resume (HTTP Range: a 206 with the right Content-Range continues; a 200 or a
  wrong Content-Range restarts from zero; FTP REST where the server supports it), also across an
  agent restart: the partial file is the state. A resumed file that fails its hash is fetched once
  more from zero, since the kept bytes may be what was wrong.
- TLS is always verified (``ca_file`` or the system CAs); an https URL redirecting to anything but
  https is refused. ``file://`` sources must be regular files (a FIFO or /dev/zero is refused).
- Transport failures are retried a bounded number of times with full-jitter back-off; content
  failures (size, hash) and TLS failures are not.
- Free disk is checked before the first byte is written.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import random
import re
import shutil
import socket
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import unquote, urljoin, urlsplit

from agent import errors

if TYPE_CHECKING:
    import ftplib  # imported where used: an idle daemon does without it

    from agent.config import DownloadsConfig

from agent.bundles.streaming import CHUNK_BYTES, Deadline, Digest, StreamHash, _watch

log = logging.getLogger(__name__)

READ_BYTES = 64 * 1024  # one network read returns at most this: the deadline is checked this often
READ_TIMEOUT_S = 30.0  # one read may stall this long before the attempt is abandoned
CONNECT_TIMEOUT_S = 10.0
MIN_RATE_BPS = 32 * 1024  # slower than this on average and the file's deadline passes
DEADLINE_BASE_S = 60.0  # fixed allowance on top of size / MIN_RATE_BPS
MAX_ATTEMPTS = 5
BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 30.0
MAX_REDIRECTS = 5
FREE_DISK_MARGIN_BYTES = 16 * 1024 * 1024
FTP_DEFAULT_PORT = 21
SCHEMES = ("http", "https", "ftp", "file")
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")

Progress = Callable[[int], None]


@dataclass
class FetchLimits:
    read_timeout_s: float = READ_TIMEOUT_S
    connect_timeout_s: float = CONNECT_TIMEOUT_S
    min_rate_bps: float = MIN_RATE_BPS
    deadline_base_s: float = DEADLINE_BASE_S
    max_attempts: int = MAX_ATTEMPTS
    backoff_base_s: float = BACKOFF_BASE_S
    backoff_max_s: float = BACKOFF_MAX_S

    def deadline_s(self, size: int) -> float:
        """Seconds one file of ``size`` bytes may take, all attempts together."""
        return self.deadline_base_s + size / self.min_rate_bps


def limits_from_config(d: DownloadsConfig) -> FetchLimits:
    """The ``[downloads]`` section as FetchLimits."""
    return FetchLimits(read_timeout_s=d.read_timeout_s, min_rate_bps=d.min_rate_bps,
                       deadline_base_s=d.deadline_base_s, max_attempts=d.max_attempts,
                       connect_timeout_s=min(CONNECT_TIMEOUT_S, max(d.read_timeout_s, 1.0)))


def fetcher_from_config(d: DownloadsConfig) -> Fetcher:
    """The daemon's fetcher: limits and CA bundle from ``[downloads]``."""
    return Fetcher(limits_from_config(d), ca_bundle=d.ca_file or None)


def join_url(manifest_url: str, rel: str) -> str:
    """The URL of a bundle file: the manifest URL's folder joined with its relative path."""
    return urljoin(manifest_url, rel)


def _resume_point(part: Path, size: int) -> int | None:
    """Where a download into ``part`` continues: its length (0 after dropping a part longer than
    the file), or None when it is already complete."""
    have = part.stat().st_size if part.exists() else 0
    if have > size:
        part.unlink()
        have = 0
    if have == size and size > 0:
        return None
    return have


def _name(url: str) -> str:
    return urlsplit(url).path.rsplit("/", 1)[-1] or url


def _tracked_connection_classes() -> tuple[type, type]:
    """urllib3 connection pools whose connections register their socket with the running
    attempt's Deadline just before reading a response (new and kept-alive connections alike)."""
    from urllib3.connection import HTTPConnection, HTTPSConnection
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

    def getresponse(base: Any) -> Callable[..., Any]:
        def wrapped(self: Any, *args: Any, **kwargs: Any) -> Any:
            dl = getattr(_watch, "deadline", None)
            if dl is not None and getattr(self, "sock", None) is not None:
                dl.track(self.sock)
            return base.getresponse(self, *args, **kwargs)
        return wrapped

    http_conn = type("TrackedHTTPConnection", (HTTPConnection,), {"getresponse": getresponse(HTTPConnection)})
    https_conn = type("TrackedHTTPSConnection", (HTTPSConnection,), {"getresponse": getresponse(HTTPSConnection)})
    http_pool = type("TrackedHTTPConnectionPool", (HTTPConnectionPool,), {"ConnectionCls": http_conn})
    https_pool = type("TrackedHTTPSConnectionPool", (HTTPSConnectionPool,), {"ConnectionCls": https_conn})
    return http_pool, https_pool


def _transport_errors() -> tuple[type[BaseException], ...]:
    """What a read from a server may raise: socket, TLS, http.client, urllib3, requests, ftplib
    (ValueError: a read on a connection the watchdog closed)."""
    import ftplib
    import http.client

    import requests
    import urllib3

    return (OSError, EOFError, ValueError, ftplib.Error, http.client.HTTPException,
            urllib3.exceptions.HTTPError, requests.RequestException)


def _sleep_backoff(attempt: int, lim: FetchLimits, deadline: Deadline | None) -> None:
    cap = min(lim.backoff_max_s, lim.backoff_base_s * 2 ** attempt)
    if deadline is not None:
        cap = min(cap, deadline.left())
    time.sleep(random.uniform(0, cap))


def _open_regular(path: Path, url: str) -> IO[bytes]:
    """Open a local source for reading; refuse anything but a regular file (a FIFO would block,
    a device never ends)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise errors.RetryableError(errors.DOWNLOAD_FAILED, f"{url}: {e.strerror or e}") from e
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise errors.RejectError(errors.DOWNLOAD_FAILED, f"{url}: not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


class Fetcher:
    """Fetch small documents and large files over http(s)://, ftp:// and file://."""

    def __init__(self, limits: FetchLimits | None = None, ca_bundle: str | None = None) -> None:
        self.limits = limits or FetchLimits()
        self.ca_bundle = ca_bundle
        self._session: Any = None

    def _http(self) -> Any:
        if self._session is None:
            import requests
            from requests.adapters import HTTPAdapter

            http_pool, https_pool = _tracked_connection_classes()
            s = requests.Session()
            s.trust_env = False  # no proxy or netrc surprises on a device
            s.max_redirects = MAX_REDIRECTS
            s.headers["User-Agent"] = "edge-agent"
            s.headers["Accept-Encoding"] = "identity"  # sizes and Range are of the raw bytes
            for prefix in ("http://", "https://"):
                adapter = HTTPAdapter(max_retries=0)
                adapter.poolmanager.pool_classes_by_scheme = {"http": http_pool, "https": https_pool}
                s.mount(prefix, adapter)
            self._session = s
        return self._session

    # -- small documents ---------------------------------------------------------------------
    def fetch_bytes(self, url: str, max_bytes: int, what: str = "document", until: float | None = None) -> bytes:
        """A whole small document, refusing anything past ``max_bytes``; ``until``: a
        ``time.monotonic()`` instant the caller's own deadline ends at (the earlier one holds)."""
        scheme = urlsplit(url).scheme
        if scheme not in SCHEMES:
            raise errors.RejectError(errors.INVALID_COMMAND, f"{what} {url}: unsupported URL scheme {scheme!r}")
        deadline = self._deadline(max_bytes, until)
        if scheme == "file":
            with _open_regular(Path(unquote(urlsplit(url).path)), url) as f:
                data = f.read(max_bytes + 1)
        else:
            def attempt() -> bytes:
                buf = io.BytesIO()
                with deadline.watching():
                    if scheme == "ftp":
                        self._ftp_transfer(url, buf, 0, max_bytes, deadline, None)
                    else:
                        self._http_small(url, buf, max_bytes, deadline)
                return buf.getvalue()
            data = self._with_retries(url, attempt, deadline)
        if len(data) > max_bytes:
            code = errors.INVALID_MANIFEST if what == "manifest" else errors.SIZE_EXCEEDED
            raise errors.RejectError(code, f"{what} {url}: larger than {max_bytes} bytes")
        return data

    def _http_small(self, url: str, out: IO[bytes], max_bytes: int, deadline: Deadline) -> None:
        resp = self._request(url, {}, deadline)
        try:
            if resp.status_code != 200:
                raise self._status_error(url, resp.status_code, "document")
            self._copy_capped(self._reader(resp), out, 0, max_bytes, deadline, url, None)
        finally:
            resp.close()

    # -- files -------------------------------------------------------------------------------
    def download(self, url: str, part: Path, size: int, sha256: str, progress: Progress | None = None,
                 until: float | None = None) -> None:
        """Download into ``part`` (resuming what it holds), verify size and sha256, fsync.

        On return ``part`` holds exactly the listed bytes; the caller moves it into the store.
        ``until``: a ``time.monotonic()`` instant the caller's deadline ends at (the deploy step's):
        the file's deadline is the earlier one, and its watchdog cuts a stalled read at it.
        """
        scheme = urlsplit(url).scheme
        if scheme not in SCHEMES:
            raise errors.RejectError(errors.INVALID_COMMAND, f"{url}: unsupported URL scheme {scheme!r}")
        part.parent.mkdir(parents=True, exist_ok=True)
        have = part.stat().st_size if part.exists() else 0
        self.check_disk(part.parent, size - have if have <= size else size, url)
        streamed = self._fetch_into(url, part, size, progress, until)
        try:
            self._verify_part(url, part, size, sha256, streamed)
        except errors.RejectError as e:
            if not (0 < have <= size) or e.code != errors.HASH_MISMATCH:
                raise
            log.warning("%s: the resumed download did not verify (%s); fetching it again from zero", url, e.message)
            streamed = self._fetch_into(url, part, size, progress, until)
            self._verify_part(url, part, size, sha256, streamed)

    def _deadline(self, size: int, until: float | None) -> Deadline:
        """The file's own deadline, or the caller's ``until`` when that comes first."""
        seconds = self.limits.deadline_s(size)
        if until is not None:
            seconds = max(0.0, min(seconds, until - time.monotonic()))
        return Deadline(seconds)

    def _fetch_into(self, url: str, part: Path, size: int, progress: Progress | None,
                    until: float | None = None) -> Digest | None:
        """Fill ``part``; returns its (size, sha256) when hashed on the way (None: read it back)."""
        scheme = urlsplit(url).scheme
        if scheme == "file":
            return self._copy_file(url, part, size, progress)
        deadline = self._deadline(size, until)
        to_part = self._ftp_to_part if scheme == "ftp" else self._http_to_part

        def attempt() -> Digest | None:
            with deadline.watching():
                return to_part(url, part, size, deadline, progress)

        result: Digest | None = self._with_retries(url, attempt, deadline)
        return result

    @staticmethod
    def check_disk(folder: Path, need: int, what: str) -> None:
        """``disk_full`` unless ``need`` bytes (plus a margin) are free under ``folder``."""
        folder.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(folder).free
        if need + FREE_DISK_MARGIN_BYTES > free:
            raise errors.RejectError(errors.DISK_FULL,
                                     f"{what}: needs {need} bytes, {free} free in {folder} (margin {FREE_DISK_MARGIN_BYTES})")

    @staticmethod
    def _verify_part(url: str, part: Path, size: int, sha256: str, streamed: Digest | None = None) -> None:
        """Size and sha256 of ``part`` against the manifest. ``streamed`` is what was hashed while
        the (already fsynced) file was written; without it the file is read back and fsynced."""
        if streamed is not None and streamed[0] == part.stat().st_size:
            n, digest = streamed
        else:
            h = StreamHash()
            with open(part, "rb") as f:
                while chunk := f.read(CHUNK_BYTES):
                    h.update(chunk)
                os.fsync(f.fileno())
            n, digest = h.digest()
        name = _name(url)
        if n != size:
            part.unlink(missing_ok=True)
            code = errors.SIZE_EXCEEDED if n > size else errors.HASH_MISMATCH
            raise errors.RejectError(code, f"{name}: {n} bytes, the manifest lists {size}")
        if digest != sha256:
            part.unlink(missing_ok=True)
            raise errors.RejectError(errors.HASH_MISMATCH,
                                     f"{name}: sha256 mismatch (expected {sha256}, got {digest})")

    def _copy_file(self, url: str, part: Path, size: int, progress: Progress | None) -> Digest:
        src = Path(unquote(urlsplit(url).path))
        n = 0
        h = StreamHash(size=size)
        try:
            with _open_regular(src, url) as fin:
                try:
                    with open(part, "wb") as fout:
                        while chunk := fin.read(min(CHUNK_BYTES, size + 1 - n)):
                            fout.write(chunk)
                            h.update(chunk)
                            n += len(chunk)
                            if n > size:
                                break
                            if progress:
                                progress(n)
                        fout.flush()
                        os.fsync(fout.fileno())
                except OSError as e:
                    raise errors.RetryableError(errors.DOWNLOAD_FAILED, f"{url}: {e.strerror or e}") from e
        finally:
            h.close()
        if n > size:
            part.unlink(missing_ok=True)
            raise errors.RejectError(errors.SIZE_EXCEEDED, f"{src.name}: longer than the listed {size} bytes")
        return h.digest()

    def _copy_capped(self, read: Callable[[int], bytes], out: IO[bytes], n: int, size: int,
                     deadline: Deadline, url: str, progress: Progress | None, hasher: StreamHash | None = None) -> int:
        """Append what ``read`` yields to ``out`` (and ``hasher``) until EOF or ``size + 1`` bytes
        in all; returns the count. Transport trouble and the deadline are RetryableError."""
        while n <= size:
            if deadline.passed():
                raise self._deadline_error(url, deadline, n, size)
            try:
                chunk = read(min(READ_BYTES, size + 1 - n))
            except _transport_errors() as e:
                if deadline.passed():
                    raise self._deadline_error(url, deadline, n, size) from e
                raise errors.RetryableError(errors.DOWNLOAD_FAILED, f"{url}: read failed at byte {n}: {e}") from e
            if not chunk:
                break
            out.write(chunk)
            if hasher is not None:
                hasher.update(chunk)
            n += len(chunk)
            if progress and n <= size:
                progress(n)
        if deadline.fired and n <= size:
            raise self._deadline_error(url, deadline, n, size)
        return n

    def _deadline_error(self, url: str, deadline: Deadline, n: int | None = None,
                        size: int | None = None) -> errors.RetryableError:
        where = f" at byte {n} of {size}" if n is not None else ""
        return errors.RetryableError(
            errors.DOWNLOAD_FAILED,
            f"{url}: deadline of {deadline.seconds:.1f} s passed{where} "
            f"(slower than {self.limits.min_rate_bps:.0f} B/s on average)")

    @staticmethod
    def _reader(resp: Any) -> Callable[[int], bytes]:
        raw = resp.raw
        read1 = getattr(raw, "read1", None)
        if read1 is not None:
            return lambda k: read1(k, decode_content=False)
        return lambda k: raw.read(k, decode_content=False)

    def _http_to_part(self, url: str, part: Path, size: int, deadline: Deadline,
                      progress: Progress | None) -> Digest | None:
        have = _resume_point(part, size)
        if have is None:
            return None  # complete from an earlier attempt; read back and verified by the caller
        headers = {"Range": f"bytes={have}-"} if have else {}
        resp = self._request(url, headers, deadline)
        try:
            if resp.status_code == 206 and have:
                m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
                if not m or int(m.group(1)) != have:
                    log.info("%s: server answered a different range (%s); restarting from 0",
                             url, resp.headers.get("Content-Range"))
                    resp.close()
                    part.unlink(missing_ok=True)
                    have = 0
                    resp = self._request(url, {}, deadline)
                    if resp.status_code != 200:
                        raise self._status_error(url, resp.status_code, "file")
                    mode = "wb"
                else:
                    mode = "ab"
            elif resp.status_code == 200:
                if have:
                    log.info("%s: server ignored the Range request; restarting from 0", url)
                have = 0
                mode = "wb"
            elif resp.status_code == 416 and have:
                part.unlink(missing_ok=True)
                raise errors.RetryableError(errors.DOWNLOAD_FAILED, f"{url}: range not satisfiable; restarting")
            else:
                raise self._status_error(url, resp.status_code, "file")
            hasher = StreamHash(part if have else None, have, size)
            try:
                with open(part, mode) as f:
                    try:
                        n = self._copy_capped(self._reader(resp), f, have, size, deadline, url, progress, hasher)
                    finally:
                        f.flush()
                        os.fsync(f.fileno())  # what arrived counts for a resume, even after a failure
            finally:
                hasher.close()
        finally:
            resp.close()
        if n > size:
            part.unlink(missing_ok=True)
            raise errors.RejectError(errors.SIZE_EXCEEDED, f"{_name(url)}: longer than the listed {size} bytes")
        return hasher.digest()

    # -- ftp -----------------------------------------------------------------------------------
    def _ftp_to_part(self, url: str, part: Path, size: int, deadline: Deadline,
                     progress: Progress | None) -> Digest | None:
        have = _resume_point(part, size)
        if have is None:
            return None
        with open(part, "ab" if have else "wb") as f:
            try:
                n = self._ftp_transfer(url, f, have, size, deadline, progress)
            finally:
                f.flush()
                os.fsync(f.fileno())
        if n > size:
            part.unlink(missing_ok=True)
            raise errors.RejectError(errors.SIZE_EXCEEDED, f"{_name(url)}: longer than the listed {size} bytes")
        return None  # REST may restart the transfer mid-file: the caller reads the file back

    def _ftp_transfer(self, url: str, out: IO[bytes], have: int, size: int, deadline: Deadline,
                      progress: Progress | None) -> int:
        """RETR ``url`` (passive, binary) into ``out``, from byte ``have`` where the server takes
        REST; returns the bytes ``out`` now holds (at most ``size + 1``)."""
        u = urlsplit(url)
        if not u.hostname:
            raise errors.RejectError(errors.INVALID_COMMAND, f"{url}: no host")
        path = unquote(u.path).lstrip("/")
        if not path:
            raise errors.RejectError(errors.INVALID_COMMAND, f"{url}: no file path")
        user = unquote(u.username) if u.username else "anonymous"
        password = unquote(u.password) if u.password else "anonymous@"
        import ftplib

        ftp = ftplib.FTP(timeout=self.limits.read_timeout_s)
        try:
            try:
                ftp.connect(u.hostname, u.port or FTP_DEFAULT_PORT, timeout=self.limits.connect_timeout_s)
                if ftp.sock is not None:
                    deadline.track(ftp.sock)
                    ftp.sock.settimeout(self.limits.read_timeout_s)
                ftp.login(user, password)
                ftp.set_pasv(True)
                ftp.voidcmd("TYPE I")
            except ftplib.error_perm as e:
                raise errors.RejectError(errors.DOWNLOAD_FAILED, f"{url}: {e}") from e
            except (OSError, EOFError, ftplib.Error) as e:
                raise self._ftp_transport_error(url, e, deadline) from e
            conn = self._ftp_retr(ftp, url, path, have, out, deadline)
            if conn is None:  # the server refused REST: start over
                out.seek(0)
                out.truncate()
                have = 0
                conn = self._ftp_retr(ftp, url, path, 0, out, deadline)
                assert conn is not None
            with conn:
                conn.settimeout(self.limits.read_timeout_s)
                n = self._copy_capped(conn.recv, out, have, size, deadline, url, progress)
            if n <= size:
                try:
                    ftp.voidresp()  # 226: the server says the whole file was sent
                except ftplib.error_perm as e:
                    raise errors.RejectError(errors.DOWNLOAD_FAILED, f"{url}: {e}") from e
                except (OSError, EOFError, ftplib.Error) as e:
                    raise self._ftp_transport_error(url, e, deadline) from e
            return n
        finally:
            with contextlib.suppress(OSError):
                ftp.close()

    def _ftp_retr(self, ftp: ftplib.FTP, url: str, path: str, have: int, out: IO[bytes],
                  deadline: Deadline) -> socket.socket | None:
        """Open the data connection for RETR (after REST ``have``); None if REST was refused."""
        import ftplib

        try:
            conn = ftp.transfercmd(f"RETR {path}", rest=have or None)
        except (ftplib.error_reply, ftplib.error_perm) as e:
            if have and str(e)[:3] in ("350", "500", "501", "502", "504"):
                log.info("%s: server refused REST %d (%s); restarting from 0", url, have, e)
                return None
            raise errors.RejectError(errors.DOWNLOAD_FAILED, f"{url}: {e}") from e
        except (OSError, EOFError, ftplib.Error) as e:
            raise self._ftp_transport_error(url, e, deadline) from e
        deadline.track(conn)
        return conn

    def _ftp_transport_error(self, url: str, e: BaseException, deadline: Deadline) -> errors.RetryableError:
        if deadline.passed():
            return errors.RetryableError(errors.DOWNLOAD_FAILED,
                                         f"{url}: deadline of {deadline.seconds:.1f} s passed (FTP)")
        return errors.RetryableError(errors.DOWNLOAD_FAILED, f"{url}: {type(e).__name__}: {e}")

    # -- plumbing ----------------------------------------------------------------------------
    def _request(self, url: str, headers: dict[str, str], deadline: Deadline) -> Any:
        import requests

        s = self._http()
        current = url
        for _ in range(MAX_REDIRECTS + 1):
            if deadline.passed():
                raise self._deadline_error(current, deadline)
            try:
                resp = s.get(current, headers=headers, stream=True, allow_redirects=False,
                             timeout=(self.limits.connect_timeout_s, self.limits.read_timeout_s),
                             verify=self.ca_bundle or True)
            except requests.exceptions.SSLError as e:
                if deadline.passed():
                    raise self._deadline_error(current, deadline) from e
                raise errors.RejectError(errors.DOWNLOAD_FAILED, f"{current}: TLS verification failed: {e}") from e
            except requests.exceptions.RequestException as e:
                if deadline.passed():
                    raise self._deadline_error(current, deadline) from e
                raise errors.RetryableError(errors.DOWNLOAD_FAILED, f"{current}: {e}") from e
            if resp.status_code in (301, 302, 303, 307, 308) and "Location" in resp.headers:
                nxt = urljoin(current, resp.headers["Location"])
                resp.close()
                if urlsplit(current).scheme == "https" and urlsplit(nxt).scheme != "https":
                    raise errors.RejectError(errors.DOWNLOAD_FAILED, f"{current}: redirect to {nxt} leaves https; refused")
                if urlsplit(nxt).scheme not in ("http", "https"):
                    raise errors.RejectError(errors.DOWNLOAD_FAILED, f"{current}: redirect to {nxt}; refused")
                current = nxt
                continue
            return resp
        raise errors.RejectError(errors.DOWNLOAD_FAILED, f"{url}: more than {MAX_REDIRECTS} redirects")

    @staticmethod
    def _status_error(url: str, status: int, what: str) -> errors.AgentError:
        if status in (408, 425, 429) or status >= 500:
            return errors.RetryableError(errors.DOWNLOAD_FAILED, f"{what} {url}: HTTP {status}")
        return errors.RejectError(errors.DOWNLOAD_FAILED, f"{what} {url}: HTTP {status}")

    def _with_retries(self, url: str, fn: Callable[[], Any], deadline: Deadline | None = None) -> Any:
        """Run ``fn`` until it succeeds, a RejectError, ``max_attempts`` tries or the deadline."""
        last: errors.RetryableError | None = None
        attempts = 0
        for attempt in range(self.limits.max_attempts):
            attempts = attempt + 1
            try:
                return fn()
            except errors.RetryableError as e:
                last = e
                log.warning("%s: attempt %d/%d failed: %s", url, attempts, self.limits.max_attempts, e.message)
                if attempts >= self.limits.max_attempts or (deadline is not None and deadline.passed()):
                    break
                _sleep_backoff(attempt, self.limits, deadline)
                if deadline is not None and deadline.passed():
                    break
        assert last is not None
        why = f"; its deadline of {deadline.seconds:.1f} s passed" if deadline is not None and deadline.passed() else ""
        raise errors.RejectError(last.code, f"{last.message} (gave up after {attempts} attempts{why})") from last
