"""The backbone's delivery guarantees under faults: connection loss and kill -9 of stage processes."""

from __future__ import annotations

import asyncio
import shutil
import subprocess

import pytest
from redis.asyncio import Redis

from farebox.report import load_rows, totals
from farebox.settings import Settings
from tests.support.chaos import distinct_jobs
from tests.support.pipeline import (
    ALL_STAGES,
    InProcessPipeline,
    ProcessPipeline,
    collect,
    drop_namespace,
    ledger_entries,
)
from tests.support.tcp_proxy import proxy_in_front_of


@pytest.mark.chaos  # about 20 s; the broker closing the connections is the default run's resume test
async def test_workers_resume_after_the_network_drops_every_connection(
    settings: Settings, redis: Redis, emulator: str
) -> None:
    proxy, proxied_url = await proxy_in_front_of(settings.amqp_url)
    via_proxy = settings.model_copy(update={"amqp_url": proxied_url, "emulator_url": emulator})
    p = InProcessPipeline(via_proxy)
    try:
        await p.start()
        jobs = distinct_jobs(600, "netcut")
        # The client talks to the broker directly: only the workers lose their connections.
        direct = InProcessPipeline(settings)
        async with direct.client() as client:
            collecting = asyncio.create_task(collect(client.stream(jobs, max_in_flight=300)))
            for _ in range(2):
                await asyncio.sleep(1.0)
                for _ in range(300):  # until the workers have reconnected
                    if proxy.open_connections >= 6:
                        break
                    await asyncio.sleep(0.1)
                assert proxy.cut() > 0
            results = await asyncio.wait_for(collecting, 120)
        assert sorted(r.job_id for r in results) == sorted(str(j["job_id"]) for j in jobs)
        assert all(r.status == "ok" for r in results), [r.error for r in results if r.error][:3]
        assert len(await ledger_entries(redis, settings)) == len(jobs)
    finally:
        await p.close()
        await proxy.stop()


@pytest.mark.skipif(shutil.which("rabbitmqctl") is None, reason="needs rabbitmqctl on this host")
async def test_workers_resume_after_the_broker_closes_their_connections(
    pipeline: InProcessPipeline, redis: Redis, settings: Settings
) -> None:
    await pipeline.start()
    jobs = distinct_jobs(400, "brokerclose")
    async with pipeline.client() as client:
        collecting = asyncio.create_task(collect(client.stream(jobs, max_in_flight=200)))
        await asyncio.sleep(0.8)
        closed = await asyncio.to_thread(close_connections, f"farebox-{settings.namespace}-")
        assert closed >= 5
        results = await asyncio.wait_for(collecting, 120)
    assert sorted(r.job_id for r in results) == sorted(str(j["job_id"]) for j in jobs)
    assert len(await ledger_entries(redis, settings)) == len(jobs)


def close_connections(name_prefix: str) -> int:
    out = subprocess.run(
        ["rabbitmqctl", "-q", "list_connections", "pid", "client_properties"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    pids = [line.split("\t", 1)[0] for line in out.splitlines() if name_prefix in line]
    for pid in pids:
        subprocess.run(
            ["rabbitmqctl", "-q", "close_connection", pid, "test: broker-side close"], capture_output=True, check=False
        )
    return len(pids)


async def test_kill9_of_each_stage_loses_nothing_and_charges_once(
    settings: Settings, redis: Redis, emulator: str
) -> None:
    """1,000 jobs in flight; each stage process is killed with SIGKILL mid-run and restarted.
    Every job still ends in a result and exactly one ledger entry (`-m chaos`: 5,000 jobs, three rounds)."""
    s = settings.model_copy(update={"emulator_url": emulator, "prefetch": 100})
    procs = ProcessPipeline(s)
    procs.start()
    jobs = distinct_jobs(1000, "kill9")
    try:
        async with InProcessPipeline(s).client(wait_for_pipeline_s=60) as client:
            collecting = asyncio.create_task(collect(client.stream(jobs, max_in_flight=1000)))
            for spec in ("dedup", "route", *[x for x in ALL_STAGES if x.startswith("execute")], "account"):
                await asyncio.sleep(0.7)
                procs.kill9(spec)
                procs.start_one(spec)
            results = await asyncio.wait_for(collecting, 300)
        ids = [r.job_id for r in results]
        assert len(ids) == len(set(ids)) == len(jobs)
        assert all(r.status == "ok" for r in results), [r.error for r in results if r.error][:3]
        assert sorted(await ledger_entries(redis, s)) == sorted(str(j["job_id"]) for j in jobs)
        total = totals(await load_rows(redis, s.keys, by=("tenant",)))
        assert total["jobs"] == len(jobs)  # aggregates counted once per job too
        assert abs(total["cost_usd"] - sum(r.cost_usd for r in results)) < 1e-6
    finally:
        procs.terminate()
        await drop_namespace(s)
