#!/usr/bin/env bash
# Create .venv and install the locked dependency tree (requirements.lock: runtime, test and lint
# tools, with hashes) and farebox itself, editable. Idempotent; quiet when up to date.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $("$PY" --version 2>&1)" >&2
  "$PY" -m venv .venv
fi
stamp=.venv/.farebox-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ requirements.lock -nt "$stamp" ]; then
  echo "setup: installing $(grep -c '^[a-z].*==' requirements.lock) locked packages from requirements.lock" \
    "into .venv (the first time takes about a minute; log: .venv/install.log)" >&2
  started=$(date +%s)
  if ! { .venv/bin/python -m pip install --require-hashes -r requirements.lock \
         && .venv/bin/python -m pip install --no-deps --no-build-isolation -e . ; } > .venv/install.log 2>&1; then
    tail -n 40 .venv/install.log >&2
    echo "setup: the install failed (the whole log is .venv/install.log)" >&2
    exit 1
  fi
  touch "$stamp"
  echo "setup: done in $(( $(date +%s) - started )) s" >&2
fi
