"""Jobs/s through the whole pipeline (one OS process per stage, as `farebox up` runs it) and
one-job-at-a-time latency p50/p99. Prints a table and writes bench/results/pipeline_throughput.md.

    .venv/bin/python bench/pipeline_throughput.py --jobs 5000 --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
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

WORKLOAD = ROOT.parent / "shared" / "workloads" / "make_workload.py"


def cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def broker_pids() -> list[int]:
    out = subprocess.run(["pgrep", "-f", "beam.smp"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


CPU: dict[str, list[float]] = {}


def workload(n: int, seed: int) -> list[dict[str, object]]:
    out = subprocess.run([sys.executable, str(WORKLOAD), "--jobs", str(n), "--dup-rate", "0", "--seed", str(seed)],
                         capture_output=True, text=True, check=True).stdout
    return [json.loads(line) for line in out.splitlines()]


async def one_run(jobs: list[dict[str, object]], singles: int, seed: int) -> tuple[float, float, float]:
    run = uuid.uuid4().hex[:8]
    settings = Settings(namespace=f"fbbench-{run}", redis_prefix=f"fbbench:{run}:", metrics_port=0,
                        emulator_url=os.environ.get("FAREBOX_EMULATOR_URL", "http://127.0.0.1:8099"))
    procs = ProcessPipeline(settings)
    procs.start(ALL_STAGES)
    try:
        async with FareboxClient.from_settings(settings, wait_for_pipeline_s=60) as client:
            await client.complete({"prompt": "warm up", "job_id": f"warm-{run}"}, timeout=60)
            tagged = [dict(j, job_id=f"{run}-{i}") for i, j in enumerate(jobs)]
            watched = {name: p.pid for name, p in procs.procs.items()}
            watched.update({f"rabbitmq#{i}": pid for i, pid in enumerate(broker_pids())})
            watched["bench client"] = os.getpid()
            before = {name: cpu_s(pid) for name, pid in watched.items()}
            t0 = time.perf_counter()
            n = 0
            async for _ in client.stream(tagged, max_in_flight=1000):
                n += 1
            rate = n / (time.perf_counter() - t0)
            for name, pid in watched.items():  # CPU ms per job, by process
                CPU.setdefault(name, []).append((cpu_s(pid) - before[name]) * 1000 / n)
            lat = []
            for i in range(singles):
                t = time.perf_counter()
                await client.complete({"prompt": f"single {run} {i}", "task": "classify", "max_tokens": 5}, timeout=60)
                lat.append((time.perf_counter() - t) * 1000)
        lat.sort()
        return rate, statistics.median(lat), lat[int(len(lat) * 0.99) - 1]
    finally:
        procs.terminate()
        await drop_namespace(settings)
        await drop_redis_prefix(settings)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=5000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--singles", type=int, default=200)
    a = ap.parse_args()
    emulator = subprocess.Popen(  # noqa: ASYNC220 - started once, before any timing
        [sys.executable, "-m", "farebox", "emulator", "--port", "8099"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    await asyncio.sleep(2)
    try:
        jobs = workload(a.jobs, 1)
        rows = [await one_run(jobs, a.singles, i) for i in range(a.runs)]
    finally:
        emulator.terminate()
    rates, p50s, p99s = zip(*rows, strict=True)
    fmt = lambda xs, f: f"{f(statistics.median(xs))} (min {f(min(xs))}, max {f(max(xs))})"  # noqa: E731
    table = "\n".join([
        f"# Pipeline throughput and latency ({os.cpu_count()} cores, {a.runs} runs, emulator at 0 ms)", "",
        "| measure | median (min, max) |", "|---|---|",
        f"| jobs/s, {a.jobs} jobs from make_workload --dup-rate 0 | {fmt(rates, lambda x: f'{x:.0f}')} |",
        f"| one job at a time, p50 ms ({a.singles} jobs) | {fmt(p50s, lambda x: f'{x:.1f}')} |",
        f"| one job at a time, p99 ms | {fmt(p99s, lambda x: f'{x:.1f}')} |", "",
        "CPU ms per job during the bulk run, by process (emulator not included):", "",
        "| process | CPU ms/job, median |", "|---|---|",
        *[f"| {name} | {statistics.median(v):.2f} |" for name, v in sorted(CPU.items())], ""])
    print(table)
    (ROOT / "bench" / "results" / "pipeline_throughput.md").write_text(table)


if __name__ == "__main__":
    asyncio.run(main())
