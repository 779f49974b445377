"""The benchmark harness still runs end to end (``python -m benchmarks --smoke``): every section
against the real daemon, a real Mosquitto and real runtimes, at the smallest scale, in two halves
so each stays short. Performance itself is judged in benchmarks/ and docs/benchmarks.md, never
here: this only catches breakage."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, mosquitto_binary

SMOKE_TIMEOUT_S = 100.0
pytestmark = pytest.mark.skipif(mosquitto_binary() is None, reason="needs mosquitto (apt-get install -y mosquitto)")


def smoke(tmp_path: Path, sections: str, *extra: str) -> tuple[dict[str, Any], str]:
    results = tmp_path / "results.json"
    r = subprocess.run([sys.executable, "-m", "benchmarks", "--smoke", "--no-plots", "--only", sections, *extra,
                        "--out", str(tmp_path / "docs"), "--results", str(results), "--work", str(tmp_path / "work")],
                       capture_output=True, text=True, timeout=SMOKE_TIMEOUT_S, cwd=REPO)
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    res = json.loads(results.read_text())
    assert set(res["sections"]) == set(sections.split(","))
    assert not [s for s, v in res["sections"].items() if "error" in v]
    return res["sections"], (tmp_path / "docs" / "benchmarks.md").read_text()


def test_footprint_serving_deploy(tmp_path: Path) -> None:
    res, doc = smoke(tmp_path, "footprint,serving,deploy")
    fp = res["footprint"]
    assert fp["floor:bare"]["rss_mb"]["median"] > 0 and fp["daemon:process:idle"]["rss_mb"]["median"] > 0
    # The idle daemon maps no runtime and no numpy: they load only when a model needs them.
    assert all(v["max"] == 0 for v in fp["libs:process:idle"].values() if isinstance(v, dict)), fp["libs:process:idle"]
    # With process isolation numpy and the runtime stay out of the daemon for good: they live in
    # the model's worker (and the check can see a loaded library there).
    assert fp["libs:process:onnxruntime"]["numpy"]["max"] == 0 and fp["libs:process:onnxruntime"]["onnxruntime"]["max"] == 0
    assert fp["libs:process:onnxruntime:workers"]["numpy"]["min"] == 1
    assert fp["libs:process:onnxruntime:workers"]["onnxruntime"]["min"] == 1
    assert res["serving"]["agent"]["process/tiny/json"]["latency"]["errors"] == 0
    assert res["serving"]["in_process"]["direct_us"] > 0
    assert res["deploy"]["agent"]["process, pinned/1"]["total_s"]["median"] > 0
    assert "## Figures against the aims" in doc and "## 3. Deploy" in doc


def test_swap_telemetry_fleet(tmp_path: Path) -> None:
    res, doc = smoke(tmp_path, "swap,telemetry,fleet")
    assert res["swap"]["process"]["swap_errors"] == 0 and res["swap"]["process"]["swap_ms"]["n"] > 0
    assert res["telemetry"]["bytes_per_day"]["serving"]["bytes_per_day"] > 0
    assert res["telemetry"]["drain"][0]["backlog_messages"] > 0
    size = res["fleet"]["sizes"][0]
    assert size["reached"] == size["devices"]
    assert "## 6. Fleet scale" in doc


def test_collect(tmp_path: Path) -> None:
    res, doc = smoke(tmp_path, "collect")
    c = res["collect"]
    assert c["messages_per_s"] > 0 and c["telemetry_published"] > 0
    assert c["telemetry_held"] == c["telemetry_published"]  # nothing lost between the sims and the two collectors
    assert c["lost_counted"] == 0 and c["for_100k"] is not None
    assert "## 7. Fleet collector" in doc


def test_sources(tmp_path: Path) -> None:
    pytest.importorskip("xgboost", reason="the sources section trains an XGBoost model ('edge-agent[test]')")
    res, doc = smoke(tmp_path, "sources")
    sr = res["sources"]
    assert sr["agent_json"]["errors"] == 0 and sr["agent_binary"]["errors"] == 0
    assert sr["framework"]["ms"]["median"] > 0 and sr["onnxruntime"]["ms"]["median"] > 0
    assert "## 8. A tree ensemble" in doc


def test_jsoncodec(tmp_path: Path) -> None:
    res, doc = smoke(tmp_path, "jsoncodec")
    jc = res["jsoncodec"]
    assert jc["body_bytes"] > 500_000 and jc["stdlib"]["decode"]["n"] == jc["orjson"]["decode"]["n"] > 0
    assert "## 10. JSON tensors" in doc and "JSON request decoded" in doc


def test_batching(tmp_path: Path) -> None:
    res, doc = smoke(tmp_path, "batching")
    bt = res["batching"]
    assert bt["on"]["errors"] == 0 and bt["off"]["errors"] == 0
    assert bt["on"]["rps"]["median"] > 0 and bt["off"]["rps"]["median"] > 0
    http = bt["http"]["settings"]  # on and off through real daemons' HTTP API
    assert set(http) == {"off/threads=default", "on/threads=default"}
    assert all(v["errors"] == 0 and v["rps"]["median"] > 0 for v in http.values())
    assert "## 11. Dynamic batching" in doc and "Over HTTP through the daemon" in doc


def test_autotune(tmp_path: Path) -> None:
    res, doc = smoke(tmp_path, "autotune")
    objs = res["autotune"]["objectives"]
    assert set(objs) == {"latency", "throughput"}
    for obj, v in objs.items():
        assert v["objective"] == obj and v["winner"] and v["served"]["errors"] == 0
        assert all("median_ms" in r and "throughput_rps" in r for r in v["measured"])  # both figures per candidate
        assert "won: objective " + obj in v["explain"]  # as agentctl explain prints it
    assert "## 13. Autotune under each objective" in doc


def test_peers_agent_side(tmp_path: Path) -> None:
    """The agent's half of ``--peers`` (the converted sklearn pipeline served and measured); the peer
    servers themselves install from PyPI, which a test does not do."""
    pytest.importorskip("skl2onnx", reason="the peers section converts a scikit-learn pipeline ('edge-agent[test]')")
    res, doc = smoke(tmp_path, "peers", "--peer-set", "agent")
    pr = res["peers"]
    assert list(pr["servers"]) == ["agent"] and not pr["not_installed"] and not pr["failed"]
    s = pr["summary"]["agent"]
    assert s["sk/errors"] == 0 and s["sk/p50_ms"] > 0 and s["sk/rps8"] > 0
    assert s["sk_bin/errors"] == 0 and s["sk_bin/rps8"] > 0  # binary tensors too
    assert s["rss_loaded_mb"] > 0 and s["startup_s"] > 0
    assert "## 12. Peers" in doc and "agent (process)" in doc
