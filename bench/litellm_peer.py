"""farebox against the gateway users would pick instead: the LiteLLM proxy, side by side in one run,
both in front of the same provider emulator (0 ms), with the same jobs and the same concurrency.

LiteLLM is installed and started by bench/litellm_proxy.py (pinned, checked, loopback only).

Per run, alternating: LiteLLM (no cache) and farebox on fresh jobs; LiteLLM with its Redis cache
and farebox on jobs with 30% exact repeats. Measured: requests/s, CPU ms per request (the proxy's
process tree vs farebox's stage processes, with the broker and Redis shown apart), p50 added
latency one request at a time (over a direct call to the emulator), memory, provider calls.

    .venv/bin/python bench/litellm_peer.py --jobs 3000 --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from common import (
    CpuGroups,
    broker_pids,
    cores,
    emulator_process,
    make_workload,
    peak_rss_mb,
    process_pipeline,
    process_tree,
    publish_table,
    redis_pids,
    rss_mb,
    spread,
    wait_for_emulator,
)
from http_driver import KeepAlive
from litellm_proxy import LITELLM_VERSION, MASTER_KEY, MODEL, drop_litellm_keys, ensure_litellm, litellm_proxy

from farebox.client import FareboxClient

EMULATOR_PORT = 8093


# --- the same jobs, as farebox jobs and as OpenAI requests ------------------------------------------------------
def make_jobs(n: int, dup_rate: float, seed: int, tag: str) -> list[dict[str, Any]]:
    jobs: list[dict[str, Any]] = make_workload(n, dup_rate, seed)[0]
    for job in jobs:  # a run tag in the text keeps one run's answers out of the next run's cache
        job["messages"][-1]["content"] += f"\n[{tag}]"
        job.pop("job_id")
    return jobs


def openai_body(job: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": job["messages"],
        "max_tokens": job["max_tokens"],
        "temperature": job["temperature"],
    }


@dataclass
class Side:
    """One system's figures over the runs."""

    rate: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)
    broker_ms: list[float] = field(default_factory=list)
    redis_ms: list[float] = field(default_factory=list)
    added_p50: list[float] = field(default_factory=list)
    peak_mb: list[float] = field(default_factory=list)
    infra_mb: list[float] = field(default_factory=list)  # RabbitMQ and Redis, where the system uses them
    driver_ms: list[float] = field(default_factory=list)  # the bench process that sends the load
    provider_calls: list[float] = field(default_factory=list)
    errors: list[float] = field(default_factory=list)


async def provider_calls(emulator: str) -> int:
    async with httpx.AsyncClient() as http:
        return sum((await http.get(f"{emulator}/_emulator/stats")).json()["requests"].values())


async def reset_emulator(emulator: str) -> None:
    async with httpx.AsyncClient() as http:
        await http.post(f"{emulator}/_emulator/reset")


async def http_drive(url: str, bodies: Sequence[dict[str, Any]], concurrency: int) -> tuple[float, int]:
    """requests/s with `concurrency` callers, each on a persistent connection of its own (bench/http_driver.py:
    a lean client, because the driver shares the cores with the proxy)."""
    todo = iter(bodies)
    errors = 0

    async def caller() -> None:
        nonlocal errors
        conn = KeepAlive(url, {"Authorization": f"Bearer {MASTER_KEY}"})
        try:
            for body in todo:
                status, _ = await conn.post("/v1/chat/completions", body)
                errors += status != 200
        finally:
            await conn.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return len(bodies) / (time.perf_counter() - t0), errors


async def http_singles(url: str, path: str, bodies: Sequence[dict[str, Any]], auth: bool) -> float:
    """p50 ms, one request at a time (the same lean client for the proxy and the direct emulator call)."""
    conn = KeepAlive(url, {"Authorization": f"Bearer {MASTER_KEY}"} if auth else {})
    lat = []
    try:
        for body in bodies:
            t = time.perf_counter()
            status, payload = await conn.post(path, body)
            lat.append((time.perf_counter() - t) * 1000)
            if status != 200:
                raise SystemExit(f"{url}{path} answered {status}: {payload[:300]!r}")
    finally:
        await conn.close()
    return statistics.median(lat)


