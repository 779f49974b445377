"""Build and verify model bundles (BUNDLE.md) on the fleet side.

A build writes, into one folder: the model (variant ``onnx-fp32``), golden samples
(``samples/input.npz`` and ``samples/expected.npz``, computed with onnxruntime on CPU), any extra
common files, the variants that passed, and last ``manifest.json``, the signed DSSE envelope of
the manifest document.

Invariants:
- A build happens in a staging folder beside the output (``.OUT.partial-PID-RANDOM``), fsynced and
  swapped into place in one step when complete (``renameat2(RENAME_EXCHANGE)``; two renames where
  the kernel lacks it). A failed or interrupted build leaves the previous output as it was; a
  published folder holds exactly the files its manifest lists. A build only replaces a bundle
  (with ``overwrite``), an empty folder or nothing.
- Each variant succeeds or fails on its own (fleetctl/variants.py); by default one failure fails
  the build listing every outcome, with ``keep_going`` the bundle holds the ones that passed.
- Every size and sha256 in the manifest is measured from the bytes written to the folder.
- The document passes ``agent.bundles.manifest.parse_document`` (the device's own schema check)
  before it is signed; a bundle the agent would reject as ``invalid_manifest`` is never produced.
- ``.npz`` files hold plain numeric arrays only (no pickle, no object arrays).
- Verification checks the signature with the given trust store first, then every listed file's
  size (reading at most size + 1 bytes) and sha256, and fails on the first problem with the stable
  error code a device would use. Archives are verified by the device's own reader
  (``agent.bundles.archive``).
- ``pack`` writes ``manifest.json`` first and then exactly the listed files, checked against the
  manifest, as regular files with fixed owner, mode and time (devices refuse anything else).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import errors
from agent.bundles import dsse
from agent.bundles.manifest import (
    DEFAULT_ATOL,
    DEFAULT_RTOL,
    DTYPES,
    MAX_MANIFEST_BYTES,
    MAX_OPERATORS,
    MAX_SOURCE_VALUE_CHARS,
    FileEntry,
    Manifest,
    check_path,
    parse_document,
    sign_manifest,
    verify_manifest,
)
from agent.bundles.trust import TrustStore
from agent.fsutil import atomic_write, fsync_dir
from agent.timeutil import now_rfc3339
from fleetctl.variants import (
    BUILT,
    FAILED,
    BuiltVariant,
    Outcome,
    VariantError,
    make_variant,
    parse_prebuilt,
    parse_variants,
    plan_variants,
)

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MODEL_NAME = "model.onnx"
INPUTS_NAME = "samples/input.npz"
EXPECTED_NAME = "samples/expected.npz"
RESERVED_PATHS = frozenset({MANIFEST_NAME, MODEL_NAME, INPUTS_NAME, EXPECTED_NAME})
DEFAULT_SAMPLES = 4
DEFAULT_SEED = 0
DEFAULT_EXPIRES_IN_S = 90 * 24 * 3600.0
REQUIRES_AGENT = ">=0.1"
HASH_CHUNK_BYTES = 1024 * 1024
RANDOM_INT_HIGH = 10  # random integer inputs stay small: they are often indices or token ids
STAGING_TAG = "partial"  # .OUT.partial-PID-RANDOM: a build in progress beside its output folder
RETIRED_TAG = "old"  # .OUT.old-PID-RANDOM: a replaced bundle being removed (no atomic swap here)
BUNDLE_DIR_MODE = 0o755
AT_FDCWD = -100  # <fcntl.h>
RENAME_EXCHANGE = 2  # <linux/fs.h>: renameat2 swaps the two paths


class BuildError(ValueError):
    """The model or the build options cannot make a valid bundle; the message says why."""


@dataclass(frozen=True)
class TensorInfo:
    """One graph input or output: name, numpy dtype name, shape with -1 for dynamic dims."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class VerifyReport:
    """A bundle that passed verification: its manifest and every file checked."""

    manifest: Manifest
    files: tuple[FileEntry, ...]


