"""The cache-hit fast path and the waking of coalesced waiters (issue 22), against the real broker and Redis.

A hit and a job_id replay are answered by the dedup stage itself; a coalesced waiter is held by its dedup process
and woken by the release of its leader's lease. The crash tests kill -9 real stage processes at named points
(tests/support/crash_points.py) and check the contract: one ledger entry, one or two identical results.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from farebox.client import FareboxClient
from farebox.emulator.knobs import EmulatorKnobs
from farebox.emulator.server import running
from farebox.schemas import JobResult
from farebox.settings import Settings
from tests.conftest import EmulatorStats
from tests.support.pipeline import ALL_STAGES, InProcessPipeline, ProcessPipeline, drop_namespace, ledger_entries

PROMPT = "Name one quorum queue property."
# Neither safety net (a held waiter's re-check, a parked one's broker timer) comes due within these tests: only a
# wake answers a waiter in time.
NO_POLLING = {"coalesce_recheck_ms": 30_000, "coalesce_poll_ms": 30_000}


async def aggregate(redis: Redis, settings: Settings, metric: str) -> int:
    """A metric summed over today's aggregates (every tenant, provider and model)."""
    day = time.strftime("%Y-%m-%d", time.gmtime())
    fields = await redis.hgetall(settings.keys.ledger_agg(day))
    return sum(int(v) for k, v in fields.items() if k.decode().endswith(f"|{metric}"))


@pytest.fixture
async def slow_emulator() -> AsyncIterator[str]:
    async with running(EmulatorKnobs(port=0, latency_ms=1200)) as url:
        yield url


async def test_a_hit_and_a_replay_are_answered_with_the_account_stage_down(
    pipeline: InProcessPipeline, redis: Redis, settings: Settings
) -> None:
    await pipeline.start()
    async with pipeline.client() as client:
        first = await client.complete({"prompt": PROMPT, "job_id": "w-1"}, timeout=30)
        assert first.status == "ok" and first.cache == "miss"
        await pipeline.stop("account")
        hit = await client.complete({"prompt": PROMPT, "job_id": "h-1"}, timeout=10)
        replay = await client.complete({"prompt": PROMPT, "job_id": "w-1"}, timeout=10)
    assert hit.status == "ok" and hit.cache == "hit" and hit.cost_usd == 0 and hit.content == first.content
    assert hit.baseline_cost_usd > 0  # the saving is shown
    assert replay.model_dump(exclude={"latency_ms"}) == first.model_dump(exclude={"latency_ms"})
    assert sorted(await ledger_entries(redis, settings)) == ["h-1", "w-1"]
    assert await aggregate(redis, settings, "jobs") == 2 and await aggregate(redis, settings, "cache_hits") == 1


async def test_a_waiter_is_woken_when_its_leader_finishes(settings: Settings, redis: Redis, slow_emulator: str) -> None:
    s = settings.model_copy(update={"emulator_url": slow_emulator, **NO_POLLING})
    pipeline = InProcessPipeline(s)
    try:
        await pipeline.start()
        async with pipeline.client() as client:
            leading = asyncio.create_task(client.complete({"prompt": PROMPT, "job_id": "lead"}, timeout=20))
            await asyncio.sleep(0.3)  # the leader is at the provider
            waiting = asyncio.create_task(client.complete({"prompt": PROMPT, "job_id": "wait"}, timeout=20))
            lead = await leading
            led_at = time.monotonic()
            waiter = await asyncio.wait_for(waiting, 5)
            woken_after_s = time.monotonic() - led_at
        assert lead.cache == "miss" and waiter.cache == "coalesced" and waiter.content == lead.content
        assert woken_after_s < 2.0, woken_after_s  # a wake, not a 30 s re-check
        assert sorted(await ledger_entries(redis, s)) == ["lead", "wait"]
    finally:
        await pipeline.close()


