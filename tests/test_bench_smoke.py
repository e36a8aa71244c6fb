"""The benchmark harness still runs: `bench/run_all.py --smoke` (every script once on tiny inputs
against the real broker, Redis and the emulator; the LiteLLM peer is skipped) exits 0 and writes
every table. The figures themselves are not asserted: benchmarks are measured, not tested."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Services

ROOT = Path(__file__).resolve().parents[1]
TABLES = {name: "| measure |" for name in ("pipeline_throughput", "ceiling", "cache_hit", "io_concurrency", "cost")}
TABLES["http_client"] = "| httpx on aiohttp (now) |"


@pytest.mark.timeout(420)
def test_run_all_smoke_writes_every_table(services: Services, tmp_path: Path) -> None:
    env = dict(os.environ, FAREBOX_AMQP_URL=services.amqp_url, FAREBOX_REDIS_URL=services.redis_url)
    # Its own process group, so a timeout takes the emulators and stage processes it started with it.
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "run_all.py"), "--smoke", "--results", str(tmp_path)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=360)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail("bench/run_all.py --smoke did not finish in 360 s:\n" + out[-3000:])
    assert proc.returncode == 0, out[-5000:]
    for name, row in TABLES.items():
        table = (tmp_path / f"{name}.md").read_text()
        assert row in table, table
        assert "nan" not in table.lower(), table
    assert not (tmp_path / "litellm_peer.md").exists()
