#!/usr/bin/env bash
# Set up, make sure RabbitMQ and Redis answer, run the default test suite.
# Extra arguments go to pytest (e.g. `scripts/test.sh -m chaos`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/services.sh
exec .venv/bin/python -m pytest -q "$@"