class Replies:
    """Every reply on a client's queue, repeats included (the client's streams drop those)."""

    def __init__(self, client: FareboxClient) -> None:
        self.inbox: asyncio.Queue[JobResult] = asyncio.Queue()
        client._stream_inbox = self.inbox  # a reply no waiter awaits lands here

    async def all_within(self, first_s: float, quiet_s: float) -> list[JobResult]:
        got = [await asyncio.wait_for(self.inbox.get(), first_s)]
        while True:
            try:
                got.append(await asyncio.wait_for(self.inbox.get(), quiet_s))
            except TimeoutError:
                return got


def died(procs: ProcessPipeline, spec: str, within_s: float = 20.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if procs.procs[spec].poll() is not None:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize(("point", "replies"), [("after_record", 1), ("after_reply", 2)])
async def test_kill9_of_dedup_on_the_hit_path_keeps_one_entry_and_identical_results(
    settings: Settings, redis: Redis, emulator: str, point: str, replies: int
) -> None:
    s = settings.model_copy(update={"emulator_url": emulator})
    procs = ProcessPipeline(s)
    procs.start([spec for spec in ALL_STAGES if spec != "dedup"])
    procs.start_one("dedup", crash=(point, "hit-1"))
    try:
        async with FareboxClient.from_settings(s, wait_for_pipeline_s=60) as client:
            warm = await client.complete({"prompt": PROMPT, "job_id": "warm"}, timeout=60)
            seen = Replies(client)
            await client.publish({"prompt": PROMPT, "job_id": "hit-1"}, correlation_id="hit-1")
            assert await asyncio.to_thread(died, procs, "dedup"), "the dedup process did not reach its crash point"
            procs.start_one("dedup")
            results = await seen.all_within(first_s=60, quiet_s=3)
        assert len(results) == replies
        assert all(r.model_dump() == results[0].model_dump() for r in results)  # a repeat is the stored result
        assert results[0].cache == "hit" and results[0].cost_usd == 0 and results[0].content == warm.content
        assert sorted(await ledger_entries(redis, s)) == ["hit-1", "warm"]
        assert await aggregate(redis, s, "jobs") == 2 and await aggregate(redis, s, "cache_hits") == 1
    finally:
        procs.terminate()
        await drop_namespace(s)


@pytest.mark.parametrize(("killed", "latency_ms"), [("account", 1200), ("dedup", 8000)])
async def test_a_waiter_is_answered_when_the_waking_or_the_holding_worker_dies(
    settings: Settings, redis: Redis, killed: str, latency_ms: float
) -> None:
    """``account``: the leader's account process dies after its record, before the release that wakes; its
    redelivery releases and wakes. ``dedup``: the process holding the waiter dies; the broker gives the waiter to
    the next dedup process, which holds it until the wake (the leader's call, 4 to 12 s, outlasts the restart)."""
    async with running(EmulatorKnobs(port=0, latency_ms=latency_ms)) as slow_emulator:
        await waiter_answered(settings, redis, slow_emulator, killed)


async def waiter_answered(settings: Settings, redis: Redis, slow_emulator: str, killed: str) -> None:
    s = settings.model_copy(update={"emulator_url": slow_emulator, **NO_POLLING})
    stats = EmulatorStats(slow_emulator)
    procs = ProcessPipeline(s)
    procs.start([spec for spec in ALL_STAGES if spec != killed])
    procs.start_one(killed, crash=("before_fill", "lead") if killed == "account" else None)
    try:
        async with FareboxClient.from_settings(s, wait_for_pipeline_s=60) as client:
            await stats.reset()
            leading = asyncio.create_task(client.complete({"prompt": PROMPT, "job_id": "lead"}, timeout=40))
            await asyncio.sleep(0.3)
            waiting = asyncio.create_task(client.complete({"prompt": PROMPT, "job_id": "wait"}, timeout=40))
            if killed == "dedup":
                await asyncio.sleep(0.3)  # held by now
                procs.kill9("dedup")
            else:
                assert await asyncio.to_thread(died, procs, "account"), "the account process did not crash"
            procs.start_one(killed)
            lead, waiter = await asyncio.gather(leading, waiting)
        assert lead.cache == "miss" and waiter.cache == "coalesced" and waiter.content == lead.content
        assert await stats.total() == 1
        assert sorted(await ledger_entries(redis, s)) == ["lead", "wait"]
    finally:
        procs.terminate()
        await drop_namespace(s)
