"""Certified predictions: a converted model's bundle carries the source framework's own outputs.

``build_from_source`` converts (fleetctl/sources), runs the ONNX model with onnxruntime on the
sample inputs, and compares with what the trained model predicts on the same inputs: class
labels (``Source.exact``) must be equal, every other output within ``atol + rtol·|expected|`` (the
bundle's tolerance, the one devices apply). A conversion outside that is refused with the worst
sample: its index, its input and both answers. The golden samples written into the bundle are
the source framework's outputs, so devices validate against the trained model, not against the
conversion.

Sample inputs: ``--sample-input`` (.npy for the one input, .npz keyed by input name), else the
example the source carries (an MLflow input example), else seeded random ones. The source
framework sees them as given (float64 stays float64); the ONNX model gets them cast to its input
dtype, as a device would.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fleetctl import bundle
from fleetctl.sources import Source, kind_of, open_source

MAX_SHOWN_VALUES = 8  # values of a sample's input or output printed in a refusal
SAMPLE_LIMIT = 4096  # sample inputs a build keeps (the golden files travel to every device)


class CertificationError(bundle.BuildError):
    """The converted model does not predict what the source model predicts on the samples."""


@dataclass(frozen=True)
class Agreement:
    """How close the ONNX outputs came to the source's, per output: worst error and where."""

    output: str
    exact: bool
    max_abs_error: float
    worst_sample: int

    def line(self) -> str:
        if self.exact:
            return f"{self.output}: equal on every sample"
        return f"{self.output}: max abs error {self.max_abs_error:.3g} (sample #{self.worst_sample})"


def read_samples(path: Path) -> np.ndarray | dict[str, np.ndarray]:
    """``--sample-input``: one array (.npy) or arrays keyed by input name (.npz); no pickles."""
    try:
        if path.suffix.lower() == ".npy":
            return np.asarray(np.load(path, allow_pickle=False))
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise bundle.BuildError(f"--sample-input {path}: not a readable .npy/.npz without pickles ({e})") from e


def _show(a: np.ndarray) -> str:
    flat = np.asarray(a).reshape(-1)
    vals = ", ".join(repr(x.item()) if hasattr(x, "item") else repr(x) for x in flat[:MAX_SHOWN_VALUES])
    return f"[{vals}{', …' if flat.size > MAX_SHOWN_VALUES else ''}]"


def compare(onnx_out: Mapping[str, np.ndarray], native: Mapping[str, np.ndarray], exact: Sequence[str],
            x: np.ndarray, rtol: float, atol: float, framework: str) -> list[Agreement]:
    """Per-output agreement; CertificationError naming the worst sample when one is outside."""
    out: list[Agreement] = []
    for name, want in native.items():
        if name not in onnx_out:
            raise CertificationError(f"the converted model has no output {name!r} (it has {sorted(onnx_out)})")
        got = np.asarray(onnx_out[name])
        if got.size != want.size:
            raise CertificationError(f"output {name!r}: the converted model gives shape {list(got.shape)}, "
                                     f"{framework} {list(want.shape)}")
        got = got.reshape(want.shape)
        rows = len(want)
        if name in exact or want.dtype.kind in "USO":
            bad = np.asarray(got.astype(want.dtype) != want).reshape(rows, -1).any(axis=1)
            if bad.any():
                i = int(np.argmax(bad))
                raise CertificationError(
                    f"the conversion changes predictions: output {name!r} differs on {int(bad.sum())} of {rows} "
                    f"samples; worst sample #{i}: input {_show(x[i])}, {framework} {name} {_show(want[i])}, "
                    f"ONNX {name} {_show(got[i])} (labels must match exactly)")
            out.append(Agreement(name, True, 0.0, 0))
            continue
        g, w = got.astype(np.float64), want.astype(np.float64)
        diff = np.abs(g - w)
        excess = (diff - (atol + rtol * np.abs(w))).reshape(rows, -1).max(axis=1)
        i = int(np.argmax(excess))
        if excess[i] > 0:
            raise CertificationError(
                f"the conversion changes predictions: output {name!r} differs beyond atol {atol:g} + rtol {rtol:g}·|expected| "
                f"on {int((excess > 0).sum())} of {rows} samples; worst sample #{i}: input {_show(x[i])}, "
                f"{framework} {_show(w[i])}, ONNX {_show(g[i])} (max abs error {float(diff.max()):.3g})")
        per_row = diff.reshape(rows, -1).max(axis=1)
        j = int(np.argmax(per_row))
        out.append(Agreement(name, False, float(per_row[j]), j))
    return out


def _native_samples(src: Source, given: np.ndarray | dict[str, np.ndarray] | None, samples: int,
                    seed: int) -> np.ndarray:
    """The sample inputs as the source framework sees them."""
    if isinstance(given, dict):
        if list(given) != [src.input_name]:
            raise bundle.BuildError(f"--sample-input: a converted model has one input {src.input_name!r}; "
                                    f"the .npz holds {sorted(given)} (or give a .npy)")
        given = given[src.input_name]
    x = given if given is not None else src.example
    if x is None:
        if src.input_dtype == "string":
            raise bundle.BuildError("a model with string inputs needs --sample-input")
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((samples, src.n_features or 1)).astype(np.float32)
    x = np.asarray(x)
    if x.ndim == 1:
        x = x.reshape(1, -1)
    if x.ndim != 2 or (src.n_features is not None and x.shape[1] != src.n_features):
        raise bundle.BuildError(f"sample inputs have shape {list(x.shape)}; the model takes [N, {src.n_features}]")
    if not 1 <= len(x) <= SAMPLE_LIMIT:
        raise bundle.BuildError(f"{len(x)} sample inputs; give between 1 and {SAMPLE_LIMIT}")
    return x