def file_entry(root: Path, rel: str) -> FileEntry:
    """Size and sha256 of ``root/rel`` as the manifest lists them."""
    p = root / rel
    h = hashlib.sha256()
    size = 0
    with open(p, "rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            h.update(chunk)
            size += len(chunk)
    return FileEntry(rel, size, h.hexdigest())


def _tensor_info(value_info: Any) -> TensorInfo:
    """TensorInfo from an ONNX ValueInfoProto; BuildError for non-tensors or unsupported dtypes."""
    from onnx import TensorProto, helper

    name = value_info.name
    if not value_info.type.HasField("tensor_type"):
        raise BuildError(f"model io {name!r} is not a tensor (sequence/map outputs are not supported)")
    tt = value_info.type.tensor_type
    try:
        dtype = ("string" if tt.elem_type == TensorProto.STRING
                 else np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)).name)
    except (KeyError, TypeError, ValueError) as e:
        raise BuildError(f"model io {name!r}: unsupported ONNX element type {tt.elem_type}") from e
    if dtype not in DTYPES:
        raise BuildError(f"model io {name!r}: dtype {dtype} is not one of {', '.join(DTYPES)}")
    if not tt.HasField("shape"):
        raise BuildError(f"model io {name!r} has no static rank; the manifest needs a shape")
    shape = tuple(int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else -1
                  for d in tt.shape.dim)
    return TensorInfo(name, dtype, shape)


def model_io(model_path: Path) -> tuple[list[TensorInfo], list[TensorInfo]]:
    """The graph's real inputs (initializers excluded) and outputs."""
    import onnx

    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError and friends with no common base
        raise BuildError(f"{model_path}: not a readable ONNX model ({e})") from e
    graph = model.graph
    for init in graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            raise BuildError(f"{model_path}: weights in external data files are not supported; "
                             "save the model as one file")
    init_names = {i.name for i in graph.initializer}
    inputs = [_tensor_info(v) for v in graph.input if v.name not in init_names]
    outputs = [_tensor_info(v) for v in graph.output]
    if not inputs or not outputs:
        raise BuildError(f"{model_path}: the graph needs at least one input and one output")
    return inputs, outputs


def model_operators(model_path: Path) -> list[str]:
    """The graph's operators outside the standard ONNX domain, domain-qualified and sorted
    (``ai.onnx.ml.TreeEnsembleClassifier``): devices choose backends by them (the manifest's
    variant ``operators``), builds skip variants that cannot hold them."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    ops = sorted({f"{n.domain}.{n.op_type}" for n in graph.node if n.domain not in ("", "ai.onnx")})
    if len(ops) > MAX_OPERATORS:
        raise BuildError(f"{model_path}: {len(ops)} non-standard operators, a manifest lists at most {MAX_OPERATORS}")
    return ops


def random_inputs(inputs: Sequence[TensorInfo], samples: int, seed: int) -> dict[str, np.ndarray]:
    """``samples`` seeded random samples per input, batched along a dynamic first dimension.

    A dynamic first dimension becomes ``samples``, any other dynamic dimension 1; a model with a
    fixed first dimension gets exactly that shape.
    """
    if samples < 1:
        raise BuildError(f"--samples must be at least 1, got {samples}")
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for t in inputs:
        shape = tuple(d if d >= 0 else (samples if i == 0 else 1) for i, d in enumerate(t.shape))
        dt = np.dtype(t.dtype)
        arr: np.ndarray
        if dt.kind == "f":
            arr = rng.standard_normal(shape).astype(dt)
        elif dt.kind == "b":
            arr = rng.random(shape) < 0.5
        elif dt.kind in "iu":
            arr = rng.integers(0, RANDOM_INT_HIGH, size=shape).astype(dt)
        else:
            raise BuildError(f"input {t.name!r}: cannot make random samples of dtype {t.dtype}")
        out[t.name] = arr
    return out


def load_inputs(path: Path, inputs: Sequence[TensorInfo]) -> dict[str, np.ndarray]:
    """Golden inputs from an ``.npz`` keyed by input name, cast to the model's dtypes."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            given = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as e:
        raise BuildError(f"--inputs {path}: not a readable .npz without pickles ({e})") from e
    want = {t.name: t for t in inputs}
    missing = sorted(set(want) - set(given))
    extra = sorted(set(given) - set(want))
    if missing or extra:
        raise BuildError(f"--inputs {path}: arrays must be keyed by the model's input names "
                         f"{sorted(want)}; missing {missing}, unexpected {extra}")
    out: dict[str, np.ndarray] = {}
    for name, t in want.items():
        arr = given[name]
        if t.dtype == "string":
            if arr.dtype.kind not in "US":
                raise BuildError(f"--inputs {path}: {name!r} is {arr.dtype}, the model wants strings")
            out[name] = arr.astype(str)
            continue
        dt = np.dtype(t.dtype)
        if arr.dtype != dt:
            if not np.can_cast(arr.dtype, dt, casting="same_kind"):
                raise BuildError(f"--inputs {path}: {name!r} is {arr.dtype}, the model wants {dt}")
            arr = arr.astype(dt)
        if arr.ndim != len(t.shape) or any(d >= 0 and d != a for d, a in zip(t.shape, arr.shape, strict=True)):
            raise BuildError(f"--inputs {path}: {name!r} has shape {list(arr.shape)}, "
                             f"the model wants {list(t.shape)}")
        out[name] = arr
    return out


