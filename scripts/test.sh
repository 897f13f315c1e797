#!/usr/bin/env bash
# Install everything the test suite needs on a fresh machine, then run the whole suite (CPU only, offline).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e ".[test]"
# DeepSpeed builds against the installed torch, so it cannot use build isolation (ZeRO-3 tests).
.venv/bin/pip install -q --disable-pip-version-check wheel==0.48.0 setuptools==84.2.1
.venv/bin/pip install -q --disable-pip-version-check --no-build-isolation deepspeed==0.19.8
if [ -f annotation/install_labelstudio.sh ]; then bash annotation/install_labelstudio.sh; fi
# Lint first (ruff config in pyproject.toml): a finding fails the run in seconds, before the ~15 min suite.
.venv/bin/ruff check --quiet .
exec .venv/bin/python -m pytest "$@"
