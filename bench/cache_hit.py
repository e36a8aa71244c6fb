"""Cache-hit path: latency one job at a time (p50/p99) and hit-path jobs/s, with every stage in its
own process. Prints a table and writes bench/results/cache_hit.md.

    .venv/bin/python bench/cache_hit.py --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from common import cores, emulator_process, percentile, process_pipeline, publish_table, spread, wait_for_emulator

from farebox.client import FareboxClient

PROMPT = {"prompt": "Classify the sentiment: I love this queue.", "task": "classify", "tenant": "acme"}


async def one_run(emulator: str, singles: int, bulk: int) -> tuple[float, float, float]:
    async with (
        process_pipeline(emulator) as (settings, _),
        FareboxClient.from_settings(settings, wait_for_pipeline_s=60, coalesce_writes=True) as client,
    ):
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
    return statistics.median(lat), percentile(lat, 0.99), rate


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--singles", type=int, default=300)
    ap.add_argument("--bulk", type=int, default=3000)
    a = ap.parse_args()
    with emulator_process(8099) as emulator:
        await wait_for_emulator()
        rows = [await one_run(emulator, a.singles, a.bulk) for _ in range(a.runs)]
    p50s, p99s, rates = zip(*rows, strict=True)
    publish_table(
        "cache_hit",
        "\n".join(
            [
                f"# Cache-hit path ({cores()} cores, {a.runs} runs, every stage its own process)",
                "",
                "| measure | median (min, max) |",
                "|---|---|",
                f"| hit latency one at a time, p50 ms ({a.singles} jobs) | {spread(p50s, '.1f')} |",
                f"| hit latency one at a time, p99 ms | {spread(p99s, '.1f')} |",
                f"| hit-path jobs/s ({a.bulk} identical jobs after a warm-up) | {spread(rates, '.0f')} |",
                "",
            ]
        ),
    )


if __name__ == "__main__":
    asyncio.run(main())
