"""End to end over the real RabbitMQ, Redis and the emulator over HTTP: the happy paths."""

from __future__ import annotations

import json
import uuid

import aio_pika
from redis.asyncio import Redis

from farebox.settings import Settings
from tests.conftest import EmulatorStats
from tests.support.pipeline import InProcessPipeline, get_message, ledger_entries


def job(prompt: str, **kw: object) -> dict[str, object]:
    return {"prompt": prompt, "tenant": "acme", "job_id": str(uuid.uuid4()), **kw}


async def test_jobs_flow_through_every_stage(
    pipeline: InProcessPipeline, redis: Redis, settings: Settings, emulator_stats: EmulatorStats
) -> None:
    await pipeline.start()
    jobs = [job(f"Summarize item {i}", task="summarize", quality="low", max_tokens=40) for i in range(30)]
    async with pipeline.client() as client:
        results = [r async for r in client.stream(jobs, max_in_flight=10)]
    assert sorted(r.job_id for r in results) == sorted(str(j["job_id"]) for j in jobs)
    assert all(r.status == "ok" and r.content for r in results), [r.error for r in results if r.error]
    assert all(r.cost_usd > 0 and r.baseline_cost_usd >= r.cost_usd for r in results)
    assert all(r.route and r.route.reason and r.route.candidates for r in results)
    assert await emulator_stats.total() == 30
    assert sorted(await ledger_entries(redis, settings)) == sorted(str(j["job_id"]) for j in jobs)


async def test_repeat_is_served_from_cache(pipeline: InProcessPipeline, emulator_stats: EmulatorStats) -> None:
    await pipeline.start()
    async with pipeline.client() as client:
        first = await client.complete(job("What is 2+2?"), timeout=30)
        second = await client.complete(job("What is 2+2?"), timeout=30)
        other_tenant = await client.complete(job("What is 2+2?", tenant="globex"), timeout=30)
    assert (first.cache, second.cache, other_tenant.cache) == ("miss", "hit", "miss")
    assert second.content == first.content and second.cost_usd == 0 and second.baseline_cost_usd > 0
    assert await emulator_stats.total() == 2  # the other tenant never sees acme's answer


async def test_same_job_id_is_one_call_and_one_charge(
    pipeline: InProcessPipeline, redis: Redis, settings: Settings, emulator_stats: EmulatorStats
) -> None:
    await pipeline.start()
    j = job("Write a haiku about queues", temperature=0.9)  # not cacheable: only the job_id protects it
    async with pipeline.client() as client:
        first = await client.complete(j, timeout=30)
        again = await client.complete(j, timeout=30)
    assert first.status == again.status == "ok"
    assert again.job_id == first.job_id and again.content == first.content
    assert await emulator_stats.total() == 1
    assert await ledger_entries(redis, settings) == [j["job_id"]]


async def test_unknown_model_pin_is_invalid_request(pipeline: InProcessPipeline) -> None:
    await pipeline.start()
    async with pipeline.client() as client:
        result = await client.complete(job("hi", model="openai/gpt-does-not-exist"), timeout=30)
    assert result.status == "error" and result.error is not None
    assert result.error.code == "invalid_request" and "gpt-does-not-exist" in result.error.message


async def test_pinned_model_is_honoured(pipeline: InProcessPipeline, emulator_stats: EmulatorStats) -> None:
    await pipeline.start()
    async with pipeline.client() as client:
        result = await client.complete(job("hi", model="anthropic/claude-3-haiku"), timeout=30)
    assert result.status == "ok" and (result.provider, result.model) == ("anthropic", "claude-3-haiku")
    assert await emulator_stats.requests() == {"anthropic/claude-3-haiku": 1}


async def test_any_amqp_client_can_publish_a_job(pipeline: InProcessPipeline, settings: Settings) -> None:
    """What the README shows for other languages: plain AMQP, default exchange, reply_to."""
    await pipeline.start()
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        replies = await channel.declare_queue(exclusive=True)
        body = json.dumps({"tenant": "acme", "prompt": "Classify: great product!", "task": "classify"})
        await channel.default_exchange.publish(
            aio_pika.Message(
                body.encode(),
                content_type="application/json",
                reply_to=replies.name,
                correlation_id="corr-1",
                message_id="msg-1",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=settings.topology.intake,
        )
        message = await get_message(replies)
    result = json.loads(message.body)
    assert message.correlation_id == "corr-1"
    assert result["job_id"] == "msg-1" and result["status"] == "ok" and result["cache"] == "miss"
    assert set(result) >= {"content", "provider", "model", "usage", "cost_usd", "baseline_cost_usd", "route"}
