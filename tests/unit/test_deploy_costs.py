"""What bounds a deploy's own cost: the sha256 taken while streaming (no read-back), validation's
time-boxed timed runs, autotune's layout cache, parallel candidate loads and reused golden checks."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_selection_profiles import DictKV, samples_bundle, targets

from agent import errors
from agent.backends import autotune
from agent.backends.selection import Candidate, select
from agent.bundles import streaming
from agent.bundles.fetch import Fetcher, StreamHash
from agent.bundles.manifest import Manifest, TensorSpec, parse_document
from agent.deploy import validation

# -- sha256 while streaming ----------------------------------------------------------------------

@pytest.mark.parametrize("size", [0, 1000, streaming.HASH_THREAD_MIN_BYTES + 12345])
def test_stream_hash_matches_hashlib_inline_and_threaded(size: int, tmp_path: Path) -> None:
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    h = StreamHash(size=size)
    for i in range(0, size, 65536):
        h.update(data[i:i + 65536])
    assert h.digest() == (size, hashlib.sha256(data).hexdigest())
    # A resume: the prefix already on disk is read once, then the rest streams.
    part = tmp_path / "part"
    part.write_bytes(data[: size // 3])
    r = StreamHash(part, size // 3, size)
    r.update(data[size // 3:])
    assert r.digest() == (size, hashlib.sha256(data).hexdigest())


def test_stream_hash_close_stops_the_thread_after_a_failure() -> None:
    h = StreamHash(size=streaming.HASH_THREAD_MIN_BYTES)
    h.update(b"x" * 100)
    worker = h._thread
    assert worker is not None and worker.is_alive()
    h.close()
    h.close()  # idempotent
    assert not worker.is_alive() and h.digest() == (100, hashlib.sha256(b"x" * 100).hexdigest())


def test_file_download_is_verified_from_the_stream_without_reading_back(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "model.bin"
    src.write_bytes(b"abc" * 100_000)
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    reads: list[Path] = []
    real_open = open

    def spy(path: Any, mode: str = "r", *a: Any, **k: Any) -> Any:
        if "r" in mode and Path(path).name == "part":
            reads.append(Path(path))
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr("builtins.open", spy)
    Fetcher().download(src.as_uri(), tmp_path / "part", src.stat().st_size, sha)
    assert reads == [] and (tmp_path / "part").read_bytes() == src.read_bytes()
    with pytest.raises(errors.RejectError) as e:
        Fetcher().download(src.as_uri(), tmp_path / "part2", src.stat().st_size, "0" * 64)
    assert e.value.code == errors.HASH_MISMATCH and not (tmp_path / "part2").exists()


# -- validation's timed runs ---------------------------------------------------------------------

class SlowModel:
    """Answers y = 2x after ``delays`` seconds per call (the last one repeats)."""

    backend_id = "fake:cpu"
    known_shapes: list[Any] = []  # LoadedModel: a golden check assigns it
    inputs = (TensorSpec("x", "float32", (None, 2)),)
    outputs = (TensorSpec("y", "float32", (None, 2)),)

    def __init__(self, *delays: float) -> None:
        self.delays = list(delays)
        self.calls = 0
        self.loaded_at = time.monotonic()
        self.closed = False
        self.details = {"compute_precision": "fp32"}

    def infer(self, inputs: dict[str, Any]) -> dict[str, Any]:
        time.sleep(self.delays[min(self.calls, len(self.delays) - 1)])
        self.calls += 1
        return {"y": np.asarray(inputs["x"]) * 2}

    def close(self) -> None:
        self.closed = True


def golden(tmp_path: Path, max_p95_ms: float | None = None, variants: tuple[str, ...] = ("onnx-fp32",)) -> Manifest:
    x = np.ones((2, 2), np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    np.savez(tmp_path / "out.npz", y=x * 2)
    m = samples_bundle(*variants)
    raw = dict(m.raw)
    raw["files"] = [{"path": "in.npz", "size": 1, "sha256": "a" * 64}, {"path": "out.npz", "size": 1, "sha256": "b" * 64}]
    raw["validation"] = {"inputs": "in.npz", "expected": "out.npz",
                         **({"max_p95_ms": max_p95_ms} if max_p95_ms is not None else {})}
    return parse_document(raw)


def test_validation_times_a_quick_sample_without_an_slo(tmp_path: Path) -> None:
    model = SlowModel(0.03)
    fig = validation.validate(model, tmp_path, golden(tmp_path))  # type: ignore[arg-type]
    assert fig["runs"] == validation.SLO_QUICK_RUNS and model.calls == 1 + validation.SLO_QUICK_RUNS
    fast = SlowModel(0.0)  # a fast model still gets the full count: it costs nothing
    assert validation.validate(fast, tmp_path, golden(tmp_path))["runs"] == validation.SLO_RUNS_MIN  # type: ignore[arg-type]


def test_validation_checks_a_met_slo_over_the_full_count_and_refuses_a_missed_one_early(tmp_path: Path) -> None:
    fig = validation.validate(SlowModel(0.02), tmp_path, golden(tmp_path, max_p95_ms=1000))  # type: ignore[arg-type]
    assert fig["runs"] == validation.SLO_RUNS_MIN
    # A slow run after the quick sample is still caught, as before.
    late = SlowModel(*[0.02] * 12, 0.08, 0.001)
    with pytest.raises(errors.RejectError) as e:
        validation.validate(late, tmp_path, golden(tmp_path, max_p95_ms=60))  # type: ignore[arg-type]
    assert e.value.code == errors.SLO_FAILED
    slow = SlowModel(0.05)  # misses in the quick sample: refused without the other 15 runs
    with pytest.raises(errors.RejectError) as e:
        validation.validate(slow, tmp_path, golden(tmp_path, max_p95_ms=10))  # type: ignore[arg-type]
    assert e.value.code == errors.SLO_FAILED and slow.calls == 1 + validation.SLO_QUICK_RUNS


# -- autotune ------------------------------------------------------------------------------------

def test_layout_hash_ignores_weights_but_not_sizes_or_variants() -> None:
    m = samples_bundle("onnx-fp32", "openvino-fp32")
    raw = dict(m.raw)
    raw["version"] = 2
    raw["variants"] = [dict(v, files=[dict(f, sha256="f" * 64) for f in v["files"]]) for v in raw["variants"]]
    retrained = parse_document(raw)
    assert autotune.model_hash(retrained) != autotune.model_hash(m)
    assert autotune.layout_hash(retrained) == autotune.layout_hash(m)
    raw["variants"] = [dict(v, files=[dict(f, size=f["size"] + 1) for f in v["files"]]) for v in raw["variants"]]
    assert autotune.layout_hash(parse_document(raw)) != autotune.layout_hash(m)
    assert autotune.layout_hash(samples_bundle("onnx-fp32")) != autotune.layout_hash(m)


def test_layout_hash_ignores_the_openvino_xml_size_but_not_its_weights() -> None:
    """OpenVINO names generated nodes from a process-wide counter, so converting the same ONNX
    model twice gives .xml files of different sizes (``Constant_2360`` vs ``Constant_17890``)."""
    base = samples_bundle("onnx-fp32", "openvino-fp32").raw

    def layout(xml_size: int, bin_size: int) -> str:
        raw = dict(base)
        ir = [{"path": "ir/model.xml", "size": xml_size, "sha256": "c" * 64},
              {"path": "ir/model.bin", "size": bin_size, "sha256": "d" * 64}]
        raw["variants"] = [dict(v, files=ir) if v["format"] == "openvino" else v for v in raw["variants"]]
        return autotune.layout_hash(parse_document(raw))

    assert layout(4947, 2836) == layout(4950, 2836)  # the same graph, converted in another process
    assert layout(4947, 2836) != layout(4947, 2840)  # other weight shapes


def test_plan_reuses_a_verdict_of_the_same_layout_and_says_so() -> None:
    m = samples_bundle("onnx-fp32", "openvino-fp32")
    kv = DictKV()
    d = select(m, targets())
    assert autotune.plan(d, m, kv, "exact", enabled=True, pinned=False, layout="layout")
    assert d.autotune is not None and d.autotune["layout_key"] == "layout"
    kv["layout"] = {"winner": {"variant": "onnx-fp32", "backend": "onnxruntime:CPUExecutionProvider"},
                    "measured": [{"variant": "onnx-fp32"}], "at": 1000.0, "version": 3}
    d2 = select(m, targets())
    assert autotune.plan(d2, m, kv, "exact", enabled=True, pinned=False, layout="layout", now=2000.0) == []
    assert (d2.chosen.target.id, d2.chosen.variant.id) == ("onnxruntime:CPUExecutionProvider", "onnx-fp32")
    assert d2.autotune is not None and d2.autotune["state"] == "cached" and d2.autotune["basis"] == "layout"
    assert d2.autotune["measured_version"] == 3 and "same layout" in d2.autotune["why"]
    kv["exact"] = {"winner": {"variant": "openvino-fp32", "backend": "openvino:CPU"}, "measured": [], "at": 1500.0}
    d3 = select(m, targets())  # the verdict for these very files comes first
    assert autotune.plan(d3, m, kv, "exact", enabled=True, pinned=False, layout="layout", now=2000.0) == []
    assert d3.autotune is not None and d3.autotune["basis"] == "files" and d3.chosen.target.id == "openvino:CPU"


@pytest.mark.parametrize("concurrent", [1, 2])
def test_tune_loads_two_at_once_holds_at_most_two_and_caches_under_both_keys(concurrent: int, tmp_path: Path) -> None:
    m = golden(tmp_path, variants=("onnx-fp32", "openvino-fp32", "tflite-fp32"))
    d = select(m, targets())
    kv = DictKV()
    indices = autotune.plan(d, m, kv, "exact", enabled=True, pinned=False, layout="layout")
    assert len(indices) == 3
    speed = {c.target.id + c.variant.id: 0.004 * (i + 1) for i, c in enumerate(d.candidates)}
    speed[d.candidates[indices[1]].target.id + d.candidates[indices[1]].variant.id] = 0.0  # the second is fastest
    lock = threading.Lock()
    live: list[SlowModel] = []
    peak = [0]
    spans: list[tuple[float, float]] = []

    def load(c: Candidate) -> SlowModel:
        t0 = time.monotonic()
        time.sleep(0.1)
        model = SlowModel(speed[c.target.id + c.variant.id])
        with lock:
            live.append(model)
            peak[0] = max(peak[0], sum(not x.closed for x in live))
            spans.append((t0, time.monotonic()))
        return model

    res = autotune.tune(d, indices, m, tmp_path, load, lambda c, e: None, kv, "exact", "layout",  # type: ignore[arg-type]
                        concurrent_loads=concurrent)
    assert peak[0] <= autotune.MAX_LOADED
    overlapped = spans[1][0] < spans[0][1] and spans[0][0] < spans[1][1]
    assert overlapped == (concurrent == 2)
    w = d.chosen
    assert res.loaded is not None and not res.loaded.closed and res.row is not None  # type: ignore[attr-defined]
    assert (res.row["variant"], res.row["backend"]) == (w.variant.id, w.target.id) and res.row["p95_ms"] >= 0
    assert sum(not x.closed for x in live) == 1  # only the winner stays loaded
    assert kv["exact"]["winner"] == kv["layout"]["winner"] == {"variant": w.variant.id, "backend": w.target.id}
    rows = d.autotune["measured"]  # type: ignore[index]
    assert len(rows) == 3 and all(r["runs"] >= autotune.MIN_RUNS for r in rows)
    assert ("loaded_with" in rows[0]) == (concurrent == 2)


def test_tune_closes_every_model_when_a_bug_escapes(tmp_path: Path) -> None:
    m = golden(tmp_path, variants=("onnx-fp32", "openvino-fp32"))
    d = select(m, targets())
    indices = autotune.plan(d, m, DictKV(), "k", enabled=True, pinned=False)
    made: list[SlowModel] = []

    def load(c: Candidate) -> SlowModel:
        if len(made) == 1:
            raise RuntimeError("bug")
        made.append(SlowModel(0.0))
        return made[-1]

    with pytest.raises(RuntimeError):
        autotune.tune(d, indices, m, tmp_path, load, lambda c, e: None, DictKV(), "k")  # type: ignore[arg-type]
    assert made and all(x.closed for x in made)
