"""Downloads that cannot be starved or tricked (BUNDLE.md "How a device handles it").

Invariants:
- Reading stops at the listed size + 1 byte; sha256 is computed while streaming; a file counts
  only after its size and hash matched and it was fsynced.
- Each read has a timeout, each file a total deadline from its size and a minimum rate.
- Partial downloads resume with HTTP Range (a 206 with the right Content-Range continues; a 200
  or a wrong Content-Range restarts from zero), also across an agent restart.
- TLS is always verified; an https URL redirecting to anything but https is refused.
- Transport failures are retried a bounded number of times with jittered back-off; content
  failures (size, hash) are not.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

from agent import errors

log = logging.getLogger(__name__)

CHUNK_BYTES = 1024 * 1024
READ_TIMEOUT_S = 30.0  # one read may stall this long before the attempt is abandoned
CONNECT_TIMEOUT_S = 10.0
MIN_RATE_BPS = 32 * 1024  # slower than this on average and the file's deadline passes
DEADLINE_BASE_S = 60.0  # fixed allowance on top of size / MIN_RATE_BPS
MAX_ATTEMPTS = 5
BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 30.0
MAX_REDIRECTS = 5
FREE_DISK_MARGIN_BYTES = 16 * 1024 * 1024
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


def join_url(manifest_url: str, rel: str) -> str:
    """The URL of a bundle file: the manifest URL's folder joined with its relative path."""
    return urljoin(manifest_url, rel)


def _deadline(size: int, lim: FetchLimits) -> float:
    return time.monotonic() + lim.deadline_base_s + size / lim.min_rate_bps


def _sleep_backoff(attempt: int, lim: FetchLimits) -> None:
    cap = min(lim.backoff_max_s, lim.backoff_base_s * 2 ** attempt)
    time.sleep(random.uniform(0, cap))


