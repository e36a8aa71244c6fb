"""Fault runs shared by the chaos tests (`-m chaos`) and `bench/chaos.py`: each returns figures
(jobs lost, double charges, repeated results, time to resume) for a table or for assertions."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from redis.asyncio import Redis

from farebox.client import FareboxClient
from farebox.report import load_rows, totals
from farebox.schemas import JobResult
from farebox.settings import Settings
from tests.support.pipeline import ALL_STAGES, InProcessPipeline, ProcessPipeline, drop_namespace, ledger_entries
from tests.support.tcp_proxy import proxy_in_front_of


@dataclass
class FaultReport:
    name: str
    jobs: int
    results: int = 0
    lost: int = 0
    double_charged: int = 0
    repeated_results: int = 0
    errors: int = 0
    resume_s: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0

    def row(self) -> str:
        resume = f"{max(self.resume_s):.1f}" if self.resume_s else "-"
        return (
            f"| {self.name} | {self.jobs} | {self.results} | {self.lost} | {self.double_charged} | "
            f"{self.repeated_results} | {self.errors} | {resume} | {self.elapsed_s:.0f} |"
        )


HEADER = [
    "| fault | jobs | results | lost | double charges | repeated results | error results | max resume s | run s |",
    "|---|---|---|---|---|---|---|---|---|",
]


def distinct_jobs(n: int, tag: str) -> list[dict[str, object]]:
    return [
        {
            "prompt": f"{tag}: summarize record {i}",
            "task": "summarize",
            "quality": "low",
            "max_tokens": 30,
            "tenant": "acme",
            "job_id": f"{tag}-{i}",
        }
        for i in range(n)
    ]


async def account_for(
    report: FaultReport, results: list[JobResult], jobs: list[dict[str, object]], redis: Redis, settings: Settings
) -> FaultReport:
    """Fill lost / double-charge figures from the results and the ledger."""
    wanted = {str(j["job_id"]) for j in jobs}
    got = {r.job_id for r in results}
    report.results = len(results)
    report.lost = len(wanted - got)
    report.errors = sum(1 for r in results if r.status != "ok")
    entries = await ledger_entries(redis, settings)
    total = totals(await load_rows(redis, settings.keys, by=("tenant",)))
    # A double charge shows as more ledger entries or aggregate jobs than jobs, or more money.
    report.double_charged = max(0, len(entries) - len(wanted)) + max(0, total["jobs"] - len(wanted))
    if abs(total["cost_usd"] - sum(r.cost_usd for r in results)) > 1e-6:
        report.double_charged += 1
    return report


async def _stream(
    client: FareboxClient, jobs: list[dict[str, object]], stamps: list[float], max_in_flight: int
) -> list[JobResult]:
    out = []
    async for r in client.stream(jobs, max_in_flight=max_in_flight):
        out.append(r)
        stamps.append(time.monotonic())
    return out


def resumed_after(stamps: list[float], at: float) -> float:
    later = [t for t in stamps if t > at]
    return (later[0] - at) if later else float("inf")


async def kill9_each_stage(
    settings: Settings, redis: Redis, emulator: str, *, jobs: int = 5000, rounds: int = 3
) -> FaultReport:
    s = settings.model_copy(update={"emulator_url": emulator})
    report = FaultReport(f"kill -9 of each stage x{rounds}", jobs)
    batch = distinct_jobs(jobs, f"k9{settings.namespace[-6:]}")
    procs = ProcessPipeline(s)
    procs.start()
    started = time.monotonic()
    try:
        async with FareboxClient.from_settings(s, wait_for_pipeline_s=60) as client:
            stamps: list[float] = []
            collecting = asyncio.create_task(_stream(client, batch, stamps, max_in_flight=2000))
            for _ in range(rounds):
                for spec in ALL_STAGES:
                    await asyncio.sleep(0.5)
                    procs.kill9(spec)
                    procs.start_one(spec)
            results = await asyncio.wait_for(collecting, 900)
            report.repeated_results = client.repeats_dropped
    finally:
        procs.terminate()
        await drop_namespace(s)
    report.elapsed_s = time.monotonic() - started
    return await account_for(report, results, batch, redis, s)


async def broker_outage(
    settings: Settings, redis: Redis, emulator: str, *, jobs: int = 2000, cuts: int = 2, outage_s: float = 3.0
) -> FaultReport:
    """A TCP proxy between the workers and the broker drops every connection and refuses new ones
    for ``outage_s``; resume = first result after the broker is reachable again."""
    proxy, proxied_url = await proxy_in_front_of(settings.amqp_url)
    via = settings.model_copy(update={"amqp_url": proxied_url, "emulator_url": emulator})
    report = FaultReport(f"network drop + {outage_s:.0f}s broker outage x{cuts}", jobs)
    batch = distinct_jobs(jobs, f"net{settings.namespace[-6:]}")
    p = InProcessPipeline(via)
    started = time.monotonic()
    try:
        await p.start()
        async with FareboxClient.from_settings(settings) as client:
            stamps: list[float] = []
            collecting = asyncio.create_task(_stream(client, batch, stamps, max_in_flight=500))
            for _ in range(cuts):
                await asyncio.sleep(1.5)
                proxy.refusing = True
                proxy.cut()
                await asyncio.sleep(outage_s)
                proxy.refusing = False
                back = time.monotonic()
                while resumed_after(stamps, back) == float("inf") and not collecting.done():  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
                report.resume_s.append(resumed_after(stamps, back) if not collecting.done() else 0.0)
            results = await asyncio.wait_for(collecting, 600)
            report.repeated_results = client.repeats_dropped
    finally:
        await p.close()
        await proxy.stop()
    report.elapsed_s = time.monotonic() - started
    return await account_for(report, results, batch, redis, settings)
