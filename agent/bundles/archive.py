"""Offline bundles: one ``.tar``, ``.tar.gz`` or ``.zip`` archive read as hostile input (BUNDLE.md).

Invariants:
- Nothing is ever extracted by a name the archive chose: member bytes go only to the store's
  partial area under the sha256 the signed manifest lists (or nowhere, when only verifying),
  and are committed to the store only after the whole archive passed.
- ``manifest.json`` is read first (the first file of a tar stream; zip: from its directory),
  with the manifest cap, and verified before any other member's data is read.
- Every member is judged by its header before its data is read: a regular file with a
  normalised relative path that the manifest lists, declared exactly as large as listed, not
  repeated; directories only as parents of listed files. Absolute paths, ``..``, links, devices,
  FIFOs, sparse or encrypted members and anything unlisted are ``invalid_bundle``.
- Decompressed bytes are capped: a tar stream is read through a counter that refuses to go past
  the listed sizes plus a bounded header allowance, so a bomb (a huge member, a huge PAX header)
  stops there; each member is copied at most listed size + 1 bytes, hashed while copied.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from agent import errors
from agent.bundles.manifest import MAX_MANIFEST_BYTES, FileEntry, Manifest, verify_manifest
from agent.bundles.store import Store
from agent.bundles.trust import TrustStore

MANIFEST_NAME = "manifest.json"
CHUNK_BYTES = 1024 * 1024
TAR_BLOCK_BYTES = 512
MEMBER_ALLOWANCE_BYTES = 8 * 1024  # per member: its header, PAX/GNU long-name headers, padding
MAX_META_HEADER_BYTES = 64 * 1024  # one PAX or GNU long-name header; real ones are a few hundred bytes
STREAM_SLACK_BYTES = 64 * 1024  # end-of-archive blocks and tarfile's read-ahead record
MAX_DIR_MEMBERS = 256  # directory entries tolerated beside the listed files
KINDS = ("tar", "tar.gz", "zip")

Progress = Callable[[int], None]


def _bad(msg: str) -> errors.RejectError:
    return errors.RejectError(errors.INVALID_BUNDLE, msg)


def archive_kind(path: Path) -> str:
    """``tar``, ``tar.gz`` or ``zip``, from the file's first bytes (not its name)."""
    try:
        with open(path, "rb") as f:
            head = f.read(TAR_BLOCK_BYTES)
    except OSError as e:
        raise _bad(f"{path}: {e.strerror or e}") from e
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if head[:2] == b"\x1f\x8b":
        return "tar.gz"
    if len(head) == TAR_BLOCK_BYTES and head[257:262] == b"ustar":
        return "tar"
    raise _bad(f"{path}: not a .tar, .tar.gz or .zip archive")


def member_path(raw: str) -> str:
    """A member's name, normalised (``./`` prefixes and a trailing ``/`` dropped); ``""`` is the
    archive's root. Absolute paths, ``..`` and odd names are ``invalid_bundle``."""
    if "\\" in raw or "\x00" in raw:
        raise _bad(f"member {raw!r}: backslash or NUL in the name")
    if raw.startswith("/"):
        raise _bad(f"member {raw!r}: absolute path")
    parts = raw.split("/")
    while parts and parts[0] == ".":
        parts.pop(0)
    if parts and parts[-1] == "":
        parts.pop()
    if any(p == ".." for p in parts):
        raise _bad(f"member {raw!r}: '..' in the path")
    if any(p in ("", ".") for p in parts):
        raise _bad(f"member {raw!r}: empty or '.' path segment")
    return "/".join(parts)


@dataclass(frozen=True)
class _Member:
    name: str  # normalised
    raw: str
    kind: str  # file, dir, symlink, hardlink, device, fifo, sparse, encrypted, other
    size: int
    open: Callable[[], IO[bytes]]


