#!/usr/bin/env bash
# Set up .venv with the test extras, then lint, type-check and run the whole test suite.
# Needs python3 3.10+ with venv, and mosquitto (apt-get install -y python3-venv mosquitto); anything
# missing is named on one line with the command that installs it. The fleet observability, clock
# and encryption tests also run prometheus/promtool, faketime and age (apt-get install -y prometheus
# faketime age). .ci/run installs them all. PYTHON=python3.12 bash tools/test.sh picks another
# interpreter for a new .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
missing() { echo "tools/test.sh: $1: $2" >&2; exit 1; }

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
  command -v "$PY" >/dev/null 2>&1 || missing "$PY not found" "apt-get install -y python3 python3-venv"
  "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null \
    || missing "$PY is Python $("$PY" -c 'import platform; print(platform.python_version())' 2>/dev/null || echo '?'), 3.10 or newer is needed" \
               "apt-get install -y python3 python3-venv, or PYTHON=python3.X bash tools/test.sh"
  "$PY" -c 'import ensurepip, venv' 2>/dev/null \
    || missing "$PY -m venv is not available" "apt-get install -y python3-venv"
fi
for tool in mosquitto:mosquitto prometheus:prometheus promtool:prometheus faketime:faketime age:age; do
  prog=${tool%%:*} pkg=${tool#*:}  # program:Debian package
  if ! command -v "$prog" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$prog" ] && [ ! -x "/usr/bin/$prog" ]; then
    missing "$prog not found" "apt-get install -y $pkg"
  fi
done

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
  rm -rf .venv  # absent, or left without pip by an earlier failed attempt
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]' \
  || missing "pip could not install the test extras (above)" "check access to PyPI, or set PIP_INDEX_URL / PIP_FIND_LINKS"
.venv/bin/ruff check agent tools tests benchmarks
.venv/bin/mypy
.venv/bin/lint-imports --no-cache
exec .venv/bin/python -m pytest "$@"
