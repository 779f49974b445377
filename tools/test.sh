#!/usr/bin/env bash
# Set up .venv with the test extras, then lint, type-check and run the whole test suite.
# Needs mosquitto on PATH or in /usr/sbin and prometheus/promtool (apt-get install -y mosquitto prometheus);
# .ci/run installs them.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
.venv/bin/ruff check agent tools tests benchmarks
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
