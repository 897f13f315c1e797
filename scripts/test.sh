#!/usr/bin/env bash
# Install everything the test suite needs on a fresh machine, then run the whole suite (CPU only, offline).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# System packages for the annotation tests: Chromium (the browser test, driven by Playwright with the system
# browser: `playwright install` is never run) and PostgreSQL (team mode). Installed when missing and we may.
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing ${need[*]} (apt-get) ..."
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  else
    echo "warning: ${need[*]} missing and not installable here (needs root and apt-get): their tests will skip" >&2
  fi
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e ".[test]"
# DeepSpeed builds against the installed torch, so it cannot use build isolation (ZeRO-3 tests).
.venv/bin/pip install -q --disable-pip-version-check wheel==0.48.0 setuptools==84.2.1
.venv/bin/pip install -q --disable-pip-version-check --no-build-isolation deepspeed==0.19.8
if [ -f annotation/install_labelstudio.sh ]; then bash annotation/install_labelstudio.sh; fi
# Lint first (ruff config in pyproject.toml): a finding fails the run in seconds, before the ~15 min suite.
.venv/bin/ruff check --quiet .
exec .venv/bin/python -m pytest "$@"
