"""The benchmark harness still runs: `bench/run_all.py --smoke` (scripts once on tiny inputs against
the real broker, Redis and the emulator; the LiteLLM peer is skipped) exits 0 and writes its
tables. The default run smokes `ceiling` alone (the bare chain, the process pipeline and the
shared harness); every script's smoke is marked slow. The figures themselves are not asserted:
benchmarks are measured, not tested."""

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
TABLES["http_client"] = "| httpx-aiohttp (now) |"
TABLES["ab_replay"] = "| rules (control) |"
TABLES["fairness"] = "| measure |"


def run_smoke(services: Services, tmp_path: Path, only: list[str], timeout_s: float) -> None:
    env = dict(os.environ, FAREBOX_AMQP_URL=services.amqp_url, FAREBOX_REDIS_URL=services.redis_url)
    selection = ["--only", *only] if only else []
    # Its own process group, so a timeout takes the emulators and stage processes it started with it.
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "run_all.py"), "--smoke", "--results", str(tmp_path), *selection],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"bench/run_all.py --smoke did not finish in {timeout_s:.0f} s:\n" + out[-3000:])
    assert proc.returncode == 0, out[-5000:]
    for name in only or TABLES:
        table = (tmp_path / f"{name}.md").read_text()
        assert TABLES[name] in table, table
        assert "nan" not in table.lower(), table
    assert not (tmp_path / "litellm_peer.md").exists()
    assert {p.stem for p in tmp_path.glob("*.md")} == set(only or TABLES)


@pytest.mark.slow  # about 25 s; .ci/run runs it (run_all's smoke, also slow, covers every script)
@pytest.mark.timeout(200)
def test_the_ceiling_smoke_writes_its_table(services: Services, tmp_path: Path) -> None:
    run_smoke(services, tmp_path, ["ceiling"], 180)


@pytest.mark.slow  # run_all's smoke (slow too) covers it; the default run smokes ceiling alone
@pytest.mark.timeout(120)
def test_the_fairness_smoke_writes_its_table(services: Services, tmp_path: Path) -> None:
    run_smoke(services, tmp_path, ["fairness"], 100)


@pytest.mark.slow  # run_all's smoke (slow too) covers it; the default run smokes ceiling alone
@pytest.mark.timeout(120)
def test_the_ab_replay_smoke_writes_its_table(services: Services, tmp_path: Path) -> None:
    run_smoke(services, tmp_path, ["ab_replay"], 100)


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_run_all_smoke_writes_every_table(services: Services, tmp_path: Path) -> None:
    run_smoke(services, tmp_path, [], 360)
