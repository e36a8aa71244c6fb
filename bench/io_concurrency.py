"""One execute process's I/O concurrency: the emulator answers after ~1,000 ms, every job goes to
one provider, and we measure jobs/s and the most provider calls open at once (the emulator's
peak_in_flight). Prints a table and writes bench/results/io_concurrency.md.

    .venv/bin/python bench/io_concurrency.py --jobs 5000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from farebox.client import FareboxClient  # noqa: E402
from farebox.settings import Settings  # noqa: E402
from tests.support.pipeline import ALL_STAGES, ProcessPipeline, drop_namespace, drop_redis_prefix  # noqa: E402

PORT = 8097


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=5000)
    ap.add_argument("--latency-ms", type=int, default=1000)
    a = ap.parse_args()
    emulator = subprocess.Popen(  # noqa: ASYNC220 - started once, before any timing
        [sys.executable, "-m", "farebox", "emulator", "--port", str(PORT), "--latency-ms", str(a.latency_ms)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = uuid.uuid4().hex[:8]
    settings = Settings(namespace=f"fbbench-{run}", redis_prefix=f"fbbench:{run}:", metrics_port=0,
                        emulator_url=f"http://127.0.0.1:{PORT}")
    procs = ProcessPipeline(settings)
    procs.start(ALL_STAGES)
    jobs = [{"prompt": f"Summarize record {run}-{i}.", "task": "summarize", "quality": "low", "max_tokens": 30,
             "job_id": f"{run}-{i}"} for i in range(a.jobs)]
    try:
        await asyncio.sleep(2)
        async with httpx.AsyncClient() as http:
            await http.post(f"http://127.0.0.1:{PORT}/_emulator/reset")
            async with FareboxClient.from_settings(settings, wait_for_pipeline_s=60) as client:
                t0 = time.perf_counter()
                providers: dict[str, int] = {}
                async for r in client.stream(jobs, max_in_flight=a.jobs):
                    providers[r.provider or "-"] = providers.get(r.provider or "-", 0) + 1
                elapsed = time.perf_counter() - t0
            stats = (await http.get(f"http://127.0.0.1:{PORT}/_emulator/stats")).json()
    finally:
        procs.terminate()
        emulator.terminate()
        await drop_namespace(settings)
        await drop_redis_prefix(settings)
    table = "\n".join([
        f"# I/O concurrency of one execute process ({os.cpu_count()} cores, emulator latency "
        f"{a.latency_ms} ms +-50%, FAREBOX_PROVIDER_CONCURRENCY={settings.provider_concurrency})", "",
        "| jobs | results by provider | elapsed s | jobs/s | peak provider calls in flight |",
        "|---|---|---|---|---|",
        f"| {a.jobs} | {providers} | {elapsed:.1f} | {a.jobs / elapsed:.0f} | {stats['peak_in_flight']} |", ""])
    print(table)
    (ROOT / "bench" / "results" / "io_concurrency.md").write_text(table)


if __name__ == "__main__":
    asyncio.run(main())