class Fetcher:
    """Fetch small documents and large files over http(s):// and file://."""

    def __init__(self, limits: FetchLimits | None = None, ca_bundle: str | None = None) -> None:
        self.limits = limits or FetchLimits()
        self.ca_bundle = ca_bundle
        self._session: Any = None

    def _http(self) -> Any:
        if self._session is None:
            import requests

            s = requests.Session()
            s.trust_env = False  # no proxy or netrc surprises on a device
            s.max_redirects = MAX_REDIRECTS
            s.headers["User-Agent"] = "edge-agent"
            s.headers["Accept-Encoding"] = "identity"  # sizes and Range are of the raw bytes
            self._session = s
        return self._session

    # -- small documents ---------------------------------------------------------------------
    def fetch_bytes(self, url: str, max_bytes: int, what: str = "document") -> bytes:
        """A whole small document, refusing anything past ``max_bytes``."""
        scheme = urlsplit(url).scheme
        if scheme == "file":
            path = Path(unquote(urlsplit(url).path))
            try:
                with open(path, "rb") as f:
                    data = f.read(max_bytes + 1)
            except OSError as e:
                raise errors.RetryableError(errors.DOWNLOAD_FAILED, f"{what} {url}: {e.strerror or e}") from e
        elif scheme in ("http", "https"):
            data = self._with_retries(url, what, lambda: self._get_small(url, max_bytes, what))
        else:
            raise errors.RejectError(errors.INVALID_COMMAND, f"{what} {url}: unsupported URL scheme {scheme!r}")
        if len(data) > max_bytes:
            code = errors.INVALID_MANIFEST if what == "manifest" else errors.SIZE_EXCEEDED
            raise errors.RejectError(code, f"{what} {url}: larger than {max_bytes} bytes")
        return data

    def _get_small(self, url: str, max_bytes: int, what: str) -> bytes:
        resp = self._request(url, {})
        try:
            if resp.status_code != 200:
                raise self._status_error(url, resp.status_code, what)
            buf = bytearray()
            for chunk in resp.iter_content(64 * 1024):
                buf += chunk
                if len(buf) > max_bytes:
                    break
            return bytes(buf)
        finally:
            resp.close()

    # -- files -------------------------------------------------------------------------------
    def download(self, url: str, part: Path, size: int, sha256: str, progress: Progress | None = None) -> None:
        """Download into ``part`` (resuming what it holds), verify size and sha256, fsync.

        On return ``part`` holds exactly the listed bytes; the caller moves it into the store.
        """
        part.parent.mkdir(parents=True, exist_ok=True)
        self._check_disk(part.parent, size - (part.stat().st_size if part.exists() else 0), url)
        scheme = urlsplit(url).scheme
        if scheme == "file":
            self._copy_file(url, part, size, progress)
        elif scheme in ("http", "https"):
            self._with_retries(url, "file", lambda: self._http_to_part(url, part, size, progress))
        else:
            raise errors.RejectError(errors.INVALID_COMMAND, f"{url}: unsupported URL scheme {scheme!r}")
        self._verify_part(url, part, size, sha256)

    @staticmethod
    def _check_disk(folder: Path, need: int, url: str) -> None:
        free = shutil.disk_usage(folder).free
        if need + FREE_DISK_MARGIN_BYTES > free:
            raise errors.RejectError(errors.DISK_FULL,
                                     f"{url}: needs {need} bytes, {free} free in {folder} (margin {FREE_DISK_MARGIN_BYTES})")

    @staticmethod
    def _verify_part(url: str, part: Path, size: int, sha256: str) -> None:
        h = hashlib.sha256()
        n = 0
        with open(part, "rb") as f:
            while chunk := f.read(CHUNK_BYTES):
                h.update(chunk)
                n += len(chunk)
            os.fsync(f.fileno())
        name = urlsplit(url).path.rsplit("/", 1)[-1]
        if n != size:
            part.unlink(missing_ok=True)
            code = errors.SIZE_EXCEEDED if n > size else errors.HASH_MISMATCH
            raise errors.RejectError(code, f"{name}: {n} bytes, the manifest lists {size}")
        if h.hexdigest() != sha256:
            part.unlink(missing_ok=True)
            raise errors.RejectError(errors.HASH_MISMATCH,
                                     f"{name}: sha256 mismatch (expected {sha256}, got {h.hexdigest()})")

    def _copy_file(self, url: str, part: Path, size: int, progress: Progress | None) -> None:
        src = Path(unquote(urlsplit(url).path))
        try:
            with open(src, "rb") as fin, open(part, "wb") as fout:
                n = 0
                while chunk := fin.read(min(CHUNK_BYTES, size + 1 - n)):
                    fout.write(chunk)
                    n += len(chunk)
                    if progress:
                        progress(n)
                    if n > size:
                        break
        except OSError as e:
            raise errors.RetryableError(errors.DOWNLOAD_FAILED, f"{url}: {e.strerror or e}") from e
        if n > size:
            part.unlink(missing_ok=True)
            raise errors.RejectError(errors.SIZE_EXCEEDED, f"{src.name}: longer than the listed {size} bytes")

    def _http_to_part(self, url: str, part: Path, size: int, progress: Progress | None) -> None:
        have = part.stat().st_size if part.exists() else 0
        if have > size:
            part.unlink()
            have = 0
        if have == size and size > 0:
            return  # complete from an earlier attempt; verified by the caller
        headers = {"Range": f"bytes={have}-"} if have else {}
        deadline = _deadline(size - have, self.limits)
        resp = self._request(url, headers)
        try:
            if resp.status_code == 206 and have:
                m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
                if not m or int(m.group(1)) != have:
                    log.info("%s: server answered a different range (%s); restarting from 0",
                             url, resp.headers.get("Content-Range"))
                    resp.close()
                    part.unlink(missing_ok=True)
                    have = 0
                    resp = self._request(url, {})
                    if resp.status_code != 200:
                        raise self._status_error(url, resp.status_code, "file")
                    mode = "wb"
                else:
                    mode = "ab"
            elif resp.status_code == 200:
                have = 0
                mode = "wb"
            elif resp.status_code == 416 and have:
                part.unlink(missing_ok=True)
                raise errors.RetryableError(errors.DOWNLOAD_FAILED, f"{url}: range not satisfiable; restarting")
            else:
                raise self._status_error(url, resp.status_code, "file")
            n = have
            with open(part, mode) as f:
                for chunk in resp.iter_content(CHUNK_BYTES):
                    if n + len(chunk) > size:
                        f.write(chunk[: size + 1 - n])
                        n = size + 1
                        break
                    f.write(chunk)
                    n += len(chunk)
                    if progress:
                        progress(n)
                    if time.monotonic() > deadline:
                        raise errors.RetryableError(
                            errors.DOWNLOAD_FAILED,
                            f"{url}: slower than {self.limits.min_rate_bps:.0f} B/s on average; deadline passed at {n} of {size} bytes")
                f.flush()
                os.fsync(f.fileno())
            if n > size:
                part.unlink(missing_ok=True)
                raise errors.RejectError(errors.SIZE_EXCEEDED,
                                         f"{urlsplit(url).path.rsplit('/', 1)[-1]}: longer than the listed {size} bytes")
        finally:
            resp.close()

    # -- plumbing ----------------------------------------------------------------------------
    def _request(self, url: str, headers: dict[str, str]) -> Any:
        import requests

        s = self._http()
        current = url
        for _ in range(MAX_REDIRECTS + 1):
            try:
                resp = s.get(current, headers=headers, stream=True, allow_redirects=False,
                             timeout=(self.limits.connect_timeout_s, self.limits.read_timeout_s),
                             verify=self.ca_bundle or True)
            except requests.exceptions.SSLError as e:
                raise errors.RejectError(errors.DOWNLOAD_FAILED, f"{current}: TLS verification failed: {e}") from e
            except requests.exceptions.RequestException as e:
                raise errors.RetryableError(errors.DOWNLOAD_FAILED, f"{current}: {e}") from e
            if resp.status_code in (301, 302, 303, 307, 308) and "Location" in resp.headers:
                nxt = urljoin(current, resp.headers["Location"])
                resp.close()
                if urlsplit(current).scheme == "https" and urlsplit(nxt).scheme != "https":
                    raise errors.RejectError(errors.DOWNLOAD_FAILED, f"{current}: redirect to {nxt} leaves https; refused")
                current = nxt
                continue
            return resp
        raise errors.RejectError(errors.DOWNLOAD_FAILED, f"{url}: more than {MAX_REDIRECTS} redirects")

    @staticmethod
    def _status_error(url: str, status: int, what: str) -> errors.AgentError:
        if status in (408, 425, 429) or status >= 500:
            return errors.RetryableError(errors.DOWNLOAD_FAILED, f"{what} {url}: HTTP {status}")
        return errors.RejectError(errors.DOWNLOAD_FAILED, f"{what} {url}: HTTP {status}")

    def _with_retries(self, url: str, what: str, fn: Callable[[], Any]) -> Any:
        last: errors.RetryableError | None = None
        for attempt in range(self.limits.max_attempts):
            try:
                return fn()
            except errors.RetryableError as e:
                last = e
                log.warning("%s: attempt %d/%d failed: %s", url, attempt + 1, self.limits.max_attempts, e.message)
                if attempt + 1 < self.limits.max_attempts:
                    _sleep_backoff(attempt, self.limits)
        assert last is not None
        raise errors.RejectError(last.code, f"{last.message} (gave up after {self.limits.max_attempts} attempts)") from last