class _SafeTarInfo(tarfile.TarInfo):
    """Refuses oversized PAX / GNU long-name headers before tarfile reads them into memory."""

    def _proc_member(self, tarfile: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in _META_TYPES and self.size > MAX_META_HEADER_BYTES:
            raise _bad(f"an extended (PAX or long-name) header of {self.size} bytes (cap {MAX_META_HEADER_BYTES})")
        return super()._proc_member(tarfile)  # type: ignore[misc]


_META_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
               tarfile.GNUTYPE_LONGLINK)


class _CappedReader(io.RawIOBase):
    """A read-only stream that refuses to deliver more than ``budget`` bytes in all."""

    def __init__(self, inner: IO[bytes], budget: int) -> None:
        super().__init__()
        self.inner = inner
        self.budget = budget
        self.consumed = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        if size == 0:
            return b""
        left = self.budget - self.consumed
        if left <= 0:
            if self.inner.read(1):  # more is there than the listed sizes allow: never expand it
                raise _bad(f"the archive expands past its listed sizes ({self.budget} bytes in all)")
            return b""
        data = self.inner.read(left if size is None or size < 0 else min(size, left))
        self.consumed += len(data)
        return data

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


def _tar_kind(ti: tarfile.TarInfo) -> str:
    if ti.issparse():
        return "sparse"
    if ti.isreg():
        return "file"
    if ti.isdir():
        return "dir"
    if ti.issym():
        return "symlink"
    if ti.islnk():
        return "hardlink"
    if ti.ischr() or ti.isblk():
        return "device"
    if ti.isfifo():
        return "fifo"
    return "other"


def _zip_kind(zi: zipfile.ZipInfo) -> str:
    if zi.flag_bits & 0x1:
        return "encrypted"
    mode = zi.external_attr >> 16
    if zi.create_system == 3 and stat.S_IFMT(mode):  # Unix attributes with a file type
        if stat.S_ISLNK(mode):
            return "symlink"
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            return "device"
        if stat.S_ISFIFO(mode):
            return "fifo"
        if stat.S_ISDIR(mode):
            return "dir"
        if not stat.S_ISREG(mode):
            return "other"
    return "dir" if zi.is_dir() else "file"


_ARCHIVE_ERRORS: tuple[type[BaseException], ...] = (
    tarfile.TarError, zipfile.BadZipFile, zlib.error, gzip.BadGzipFile, EOFError, OSError,
    NotImplementedError, RuntimeError)


