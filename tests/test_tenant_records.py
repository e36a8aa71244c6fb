"""Every stored record is keyed by tenant as well as job_id: the same job_id from two tenants is two jobs,
and no body, valid or not, can reach another tenant's stored result. And records expire: ledger entries,
feedback and day aggregates have a retention (settings ledger_entry_ttl_s, ledger_days_kept)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import aio_pika
from redis.asyncio import Redis

from farebox.constants import JobRecord, job_record
from farebox.settings import Settings
from farebox.stages.ledger_entry import day_expiry, utc_day
from tests.conftest import EmulatorStats
from tests.support.pipeline import InProcessPipeline, get_message, ledger_entries

ANY = JobRecord("*")


async def reply_to_raw(settings: Settings, body: dict[str, Any]) -> dict[str, Any]:
    """The answer to ``body`` published as it is to the intake, past the client's validation."""
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        replies = await channel.declare_queue(exclusive=True)
        message = aio_pika.Message(json.dumps(body).encode(), reply_to=replies.name, correlation_id="c-1")
        await channel.default_exchange.publish(message, routing_key=settings.topology.intake)
        reply: dict[str, Any] = json.loads((await get_message(replies)).body)
    return reply


async def test_the_same_job_id_from_two_tenants_is_two_jobs(
    pipeline: InProcessPipeline, redis: Redis, emulator_stats: EmulatorStats
) -> None:
    await pipeline.start()
    async with pipeline.client() as client:
        victim = await client.complete(
            {"job_id": "shared-1", "tenant": "victim", "prompt": "The victim's private question"}, timeout=30
        )
        calls = await emulator_stats.total()
        mallory = await client.complete(
            {"job_id": "shared-1", "tenant": "mallory", "prompt": "Anything at all"}, timeout=30
        )
        assert await emulator_stats.total() == calls + 1  # a job of its own, not a replay
        again = await client.complete(
            {"job_id": "shared-1", "tenant": "victim", "prompt": "The victim's private question"}, timeout=30
        )
    assert victim.status == mallory.status == again.status == "ok"
    assert mallory.tenant == "mallory" and mallory.content != victim.content
    assert again.content == victim.content and await emulator_stats.total() == calls + 1  # the victim's replay
    assert sorted(await ledger_entries(redis, pipeline.settings)) == ["shared-1", "shared-1"]
    for tenant in ("victim", "mallory"):
        assert await redis.exists(pipeline.settings.keys.result(job_record(tenant, "shared-1"))) == 1


async def test_an_invalid_body_naming_another_tenants_job_id_replays_nothing(
    pipeline: InProcessPipeline, redis: Redis
) -> None:
    await pipeline.start()
    s = pipeline.settings
    async with pipeline.client() as client:
        victim = await client.complete({"job_id": "v-9", "tenant": "victim", "prompt": "Victim secret"}, timeout=30)
    assert victim.status == "ok" and victim.content
    reply = await reply_to_raw(s, {"job_id": "v-9", "tenant": "mallory", "prompt": 42})  # prompt must be text
    assert reply["status"] == "error" and reply["error"]["code"] == "invalid_request"
    assert reply["job_id"] == "v-9" and reply.get("content") is None
    stored = json.loads(await redis.get(s.keys.result(job_record("victim", "v-9"))))
    assert stored["content"] == victim.content  # untouched
    entries = [json.loads(await redis.get(k)) async for k in redis.scan_iter(match=s.keys.ledger_entry(ANY))]
    assert sorted((e["tenant"], e["status"]) for e in entries) == [("mallory", "error"), ("victim", "ok")]


async def test_ledger_records_expire_after_their_retention(pipeline: InProcessPipeline, redis: Redis) -> None:
    s = pipeline.settings
    await pipeline.start()
    async with pipeline.client() as client:
        r = await client.complete({"job_id": f"r-{uuid.uuid4()}", "prompt": "Keep me a while"}, timeout=30)
    entry_key = s.keys.ledger_entry(job_record("default", r.job_id))
    assert s.ledger_entry_keep_s - 60 < await redis.ttl(entry_key) <= s.ledger_entry_keep_s
    day = json.loads(await redis.get(entry_key))["day"]
    expires_at = await redis.expiretime(s.keys.ledger_agg(day))
    assert expires_at == day_expiry(time.time(), s.ledger_days_kept) or day != utc_day(time.time())
    assert expires_at > time.time() + (s.ledger_days_kept - 1) * 86_400


def test_a_days_aggregates_expire_days_kept_after_the_day_ends() -> None:
    noon = 1_764_633_600 + 12 * 3600  # 2025-12-02 12:00 UTC (midnight + 12 h)
    assert utc_day(noon) == "2025-12-02"
    assert day_expiry(noon, 1) == 1_764_633_600 + 2 * 86_400
    assert day_expiry(1_764_633_600, 400) == day_expiry(1_764_633_600 + 86_399, 400)


async def test_feedback_expires_with_its_job_and_old_records_leave_the_export_index(
    pipeline: InProcessPipeline, redis: Redis
) -> None:
    s = pipeline.settings
    await pipeline.start()
    stale = job_record("default", "long-gone")
    await redis.zadd(s.keys.feedback_jobs, {stale: time.time() - s.ledger_entry_keep_s - 60})
    async with pipeline.client() as client:
        r = await client.complete({"prompt": "Rate me"}, timeout=30)
        receipt = await client.feedback(r.job_id, "good")
    assert receipt is not None and receipt.status == "ok"
    record = job_record("default", r.job_id)
    assert s.ledger_entry_keep_s - 60 < await redis.ttl(s.keys.feedback(record)) <= s.ledger_entry_keep_s
    assert await redis.zscore(s.keys.feedback_jobs, record) is not None
    assert await redis.zscore(s.keys.feedback_jobs, stale) is None


async def test_an_invalid_body_cannot_name_a_tenant_that_spells_another_tenants_record(
    pipeline: InProcessPipeline, redis: Redis
) -> None:
    """Records are "<tenant>/<job_id>" and a job_id may hold "/": tenant "victim/v" with job_id "9" would spell
    the victim's job "v/9". A valid job cannot name such a tenant; an invalid body's claim must not either."""
    await pipeline.start()
    s = pipeline.settings
    async with pipeline.client() as client:
        victim = await client.complete({"job_id": "v/9", "tenant": "victim", "prompt": "Victim secret"}, timeout=30)
    assert victim.status == "ok" and victim.content
    reply = await reply_to_raw(s, {"job_id": "9", "tenant": "victim/v", "prompt": 42})
    assert reply["status"] == "error" and reply["error"]["code"] == "invalid_request"
    assert reply.get("content") is None and reply["tenant"] == "default"  # the claim is not a tenant's name
    stored = json.loads(await redis.get(s.keys.result(job_record("victim", "v/9"))))
    assert stored["content"] == victim.content and stored["status"] == "ok"  # untouched
