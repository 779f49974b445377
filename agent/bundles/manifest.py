"""The bundle manifest (BUNDLE.md): parsing, schema checks and the signed-envelope wrapper.

Invariants: a Manifest exists only for a document that passed the schema; every path in it is
relative, normalised and inside the bundle; every file has an exact size and a sha256.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from agent import errors
from agent.timeutil import parse_rfc3339

if TYPE_CHECKING:  # signatures only where they are checked: a model worker imports TensorSpec, not cryptography
    from agent.bundles.trust import TrustStore

MAX_MANIFEST_BYTES = 1024 * 1024
MAX_FILE_BYTES = 64 * 1024**3
MAX_FILES = 256
FORMATS = ("onnx", "tflite", "openvino")
PRECISIONS = ("fp32", "fp16", "int8")
DTYPES = ("float32", "float16", "float64", "int8", "uint8", "int16", "int32", "int64", "bool", "string")
MAX_SOURCE_KEYS = 16  # the optional ``source`` object: provenance, a few short strings
MAX_SOURCE_VALUE_CHARS = 256
MAX_OPERATORS = 64  # a variant's non-standard operators the manifest lists, for backend selection
OPERATOR_RE = re.compile(r"^[A-Za-z0-9_.]{1,128}$")  # ai.onnx.ml.TreeEnsembleClassifier
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
PATH_RE = re.compile(r"^[A-Za-z0-9_.+@=-][A-Za-z0-9_.+@=/-]{0,254}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
DEFAULT_RTOL = 1e-3
DEFAULT_ATOL = 1e-4


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "sha256": self.sha256}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int | None, ...]  # None or -1 in the document: a dynamic dimension

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype,
                "shape": [-1 if d is None else d for d in self.shape]}


@dataclass(frozen=True)
class Variant:
    id: str
    format: str
    precision: str
    files: tuple[FileEntry, ...]
    operators: tuple[str, ...] = ()  # an ONNX variant's operators outside the standard domain (ai.onnx.ml.*)

    @property
    def main_file(self) -> FileEntry:
        """The file a runtime loads: the .onnx / .tflite / .xml one."""
        suffix = {"onnx": ".onnx", "tflite": ".tflite", "openvino": ".xml"}[self.format]
        for f in self.files:
            if f.path.endswith(suffix):
                return f
        return self.files[0]


@dataclass(frozen=True)
class Validation:
    inputs: str
    expected: str
    rtol: float = DEFAULT_RTOL
    atol: float = DEFAULT_ATOL
    max_p95_ms: float | None = None


@dataclass(frozen=True)
class Manifest:
    name: str
    version: int
    created_at: str
    expires_at: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    variants: tuple[Variant, ...]
    files: tuple[FileEntry, ...]
    validation: Validation | None
    description: str = ""
    requires: dict[str, Any] = field(default_factory=dict)
    source: dict[str, str] = field(default_factory=dict)  # provenance: framework and converter versions
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def variant(self, vid: str) -> Variant:
        for v in self.variants:
            if v.id == vid:
                return v
        raise errors.RejectError(errors.INVALID_MANIFEST, f"{self.name} v{self.version}: no variant {vid!r}")

    def files_for(self, variant: Variant) -> list[FileEntry]:
        """Every file a device downloads for ``variant``: its own, the common ones, the samples."""
        out: dict[str, FileEntry] = {}
        for f in (*variant.files, *self.files):
            out[f.path] = f
        if self.validation is not None:
            for p in (self.validation.inputs, self.validation.expected):
                out[p] = self.file_entry(p)
        return list(out.values())

    def file_entry(self, path: str) -> FileEntry:
        for f in (*self.files, *(f for v in self.variants for f in v.files)):
            if f.path == path:
                return f
        raise errors.RejectError(errors.INVALID_MANIFEST, f"{self.name}: file {path!r} is not listed in the manifest")

    def is_expired(self, now: float | None = None) -> bool:
        return parse_rfc3339(self.expires_at) <= (time.time() if now is None else now)


def _bad(msg: str) -> errors.RejectError:
    return errors.RejectError(errors.INVALID_MANIFEST, msg)


def _req(d: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in d:
        raise _bad(f"{where}: missing {key!r}")
    v = d[key]
    if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
        raise _bad(f"{where}.{key}: wrong type {type(v).__name__}")
    return v


def check_path(p: Any, where: str) -> str:
    """A safe relative path: no absolute path, no '..', no empty or odd segments."""
    if not isinstance(p, str) or not PATH_RE.match(p):
        raise _bad(f"{where}: bad path {p!r}")
    parts = p.split("/")
    if any(s in ("", ".", "..") for s in parts) or p == "manifest.json":
        raise _bad(f"{where}: bad path {p!r}")
    return p


def _file(d: Any, where: str) -> FileEntry:
    if not isinstance(d, dict):
        raise _bad(f"{where}: not an object")
    path = check_path(d.get("path"), f"{where}.path")
    size = _req(d, "size", int, where)
    if not 0 <= size <= MAX_FILE_BYTES:
        raise _bad(f"{where}.size: {size} out of range")
    sha = _req(d, "sha256", str, where)
    if not SHA256_RE.match(sha):
        raise _bad(f"{where}.sha256: not 64 lowercase hex digits")
    return FileEntry(path, size, sha)


def _tensor(d: Any, where: str) -> TensorSpec:
    if not isinstance(d, dict):
        raise _bad(f"{where}: not an object")
    name = _req(d, "name", str, where)
    dtype = _req(d, "dtype", str, where)
    if dtype not in DTYPES:
        raise _bad(f"{where}.dtype: {dtype!r} not one of {', '.join(DTYPES)}")
    shape = _req(d, "shape", list, where)
    dims: list[int | None] = []
    for x in shape:
        if x is None or x == -1 or isinstance(x, str):
            dims.append(None)
        elif isinstance(x, int) and not isinstance(x, bool) and x >= 0:
            dims.append(x)
        else:
            raise _bad(f"{where}.shape: bad dimension {x!r}")
    return TensorSpec(name, dtype, tuple(dims))


def _check_no_file_is_a_folder(paths: dict[str, FileEntry]) -> None:
    """Refuse ``x`` listed beside ``x/y``: one path cannot be a file and a folder on disk."""
    folders: dict[str, str] = {}  # folder -> a path inside it
    for p in sorted(paths):
        parts = p.split("/")
        for i in range(1, len(parts)):
            folders.setdefault("/".join(parts[:i]), p)
    for p in sorted(paths):
        if p in folders:
            raise _bad(f"manifest: {p!r} is listed as a file and is also the folder of {folders[p]!r}")


def parse_document(doc: Any) -> Manifest:
    """Validate a decoded manifest document against the schema."""
    if not isinstance(doc, dict):
        raise _bad("manifest is not a JSON object")
    name, version, created_at, expires_at = _header(doc)
    io = _req(doc, "io", dict, "manifest")
    inputs = tuple(_tensor(t, f"io.inputs[{i}]") for i, t in enumerate(_req(io, "inputs", list, "io")))
    outputs = tuple(_tensor(t, f"io.outputs[{i}]") for i, t in enumerate(_req(io, "outputs", list, "io")))
    if not inputs or not outputs:
        raise _bad("io: at least one input and one output are required")
    seen_ids: set[str] = set()
    variants = tuple(_variant(vd, f"variants[{i}]", seen_ids)
                     for i, vd in enumerate(_req(doc, "variants", list, "manifest")))
    if not variants:
        raise _bad("manifest: no variants")
    common = tuple(_file(f, f"files[{j}]") for j, f in enumerate(doc.get("files", []) or []))
    by_path = _files_by_path([*common, *(f for v in variants for f in v.files)])
    vd = doc.get("validation")
    validation = None if vd is None else _validation(vd, by_path)
    requires = doc.get("requires") or {}
    if not isinstance(requires, dict):
        raise _bad("requires: not an object")
    return Manifest(name=name, version=version, created_at=created_at, expires_at=expires_at,
                    inputs=inputs, outputs=outputs, variants=variants, files=common,
                    validation=validation, description=str(doc.get("description", ""))[:1024],
                    requires=requires, source=_source(doc.get("source")), raw=doc)


def _header(doc: dict[str, Any]) -> tuple[str, int, str, str]:
    """(name, version, created_at, expires_at), after the schema version ``v`` this agent reads."""
    v = doc.get("v", 1)
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise _bad(f"manifest v {v!r} is not a positive integer")
    if v > 1:
        raise errors.RejectError(errors.UNSUPPORTED_VERSION, f"manifest v {v} is newer than this agent understands (1)")
    name = _req(doc, "name", str, "manifest")
    if not NAME_RE.match(name):
        raise _bad(f"manifest.name {name!r} not in [A-Za-z0-9_.-]{{1,64}}")
    version = _req(doc, "version", int, "manifest")
    if version < 1:
        raise _bad(f"manifest.version {version} is not a positive integer")
    expires_at = _req(doc, "expires_at", str, "manifest")
    created_at = doc.get("created_at", "")
    for key, val in (("expires_at", expires_at), ("created_at", created_at)):
        if val:
            try:
                parse_rfc3339(val)
            except ValueError as e:
                raise _bad(f"manifest.{key}: {e}") from e
    return name, version, created_at, expires_at


def _variant(vd: Any, where: str, seen_ids: set[str]) -> Variant:
    """One entry of ``variants``; its id must not be in ``seen_ids`` (it is added)."""
    if not isinstance(vd, dict):
        raise _bad(f"{where}: not an object")
    vid = _req(vd, "id", str, where)
    if not NAME_RE.match(vid) or vid in seen_ids:
        raise _bad(f"{where}.id {vid!r} invalid or repeated")
    seen_ids.add(vid)
    fmt = _req(vd, "format", str, where)
    if fmt not in FORMATS:
        raise _bad(f"{where}.format {fmt!r} not one of {', '.join(FORMATS)}")
    prec = _req(vd, "precision", str, where)
    if prec not in PRECISIONS:
        raise _bad(f"{where}.precision {prec!r} not one of {', '.join(PRECISIONS)}")
    vfiles = tuple(_file(f, f"{where}.files[{j}]") for j, f in enumerate(_req(vd, "files", list, where)))
    if not vfiles:
        raise _bad(f"{where}: no files")
    return Variant(vid, fmt, prec, vfiles, _operators(vd.get("operators"), where))


def _files_by_path(all_files: list[FileEntry]) -> dict[str, FileEntry]:
    """Every file the manifest lists (common and per variant) by path: at most MAX_FILES, a path
    listed twice only with the same size and sha256, and no path both a file and a folder."""
    if len(all_files) > MAX_FILES:
        raise _bad(f"manifest: {len(all_files)} files, at most {MAX_FILES}")
    by_path: dict[str, FileEntry] = {}
    for f in all_files:
        if f.path in by_path and by_path[f.path] != f:
            raise _bad(f"manifest: file {f.path!r} listed twice with different size or sha256")
        by_path[f.path] = f
    _check_no_file_is_a_folder(by_path)
    return by_path


def _validation(vd: Any, by_path: dict[str, FileEntry]) -> Validation:
    """The optional ``validation`` object: golden samples among the listed files, tolerances and
    the latency SLO."""
    if not isinstance(vd, dict):
        raise _bad("validation: not an object")
    vin = check_path(vd.get("inputs"), "validation.inputs")
    vexp = check_path(vd.get("expected"), "validation.expected")
    for p in (vin, vexp):
        if p not in by_path:
            raise _bad(f"validation: sample file {p!r} not listed in files")
    rtol = vd.get("rtol", DEFAULT_RTOL)
    atol = vd.get("atol", DEFAULT_ATOL)
    p95 = vd.get("max_p95_ms")
    for k, val in (("rtol", rtol), ("atol", atol)):
        if not isinstance(val, (int, float)) or isinstance(val, bool) or val < 0:
            raise _bad(f"validation.{k}: {val!r} is not a non-negative number")
    if p95 is not None and (not isinstance(p95, (int, float)) or isinstance(p95, bool) or p95 <= 0):
        raise _bad(f"validation.max_p95_ms: {p95!r} is not a positive number")
    return Validation(vin, vexp, float(rtol), float(atol), None if p95 is None else float(p95))


def _operators(ops: Any, where: str) -> tuple[str, ...]:
    """A variant's optional ``operators``: at most MAX_OPERATORS domain-qualified operator names."""
    if ops is None:
        return ()
    if not isinstance(ops, list) or len(ops) > MAX_OPERATORS or not all(
            isinstance(o, str) and OPERATOR_RE.match(o) for o in ops):
        raise _bad(f"{where}.operators: not a list of at most {MAX_OPERATORS} operator names")
    return tuple(ops)


