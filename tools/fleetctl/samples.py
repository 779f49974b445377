"""A small real image classifier built with onnx.helper, for the demo, the tests and
``fleetctl sample-model``, and a KServe v2 request that fits it.

Conv(3→8, 3x3) → Relu → Conv(8→16, 3x3, stride 2) → Relu → GlobalAveragePool → Flatten →
Gemm(16→10) → Softmax. Weights are seeded random: the point is a real CNN graph on a real
runtime, not accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from agent.fsutil import atomic_write

INPUT_NAME = "image"
OUTPUT_NAME = "scores"
INPUT_SHAPE = (1, 3, 32, 32)
CLASSES = 10


def make_classifier(path: Path, seed: int = 7, size: int = 32) -> Path:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)

    def w(*shape: int) -> np.ndarray:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
        return (rng.standard_normal(shape) * (2.0 / fan_in) ** 0.5).astype(np.float32)

    inits = [numpy_helper.from_array(w(8, 3, 3, 3), "c1w"), numpy_helper.from_array(np.zeros(8, np.float32), "c1b"),
             numpy_helper.from_array(w(16, 8, 3, 3), "c2w"), numpy_helper.from_array(np.zeros(16, np.float32), "c2b"),
             numpy_helper.from_array(w(CLASSES, 16), "fcw"), numpy_helper.from_array(w(CLASSES), "fcb")]
    nodes = [
        helper.make_node("Conv", [INPUT_NAME, "c1w", "c1b"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "c2w", "c2b"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fcw", "fcb"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], [OUTPUT_NAME], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "demo-classifier",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", CLASSES])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="fleetctl-samples")
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def request_body(seed: int = 0) -> dict[str, Any]:
    """One KServe v2 inference request for the classifier: a seeded random image in [0, 1)."""
    import numpy as np

    image = np.random.default_rng(seed).random(INPUT_SHAPE, dtype=np.float32)
    return {"inputs": [{"name": INPUT_NAME, "shape": list(INPUT_SHAPE), "datatype": "FP32",
                        "data": image.reshape(-1).tolist()}]}


def write_request(path: Path, seed: int = 0) -> Path:
    """Write ``request_body(seed)`` as one line of JSON (``curl -d @PATH`` sends it as is)."""
    atomic_write(path, json.dumps(request_body(seed), separators=(",", ":")).encode() + b"\n")
    return path
