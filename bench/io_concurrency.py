"""One execute process's I/O concurrency: the emulator answers after ~1,000 ms, every job goes to
one provider, and we measure jobs/s and the most provider calls open at once (the emulator's
peak_in_flight). Prints a table and writes bench/results/io_concurrency.md.

    .venv/bin/python bench/io_concurrency.py --jobs 5000
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid

import httpx
from common import cores, emulator_process, process_pipeline, publish_table, spread, wait_for_emulator

from farebox.client import FareboxClient

PORT = 8097


async def one_run(emulator: str, n: int, concurrency: int) -> tuple[float, int, dict[str, int], int]:
    tag = uuid.uuid4().hex[:8]
    jobs = [
        {
            "prompt": f"Summarize record {tag}-{i}.",
            "task": "summarize",
            "quality": "low",
            "max_tokens": 30,
            "job_id": f"{tag}-{i}",
        }
        for i in range(n)
    ]
    by_provider: dict[str, int] = {}
    async with (
        process_pipeline(emulator, provider_concurrency=concurrency) as (settings, _),
        httpx.AsyncClient() as http,
    ):
        await http.post(f"{emulator}/_emulator/reset")
        async with FareboxClient.from_settings(settings, wait_for_pipeline_s=60, coalesce_writes=True) as client:
            t0 = time.perf_counter()
            async for r in client.stream(jobs, max_in_flight=n):
                by_provider[r.provider or "-"] = by_provider.get(r.provider or "-", 0) + 1
            rate = n / (time.perf_counter() - t0)
        stats = (await http.get(f"{emulator}/_emulator/stats")).json()
    return rate, stats["peak_in_flight"], by_provider, settings.provider_concurrency


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=5000)
    ap.add_argument("--latency-ms", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument(
        "--provider-concurrency",
        type=int,
        nargs="+",
        default=[256, 1024],
        help="FAREBOX_PROVIDER_CONCURRENCY values (calls in flight per execute process; 256 is farebox's "
        "default); one row pair per value",
    )
    a = ap.parse_args()
    lines = []
    with emulator_process(PORT, latency_ms=a.latency_ms) as emulator:
        await wait_for_emulator()
        for concurrency in a.provider_concurrency:
            rows = [await one_run(emulator, a.jobs, concurrency) for _ in range(a.runs)]
            lines += [
                f"| cap {concurrency}: jobs/s, {a.jobs} jobs all on one provider | "
                f"{spread([r[0] for r in rows], '.0f')} |",
                f"| cap {concurrency}: peak provider calls in flight | {spread([r[1] for r in rows], '.0f')} |",
            ]
    publish_table(
        "io_concurrency",
        "\n".join(
            [
                f"# I/O concurrency of one execute process ({cores()} cores, {a.runs} runs, "
                f"emulator latency {a.latency_ms} ms "
                "+-50%, by FAREBOX_PROVIDER_CONCURRENCY cap)",
                "",
                "| measure | median (min, max) |",
                "|---|---|",
                *lines,
                "",
                f"Results by provider (last run): {rows[-1][2]}.",
                "",
            ]
        ),
    )


if __name__ == "__main__":
    asyncio.run(main())