def _source(d: Any) -> dict[str, str]:
    """The optional provenance object: at most MAX_SOURCE_KEYS short strings."""
    if d is None:
        return {}
    if (not isinstance(d, dict) or len(d) > MAX_SOURCE_KEYS
            or not all(isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= MAX_SOURCE_VALUE_CHARS
                       for k, v in d.items())):
        raise _bad(f"source: not an object of at most {MAX_SOURCE_KEYS} strings of at most "
                   f"{MAX_SOURCE_VALUE_CHARS} characters")
    return dict(d)


def verify_manifest(raw: bytes, trust: TrustStore, threshold: int) -> Manifest:
    """Verify a signed manifest envelope and return the parsed document.

    Size cap and JSON shape → ``invalid_manifest``; signatures → ``bad_signature`` /
    ``untrusted_key`` / ``threshold_not_met``; schema → ``invalid_manifest``.
    """
    from agent.bundles import dsse

    if len(raw) > MAX_MANIFEST_BYTES:
        raise _bad(f"manifest is {len(raw)} bytes, the cap is {MAX_MANIFEST_BYTES}")
    try:
        env = dsse.parse_envelope(raw)
    except errors.RejectError as e:
        raise _bad(f"manifest envelope: {e.message}") from e
    try:
        payload = dsse.verify(env, dsse.MANIFEST_TYPE, trust, threshold, what="manifest")
    except errors.RejectError as e:
        if e.code == errors.INVALID_COMMAND:
            raise _bad(e.message) from e
        raise
    try:
        doc = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as e:
        raise _bad(f"manifest payload is not valid JSON: {e}") from e
    return parse_document(doc)


def sign_manifest(doc: dict[str, Any], keys: list[Any]) -> bytes:
    """Fleet side: the manifest.json bytes (a DSSE envelope) for ``doc``."""
    from agent.bundles import dsse

    payload = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    return json.dumps(dsse.sign(dsse.MANIFEST_TYPE, payload, keys), indent=1).encode()