async def litellm_side(
    exe: Path,
    emulator: str,
    jobs: Sequence[dict[str, Any]],
    side: Side,
    a: argparse.Namespace,
    *,
    cache_namespace: str | None,
    singles: Sequence[dict[str, Any]],
    direct_p50: float,
) -> None:
    with litellm_proxy(exe, emulator, cache_namespace=cache_namespace, workers=a.litellm_workers) as (url, pid):
        warm = [
            {"model": MODEL, "messages": [{"role": "user", "content": f"warm up {uuid.uuid4()}"}], "max_tokens": 5}
            for _ in range(50)
        ]
        await http_drive(url, warm, 4)
        await reset_emulator(emulator)
        tree = process_tree(pid)
        meter = CpuGroups({"proxy": tree, "broker": broker_pids(), "redis": redis_pids(), "driver": [os.getpid()]})
        rate, errors = await http_drive(url, [openai_body(j) for j in jobs], a.concurrency)
        _record(
            side,
            rate,
            errors,
            meter.per_job_ms(len(jobs)),
            await provider_calls(emulator),
            sum(peak_rss_mb(p) for p in tree),
            redis_pids() if cache_namespace else [],
        )
        if singles:
            side.added_p50.append(
                await http_singles(url, "/v1/chat/completions", [openai_body(j) for j in singles], auth=True)
                - direct_p50
            )


async def farebox_side(
    emulator: str,
    jobs: Sequence[dict[str, Any]],
    side: Side,
    a: argparse.Namespace,
    *,
    singles: Sequence[dict[str, Any]],
    direct_p50: float,
) -> None:
    async with (
        process_pipeline(emulator) as (settings, procs),
        FareboxClient.from_settings(settings, wait_for_pipeline_s=60, coalesce_writes=True) as client,
    ):
        run = settings.namespace
        async for _ in client.stream(
            [{"prompt": f"warm up {run} {i}", "max_tokens": 5} for i in range(50)], max_in_flight=4
        ):
            pass
        await reset_emulator(emulator)
        stages = [p.pid for p in procs.procs.values()]
        meter = CpuGroups({"proxy": stages, "broker": broker_pids(), "redis": redis_pids(), "driver": [os.getpid()]})
        errors = 0
        t0 = time.perf_counter()
        async for r in client.stream(
            [dict(j, job_id=f"{run}-{i}") for i, j in enumerate(jobs)], max_in_flight=a.concurrency
        ):
            errors += r.status != "ok"
        rate = len(jobs) / (time.perf_counter() - t0)
        _record(
            side,
            rate,
            errors,
            meter.per_job_ms(len(jobs)),
            await provider_calls(emulator),
            sum(peak_rss_mb(p) for p in stages),
            broker_pids() + redis_pids(),
        )
        if singles:
            lat = []
            for i, job in enumerate(singles):
                t = time.perf_counter()
                r = await client.complete(dict(job, job_id=f"{run}-single-{i}"), timeout=60)
                lat.append((time.perf_counter() - t) * 1000)
                assert r.status == "ok", r.error
            side.added_p50.append(statistics.median(lat) - direct_p50)


def _record(
    side: Side, rate: float, errors: int, cpu: dict[str, float], calls: int, peak_mb: float, infra: list[int]
) -> None:
    side.infra_mb.append(sum(rss_mb(pid) for pid in infra))
    side.driver_ms.append(cpu["driver"])
    side.rate.append(rate)
    side.errors.append(errors)
    side.cpu_ms.append(cpu["proxy"])
    side.broker_ms.append(cpu["broker"])
    side.redis_ms.append(cpu["redis"])
    side.provider_calls.append(calls)
    side.peak_mb.append(peak_mb)


