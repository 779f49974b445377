"""A real Prometheus (Debian package ``prometheus``) on a free loopback port, for tests: a temporary
config and storage, scraping given targets every second, and its HTTP query API."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port, wait_port

PROMETHEUS_START_TIMEOUT_S = 30.0
QUERY_TIMEOUT_S = 10.0
SCRAPE_INTERVAL = "1s"


@dataclass
class Prometheus:
    port: int
    proc: subprocess.Popen[bytes]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query's result vector (raises on a PromQL error)."""
        args = {"query": expr, **({"time": f"{at:.3f}"} if at is not None else {})}
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode(args)
        with urllib.request.urlopen(url, timeout=QUERY_TIMEOUT_S) as r:
            doc = json.load(r)
        assert doc["status"] == "success", doc
        return list(doc["data"]["result"])

    def label_values(self, label: str, match: str) -> list[str]:
        url = (f"http://127.0.0.1:{self.port}/api/v1/label/{label}/values?"
               + urllib.parse.urlencode({"match[]": match}))
        with urllib.request.urlopen(url, timeout=QUERY_TIMEOUT_S) as r:
            return list(json.load(r)["data"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def start_prometheus(tmp: Path, targets: Sequence[str], job: str, rule_files: Sequence[Path] = ()) -> Prometheus:
    binary = shutil.which("prometheus") or "/usr/bin/prometheus"
    if not Path(binary).exists():
        pytest.fail("prometheus is not installed (apt-get install -y prometheus); .ci/run installs it")
    tmp.mkdir(parents=True, exist_ok=True)
    conf = tmp / "prometheus.yml"
    conf.write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": [{"job_name": job, "static_configs": [{"targets": list(targets)}]}]}))
    port = free_port()
    proc = subprocess.Popen([binary, f"--config.file={conf}", f"--storage.tsdb.path={tmp / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                            stdout=subprocess.DEVNULL, stderr=(tmp / "prometheus.log").open("wb"))
    prom = Prometheus(port, proc)
    try:
        wait_port("127.0.0.1", port, PROMETHEUS_START_TIMEOUT_S)
        deadline = time.monotonic() + PROMETHEUS_START_TIMEOUT_S
        while not _ready(prom):  # the first scrape happened
            assert time.monotonic() < deadline, (tmp / "prometheus.log").read_text()
            time.sleep(0.2)
    except BaseException:
        prom.stop()
        raise
    return prom


def _ready(prom: Prometheus) -> bool:
    try:
        return bool(prom.query("up"))
    except OSError:  # 503 while starting
        return False
