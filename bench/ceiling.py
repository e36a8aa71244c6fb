"""farebox against its ceiling, side by side in one run: the bare aio-pika chain (bench/bare_chain.py,
same hops and durability, no work) and the farebox pipeline (one process per stage, emulator at
0 ms), at 0% and 30% repeats, several alternating runs. Prints a table and writes
bench/results/ceiling.md.

    .venv/bin/python bench/ceiling.py --jobs 3000 --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time

from bare_chain import bare_chain, drive, one_at_a_time
from common import cores, emulator_process, process_pipeline, publish_table, spread, wait_for_emulator
from pipeline_throughput import WORKLOAD, workload

from farebox.client import FareboxClient


async def farebox_rate(emulator: str, jobs: list[dict[str, object]], singles: int) -> tuple[float, list[float]]:
    async with process_pipeline(emulator) as (settings, _), \
            FareboxClient.from_settings(settings, wait_for_pipeline_s=60) as client:
        run = settings.namespace
        await client.complete({"prompt": "warm up", "job_id": f"warm-{run}"}, timeout=60)
        tagged = [dict(j, job_id=f"{run}-{i}") for i, j in enumerate(jobs)]
        t0 = time.perf_counter()
        n = 0
        async for _ in client.stream(tagged, max_in_flight=1000):
            n += 1
        rate = n / (time.perf_counter() - t0)
        lat = []
        for i in range(singles):
            t = time.perf_counter()
            await client.complete({"prompt": f"single {run} {i}", "task": "classify", "max_tokens": 5}, timeout=60)
            lat.append((time.perf_counter() - t) * 1000)
    return rate, sorted(lat)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=3000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--singles", type=int, default=100)
    a = ap.parse_args()
    fresh, repeats = workload(a.jobs, 1), workload_with_repeats(a.jobs)
    body = json.dumps(fresh[0]).encode()
    bare: list[float] = []
    fb0: list[float] = []
    fb30: list[float] = []
    bare_lat: list[float] = []
    fb_lat: list[float] = []
    with emulator_process(8099) as emulator:
        await wait_for_emulator()
        for _ in range(a.runs):  # alternate, so drift on this noisy machine hits both alike
            async with bare_chain() as ns:
                bare.append(await drive(ns, a.jobs, max_in_flight=1000, body=body))
                bare_lat.append(statistics.median(await one_at_a_time(ns, a.singles, body)))
            rate, lat = await farebox_rate(emulator, fresh, a.singles)
            fb0.append(rate)
            fb_lat.append(statistics.median(lat))
            fb30.append((await farebox_rate(emulator, repeats, 0))[0])
    ratio0 = [f / b for f, b in zip(fb0, bare, strict=True)]
    ratio30 = [f / b for f, b in zip(fb30, bare, strict=True)]
    publish_table("ceiling", "\n".join([
        f"# farebox vs the bare aio-pika chain ({cores()} cores, {a.runs} alternating runs, {a.jobs} jobs)", "",
        "| measure | median (min, max) |", "|---|---|",
        f"| bare chain jobs/s | {spread(bare, '.0f')} |",
        f"| farebox jobs/s, 0% repeats | {spread(fb0, '.0f')} |",
        f"| farebox jobs/s, 30% repeats | {spread(fb30, '.0f')} |",
        f"| ratio farebox/bare, 0% repeats | {spread(ratio0, '.2f')} |",
        f"| ratio farebox/bare, 30% repeats | {spread(ratio30, '.2f')} |",
        f"| one at a time p50 ms, bare chain | {spread(bare_lat, '.1f')} |",
        f"| one at a time p50 ms, farebox | {spread(fb_lat, '.1f')} |", ""]))


def workload_with_repeats(n: int) -> list[dict[str, object]]:
    out = subprocess.run([sys.executable, str(WORKLOAD), "--jobs", str(n), "--dup-rate", "0.3", "--seed", "2"],
                         capture_output=True, text=True, check=True).stdout
    return [json.loads(line) for line in out.splitlines()]


if __name__ == "__main__":
    asyncio.run(main())