def reference_outputs(model_path: Path, feeds: dict[str, np.ndarray],
                      outputs: Sequence[TensorInfo]) -> dict[str, np.ndarray]:
    """Run the model with onnxruntime on CPU and return its outputs keyed by name."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        sess = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
        names = [o.name for o in outputs]
        results = sess.run(names, feeds)
    except Exception as e:  # onnxruntime's errors share no public base class
        raise BuildError(f"{model_path}: onnxruntime could not run the golden inputs ({e})") from e
    out: dict[str, np.ndarray] = {}
    for name, val in zip(names, results, strict=True):
        arr = np.asarray(val)
        if arr.dtype == object:
            if not all(isinstance(v, str) for v in arr.reshape(-1)):
                raise BuildError(f"output {name!r} is neither a numeric nor a string tensor")
            arr = arr.astype(str)  # .npz holds unicode arrays without pickles
        out[name] = arr
    return out


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An uncompressed ``.npz`` of plain arrays (no pickle)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


class VariantsFailed(BuildError):
    """At least one variant failed and ``keep_going`` was off: nothing was written.

    ``outcomes`` holds every variant's outcome; the message lists them, one per line.
    """

    def __init__(self, outcomes: Sequence[Outcome]) -> None:
        self.outcomes = tuple(outcomes)
        failed = sum(o.status == FAILED for o in self.outcomes)
        super().__init__(f"{failed} of {len(self.outcomes)} variants failed; nothing written "
                         "(--keep-going builds the bundle with the variants that passed):\n  "
                         + "\n  ".join(o.line() for o in self.outcomes))


# ---------------------------------------------------------------- the output folder


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep_stale(out: Path) -> None:
    """Remove staging and retired folders beside ``out`` left by builds that were killed."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(?:{STAGING_TAG}|{RETIRED_TAG})-(\d+)-[0-9a-z_]+")
    for p in out.parent.glob(f".{glob.escape(out.name)}.*-*"):
        m = pattern.fullmatch(p.name)
        if m and p.is_dir() and not p.is_symlink() and not _pid_alive(int(m.group(1))):
            log.info("removing %s, left by an interrupted build", p)
            shutil.rmtree(p, ignore_errors=True)


def _check_output(out: Path, overwrite: bool) -> None:
    """A build replaces the whole output folder: only a bundle (with ``overwrite``), an empty
    folder or a new path may be replaced."""
    if not out.name:
        raise BuildError(f"{out}: a bundle cannot replace the filesystem root; give --out a folder name")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise BuildError(f"{out}: exists and is not a folder")
    if not out.exists():
        return
    if (out / MANIFEST_NAME).exists():
        if not overwrite:
            raise BuildError(f"{out / MANIFEST_NAME} already exists (bump --version, or --force to rebuild)")
    elif any(out.iterdir()):
        raise BuildError(f"{out}: not empty and not a bundle (no {MANIFEST_NAME}); a build replaces its whole "
                         "output folder, so give a new or empty --out")


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    if fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _publish(staged: Path, out: Path) -> None:
    """Move a complete staged folder into place: ``out`` is the old bundle or the new one, never a mix."""
    _fsync_tree(staged)
    if not out.exists():
        os.rename(staged, out)
    elif _exchange(staged, out):
        fsync_dir(out.parent)
        shutil.rmtree(staged)  # it now holds the previous output
    else:  # no atomic swap here: the old folder steps aside for the moment of two renames
        retired = Path(tempfile.mkdtemp(prefix=f".{out.name}.{RETIRED_TAG}-{os.getpid()}-", dir=out.parent))
        os.rename(out, retired / "bundle")
        os.rename(staged, out)
        fsync_dir(out.parent)
        shutil.rmtree(retired)
    fsync_dir(out.parent)


