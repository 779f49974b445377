"""Every runtime loads an encrypted variant from decrypted bytes (agent/bundles/sealed.py):
onnxruntime (.onnx), OpenVINO (IR .xml + .bin, and .onnx) and LiteRT (.tflite), built by
fleetctl with ``--encrypt-to``, each giving the plain model's outputs. The loads run in a child
process, which the seam makes non-dumpable (as a worker is), not in the test process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from conftest import make_linear_onnx
from integration.opskit import env

from fleetctl.bundle import build_bundle, manifest_document
from fleetctl.keys import generate_keypair, load_signing_keys
from fleetctl.sealing import generate_identity

CASES = [("onnx-fp32", "onnxruntime", "CPUExecutionProvider"), ("onnx-fp32", "openvino", "CPU"),
         ("openvino-fp32", "openvino", "CPU"), ("tflite-fp32", "tflite", "xnnpack")]
CHILD = """
import json, sys
from pathlib import Path
import numpy as np
from agent.backends import find_backend
from agent.backends.base import LoadOptions
from agent.backends import unseal
from agent.bundles import sealed
from fleetctl.bundle import manifest_document
root, identity, cases = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
doc = manifest_document(root / "manifest.json")
x = np.arange(8, dtype=np.float32).reshape(2, 4) / 8
out = {}
for vid, runtime, target in cases:
    v = next(v for v in doc["variants"] if v["id"] == vid)
    paths = [f["path"] for f in v["files"]]
    main = next(p for p in paths if p.endswith((".onnx", ".xml", ".tflite")))
    spec = sealed.load_spec(doc, root, paths, [identity])
    m = unseal.load(find_backend(runtime), root / main, target, LoadOptions(extra={sealed.SPEC_KEY: spec}))
    out[f"{vid}@{runtime}"] = m.infer({m.inputs[0].name: x})[m.outputs[0].name].tolist()
print(json.dumps(out))
"""


def test_each_runtime_loads_an_encrypted_variant_from_memory(tmp_path: Path) -> None:
    import onnxruntime as ort

    model = make_linear_onnx(tmp_path / "m.onnx", seed=5)
    ident = generate_identity(tmp_path / "k", "dev")
    kp = generate_keypair(tmp_path / "k", "fleet")
    build_bundle(model, tmp_path / "b", "lin", 1, load_signing_keys([kp.private_path]),
                 variants=["openvino-fp32", "tflite"], encrypt_to=[ident.recipient])
    doc = manifest_document(tmp_path / "b" / "manifest.json")
    sealed_paths = {f["path"] for v in doc["variants"] for f in v["files"] if "encryption" in f}
    assert {"model.onnx", "model.tflite"} <= sealed_paths and any(p.endswith(".bin") for p in sealed_paths)
    r = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "b"), str(ident.identity_path), json.dumps(CASES)],
                       capture_output=True, text=True, timeout=120, env=env())
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    x = np.arange(8, dtype=np.float32).reshape(2, 4) / 8
    want = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(["y"], {"x": x})[0]
    assert set(got) == {f"{v}@{rt}" for v, rt, _ in CASES}
    for key, y in got.items():
        np.testing.assert_allclose(np.asarray(y, dtype=np.float32), want, rtol=1e-4, atol=1e-5, err_msg=key)
