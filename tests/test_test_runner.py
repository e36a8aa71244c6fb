"""The test command cannot pass by skipping: with RabbitMQ or Redis down, a run that selects tests
needing them stops with a clear message; only the unit run goes on without them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOWHERE = {"FAREBOX_AMQP_URL": "amqp://guest:guest@127.0.0.1:9/", "FAREBOX_REDIS_URL": "redis://127.0.0.1:9/0"}


def pytest_run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **NOWHERE, "CI": ""}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_a_run_needing_the_services_fails_when_they_do_not_answer() -> None:
    run = pytest_run("tests/test_circuits.py")
    assert run.returncode == 3, run.stdout + run.stderr
    out = run.stdout + run.stderr
    assert "RabbitMQ (amqp://guest:guest@127.0.0.1:9/) and Redis (redis://127.0.0.1:9/0) not answering" in out
    assert "make unit" in out
    assert " passed" not in out and " skipped" not in out


def test_the_unit_run_needs_no_services() -> None:
    run = pytest_run("-m", "unit", "tests/test_routing.py", "tests/test_circuits.py")
    assert run.returncode == 0, run.stdout + run.stderr
    assert " passed" in run.stdout and "error" not in run.stdout.lower()
