"""Cache modes and TTLs through the real pipeline."""

from __future__ import annotations

import asyncio
import uuid

from redis.asyncio import Redis

from farebox.settings import Settings
from tests.conftest import EmulatorStats
from tests.support.pipeline import InProcessPipeline


def job(**kw: object) -> dict[str, object]:
    return {"prompt": "Name one quorum queue feature.", "tenant": "acme", "job_id": str(uuid.uuid4()), **kw}


async def test_bypass_and_refresh(pipeline: InProcessPipeline, emulator_stats: EmulatorStats) -> None:
    await pipeline.start()
    async with pipeline.client() as client:
        first = await client.complete(job(), timeout=30)
        bypass = await client.complete(job(cache={"mode": "bypass"}), timeout=30)
        refresh = await client.complete(job(cache={"mode": "refresh"}), timeout=30)
        hit = await client.complete(job(), timeout=30)
    assert (first.cache, bypass.cache, refresh.cache, hit.cache) == ("miss", "miss", "miss", "hit")
    assert bypass.cost_usd > 0 and refresh.cost_usd > 0 and hit.cost_usd == 0
    assert await emulator_stats.total() == 3  # bypass and refresh both call; the last one is served


async def test_per_job_ttl_and_errors_never_cached(
    pipeline: InProcessPipeline, redis: Redis, settings: Settings, emulator_stats: EmulatorStats
) -> None:
    await pipeline.start()
    async with pipeline.client() as client:
        short = await client.complete(job(prompt="Short-lived answer", cache={"ttl_s": 1}), timeout=30)
        keys = [k async for k in redis.scan_iter(match=settings.keys.cache("*"))]
        assert len(keys) == 1 and 0 < await redis.pttl(keys[0]) <= 1000  # (TTL rounds: 0 in its last second)
        await asyncio.sleep(1.5)
        again = await client.complete(job(prompt="Short-lived answer"), timeout=30)
        failed = await client.complete(job(prompt="x", model="openai/no-such-model"), timeout=30)
        failed_again = await client.complete(job(prompt="x", model="openai/no-such-model"), timeout=30)
    assert short.cache == "miss" and again.cache == "miss"  # expired, so paid again
    assert failed.status == failed_again.status == "error" and failed_again.cache == "miss"
    assert await emulator_stats.total() == 2
