"""Cache-hit path: latency one job at a time (p50/p99) and hit-path jobs/s, with every stage in its
own process. Prints a table and writes bench/results/cache_hit.md.

    .venv/bin/python bench/cache_hit.py --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from farebox.client import FareboxClient  # noqa: E402
from farebox.settings import Settings  # noqa: E402
from tests.support.pipeline import ALL_STAGES, ProcessPipeline, drop_namespace, drop_redis_prefix  # noqa: E402

PROMPT = {"prompt": "Classify the sentiment: I love this queue.", "task": "classify", "tenant": "acme"}


async def one_run(singles: int, bulk: int) -> tuple[float, float, float]:
    run = uuid.uuid4().hex[:8]
    settings = Settings(namespace=f"fbbench-{run}", redis_prefix=f"fbbench:{run}:", metrics_port=0,
                        emulator_url=os.environ.get("FAREBOX_EMULATOR_URL", "http://127.0.0.1:8099"))
    procs = ProcessPipeline(settings)
    procs.start(ALL_STAGES)
    try:
        async with FareboxClient.from_settings(settings, wait_for_pipeline_s=60) as client:
            first = await client.complete(PROMPT, timeout=60)
            assert first.status == "ok", first.error
            lat = []
            for _ in range(singles):
                t = time.perf_counter()
                r = await client.complete(PROMPT, timeout=60)
                lat.append((time.perf_counter() - t) * 1000)
                assert r.cache == "hit"
            t0 = time.perf_counter()
            n = 0
            async for _ in client.stream([PROMPT] * bulk, max_in_flight=500):
                n += 1
            rate = n / (time.perf_counter() - t0)
        lat.sort()
        return statistics.median(lat), lat[int(len(lat) * 0.99) - 1], rate
    finally:
        procs.terminate()
        await drop_namespace(settings)
        await drop_redis_prefix(settings)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--singles", type=int, default=300)
    ap.add_argument("--bulk", type=int, default=3000)
    a = ap.parse_args()
    emulator = subprocess.Popen(  # noqa: ASYNC220 - started once, before any timing
        [sys.executable, "-m", "farebox", "emulator", "--port", "8099"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    await asyncio.sleep(2)
    try:
        rows = [await one_run(a.singles, a.bulk) for _ in range(a.runs)]
    finally:
        emulator.terminate()
    p50s, p99s, rates = zip(*rows, strict=True)

    def fmt(xs: tuple[float, ...], spec: str) -> str:
        return f"{statistics.median(xs):{spec}} (min {min(xs):{spec}}, max {max(xs):{spec}})"

    table = "\n".join([
        f"# Cache-hit path ({os.cpu_count()} cores, {a.runs} runs, every stage its own process)", "",
        "| measure | median (min, max) |", "|---|---|",
        f"| hit latency one at a time, p50 ms ({a.singles} jobs) | {fmt(p50s, '.1f')} |",
        f"| hit latency one at a time, p99 ms | {fmt(p99s, '.1f')} |",
        f"| hit-path jobs/s ({a.bulk} identical jobs after a warm-up) | {fmt(rates, '.0f')} |", ""])
    print(table)
    (ROOT / "bench" / "results" / "cache_hit.md").write_text(table)


if __name__ == "__main__":
    asyncio.run(main())
