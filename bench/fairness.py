"""Single interactive jobs during another tenant's backfill (issue 19). Each run starts the pipeline as
`farebox up` runs it (one process per stage, and one more for every stage's interactive lane; emulator at
--latency-ms), times single jobs of tenant B one at a time on the idle pipeline, then queues a backfill of
tenant A (make_workload jobs, no repeats, published all at once) and, once it is all handed to the
publisher, times single jobs of tenant B one at a time (--gap-ms apart) until the backfill is answered.
Sides, alternating run by run so that drift on this noisy machine hits them alike:

* ``lanes``: the backfill in the background lane (as `farebox submit` sends it), the singles interactive
  (as `farebox ask` and the client's ``complete`` send them);
* ``shared`` (``--shared``): the same jobs, without the interactive process: each stage process serves
  both lanes, interactive first (a deployment that runs only the stage workers);
* ``fifo`` (``--lanes off``): no job names a priority, so everything shares one lane: one FIFO, as before;
* ``today`` (``--today DIR``): the fifo side on the stages of another checkout (the code before the lanes),
  for background throughput then and now.

Prints a table and writes bench/results/fairness.md.

    .venv/bin/python bench/fairness.py --jobs 3000 --runs 3 --shared
    .venv/bin/python bench/fairness.py --smoke        # small numbers, under 20 s
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
from common import (
    check_imports,
    cores,
    emulator_process,
    make_workload,
    process_pipeline,
    publish_table,
    spread,
    wait_for_emulator,
)

from farebox.client import FareboxClient
from farebox.schemas.job import Priority
from farebox.settings import Settings
from tests.support.pipeline import ProcessPipeline

PORT = 8099
GOAL_FACTOR, GOAL_MS = 3.0, 50.0  # a single job under a backfill: under 3x its idle latency + 50 ms
NAMES = {
    "lanes": "lanes (`farebox up`)",
    "shared": "lanes, stage processes only (`--shared`)",
    "fifo": "one FIFO (`--lanes off`)",
    "today": "today (`--today`)",
}


@dataclass
class Run:
    idle: list[float] = field(default_factory=list)  # ms, singles on the idle pipeline
    loaded: list[float] = field(default_factory=list)  # ms, singles answered while the backfill was there
    overtaken: list[int] = field(default_factory=list)  # backfill jobs answered while each of those waited
    rate: float = 0.0  # backfill jobs/s, from its first publish to its last result


def single(run: str, i: int) -> dict[str, Any]:
    return {"prompt": f"single {run} {i}: is this ticket urgent?", "task": "classify", "max_tokens": 5, "tenant": "b"}


async def timed(client: FareboxClient, job: dict[str, Any], priority: Priority | None) -> float:
    t = time.perf_counter()
    r = await client.complete(job, timeout=120, priority=priority)
    if r.status != "ok":
        raise SystemExit(f"a single job failed: {r.error}")
    return (time.perf_counter() - t) * 1000


def spawn_interactive_process(procs: ProcessPipeline) -> None:
    argv = [sys.executable, "-m", "farebox", "worker", "all", "--lane", "interactive"]
    procs.procs["interactive"] = subprocess.Popen(
        argv, env=procs.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


async def start_interactive_process(settings: Settings, procs: ProcessPipeline) -> None:
    """`farebox up`'s process for every stage's interactive lane; back once it consumes the interactive intake."""
    spawn_interactive_process(procs)
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            channel = await connection.channel()
            try:  # the stage processes' dedup and this process
                queue = await channel.declare_queue(settings.topology.intake_interactive, passive=True)
                if (queue.declaration_result.consumer_count or 0) >= 2:
                    return
            except aio_pika.exceptions.ChannelNotFoundEntity:
                pass
            await asyncio.sleep(0.2)
    raise SystemExit("the interactive process did not start consuming within 60 s")


async def backfill_under_singles(
    client: FareboxClient, producer: FareboxClient, run: str, backfill: list[dict[str, Any]], lanes: bool, gap_s: float
) -> Run:
    out = Run()
    queued = asyncio.Event()
    answered = 0

    def feed() -> Iterator[dict[str, Any]]:
        yield from backfill
        queued.set()  # every job handed to the publisher (at most its confirm window still on the way)

    async def drain() -> None:
        nonlocal answered
        lane: Priority | None = "background" if lanes else None
        async for _ in producer.stream(feed(), max_in_flight=len(backfill) + 1, priority=lane):
            answered += 1

    t0 = time.perf_counter()
    task = asyncio.create_task(drain())
    await asyncio.wait([asyncio.create_task(queued.wait()), task], return_when=asyncio.FIRST_COMPLETED)
    i = 0
    while not task.done():
        before = answered
        latency = await timed(client, single(run, 1000 + i), "interactive" if lanes else None)
        if answered < len(backfill):
            out.loaded.append(latency)
            out.overtaken.append(answered - before)
        i += 1
        await asyncio.sleep(gap_s)
    await task
    out.rate = len(backfill) / (time.perf_counter() - t0)
    return out


async def one_run(emulator: str, side: str, jobs: list[dict[str, Any]], a: argparse.Namespace) -> Run:
    lanes = side in ("lanes", "shared")
    child_env = {"PYTHONPATH": str(a.today)} if side == "today" else None
    async with process_pipeline(emulator, child_env=child_env) as (settings, procs):
        if side in ("lanes", "fifo"):
            await start_interactive_process(settings, procs)
        async with (
            FareboxClient.from_settings(settings, wait_for_pipeline_s=60, coalesce_writes=True) as client,
            # Tenant A's producer is another program: its own connection (on one, the singles' publishes would
            # queue behind the backfill's in the socket and in the broker's flow control).
            FareboxClient.from_settings(settings, wait_for_pipeline_s=60, coalesce_writes=True) as producer,
        ):
            run = settings.namespace
            lane: Priority | None = "interactive" if lanes else None
            await client.complete({"prompt": "warm up", "job_id": f"warm-{run}"}, timeout=60, priority=lane)
            idle = [await timed(client, single(run, i), lane) for i in range(a.idle)]
            backfill = [dict(j, tenant="a", job_id=f"{run}-a{i}") for i, j in enumerate(jobs)]
            out = await backfill_under_singles(client, producer, run, backfill, lanes, a.gap_ms / 1000)
    out.idle = idle
    return out


def figure(runs: list[Run], measure: str) -> str:
    if measure == "goal":
        met = sum(1 for r in runs if r.loaded and statistics.median(r.loaded) < goal(r))
        return f"{met} of {len(runs)} runs"
    if measure == "rate":
        return spread([r.rate for r in runs], ".0f")
    if measure == "idle":
        return spread([statistics.median(r.idle) for r in runs], ".1f")
    loaded = [r for r in runs if r.loaded]
    if not loaded:
        return "-"
    pick = {
        "loaded": (lambda r: statistics.median(r.loaded), ".1f"),
        "max": (lambda r: max(r.loaded), ".1f"),
        "ratio": (lambda r: statistics.median(r.loaded) / statistics.median(r.idle), ".2f"),
        "overtaken": (lambda r: statistics.median(r.overtaken), ".0f"),
        "singles": (lambda r: len(r.loaded), ".0f"),
    }
    of, spec = pick[measure]
    return spread([of(r) for r in loaded], spec)


def goal(r: Run) -> float:
    return GOAL_FACTOR * statistics.median(r.idle) + GOAL_MS


def rate_ratio(results: dict[str, list[Run]], side: str, base: str) -> str:
    if side not in results or base not in results:
        return "-"
    return spread([a.rate / b.rate for a, b in zip(results[side], results[base], strict=True)], ".2f")


def table(results: dict[str, list[Run]], a: argparse.Namespace) -> str:
    sides = list(results)
    rows = [
        ("single job on the idle pipeline, p50 ms", "idle"),
        ("single job during the backfill, p50 ms", "loaded"),
        ("single job during the backfill, max ms", "max"),
        ("**during / idle, p50**", "ratio"),
        (f"goal: during p50 < {GOAL_FACTOR:g} x idle p50 + {GOAL_MS:g} ms", "goal"),
        ("backfill jobs answered while a single waited, median", "overtaken"),
        ("singles answered during the backfill", "singles"),
        ("backfill jobs/s", "rate"),
    ]
    base = "today" if "today" in results else "fifo"
    ratios = [
        f"| backfill jobs/s / {NAMES[base]}'s, run by run | "
        + " | ".join(rate_ratio(results, s, base) for s in sides)
        + " |"
    ]
    return "\n".join(
        [
            f"# Single interactive jobs of B during a backfill of A ({cores()} cores, {a.runs} alternating runs, "
            f"{a.jobs}-job backfill, singles {a.gap_ms} ms apart, emulator at {a.latency_ms} ms)",
            "",
            "| measure | " + " | ".join(NAMES[s] for s in sides) + " |",
            "|---|" + "---|" * len(sides),
            *[f"| {label} | " + " | ".join(figure(results[s], m) for s in sides) + " |" for label, m in rows],
            *(ratios if base in results and len(sides) > 1 else []),
            "",
            "Each figure: median (min, max) over runs of the run's own figure (its p50, max, count or rate). A single "
            "job is B's one-token classify, sent when the one before it is answered; the backfill is A's, published "
            "all at once (no cap on jobs in flight); A and B are two customers. The emulator is one process on the "
            "same cores and answers in arrival order: a single job's call waits there behind the backfill's calls in "
            "flight, which a real provider's would not.",
            "",
        ]
    )


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=3000, help="the backfill's size")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--idle", type=int, default=30, help="singles timed on the idle pipeline, per run")
    ap.add_argument("--gap-ms", type=int, default=50, help="pause between two singles during the backfill")
    ap.add_argument("--latency-ms", type=int, default=0, help="the emulator's mean added latency")
    ap.add_argument("--lanes", choices=["on", "off", "both"], default="both", help="off: the one-FIFO side only")
    ap.add_argument("--shared", action="store_true", help="add the side without the interactive process")
    ap.add_argument("--today", type=Path, help="a checkout of farebox before the lanes: adds the 'today' side")
    ap.add_argument("--smoke", action="store_true", help="small numbers (300 jobs, one run), under 20 s")
    a = ap.parse_args()
    if a.smoke:
        a.jobs, a.runs, a.idle = 300, 1, 5
    sides = {"on": ["lanes"], "off": ["fifo"], "both": ["lanes", "fifo"]}[a.lanes]
    sides[1:1] = ["shared"] if a.shared else []
    sides += ["today"] if a.today else []
    if a.today:
        # From an empty folder: a child's working directory comes first on its sys.path (check_imports).
        a.today = a.today.resolve()
        os.chdir(tempfile.mkdtemp(prefix="fb-fairness-"))
        print(f"today: stages from {check_imports(a.today)}", flush=True)
    jobs = make_workload(a.jobs, 0.0, seed=1)[0]
    results: dict[str, list[Run]] = {s: [] for s in sides}
    with emulator_process(PORT, latency_ms=a.latency_ms) as emulator:
        await wait_for_emulator()
        for _ in range(a.runs):
            for side in sides:
                results[side].append(await one_run(emulator, side, jobs, a))
    publish_table("fairness", table(results, a))


if __name__ == "__main__":
    asyncio.run(main())
