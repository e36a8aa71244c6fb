"""The batch lane against the synchronous lane: `make_workload.py --jobs 10000 --dup-rate 0.3` through the
pipeline (every stage an OS process, the batch worker too) with the same policy, once with every job marked
``"lane": "batch"`` and once ``"lane": "sync"``, alternately. The emulator ends a batch --batch-delay-s after
it is made. Measured: total cost, wall time, the Redis memory the batch lane holds per waiting job (sampled
while jobs wait: their batch records and per-job markers, by MEMORY USAGE), and the batch worker's CPU per job.
Prints a table and writes bench/results/batch_lane.md.

    .venv/bin/python bench/batch_lane.py --jobs 10000 --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import cores, cpu_s, emulator_process, make_workload, process_pipeline, publish_table, spread
from redis.asyncio import Redis

from farebox.client import FareboxClient
from farebox.settings import CATALOG_DIR, Settings

EMULATOR_PORT = 8093


@dataclass
class Run:
    cost_usd: float = 0.0
    jobs: int = 0
    ok: int = 0
    batch_answered: int = 0
    wall_s: float = 0.0
    worker_cpu_ms_per_job: float = 0.0
    bytes_per_waiting_job: list[float] = field(default_factory=list)
    most_waiting: int = 0


def policy_file(folder: Path, linger_s: float) -> Path:
    policy = json.loads((CATALOG_DIR / "policy.json").read_text())
    policy["batch"] = {"linger_s": linger_s}
    path = folder / "policy.json"
    path.write_text(json.dumps(policy))
    return path


async def sample_redis(settings: Settings, run: Run, done: asyncio.Event) -> None:
    """Bytes of the batch lane's keys per job waiting in a batch, while jobs wait."""
    redis = Redis.from_url(settings.redis_url)
    pattern = f"{settings.keys.prefix}{{batch:*"
    try:
        while not done.is_set():
            keys = [k async for k in redis.scan_iter(match=pattern, count=1000)]
            waiting = sum([await redis.hlen(k) for k in keys if b":jobs:" in k])
            if waiting >= max(100, run.most_waiting):
                size = sum([await redis.memory_usage(k) or 0 for k in keys])
                run.most_waiting = waiting
                run.bytes_per_waiting_job.append(size / waiting)
            await asyncio.sleep(0.5)
    finally:
        await redis.aclose()


async def one_run(emulator: str, jobs: list[dict[str, Any]], lane: str, policy: Path) -> Run:
    run = Run()
    async with process_pipeline(emulator, policy=policy) as (settings, procs):
        procs.start_one("batch")
        worker = procs.procs["batch"].pid
        done = asyncio.Event()
        sampler = asyncio.create_task(sample_redis(settings, run, done))
        async with FareboxClient.from_settings(settings, wait_for_pipeline_s=60, coalesce_writes=True) as client:
            await asyncio.sleep(3)  # the batch worker's start (imports, connecting) is not per-job work
            cpu_before, started = cpu_s(worker), time.perf_counter()
            marked = [dict(j, lane=lane, job_id=f"{settings.namespace}-{i}") for i, j in enumerate(jobs)]
            async for r in client.stream(marked, max_in_flight=len(marked)):
                run.jobs += 1
                run.ok += r.status == "ok"
                run.cost_usd += r.cost_usd
                run.batch_answered += bool(r.route and r.route.lane == "batch")
            run.wall_s = time.perf_counter() - started
            run.worker_cpu_ms_per_job = (cpu_s(worker) - cpu_before) * 1000 / max(1, run.jobs)
        done.set()
        await sampler
    return run


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--dup-rate", type=float, default=0.3)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--batch-delay-s", type=float, default=3.0)
    ap.add_argument("--linger-s", type=float, default=2.0)
    a = ap.parse_args()
    jobs, shape = make_workload(a.jobs, a.dup_rate, seed=1)
    batch: list[Run] = []
    sync: list[Run] = []
    with tempfile.TemporaryDirectory() as folder, emulator_process(EMULATOR_PORT, batch_delay_s=a.batch_delay_s) as emu:
        policy = policy_file(Path(folder), a.linger_s)
        await asyncio.sleep(2)
        for _ in range(a.runs):
            sync.append(await one_run(emu, jobs, "sync", policy))
            batch.append(await one_run(emu, jobs, "batch", policy))
    ratio = [b.cost_usd / s.cost_usd for b, s in zip(batch, sync, strict=True)]
    per_job = [statistics.median(b.bytes_per_waiting_job) for b in batch if b.bytes_per_waiting_job]
    rows = [
        f"# Batch lane vs sync lane, make_workload.py --jobs {a.jobs} --dup-rate {a.dup_rate} ({cores()} cores, "
        f"{a.runs} runs each, alternately; {shape['unique_keys']} unique requests; emulator batch delay "
        f"{a.batch_delay_s:g} s, policy batch.linger_s {a.linger_s:g} s)",
        "",
        "| measure | batch lane | sync lane |",
        "|---|---|---|",
        f"| total cost USD | {spread([b.cost_usd for b in batch], '.4f')} | "
        f"{spread([s.cost_usd for s in sync], '.4f')} |",
        f"| batch cost / sync cost, run by run | {spread(ratio, '.3f')} | 1 |",
        f"| ok results | {spread([b.ok for b in batch], '.0f')} | {spread([s.ok for s in sync], '.0f')} |",
        f"| jobs answered through a batch | {spread([b.batch_answered for b in batch], '.0f')} | "
        f"{spread([s.batch_answered for s in sync], '.0f')} |",
        f"| wall time s | {spread([b.wall_s for b in batch], '.1f')} | {spread([s.wall_s for s in sync], '.1f')} |",
        f"| batch worker CPU ms per job | {spread([b.worker_cpu_ms_per_job for b in batch], '.3f')} | "
        f"{spread([s.worker_cpu_ms_per_job for s in sync], '.3f')} (idle loop) |",
        f"| Redis bytes per waiting job (median of samples) | {spread(per_job, '.0f') if per_job else '-'} | - |",
        f"| most jobs waiting in batches at once | {spread([b.most_waiting for b in batch], '.0f')} | - |",
        "",
    ]
    publish_table("batch_lane", "\n".join(rows))


if __name__ == "__main__":
    asyncio.run(main())