class BundleArchive:
    """An offline bundle archive: its manifest, then a checked pass over every member."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.kind = archive_kind(self.path)

    # -- reading members -------------------------------------------------------------------------
    @contextlib.contextmanager
    def _members(self, budget: int) -> Iterator[Iterator[_Member]]:
        """The archive's members in order; a tar stream is decompressed at most ``budget`` bytes."""
        try:
            with open(self.path, "rb") as raw:
                if self.kind == "zip":
                    with zipfile.ZipFile(raw) as zf:
                        yield self._zip_members(zf)
                else:
                    inner: IO[bytes] = raw
                    gz = gzip.GzipFile(fileobj=raw, mode="rb") if self.kind == "tar.gz" else None
                    if gz is not None:
                        inner = gz  # type: ignore[assignment]
                    capped = _CappedReader(inner, budget)
                    with tarfile.open(fileobj=capped, mode="r|", tarinfo=_SafeTarInfo) as tf:
                        yield self._tar_members(tf)
        except errors.AgentError:
            raise
        except _ARCHIVE_ERRORS as e:
            raise _bad(f"{self.path.name}: not a readable {self.kind} archive: {type(e).__name__}: {e}") from e

    @staticmethod
    def _tar_members(tf: tarfile.TarFile) -> Iterator[_Member]:
        for ti in tf:
            kind = _tar_kind(ti)

            def opener(ti: tarfile.TarInfo = ti) -> IO[bytes]:
                f = tf.extractfile(ti)
                if f is None:
                    raise _bad(f"member {ti.name!r}: no data")
                return f

            yield _Member(member_path(ti.name), ti.name, kind, ti.size, opener)

    @staticmethod
    def _zip_members(zf: zipfile.ZipFile) -> Iterator[_Member]:
        for zi in zf.infolist():
            def opener(zi: zipfile.ZipInfo = zi) -> IO[bytes]:
                return zf.open(zi)

            yield _Member(member_path(zi.filename), zi.filename, _zip_kind(zi), zi.file_size, opener)

    def manifest_bytes(self) -> bytes:
        """The raw (unverified) manifest.json; ``invalid_manifest`` past the cap."""
        budget = MAX_MANIFEST_BYTES + MEMBER_ALLOWANCE_BYTES * 4 + STREAM_SLACK_BYTES
        with self._members(budget) as members:
            for m in members:
                if m.name == "" and m.kind == "dir":
                    continue  # the archive's own root folder ("./")
                if m.name != MANIFEST_NAME:
                    if self.kind == "zip":
                        continue
                    raise _bad(f"{self.path.name}: the first member is {m.raw!r}; a bundle archive starts with {MANIFEST_NAME}")
                if m.kind != "file":
                    raise _bad(f"{MANIFEST_NAME} in {self.path.name} is a {m.kind}, not a regular file")
                if m.size > MAX_MANIFEST_BYTES:
                    raise errors.RejectError(errors.INVALID_MANIFEST,
                                             f"{MANIFEST_NAME} is {m.size} bytes, the cap is {MAX_MANIFEST_BYTES}")
                with m.open() as f:
                    data = f.read(MAX_MANIFEST_BYTES + 1)
                if len(data) > MAX_MANIFEST_BYTES:
                    raise errors.RejectError(errors.INVALID_MANIFEST, f"{MANIFEST_NAME} is larger than {MAX_MANIFEST_BYTES} bytes")
                return data
        raise _bad(f"{self.path.name}: no {MANIFEST_NAME}")

    # -- the checked pass --------------------------------------------------------------------------
    def scan(self, manifest_raw: bytes, manifest: Manifest, sink: Callable[[FileEntry], Path | None],
             required: set[str], progress: Progress | None = None) -> list[FileEntry]:
        """Check every member against the verified ``manifest``; hash every listed file and copy
        those ``sink`` names a path for. Every path in ``required`` must be present.

        On any refusal the files written by this pass are removed before the error is raised.
        Returns the listed files found, in archive order.
        """
        listed = _listed(manifest)
        parents = {p.rsplit("/", i)[0] for p in listed for i in range(1, p.count("/") + 1)}
        budget = (MAX_MANIFEST_BYTES + STREAM_SLACK_BYTES
                  + sum(-(-f.size // TAR_BLOCK_BYTES) * TAR_BLOCK_BYTES for f in listed.values())
                  + MEMBER_ALLOWANCE_BYTES * (len(listed) + MAX_DIR_MEMBERS + 1))
        max_members = len(listed) + MAX_DIR_MEMBERS + 1
        seen: set[str] = set()
        found: list[FileEntry] = []
        written: list[Path] = []
        done = 0
        try:
            with self._members(budget) as members:
                for count, m in enumerate(members, 1):
                    if count > max_members:
                        raise _bad(f"{self.path.name}: more than {max_members} members")
                    if m.name in seen:
                        raise _bad(f"member {m.raw!r} appears twice")
                    seen.add(m.name)
                    if m.kind == "dir":
                        if m.name and m.name not in parents:
                            raise _bad(f"directory {m.raw!r} is not a folder of any file the manifest lists")
                        continue
                    if m.kind != "file":
                        raise _bad(f"member {m.raw!r} is a {m.kind}; only regular files are allowed")
                    if m.name == MANIFEST_NAME:
                        with m.open() as f:
                            if f.read(MAX_MANIFEST_BYTES + 1) != manifest_raw:
                                raise _bad(f"{MANIFEST_NAME} changed since it was verified")
                        continue
                    entry = listed.get(m.name)
                    if entry is None:
                        raise _bad(f"member {m.raw!r} is not listed in the manifest")
                    if m.size > entry.size:
                        raise _bad(f"member {m.raw!r} declares {m.size} bytes, the manifest lists {entry.size}; not expanded")
                    if m.size < entry.size:
                        raise errors.RejectError(errors.HASH_MISMATCH,
                                                 f"{m.name}: {m.size} bytes, the manifest lists {entry.size}")
                    dest = sink(entry)
                    base = done

                    def member_progress(n: int, base: int = base) -> None:
                        if progress is not None:
                            progress(base + n)

                    if dest is not None:
                        written.append(dest)
                    _copy_member(m, entry, dest, member_progress if dest is not None else None)
                    if dest is not None:
                        done += entry.size
                    found.append(entry)
            missing = sorted(required - {f.path for f in found})
            if missing:
                raise _bad(f"{self.path.name}: listed file(s) missing from the archive: {', '.join(missing)}")
        except BaseException:
            for p in written:
                p.unlink(missing_ok=True)
            raise
        return found

    def install_into(self, manifest_raw: bytes, manifest: Manifest, wanted: list[FileEntry], store: Store,
                     progress: Progress | None = None) -> None:
        """Check the whole archive and stage ``wanted`` in the store; commit them only if it all passed."""
        want = {f.path: f for f in wanted}
        self.scan(manifest_raw, manifest,
                  lambda e: store.partial_path(e.sha256) if e.path in want else None,
                  set(want), progress)
        for f in wanted:
            store.commit_partial(f.sha256)


def _listed(m: Manifest) -> dict[str, FileEntry]:
    out: dict[str, FileEntry] = {}
    for f in (*m.files, *(f for v in m.variants for f in v.files)):
        out[f.path] = f
    return out


def _copy_member(m: _Member, entry: FileEntry, dest: Path | None, progress: Progress | None) -> None:
    """Copy at most ``entry.size + 1`` bytes of ``m`` (to ``dest`` if given), hashing them."""
    h = hashlib.sha256()
    n = 0
    out = open(dest, "wb") if dest is not None else None  # noqa: SIM115 (closed below)
    try:
        with m.open() as f:
            while n <= entry.size:
                chunk = f.read(min(CHUNK_BYTES, entry.size + 1 - n))
                if not chunk:
                    break
                h.update(chunk)
                n += len(chunk)
                if out is not None and n <= entry.size:
                    out.write(chunk)
                    if progress is not None:
                        progress(n)
        if out is not None:
            out.flush()
            os.fsync(out.fileno())
    except errors.AgentError:
        raise
    except _ARCHIVE_ERRORS as e:
        raise _bad(f"member {m.raw!r}: unreadable: {type(e).__name__}: {e}") from e
    finally:
        if out is not None:
            out.close()
    if n > entry.size:
        raise _bad(f"member {m.raw!r} expands past its listed {entry.size} bytes")
    if n < entry.size:
        raise _bad(f"member {m.raw!r} is truncated: {n} of {entry.size} bytes")
    if h.hexdigest() != entry.sha256:
        raise errors.RejectError(errors.HASH_MISMATCH,
                                 f"{entry.path}: sha256 mismatch (expected {entry.sha256}, got {h.hexdigest()})")


@dataclass(frozen=True)
class ArchiveReport:
    manifest: Manifest
    files: tuple[FileEntry, ...]


def verify_archive(path: Path | str, trust: TrustStore, threshold: int, now: float | None = None) -> ArchiveReport:
    """Verify an offline bundle as a device would, writing nothing: signature and expiry, every
    member's header, every listed file's size and sha256."""
    arch = BundleArchive(path)
    raw = arch.manifest_bytes()
    if len(trust) == 0:
        raise errors.RejectError(errors.UNTRUSTED_KEY, trust.no_keys_message())
    m = verify_manifest(raw, trust, threshold)
    if m.is_expired(now):
        raise errors.RejectError(errors.EXPIRED, f"{m.name} v{m.version}: expired at {m.expires_at}")
    found = arch.scan(raw, m, lambda e: None, set(_listed(m)))
    return ArchiveReport(m, tuple(found))