@contextlib.contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A fresh folder beside ``out``, removed unless it was published."""
    out.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale(out)
    staged = Path(tempfile.mkdtemp(prefix=f".{out.name}.{STAGING_TAG}-{os.getpid()}-", dir=out.parent))
    os.chmod(staged, BUNDLE_DIR_MODE)
    try:
        yield staged
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def _drop_unlisted(root: Path, listed: set[str]) -> None:
    """Remove anything a converter left in the staged folder that the manifest does not list."""
    for p in sorted(root.rglob("*"), key=lambda q: len(q.parts), reverse=True):
        if p.is_dir() and not p.is_symlink():
            if not any(p.iterdir()):
                p.rmdir()
        elif p.relative_to(root).as_posix() not in listed:
            log.debug("dropping %s: not listed in the manifest", p)
            p.unlink()


# ---------------------------------------------------------------- build


def _extra_files(extra_files: Sequence[Path | str]) -> dict[str, Path]:
    extras: dict[str, Path] = {}
    for src in map(Path, extra_files):
        rel = src.name
        if not src.is_file():
            raise BuildError(f"--file {src}: not a regular file")
        if rel in RESERVED_PATHS or rel in extras:
            raise BuildError(f"--file {src}: the name {rel!r} is already used in the bundle")
        try:
            check_path(rel, "--file")
        except errors.RejectError as e:
            raise BuildError(f"--file {src}: {e.message}") from e
        extras[rel] = src
    return extras


def build_bundle(model_path: Path | str, out_dir: Path | str, name: str, version: int,
                 keys: Sequence[Ed25519PrivateKey], *, inputs: Path | str | None = None,
                 samples: int = DEFAULT_SAMPLES, seed: int = DEFAULT_SEED,
                 expires_in_s: float = DEFAULT_EXPIRES_IN_S, rtol: float = DEFAULT_RTOL,
                 atol: float = DEFAULT_ATOL, max_p95_ms: float | None = None,
                 extra_files: Sequence[Path | str] = (), description: str = "",
                 overwrite: bool = False, now: float | None = None, variants: Sequence[str] = (),
                 tflite: Path | str | None = None, prebuilt: Sequence[str] = (),
                 unchecked: Sequence[str] = (), checks: list[dict[str, Any]] | None = None,
                 keep_going: bool = False, outcomes: list[Outcome] | None = None,
                 golden: tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None = None,
                 provenance: Mapping[str, str] | None = None,
                 encrypt_to: Sequence[str] = ()) -> Path:
    """Write a signed bundle for an ONNX model into ``out_dir``; return the manifest's path.

    ``variants`` / ``tflite`` / ``prebuilt`` (``ID:FORMAT:PRECISION:PATH``) add variants beside
    ``onnx-fp32``, each made and checked on its own against the golden outputs
    (fleetctl/variants.py) unless its id is in ``unchecked``. ``outcomes`` receives every
    variant's outcome; ``checks`` one dict of figures per variant built. When a variant fails the
    build raises VariantsFailed and writes nothing, unless ``keep_going``: then the bundle holds
    the variants that passed.

    The bundle is made in a folder beside ``out_dir`` and replaces it in one step when complete,
    so ``out_dir`` is the previous bundle or the new one, never a mix; it holds exactly the files
    of its manifest. ``extra_files`` are copied under their base names and listed as common files.
    ``overwrite`` allows replacing a bundle (devices refuse a version they already have, so
    re-signing the same version is usually a mistake).

    ``golden`` (inputs, expected outputs) replaces the samples and onnxruntime's outputs: a
    converted model's golden outputs are its source framework's (fleetctl/sources/certify.py).
    ``provenance`` becomes the manifest's ``source`` object (framework and converter versions).
    ``encrypt_to`` (age ``age1…`` recipients, fleetctl/sealing.py): every variant file is
    encrypted to them before the manifest is signed.
    """
    model_path, out = Path(model_path), Path(os.path.abspath(out_dir))  # "." and ".." resolved, links not
    if not keys:
        raise BuildError("at least one signing key is required")
    if not model_path.is_file():
        raise BuildError(f"{model_path}: no such model file")
    _check_output(out, overwrite)
    if expires_in_s <= 0:
        raise BuildError(f"the expiry must be in the future, got {expires_in_s} s")
    extras = _extra_files(extra_files)
    ins, outs = model_io(model_path)
    try:
        plan, skipped = plan_variants(
            variants=parse_variants(variants), tflite=Path(tflite) if tflite is not None else None,
            prebuilt=[parse_prebuilt(p) for p in prebuilt], unchecked=unchecked,
            taken=(MODEL_NAME, INPUTS_NAME, EXPECTED_NAME, *extras), operators=model_operators(model_path))
    except VariantError as e:
        raise BuildError(str(e)) from e

    if golden is not None:
        feeds, expected = golden
    else:
        feeds = load_inputs(Path(inputs), ins) if inputs is not None else random_inputs(ins, samples, seed)
        expected = reference_outputs(model_path, feeds, outs)

    with _staging(out) as tmp:
        shutil.copyfile(model_path, tmp / MODEL_NAME)
        atomic_write(tmp / INPUTS_NAME, npz_bytes(feeds))
        atomic_write(tmp / EXPECTED_NAME, npz_bytes(expected))
        for rel, src in extras.items():
            shutil.copyfile(src, tmp / rel)
        results = [Outcome("onnx-fp32", "onnx", "fp32", BUILT, "the given model, the reference for the checks"),
                   *(make_variant(tmp, tmp / MODEL_NAME, p, feeds, expected, check=p.id not in unchecked,
                                  rtol=rtol, atol=atol) for p in plan),
                   *skipped]
        if outcomes is not None:
            outcomes.extend(results)
        if any(o.status == FAILED for o in results) and not keep_going:
            raise VariantsFailed(results)
        built = [o.variant for o in results if o.variant is not None]
        if checks is not None:
            checks.extend({"variant": b.id, "format": b.format, "precision": b.precision, **b.check} for b in built)
        doc = _manifest_doc(tmp, name, version, description, ins, outs, built, extras, now=now,
                            expires_in_s=expires_in_s, rtol=rtol, atol=atol, max_p95_ms=max_p95_ms,
                            provenance=provenance)
        if encrypt_to:
            from fleetctl.sealing import seal_document

            doc = check_document(seal_document(tmp, doc, encrypt_to))
        _drop_unlisted(tmp, {MANIFEST_NAME, *(f["path"] for v in doc["variants"] for f in v["files"]),
                             *(f["path"] for f in doc["files"])})
        atomic_write(tmp / MANIFEST_NAME, sign_manifest(doc, list(keys)))
        _publish(tmp, out)
    return out / MANIFEST_NAME


def _manifest_doc(root: Path, name: str, version: int, description: str, ins: Sequence[TensorInfo],
                  outs: Sequence[TensorInfo], built: Sequence[BuiltVariant], extras: Mapping[str, Path], *,
                  now: float | None, expires_in_s: float, rtol: float, atol: float,
                  max_p95_ms: float | None, provenance: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The manifest document for the files in ``root``, checked with the device's own schema."""
    t = time.time() if now is None else now
    validation: dict[str, Any] = {"inputs": INPUTS_NAME, "expected": EXPECTED_NAME,
                                  "rtol": rtol, "atol": atol}
    if max_p95_ms is not None:
        validation["max_p95_ms"] = max_p95_ms
    doc: dict[str, Any] = {
        "v": 1,
        "name": name,
        "version": version,
        "created_at": now_rfc3339(t),
        "expires_at": now_rfc3339(t + expires_in_s),
        "description": description,
        "io": {"inputs": [i.to_dict() for i in ins], "outputs": [o.to_dict() for o in outs]},
        "variants": [{"id": "onnx-fp32", "format": "onnx", "precision": "fp32",
                      "files": [file_entry(root, MODEL_NAME).to_dict()]},
                     *(b.document(lambda rel: file_entry(root, rel).to_dict()) for b in built)],
        "files": [file_entry(root, rel).to_dict() for rel in (*extras, INPUTS_NAME, EXPECTED_NAME)],
        "validation": validation,
        "requires": {"agent": REQUIRES_AGENT},
    }
    if provenance:
        doc["source"] = {k: str(v)[:MAX_SOURCE_VALUE_CHARS] for k, v in provenance.items()}
    for vd in doc["variants"]:
        if vd["format"] == "onnx" and (ops := model_operators(root / vd["files"][0]["path"])):
            vd["operators"] = ops
    try:
        parse_document(doc)
    except errors.AgentError as e:
        raise BuildError(f"the manifest would be rejected by devices: {e}") from e
    return doc


