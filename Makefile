# Everyday commands. Each sets up .venv from requirements.lock first (scripts/setup.sh).
PY := .venv/bin/python
.PHONY: setup demo test unit chaos lint format typecheck bench bench-smoke lock clean

setup:
	@bash scripts/setup.sh

demo:                 ## the pipeline on a sample backfill, results and a cost summary
	bash scripts/demo.sh

test:                 ## the default suite: needs RabbitMQ and Redis (started if local and down)
	bash scripts/test.sh

unit: setup           ## pure unit tests, no services, about two minutes
	$(PY) -m pytest -q -m unit -p no:cacheprovider

chaos: setup          ## the long fault, outage and load runs (kill -9, cuts, big backfills)
	bash scripts/test.sh -m "chaos or slow or cluster"

lint: setup           ## what .ci/run enforces
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

format: setup
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

typecheck: setup
	$(PY) -m mypy

bench: setup          ## every benchmark, 3+ runs each (20-30 min); tables go to bench/results/ (untracked)
	$(PY) bench/run_all.py

bench-smoke: setup
	$(PY) bench/run_all.py --smoke

lock:                 ## re-resolve requirements*.lock from pyproject.toml (needs PyPI)
	$(PY) -m pip install -q uv==0.13.8
	.venv/bin/uv pip compile pyproject.toml --extra test --extra lint --universal --python-version 3.11 \
	  --generate-hashes -q -o requirements.lock
	.venv/bin/uv pip compile pyproject.toml --universal --python-version 3.11 --generate-hashes -q \
	  -o requirements-runtime.lock

clean:
	rm -rf .venv .mypy_cache .ruff_cache .pytest_cache build *.egg-info
