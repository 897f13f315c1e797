#!/usr/bin/env bash
# Install the Label Studio SERVER into its own virtualenv (it pins Django, numpy, pyarrow... that clash with
# the training stack). Idempotent: does nothing when the venv already has the pinned version.
#   LABEL_STUDIO_VENV  target venv (default ~/.cache/qwen-image-align/labelstudio-venv)
#   PYTHON             interpreter used to create it (default python3)
set -euo pipefail
VERSION="1.23.2"
VENV="${LABEL_STUDIO_VENV:-$HOME/.cache/qwen-image-align/labelstudio-venv}"
PY="${PYTHON:-python3}"
if [ -x "$VENV/bin/label-studio" ] && "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('label-studio') != '$VERSION')" 2>/dev/null; then
  echo "label-studio $VERSION already installed in $VENV"
else
  mkdir -p "$(dirname "$VENV")"
  # It takes minutes (about 1 GB of wheels): say so, and show pip's progress, one line per package.
  echo "installing label-studio $VERSION into $VENV (about 1 GB, a few minutes) ..."
  START=$SECONDS
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
  "$VENV/bin/python" -m pip install --progress-bar off "label-studio==$VERSION" 2>&1 \
    | grep --line-buffered -E "^(Collecting|Installing|Successfully|ERROR)" \
    | while IFS= read -r line; do echo "  [$((SECONDS - START)) s] ${line:0:110}"; done || true
  "$VENV/bin/python" -c "import importlib.metadata as m; assert m.version('label-studio') == '$VERSION'"
  echo "label-studio $VERSION installed in $VENV after $((SECONDS - START)) s"
fi
# A migrated, user-less SQLite template (annotation/server.py copies it into fresh data dirs: first start
# takes ~5 s instead of ~35-90 s of migrations).
TEMPLATE="$VENV/qwen-image-align-template/label_studio.sqlite3"
if [ ! -f "$TEMPLATE" ]; then
  echo "building the migrated database template (about 1 minute) ..."
  BUILD="$(mktemp -d "$VENV/.template-build-XXXXXX")"
  SITE="$("$VENV/bin/python" -c 'import label_studio, os; print(os.path.dirname(label_studio.__file__))')"
  (cd "$BUILD" && env -u USERNAME -u PASSWORD -u PORT -u HOST -u DJANGO_DB PYTHONPATH="$SITE" \
     LABEL_STUDIO_BASE_DATA_DIR="$BUILD" LATEST_VERSION_CHECK=false COLLECT_ANALYTICS=false SENTRY_DSN= \
     "$VENV/bin/python" -m label_studio.manage migrate --noinput >"$BUILD/migrate.log" 2>&1) \
    || { tail -5 "$BUILD/migrate.log"; rm -rf "$BUILD"; exit 1; }
  mkdir -p "$(dirname "$TEMPLATE")"
  mv "$BUILD/label_studio.sqlite3" "$TEMPLATE"
  rm -rf "$BUILD"
  echo "database template ready: $TEMPLATE"
fi
