#!/usr/bin/env bash
# Create .venv and install farebox with its test extras (idempotent; quiet when up to date).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.farebox-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  if ! .venv/bin/python -m pip install -q -e ".[test]" > .venv/install.log 2>&1; then
    cat .venv/install.log >&2; exit 1
  fi
  touch "$stamp"
fi
