"""onnxruntime's CUDA (and TensorRT) path on a real NVIDIA GPU. Skipped where there is none.

Run on a GPU machine (see docs/hardware.md, "GPU verification"):

    pip install -e '.[test]' && pip uninstall -y onnxruntime && pip install onnxruntime-gpu
    python -m pytest tests/integration/test_backends_gpu.py -v -s -p no:cacheprovider

It prints the figures to record in docs/hardware.md. Nothing is faked: if the provider is not
really usable the test fails with onnxruntime's own reason rather than passing on the CPU.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from agent.backends.autotune import time_model
from agent.backends.base import LoadOptions
from agent.backends.onnxruntime import CPU, CUDA, TENSORRT, OnnxRuntimeBackend, nvidia_present

ort = pytest.importorskip("onnxruntime")
HAS_CUDA = CUDA in ort.get_available_providers() and nvidia_present()
pytestmark = pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu and an NVIDIA GPU with its driver")
DIMS = (1024, 4096, 4096, 1000)
CUDA_VS_CPU_ATOL = 1e-3  # FIELD-NOTES: CUDA vs CPU differ by up to 8e-4 on a real classifier
FP16_ATOL = 5e-2


def make_big_mlp(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, cur = [], [], "x"
    for i, (a, b) in enumerate(itertools.pairwise(DIMS)):
        inits += [numpy_helper.from_array((rng.standard_normal((a, b)) * (2 / a) ** 0.5).astype(np.float32), f"w{i}"),
                  numpy_helper.from_array(np.zeros(b, np.float32), f"b{i}")]
        nodes += [helper.make_node("MatMul", [cur, f"w{i}"], [f"m{i}"]), helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"])]
        cur = f"a{i}"
        if i < len(DIMS) - 2:
            nodes.append(helper.make_node("Relu", [cur], [f"r{i}"]))
            cur = f"r{i}"
    nodes.append(helper.make_node("Identity", [cur], ["y"]))
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", DIMS[0]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", DIMS[-1]])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_cuda_matches_cpu_and_is_timed(tmp_path: Path) -> None:
    from fleetctl.variants import convert_onnx_fp16

    fp32 = make_big_mlp(tmp_path / "big.onnx")
    fp16 = tmp_path / "big16.onnx"
    convert_onnx_fp16(fp32, fp16)
    b = OnnxRuntimeBackend()
    usable = {t.target: t.availability for t in b.targets()}
    assert usable[CUDA].usable, usable[CUDA].reason
    rows = []
    for batch in (1, 32):
        x = np.random.default_rng(batch).standard_normal((batch, DIMS[0])).astype(np.float32)
        cpu = b.load(fp32, CPU, LoadOptions(precision="fp32"))
        ref = cpu.infer({"x": x})["y"]
        rows.append((batch, CPU, "fp32", 0.0, time_model(cpu, {"x": x})))
        cpu.close()
        cases = [(CUDA, fp32, "fp32", CUDA_VS_CPU_ATOL), (CUDA, fp16, "fp16", FP16_ATOL)]
        if usable[TENSORRT].usable:
            cases += [(TENSORRT, fp32, "fp32", CUDA_VS_CPU_ATOL), (TENSORRT, fp16, "fp16", FP16_ATOL)]
        for target, path, prec, atol in cases:
            m = b.load(path, target, LoadOptions(precision=prec, cache_dir=tmp_path / "cache"))
            assert m.details["providers"][0] == target  # active, not silently on the CPU
            y = m.infer({"x": x})["y"]
            err = float(np.abs(y - ref).max())
            assert err <= atol, (target, prec, err)
            rows.append((batch, target, prec, err, time_model(m, {"x": x})))
            m.close()
    print(f"\nonnxruntime {ort.__version__}, MLP {DIMS}")
    print("| batch | provider | variant | max abs diff vs CPU fp32 | median ms | p90 ms |")
    for batch, target, prec, err, t in rows:
        print(f"| {batch} | {target} | {prec} | {err:.2e} | {t['median_ms']:.3f} | {t['p90_ms']:.3f} |")


def test_selection_on_this_gpu_machine_picks_the_gpu() -> None:
    from agent.backends import available_backends
    from agent.backends.selection import all_targets, policy_from_report, select
    from agent.bundles.manifest import parse_document
    from agent.hardware import hw_report

    pol = policy_from_report(hw_report("/", probe_runtimes=False))
    m = parse_document({"v": 1, "name": "m", "version": 1, "expires_at": "2036-01-01T00:00:00Z",
                        "io": {"inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 4]}],
                               "outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 3]}]},
                        "variants": [{"id": v, "format": "onnx", "precision": v[5:],
                                      "files": [{"path": f"{v}.onnx", "size": 1, "sha256": c * 64}]}
                                     for v, c in (("onnx-fp32", "a"), ("onnx-fp16", "b"))]})
    d = select(m, all_targets(available_backends()), policy=pol)
    print("\n", d.explain()["chosen"])
    assert d.chosen.target.target in (TENSORRT, CUDA) and d.chosen.variant.id == "onnx-fp16"