def _one_input_npz(model_path: Path, x: np.ndarray, out: Path) -> Path:
    """``x`` as golden inputs of an ONNX model with one input (an .npy, or an input example)."""
    ins, _ = bundle.model_io(model_path)
    if len(ins) != 1:
        raise bundle.BuildError(f"{model_path.name} has {len(ins)} inputs; give --sample-input as an .npz "
                                "keyed by input name")
    out.write_bytes(bundle.npz_bytes({ins[0].name: x}))
    return out


def _onnx_input(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "string":
        return x.astype(str)
    return x.astype(np.dtype(dtype))


def _golden_outputs(native: Mapping[str, np.ndarray], onnx_out: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The source's outputs in the ONNX outputs' shapes (what the device answers), as plain arrays."""
    out: dict[str, np.ndarray] = {}
    for name, want in native.items():
        a = np.asarray(want).reshape(np.asarray(onnx_out[name]).shape)
        out[name] = a.astype(str) if a.dtype.kind in "OS" else a
    return out


def certify(src: Source, model_path: Path, x: np.ndarray, rtol: float, atol: float
            ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[Agreement]]:
    """(feeds, golden outputs, agreement) for ``src`` converted into ``model_path``."""
    assert src.predict is not None
    _, outs = bundle.model_io(model_path)
    feeds = {src.input_name: _onnx_input(x, src.input_dtype)}
    onnx_out = bundle.reference_outputs(model_path, feeds, outs)
    try:
        native = src.predict(x)
    except Exception as e:  # the source framework raises whatever it raises on inputs it refuses
        raise bundle.BuildError(f"{src.provenance.get('framework')} could not predict the sample inputs "
                                f"({type(e).__name__}: {e})") from e
    framework = src.provenance.get("framework", "the source model")
    agreement = compare(onnx_out, native, src.exact, x, rtol, atol, framework)
    return feeds, _golden_outputs(native, onnx_out), agreement


def build_from_source(spec: str, out_dir: Path | str, name: str, version: int, keys: Sequence[Any], *,
                      tracking_uri: str | None = None, sample_input: Path | str | None = None,
                      samples: int = bundle.DEFAULT_SAMPLES, seed: int = bundle.DEFAULT_SEED,
                      rtol: float = bundle.DEFAULT_RTOL, atol: float = bundle.DEFAULT_ATOL,
                      agreement: list[Agreement] | None = None, **kw: Any) -> Path:
    """``bundle.build_bundle`` for any SOURCE (fleetctl/sources); certified when converted.

    ``agreement`` receives the per-output agreement of a converted model. Other keyword
    arguments go to ``build_bundle`` as they are.
    """
    given = read_samples(Path(sample_input)) if sample_input is not None else None
    if kind_of(spec) == "onnx":
        with tempfile.TemporaryDirectory(prefix="fleetctl-samples-") as d:
            onnx_inputs = (_one_input_npz(Path(spec), given, Path(d) / "inputs.npz") if isinstance(given, np.ndarray)
                           else sample_input)
            return bundle.build_bundle(spec, out_dir, name, version, keys, inputs=onnx_inputs, samples=samples,
                                       seed=seed, rtol=rtol, atol=atol, **kw)
    example = given if isinstance(given, np.ndarray) else None
    src = open_source(spec, tracking_uri=tracking_uri, example=example)
    with tempfile.TemporaryDirectory(prefix="fleetctl-convert-") as d:
        model_path = Path(d) / bundle.MODEL_NAME
        model_path.write_bytes(src.onnx)
        if src.predict is None:  # an MLflow onnx flavour: onnxruntime's outputs are the golden ones
            inputs: Path | str | None = sample_input if isinstance(given, dict) else None
            x = given if isinstance(given, np.ndarray) else src.example
            if x is not None:  # one array: the model's one input (the .npy or the input example)
                inputs = _one_input_npz(model_path, x, Path(d) / "inputs.npz")
            return bundle.build_bundle(model_path, out_dir, name, version, keys, inputs=inputs, samples=samples,
                                       seed=seed, rtol=rtol, atol=atol, provenance=src.provenance, **kw)
        x = _native_samples(src, given, samples, seed)
        feeds, expected, agreed = certify(src, model_path, x, rtol, atol)
        if agreement is not None:
            agreement.extend(agreed)
        return bundle.build_bundle(model_path, out_dir, name, version, keys, rtol=rtol, atol=atol,
                                   golden=(feeds, expected), provenance=src.provenance, **kw)


def tolerance_note(rtol: float, atol: float) -> str:
    """How the build compared, for the CLI."""
    return f"labels exactly, other outputs within atol {atol:g} + rtol {rtol:g}·|expected|"