def row(name: str, lite: Sequence[float], fare: Sequence[float], spec: str, ratio: bool = True) -> str:
    cells = f"| {name} | {spread(lite, spec) if lite else '-'} | {spread(fare, spec) if fare else '-'} |"
    if ratio and lite and fare and all(lite):
        return cells + f" {spread([f / x for f, x in zip(fare, lite, strict=True)], '.2f')} |"
    return cells + " - |"


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=3000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--singles", type=int, default=100)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--litellm-workers", type=int, default=cores(), help="uvicorn workers; default one per core")
    a = ap.parse_args()
    exe = ensure_litellm()
    lite0, fare0, lite30, fare30 = Side(), Side(), Side(), Side()
    direct: list[float] = []
    with emulator_process(EMULATOR_PORT) as emulator:
        await wait_for_emulator()
        for _ in range(a.runs):  # alternate, so drift on this noisy machine hits both alike
            tag = uuid.uuid4().hex[:8]
            fresh, repeats = make_jobs(a.jobs, 0.0, 1, tag), make_jobs(a.jobs, 0.3, 2, tag)
            singles = make_jobs(a.singles, 0.0, 3, f"{tag}-single")
            direct.append(
                await http_singles(
                    emulator, "/openai/v1/chat/completions", [openai_body(j) for j in singles], auth=False
                )
            )
            await litellm_side(
                exe, emulator, fresh, lite0, a, cache_namespace=None, singles=singles, direct_p50=direct[-1]
            )
            await farebox_side(emulator, fresh, fare0, a, singles=singles, direct_p50=direct[-1])
            namespace = f"fbbench-litellm-{tag}"
            try:
                await litellm_side(
                    exe, emulator, repeats, lite30, a, cache_namespace=namespace, singles=(), direct_p50=0
                )
            finally:
                await drop_litellm_keys(namespace)
            await farebox_side(emulator, repeats, fare30, a, singles=(), direct_p50=0)
    total = [[c + b + r for c, b, r in zip(s.cpu_ms, s.broker_ms, s.redis_ms, strict=True)] for s in (lite0, fare0)]
    memory = [[p + i for p, i in zip(s.peak_mb, s.infra_mb, strict=True)] for s in (lite0, fare0)]
    publish_table(
        "litellm_peer",
        "\n".join(
            [
                f"# farebox vs the LiteLLM proxy {LITELLM_VERSION} ({cores()} cores, "
                f"{a.runs} alternating runs, {a.jobs} jobs, "
                f"{a.concurrency} in flight, emulator at 0 ms, LiteLLM --num_workers {a.litellm_workers})",
                "",
                "Median (min, max) over the runs; the ratio is farebox/LiteLLM, taken run by run.",
                "",
                "| measure | LiteLLM proxy | farebox | ratio |",
                "|---|---|---|---|",
                row("fresh jobs: requests/s", lite0.rate, fare0.rate, ".0f"),
                row("CPU ms/request: proxy process tree / farebox stage processes", lite0.cpu_ms, fare0.cpu_ms, ".2f"),
                row("CPU ms/request: RabbitMQ", lite0.broker_ms, fare0.broker_ms, ".2f", ratio=False),
                row("CPU ms/request: Redis", lite0.redis_ms, fare0.redis_ms, ".2f", ratio=False),
                row("CPU ms/request: all of the above", total[0], total[1], ".2f"),
                row(
                    "p50 added latency ms, one at a time (over a direct emulator call)",
                    lite0.added_p50,
                    fare0.added_p50,
                    ".1f",
                ),
                row(
                    "CPU ms/request: the bench process driving the load (HTTP callers / FareboxClient)",
                    lite0.driver_ms,
                    fare0.driver_ms,
                    ".2f",
                    ratio=False,
                ),
                row(
                    "peak RSS MiB, sum of its processes (proxy tree / stage processes)",
                    lite0.peak_mb,
                    fare0.peak_mb,
                    ".0f",
                ),
                row(
                    "RSS MiB at the end of the run, RabbitMQ + Redis it needs (none for LiteLLM without cache)",
                    lite0.infra_mb,
                    fare0.infra_mb,
                    ".0f",
                    ratio=False,
                ),
                row("memory, both of the above", memory[0], memory[1], ".0f"),
                row("errors", lite0.errors, fare0.errors, ".0f", ratio=False),
                row("30% repeats, Redis cache on: requests/s", lite30.rate, fare30.rate, ".0f"),
                row("30% repeats: provider calls", lite30.provider_calls, fare30.provider_calls, ".0f"),
                row("30% repeats: CPU ms/request, proxy / stages", lite30.cpu_ms, fare30.cpu_ms, ".2f"),
                row(
                    "30% repeats: RSS MiB of RabbitMQ + Redis it uses",
                    lite30.infra_mb,
                    fare30.infra_mb,
                    ".0f",
                    ratio=False,
                ),
                row("30% repeats: errors", lite30.errors, fare30.errors, ".0f", ratio=False),
                "",
                f"Direct emulator call, one at a time, p50 ms: {spread(direct, '.1f')}. "
                f"Jobs: make_workload.py --jobs {a.jobs} "
                f"(--dup-rate 0 --seed 1 and --dup-rate 0.3 --seed 2). LiteLLM sends "
                f"every job to openai/{MODEL}; farebox "
                "routes each by its policy (all providers are the emulator). farebox's "
                "figures include routing, PII scan, "
                "budgets, the ledger and durable queues; LiteLLM's include its spend tracking and logging defaults. "
                "RabbitMQ's and Redis's memory is the whole server's (other data included), not farebox's share.",
                "",
            ]
        ),
    )
    failed = sum(sum(s.errors) for s in (lite0, fare0, lite30, fare30))
    if failed:
        raise SystemExit(f"{failed:.0f} request(s) failed: the figures above are not comparable")


if __name__ == "__main__":
    asyncio.run(main())
