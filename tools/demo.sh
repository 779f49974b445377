#!/usr/bin/env bash
# Set up a virtual environment in .venv and run the end-to-end demo (loopback only).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[onnx,build,demo]'
exec .venv/bin/fleetctl demo "$@"
