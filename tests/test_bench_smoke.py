"""The benchmark harness still runs: `bench/run_all.py --smoke` (every script once on tiny inputs
against the real broker, Redis and the emulator; the LiteLLM peer is skipped) exits 0 and writes
every table. The figures themselves are not asserted: benchmarks are measured, not tested."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TABLES = ("pipeline_throughput", "ceiling", "cache_hit", "io_concurrency", "cost")


def test_run_all_smoke_writes_every_table(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "run_all.py"), "--smoke", "--results", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name in TABLES:
        table = (tmp_path / f"{name}.md").read_text()
        assert "| measure |" in table, table
        assert "nan" not in table.lower(), table
    assert not (tmp_path / "litellm_peer.md").exists()
