"""Jobs/s through the whole pipeline (one OS process per stage, as `farebox up` runs it), one-job-
at-a-time latency p50/p99, and CPU per job by process (to see where the time goes). Prints a table
and writes bench/results/pipeline_throughput.md.

    .venv/bin/python bench/pipeline_throughput.py --jobs 5000 --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

from common import (
    CpuGroups,
    broker_pids,
    cores,
    emulator_process,
    make_workload,
    peak_rss_mb,
    percentile,
    pids_of,
    process_pipeline,
    publish_table,
    redis_pids,
    spread,
    wait_for_emulator,
)

from farebox.client import FareboxClient

PORT = 8099
CPU: dict[str, list[float]] = {}
RSS: dict[str, list[float]] = {}


async def one_run(emulator: str, jobs: list[dict[str, object]], singles: int) -> tuple[float, float, float]:
    async with (
        process_pipeline(emulator) as (settings, procs),
        FareboxClient.from_settings(settings, wait_for_pipeline_s=60, coalesce_writes=True) as client,
    ):
        run = settings.namespace
        await client.complete({"prompt": "warm up", "job_id": f"warm-{run}"}, timeout=60)
        tagged = [dict(j, job_id=f"{run}-{i}") for i, j in enumerate(jobs)]
        watched = {name: p.pid for name, p in procs.procs.items()}
        watched.update({f"rabbitmq#{i}": pid for i, pid in enumerate(broker_pids())})
        watched["bench client"] = os.getpid()
        watched.update(
            {
                f"emulator (stands in for the provider)#{i}": pid
                for i, pid in enumerate(pids_of(f"emulator --port {PORT}"))
            }
        )
        watched.update({f"redis#{i}": pid for i, pid in enumerate(redis_pids())})
        meter = CpuGroups({name: [pid] for name, pid in watched.items()})
        t0 = time.perf_counter()
        n = 0
        async for _ in client.stream(tagged, max_in_flight=1000):
            n += 1
        rate = n / (time.perf_counter() - t0)
        for name, ms in meter.per_job_ms(n).items():
            CPU.setdefault(name, []).append(ms)
        lat = []
        for i in range(singles):
            t = time.perf_counter()
            await client.complete({"prompt": f"single {run} {i}", "task": "classify", "max_tokens": 5}, timeout=60)
            lat.append((time.perf_counter() - t) * 1000)
        for name, proc in procs.procs.items():  # read before the pipeline stops and the pids go away
            RSS.setdefault(name, []).append(peak_rss_mb(proc.pid))
    lat.sort()
    return rate, statistics.median(lat), percentile(lat, 0.99)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=5000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--singles", type=int, default=200)
    a = ap.parse_args()
    jobs, _ = make_workload(a.jobs, 0, seed=1)
    with emulator_process(PORT) as emulator:
        await wait_for_emulator()
        rows = [await one_run(emulator, jobs, a.singles) for _ in range(a.runs)]
    rates, p50s, p99s = zip(*rows, strict=True)
    publish_table(
        "pipeline_throughput",
        "\n".join(
            [
                f"# Pipeline throughput and latency ({cores()} cores, {a.runs} runs, emulator at 0 ms)",
                "",
                "| measure | median (min, max) |",
                "|---|---|",
                f"| jobs/s, {a.jobs} jobs from make_workload --dup-rate 0 | {spread(rates, '.0f')} |",
                f"| one job at a time, p50 ms ({a.singles} jobs) | {spread(p50s, '.1f')} |",
                f"| one job at a time, p99 ms | {spread(p99s, '.1f')} |",
                "",
                "CPU ms per job during the bulk run, by process, and each stage process's peak",
                "resident memory (VmHWM) over the run:",
                "",
                "| process | CPU ms/job | peak RSS MiB |",
                "|---|---|---|",
                *[
                    f"| {name} | {spread(v, '.2f')} | {spread(RSS[name], '.0f') if name in RSS else '-'} |"
                    for name, v in sorted(CPU.items())
                ],
                "",
            ]
        ),
    )


if __name__ == "__main__":
    asyncio.run(main())
