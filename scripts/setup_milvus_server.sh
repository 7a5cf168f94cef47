#!/usr/bin/env bash
# Install the embedded Milvus server (PyPI `milvus` 2.3.5, Linux) into its own venv.
#
# Why a separate venv: this repo's top-level `milvus/` package shadows the PyPI package's import
# name `milvus`, so the server cannot be imported from the project venv. milvus/server.py starts it as
# `.milvus-server-venv/bin/python -I milvus/_embedded_server_main.py ...` in a subprocess instead.
# Needs the package registry once (a ~58 MB Linux wheel); tests skip the server half without it.
# Idempotent: does nothing when the venv already imports `milvus.default_server`.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="$(realpath -m "${RAEE_MILVUS_SERVER_VENV:-.milvus-server-venv}")"
PY="${PYTHON:-python3}"
check() { (cd / && "$VENV/bin/python" -c "import milvus; assert milvus.__version__.startswith('2.3.5')") 2>/dev/null; }
if [ -x "$VENV/bin/python" ] && check; then
  echo "milvus server venv ready: $VENV"; exit 0
fi
"$PY" -m venv "$VENV"
echo '*' > "$VENV/.gitignore"   # keep the venv out of git without touching the root .gitignore
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "milvus==2.3.5" 2>&1 \
  | grep -v '^WARNING: Location' || true
check || { echo "error: milvus 2.3.5 did not import from $VENV" >&2; exit 1; }
echo "milvus server venv ready: $VENV"
