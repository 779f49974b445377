"""The real daemon with all three backends: a multi-variant bundle deployed with a signed command
through a real Mosquitto (autotune on, as shipped), then ``agentctl bench`` and ``agentctl hw``
through the control socket. Nothing is faked."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest
from agentproc import AgentProcess, Observer
from conftest import REPO, Mosquitto
from test_backends import make_mlp

from fleetctl import keys
from fleetctl.bundle import build_bundle


def fleetctl(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fleetctl.main", *args], capture_output=True, text=True,
                          timeout=timeout_s, cwd=REPO)


def test_deploy_bench_and_hw_through_the_daemon(tmp_path: Path, mosquitto: Mosquitto) -> None:
    kp = keys.generate_keypair(tmp_path / "keys", "fleet")
    model = make_mlp(tmp_path / "src" / "mlp.onnx")
    manifest = build_bundle(model, tmp_path / "bundle", "mlp", 1, keys.load_signing_keys([str(kp.private_path)]),
                            variants=["openvino-fp32", "tflite"], samples=2)
    obs = Observer(mosquitto.host, mosquitto.port)
    agent = AgentProcess(tmp_path / "device", mosquitto.url)
    agent.write_config()
    agent.trust_key(kp.public_path.read_bytes())
    agent.start()
    try:
        obs.wait(lambda t, d: t == "edge/dev1/status" and d.get("online") is True, what="online status")
        r = fleetctl("deploy", "--device", "dev1", "--model", "mlp", "--manifest-url", manifest.as_uri(),
                     "--key", str(kp.private_path), "--broker", mosquitto.url, "--wait", "--timeout", "90")
        assert r.returncode == 0, f"{r.stdout}\n{r.stderr}\n{agent.log.read_text()[-3000:]}"
        final = obs.wait(lambda t, d: t.startswith("edge/dev1/jobs/") and d.get("state") == "SUCCEEDED", what="job")
        sel = final["result"]["selection"]
        assert sel["autotune"]["state"] == "measured" and sel["autotune"]["winner"] == {
            "backend": final["result"]["backend"], "variant": final["result"]["variant"]}
        if platform.machine() == "x86_64":
            assert sel["profile"] == "generic-x86_64"

        b = agent.agentctl("bench", "mlp", "-n", "20", "--json", timeout_s=120)
        assert b.returncode == 0, b.stderr
        bench = json.loads(b.stdout)
        assert bench["variant"] == final["result"]["variant"] and bench["serving_backend"] == final["result"]["backend"]
        # Every variant autotune downloaded is benched on every target that reads its format.
        assert set(bench["variants"]) >= {row["variant"] for row in sel["autotune"]["measured"]}
        for vid, per in bench["variants"].items():
            for bid, fig in per.items():
                if fig["usable"]:
                    assert fig["runs"] == 20 and fig["p50_ms"] > 0, (vid, bid)
                else:
                    assert fig["reason"], (vid, bid)
        assert bench["variants"]["onnx-fp32"]["onnxruntime:CPUExecutionProvider"]["usable"] is True
        human = agent.agentctl("bench", "mlp", "-n", "5")
        assert human.returncode == 0 and "onnxruntime:CPUExecutionProvider" in human.stdout and "P50_MS" in human.stdout

        hw = agent.agentctl("hw", "--json")
        assert hw.returncode == 0, hw.stderr
        rep = json.loads(hw.stdout)
        names = {x["name"]: x for x in rep["backends"]}
        for target in ("onnxruntime:CPUExecutionProvider", "openvino:CPU", "tflite:xnnpack", "tflite:edgetpu",
                       "openvino:NPU"):
            assert target in names and names[target]["reason"], target
        assert names["onnxruntime:CPUExecutionProvider"]["usable"] is True
        assert names["tflite:edgetpu"]["usable"] is False
    finally:
        code = agent.stop()
        obs.close()
    assert code == 0, agent.log.read_text()[-3000:]


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the profile expectation is for x86_64 machines")
def test_agentctl_hw_offline_lists_every_backend() -> None:
    r = subprocess.run([sys.executable, "-m", "agent.cli.agentctl", "hw", "--config", "/nonexistent", "--json"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["profile"] == "generic-x86_64"
    ranked = [x for x in rep["backends"] if x["profile"] == "generic-x86_64"]
    extra = [x for x in rep["backends"] if x["profile"] is None]
    assert ranked and extra and max(x["rank"] for x in ranked) < min(x["rank"] for x in extra)
    assert {"openvino:GPU", "tflite:cpu", "onnxruntime:OpenVINOExecutionProvider"} <= {x["name"] for x in extra}
