"""tools/test.sh on a machine that lacks something: one line naming what and how to get it.

The script runs from a copy in a fresh folder (no .venv there), with interpreters that stand in
for a machine's: a missing one, an old one and one without the venv module (Debian's python3
without python3-venv). Each must stop before anything is created.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

TIMEOUT_S = 60.0


def _fake_python(path: Path, body: str) -> Path:
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


def _run(tmp_path: Path, python: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "tools").mkdir(exist_ok=True)
    shutil.copy(REPO / "tools" / "test.sh", tmp_path / "tools" / "test.sh")
    return subprocess.run(["bash", str(tmp_path / "tools" / "test.sh")], capture_output=True, text=True,
                          timeout=TIMEOUT_S, cwd=tmp_path, env={**os.environ, "PYTHON": python})


@pytest.mark.parametrize(("case", "expected"), [
    ("absent", "not found: apt-get install -y python3 python3-venv"),
    ("old", "is Python 3.9.2, 3.10 or newer is needed: apt-get install -y python3"),
    ("no-venv", "-m venv is not available: apt-get install -y python3-venv"),
])
def test_a_missing_prerequisite_is_one_line_with_its_fix(tmp_path: Path, case: str, expected: str) -> None:
    real = sys.executable
    if case == "absent":
        python = str(tmp_path / "no-such-python3")
    elif case == "old":  # answers like a Python 3.9 would
        python = str(_fake_python(tmp_path / "python3.9", 'case "$*" in *version_info*) exit 1 ;; '
                                  '*python_version*) echo 3.9.2 ;; *) exit 1 ;; esac'))
    else:  # a current Python whose ensurepip is not installed
        python = str(_fake_python(tmp_path / "python3-novenv", f'case "$*" in *ensurepip*) exit 1 ;; esac\n'
                                  f'exec {real} "$@"'))
    r = _run(tmp_path, python)
    assert r.returncode == 1 and r.stdout == "", r.stdout + r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tools/test.sh: ") and expected in lines[0], r.stderr
    assert not (tmp_path / ".venv").exists()