def check_document(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` as devices will check it (schema, encryption, recipients), or BuildError."""
    from agent.bundles import sealed

    try:
        parse_document(doc)
        sealed.encrypted_files(doc)
        sealed.recipients(doc)
    except errors.AgentError as e:
        raise BuildError(f"the manifest would be rejected by devices: {e}") from e
    return doc


def _check_file(root: Path, root_resolved: Path, entry: FileEntry) -> None:
    """Size and sha256 of one listed file; RejectError with the device's code on mismatch."""
    p = root / entry.path
    if p.is_symlink() or not p.resolve().is_relative_to(root_resolved):
        raise errors.RejectError(errors.INVALID_BUNDLE, f"{entry.path}: a link or outside the bundle")
    if not p.is_file():
        raise errors.RejectError(errors.INVALID_BUNDLE, f"{entry.path}: listed in the manifest but missing")
    h = hashlib.sha256()
    size = 0
    with open(p, "rb") as f:
        while size <= entry.size:
            chunk = f.read(min(HASH_CHUNK_BYTES, entry.size + 1 - size))
            if not chunk:
                break
            h.update(chunk)
            size += len(chunk)
    if size > entry.size:
        raise errors.RejectError(errors.SIZE_EXCEEDED,
                                 f"{entry.path}: longer than its listed size {entry.size} bytes")
    if size < entry.size:
        raise errors.RejectError(errors.HASH_MISMATCH,
                                 f"{entry.path}: {size} bytes, the manifest lists {entry.size}")
    got = h.hexdigest()
    if got != entry.sha256:
        raise errors.RejectError(errors.HASH_MISMATCH,
                                 f"{entry.path}: sha256 mismatch (expected {entry.sha256}, got {got})")


def verify_bundle(bundle_dir: Path | str, trust: TrustStore, threshold: int = 1,
                  now: float | None = None) -> VerifyReport:
    """Verify a bundle folder as a device would; RejectError with a stable code on the first fault."""
    root = Path(bundle_dir)
    mpath = root / MANIFEST_NAME
    try:
        with open(mpath, "rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as e:
        raise errors.RejectError(errors.INVALID_BUNDLE, f"{mpath}: {e.strerror or e}") from e
    if threshold < 1:
        raise ValueError(f"threshold must be at least 1, got {threshold}")
    if len(trust) == 0:
        raise errors.RejectError(errors.UNTRUSTED_KEY, trust.no_keys_message())
    manifest = verify_manifest(raw, trust, threshold)
    if manifest.is_expired(now):
        raise errors.RejectError(errors.EXPIRED, f"{manifest.name} v{manifest.version}: expired at {manifest.expires_at}")
    entries: dict[str, FileEntry] = {}
    for fe in (*(f for v in manifest.variants for f in v.files), *manifest.files):
        entries[fe.path] = fe
    root_resolved = root.resolve()
    for entry in entries.values():
        _check_file(root, root_resolved, entry)
    return VerifyReport(manifest, tuple(entries.values()))


def describe(report: VerifyReport) -> str:
    """One-paragraph summary of a verified bundle for the CLI."""
    m = report.manifest
    total = sum(f.size for f in report.files)
    variants = ", ".join(f"{v.id} ({v.format}/{v.precision})" for v in m.variants)
    rs = m.raw.get("recipients") or []
    sealed = f"; model files encrypted (age-v1) to {', '.join(rs)}" if rs else ""
    return (f"OK {m.name} v{m.version}: variants {variants}; {len(report.files)} files OK "
            f"({total} bytes, sizes and sha256 match){sealed}; expires {m.expires_at}")


def manifest_document(manifest_path: Path) -> dict[str, Any]:
    """The (unverified) manifest document of a bundle this tool just built, for printing."""
    env = dsse.parse_envelope(manifest_path.read_bytes())
    doc: dict[str, Any] = json.loads(dsse.payload_bytes(env))
    return doc


# ---------------------------------------------------------------- offline archives

PACK_SUFFIXES = {".tar": "tar", ".tar.gz": "tar.gz", ".tgz": "tar.gz", ".zip": "zip"}
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip can hold: packs are reproducible
PACK_FILE_MODE = 0o644


def pack_kind(out: Path) -> str:
    """The archive kind ``out``'s name asks for; BuildError for any other name."""
    name = out.name.lower()
    for suffix in sorted(PACK_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return PACK_SUFFIXES[suffix]
    raise BuildError(f"{out}: the archive name must end in {', '.join(PACK_SUFFIXES)}")


def pack_bundle(bundle_dir: Path | str, out: Path | str) -> Path:
    """Pack a bundle folder into one offline archive (``.tar``, ``.tar.gz``/``.tgz`` or ``.zip``).

    ``manifest.json`` goes first (devices read and verify it before anything else), then exactly
    the files the manifest lists, sorted, as regular files with fixed owner, mode and time, so the
    same folder always packs to the same bytes (gzip and zip aside from their own headers). Each
    file's size and sha256 is checked against the manifest before it is packed; the signature is
    not (use ``bundle verify`` with a trust folder for that).
    """
    import tarfile
    import zipfile

    root = Path(bundle_dir)
    out = Path(out)
    kind = pack_kind(out)
    mpath = root / MANIFEST_NAME
    try:
        raw = mpath.read_bytes()
    except OSError as e:
        raise BuildError(f"{mpath}: {e.strerror or e}") from e
    if len(raw) > MAX_MANIFEST_BYTES:
        raise BuildError(f"{mpath}: larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        manifest = parse_document(json.loads(dsse.payload_bytes(dsse.parse_envelope(raw))))
    except (errors.AgentError, ValueError) as e:
        raise BuildError(f"{mpath}: not a bundle manifest: {e}") from e
    entries: dict[str, FileEntry] = {}
    for fe in (*(f for v in manifest.variants for f in v.files), *manifest.files):
        entries[fe.path] = fe
    root_resolved = root.resolve()
    for entry in entries.values():
        try:
            _check_file(root, root_resolved, entry)
        except errors.AgentError as e:
            raise BuildError(f"cannot pack {root}: {e.code}: {e.message}") from e
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    members = [(MANIFEST_NAME, mpath), *((p, root / p) for p in sorted(entries))]
    try:
        if kind == "zip":
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
                for name, src in members:
                    zi = zipfile.ZipInfo(name, ZIP_EPOCH)
                    zi.external_attr = (0o100000 | PACK_FILE_MODE) << 16
                    zi.create_system = 3
                    zi.compress_type = zipfile.ZIP_DEFLATED
                    with open(src, "rb") as fin, zf.open(zi, "w") as fout:
                        shutil.copyfileobj(fin, fout, HASH_CHUNK_BYTES)
        else:
            mode = "w:gz" if kind == "tar.gz" else "w"
            with tarfile.open(tmp, mode, format=tarfile.PAX_FORMAT) as tf:  # type: ignore[call-overload]
                for name, src in members:
                    ti = tarfile.TarInfo(name)
                    ti.size = src.stat().st_size
                    ti.mode = PACK_FILE_MODE
                    ti.mtime = 0
                    ti.uid = ti.gid = 0
                    ti.uname = ti.gname = ""
                    with open(src, "rb") as fin:
                        tf.addfile(ti, fin)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def verify_path(path: Path | str, trust: TrustStore, threshold: int = 1, now: float | None = None) -> VerifyReport:
    """Verify a bundle folder or an offline archive as a device would."""
    from agent.bundles.archive import verify_archive

    p = Path(path)
    if p.is_dir():
        return verify_bundle(p, trust, threshold, now)
    if threshold < 1:
        raise ValueError(f"threshold must be at least 1, got {threshold}")
    report = verify_archive(p, trust, threshold, now)
    return VerifyReport(report.manifest, report.files)
