"""Cache/dedup under faults: Redis going away mid-run, and kill -9 of a coalesced group's leader."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from farebox.emulator.knobs import EmulatorKnobs
from farebox.emulator.server import running
from farebox.settings import Settings
from tests.conftest import EmulatorStats
from tests.support.chaos import distinct_jobs
from tests.support.pipeline import (
    ALL_STAGES,
    InProcessPipeline,
    ProcessPipeline,
    collect,
    drop_namespace,
    ledger_entries,
    ledger_entries_written,
)
from tests.support.ports import free_port


class OwnRedis:
    """A redis-server of the test's own (the shared one is never touched), with an append-only
    file so that what was written before a stop is still there after the restart."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                import time

                time.sleep(0.05)
        raise RuntimeError("own redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    if shutil.which("redis-server") is None:
        pytest.skip("needs redis-server on this host to run a private Redis")
    r = OwnRedis(tmp_path)
    r.start()
    yield r
    r.stop()


async def test_redis_outage_mid_run_loses_nothing_and_the_ledger_catches_up(
    settings: Settings, own_redis: OwnRedis, emulator: str
) -> None:
    s = settings.model_copy(update={"redis_url": own_redis.url, "emulator_url": emulator})
    p = InProcessPipeline(s)
    jobs = distinct_jobs(400, "redisout")
    try:
        await p.start()
        async with p.client() as client:
            collecting = asyncio.create_task(collect(client.stream(jobs, max_in_flight=100)))
            await asyncio.sleep(0.8)
            own_redis.stop()
            await asyncio.sleep(2.0)
            own_redis.start()
            results = await asyncio.wait_for(collecting, 180)
        assert sorted(r.job_id for r in results) == sorted(str(j["job_id"]) for j in jobs)
        assert all(r.status == "ok" for r in results), [r.error for r in results if r.error][:3]
        redis = Redis.from_url(own_redis.url)
        try:
            entries = await ledger_entries_written(redis, s, len(jobs))  # held during the outage
            assert sorted(entries) == sorted(str(j["job_id"]) for j in jobs)
        finally:
            await redis.aclose()
    finally:
        await p.close()


@pytest.mark.chaos  # about 10 s; .ci/run runs it (tests/test_wake.py wakes waiters in the default run)
async def test_kill9_of_the_leaders_worker_still_answers_every_waiter(settings: Settings, redis: Redis) -> None:
    async with running(EmulatorKnobs(port=0, latency_ms=1500)) as slow_emulator:
        s = settings.model_copy(update={"emulator_url": slow_emulator})
        stats = EmulatorStats(slow_emulator)
        procs = ProcessPipeline(s)
        procs.start()
        jobs = [
            {"prompt": "One slow shared answer, please.", "tenant": "acme", "job_id": f"lead-{i}"} for i in range(50)
        ]
        try:
            async with InProcessPipeline(s).client(wait_for_pipeline_s=60) as client:
                collecting = asyncio.create_task(collect(client.stream(jobs, max_in_flight=50)))
                for _ in range(100):  # until the leader's provider call is under way
                    if await stats.total() >= 1:
                        break
                    await asyncio.sleep(0.1)
                for spec in [x for x in ALL_STAGES if x.startswith("execute")]:
                    procs.kill9(spec)
                    procs.start_one(spec)
                results = await asyncio.wait_for(collecting, 120)
            assert sorted(r.job_id for r in results) == sorted(str(j["job_id"]) for j in jobs)
            assert all(r.status == "ok" for r in results), [r.error for r in results if r.error][:3]
            assert len({r.content for r in results}) == 1
            assert sum(1 for r in results if r.cache == "miss") == 1
            assert 1 <= await stats.total() <= 2  # the killed call, and its redelivery
            assert len(await ledger_entries(redis, s)) == len(jobs)
        finally:
            procs.terminate()
            await drop_namespace(s)
