#!/usr/bin/env bash
# Install the toolkit on a fresh machine and run the main job (CPU demo on the tiny model).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e .
exec .venv/bin/qwen-image-demo "$@"
