"""Failure paths of the backbone: bad input, poison messages, a full intake, a dead caller."""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid

import aio_pika
import pytest
from redis.asyncio import Redis

from farebox.constants import H_CODE, H_REASON
from farebox.errors import DependencyUnavailable
from farebox.publishing import PUBLISH_WINDOW
from farebox.settings import Settings
from tests.support.faults import crash_route_on_poison
from tests.support.pipeline import InProcessPipeline, collect, get_message, ledger_entries


async def _publish_raw(settings: Settings, body: bytes, reply_to: str, **props: object) -> None:
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.default_exchange.publish(
            aio_pika.Message(body, reply_to=reply_to, **props), routing_key=settings.topology.intake
        )  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "body, fragment",
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe garbage", "not UTF-8"),
        (b"[1, 2]", "JSON object"),
        (b'{"prompt": "x", "max_tokens": -5}', "max_tokens"),
        (b'{"prompt": "x", "qualty": "high"}', "qualty"),
        (b'{"tenant": "acme"}', "prompt"),
        (b"[" * 100_000 + b"]" * 100_000, "nested"),
    ],
)
async def test_bad_message_gets_typed_error_and_lands_in_dead_queue(
    pipeline: InProcessPipeline, settings: Settings, redis: Redis, body: bytes, fragment: str
) -> None:
    await pipeline.start("dedup", "account")
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        replies = await channel.declare_queue(exclusive=True)
        await channel.default_exchange.publish(
            aio_pika.Message(body, reply_to=replies.name, correlation_id="c1"), routing_key=settings.topology.intake
        )
        reply = await get_message(replies)
        dead = await get_message(await channel.get_queue(settings.topology.dead))
    result = json.loads(reply.body)
    assert result["status"] == "error" and result["error"]["code"] == "invalid_request"
    assert fragment in result["error"]["message"]
    assert reply.correlation_id == "c1"
    record = json.loads(dead.body)  # a record of the message, not the message (tests/test_dead_retention.py)
    assert record["body_bytes"] == len(body) and record["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert record["queue"] == settings.topology.intake and record["stage"] == "dedup"
    assert record["job_id"] == result["job_id"] and "body" not in record
    assert fragment in record["reason"] and record["code"] == "invalid_request"
    assert fragment in dead.headers[H_REASON] and dead.headers[H_CODE] == "invalid_request"
    assert len(await ledger_entries(redis, settings)) == 1


async def test_oversized_body_is_refused_without_reading_it(pipeline: InProcessPipeline, settings: Settings) -> None:
    await pipeline.start("dedup", "account")
    big = json.dumps({"prompt": "x" * (settings.max_body_bytes + 10)}).encode()
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        replies = await channel.declare_queue(exclusive=True)
        await channel.default_exchange.publish(
            aio_pika.Message(big, reply_to=replies.name), routing_key=settings.topology.intake
        )
        result = json.loads((await get_message(replies)).body)
    assert result["error"]["code"] == "invalid_request" and "limit" in result["error"]["message"]
    assert "xxxx" not in result["error"]["message"]


async def test_poison_message_hits_delivery_limit_and_caller_gets_internal_error(
    pipeline: InProcessPipeline, settings: Settings, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job that crashes its stage every time is dead-lettered by the broker after the delivery
    limit, not retried forever, and the caller still hears about it."""
    crash_route_on_poison(monkeypatch)
    await pipeline.start()
    async with pipeline.client() as client:
        poison, good = await asyncio.gather(
            client.complete({"prompt": "boom", "tenant": "poison", "job_id": "p-1"}, timeout=60),
            client.complete({"prompt": "fine", "tenant": "acme", "job_id": "g-1"}, timeout=60),
        )
    assert good.status == "ok"
    assert poison.status == "error" and poison.error is not None and poison.error.code == "internal"
    assert "delivery limit" in poison.error.message
    assert sorted(await ledger_entries(redis, settings)) == ["g-1", "p-1"]
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        dead = await get_message(await (await connection.channel()).get_queue(settings.topology.dead))
    record = json.loads(dead.body)
    # A job of a batch: the route stage retried it itself and dead-lettered it at the limit.
    assert record["job_id"] == "p-1" and record["stage"] == "route"
    assert record["queue"].startswith(settings.topology.route)
    assert "delivery limit" in record["reason"] and record["dead_lettered_at"] is not None


async def test_full_intake_pushes_back_and_loses_nothing(settings: Settings, redis: Redis, emulator: str) -> None:
    """With the intake capped at 5 and no consumer yet, publishes are nacked; the client waits
    and retries, and once the pipeline runs every job completes."""
    small = settings.model_copy(update={"intake_max_length": 5, "emulator_url": emulator})
    p = InProcessPipeline(small)
    n = 3 * PUBLISH_WINDOW
    try:
        await p.start("route", "execute:openai", "execute:anthropic", "execute:google", "account")  # no dedup
        jobs = [{"prompt": f"item {i}", "job_id": f"j{i}"} for i in range(n)]
        async with p.client() as client:
            collected = asyncio.create_task(collect(client.stream(jobs, max_in_flight=n)))
            await asyncio.sleep(2.0)
            assert not collected.done()
            connection = await aio_pika.connect(small.amqp_url)
            async with connection:
                queue = await (await connection.channel()).declare_queue(small.topology.intake, passive=True)
                held = queue.declaration_result.message_count
            # Capped: a quorum queue learns it is full a little late, so the publishes already
            # awaiting confirms (the client's window) may still get in; the rest are held back.
            assert 5 <= held <= 5 + PUBLISH_WINDOW + 1
            await p.start("dedup")
            results = await asyncio.wait_for(collected, 120)
        assert sorted(r.job_id for r in results) == sorted(j["job_id"] for j in jobs)
        assert all(r.status == "ok" for r in results)
        assert client.repeats_dropped == 0  # nothing was published (and answered) twice
    finally:
        await p.close()


async def test_result_for_a_vanished_caller_is_dropped_not_retried(
    pipeline: InProcessPipeline, settings: Settings, redis: Redis
) -> None:
    await pipeline.start()
    job_id = str(uuid.uuid4())
    await _publish_raw(
        settings, json.dumps({"prompt": "hi", "job_id": job_id}).encode(), reply_to="amq.gen-no-such-queue"
    )
    for _ in range(200):
        if job_id in await ledger_entries(redis, settings):
            break
        await asyncio.sleep(0.05)
    assert job_id in await ledger_entries(redis, settings)
    async with pipeline.client() as client:  # the pipeline is still healthy afterwards
        assert (await client.complete({"prompt": "next"}, timeout=30)).status == "ok"


async def test_stream_raises_when_the_intake_goes_away_instead_of_hanging(
    pipeline: InProcessPipeline, settings: Settings
) -> None:
    """Publishes await their confirms several at a time; one that fails still fails the stream."""
    await pipeline.start("dedup")
    async with pipeline.client() as client:
        await pipeline.close()  # stops the stage and deletes the namespace's queues, intake included
        jobs = [{"prompt": f"item {i}", "job_id": f"gone{i}"} for i in range(200)]
        with pytest.raises(DependencyUnavailable, match="is gone"):
            # Fewer slots than jobs: the failed publishes hold theirs, and the stream must not wait
            # for its idle timeout (300 s) to give them back before it raises.
            await asyncio.wait_for(collect(client.stream(jobs, max_in_flight=10)), 30)


@pytest.mark.parametrize(
    "body, reply_to",
    [
        # An envelope that no longer validates (a newer version, say), from a batch: no properties of its own.
        (
            b'{"v": 2, "job_id": "e-1", "job": {"prompt": "x", "tenant": "acme"}, "received_at": 1.0, '
            b'"reply_to": "amq.gen-caller", "correlation_id": "c-1"}',
            "amq.gen-caller",
        ),
        # A producer's body is never trusted for where to answer: that is its message property.
        (b'{"prompt": "x", "reply_to": "amq.gen-someone-else", "qualty": "high"}', None),
    ],
)
def test_a_dead_letter_without_properties_answers_the_envelope_caller_only(body: bytes, reply_to: str | None) -> None:
    from farebox.stages.deadletter import read_dead_letter, read_origin
    from farebox.stages.stage import Delivery

    # The broker dead-lettered it, from the account queue when it is an envelope, else from the intake.
    queue = "fb.account" if reply_to else "fb.jobs"
    delivery = Delivery("fb.dead.notify", body, headers={"x-death": [{"queue": queue, "reason": "delivery_limit"}]})
    dead = read_dead_letter(delivery, read_origin(delivery, "guest"), intake="fb.jobs", max_body_bytes=10_000)
    assert dead.reply_to == reply_to
    assert dead.tenant == ("acme" if reply_to else "default")
