"""The shipped alert rules (deploy/prometheus/alerts.yml) under ``promtool``: they parse, and
each alert fires — and stays quiet — on the series of tests/prometheus/alerts_test.yml."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from conftest import REPO

PROMTOOL_TIMEOUT_S = 60.0


def promtool() -> str:
    path = shutil.which("promtool") or "/usr/bin/promtool"
    if not shutil.which(path):
        pytest.fail("promtool is not installed (apt-get install -y prometheus); .ci/run installs it")
    return path


def test_alert_rules_pass_promtool_check_and_unit_tests() -> None:
    check = subprocess.run([promtool(), "check", "rules", "deploy/prometheus/alerts.yml"], cwd=REPO,
                           capture_output=True, text=True, timeout=PROMTOOL_TIMEOUT_S)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "10 rules found" in check.stdout
    tested = subprocess.run([promtool(), "test", "rules", "tests/prometheus/alerts_test.yml"], cwd=REPO,
                            capture_output=True, text=True, timeout=PROMTOOL_TIMEOUT_S)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout
