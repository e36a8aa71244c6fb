"""Several jobs per message between stages (farebox/stages/batching.py): the coalescing rules as pure
units, then batches on the real broker — formed under load, not holding a lone job back, and a
failing job of a batch settled alone without repeating the rest."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Sequence

import aio_pika
import pytest
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from farebox.constants import H_BATCH, Topology
from farebox.errors import PermanentError
from farebox.schemas import Envelope, Job
from farebox.settings import Settings
from farebox.stages import batching
from farebox.stages.batching import Batcher, batch_count, split_batch
from farebox.stages.stage import Delivery, Publish
from tests.conftest import EmulatorStats
from tests.support.faults import crash_route_on_poison
from tests.support.pipeline import InProcessPipeline, collect, get_message, ledger_entries


def _delivery(body: bytes, headers: dict[str, object]) -> Delivery:
    return Delivery("q", body, redelivered=True, delivery_count=2, headers=headers)


@pytest.mark.parametrize(
    "headers, expected",
    [
        ({}, None),
        ({H_BATCH: 3}, 3),
        ({H_BATCH: "3"}, None),
        ({H_BATCH: True}, None),
    ],
)
def test_batch_count(headers: dict[str, object], expected: int | None) -> None:
    assert batch_count(_delivery(b"{}", headers)) == expected


@pytest.mark.parametrize(
    "body, count, jobs",
    [
        (b'{"a":1}', 1, [b'{"a":1}']),
        (b'{"a":1}\n{"b":2}\n{"c":3}', 3, [b'{"a":1}', b'{"b":2}', b'{"c":3}']),
        (b'{"a":1}\n{"b":2}', 3, None),
        (b'{"a":1}\n{"b":2}', 1, None),
        (b"", 0, None),
    ],
)
def test_split_batch(body: bytes, count: int, jobs: list[bytes] | None) -> None:
    delivery = _delivery(body, {H_BATCH: count})
    if jobs is None:
        with pytest.raises(PermanentError, match="holds"):
            split_batch(delivery, count)
        return
    parts = split_batch(delivery, count)
    assert [p.body for p in parts] == jobs
    assert all(p.redelivered and p.delivery_count == 2 and p.queue == "q" for p in parts)


@pytest.mark.parametrize(
    "queue, batched",
    [
        ("fb.route", True),
        ("fb.account", True),
        ("fb.execute.openai", True),
        ("fb.jobs", False),
        ("fb.recheck", False),
        ("fb.wait", False),
        ("fb.dead", False),
        ("fb.dead.notify", False),
        ("amq.gen-reply", False),
        ("other.route", False),
    ],
)
def test_only_internal_hops_are_batched(queue: str, batched: bool) -> None:
    assert Topology("fb").is_batched(queue) is batched


class Sent:
    def __init__(self, fail: BaseException | None = None) -> None:
        self.messages: list[Publish] = []
        self.fail = fail

    async def __call__(self, p: Publish) -> None:
        await asyncio.sleep(0)
        if self.fail is not None:
            raise self.fail
        self.messages.append(p)


def _bodies(messages: Sequence[Publish]) -> list[bytes]:
    return [m.body for m in messages]


async def test_batcher_sends_a_full_batch_at_once_and_the_rest_when_it_is_confirmed() -> None:
    sent = Sent()
    batcher = Batcher(sent, "t", max_items=3, linger_s=60)
    waits = [batcher.add(Publish(routing_key="q", body=f'{{"n":{i}}}'.encode())) for i in range(4)]
    assert not waits[3].done()
    await asyncio.wait_for(asyncio.gather(*waits), 5)  # no flush call, no linger: the confirm sends it
    assert _bodies(sent.messages) == [b'{"n":0}\n{"n":1}\n{"n":2}', b'{"n":3}']
    assert sent.messages[0].headers == {H_BATCH: 3} and sent.messages[0].content_type == "application/x-ndjson"
    assert sent.messages[1].headers == {}  # alone: an ordinary message, no batch header


async def test_batcher_keeps_queues_apart_and_sends_a_part_full_batch_after_the_linger() -> None:
    sent = Sent()
    batcher = Batcher(sent, "t", max_items=100, linger_s=0.05)
    a = batcher.add(Publish(routing_key="a", body=b"1", reply_to="r", correlation_id="c", message_id="m"))
    b = [batcher.add(Publish(routing_key="b", body=f"{i}".encode())) for i in range(2)]
    await asyncio.wait_for(asyncio.gather(a, *b), 5)
    by_key = {m.routing_key: m for m in sent.messages}
    assert by_key["a"].body == b"1" and by_key["a"].reply_to == "r"  # a lone publish keeps its properties
    assert by_key["b"].body == b"0\n1" and by_key["b"].reply_to is None


async def test_a_failed_send_fails_every_publish_in_the_batch() -> None:
    batcher = Batcher(Sent(fail=ConnectionError("gone")), "t", max_items=2, linger_s=60)
    waits = [batcher.add(Publish(routing_key="q", body=b"x")) for _ in range(2)]
    results = await asyncio.gather(*waits, return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results)


def _batched_jobs(stage: str) -> tuple[float, float]:
    """(messages, jobs) this process's batcher has sent for a stage."""
    count = REGISTRY.get_sample_value("farebox_batch_jobs_count", {"stage": stage}) or 0.0
    total = REGISTRY.get_sample_value("farebox_batch_jobs_sum", {"stage": stage}) or 0.0
    return count, total


async def test_batches_form_under_load_and_every_job_costs_one_provider_call(
    pipeline: InProcessPipeline, emulator_stats: EmulatorStats
) -> None:
    before = _batched_jobs("dedup")
    await pipeline.start()
    jobs = [{"prompt": f"summarise item {i}", "job_id": f"b{i}", "max_tokens": 20} for i in range(300)]
    async with pipeline.client() as client:
        results = await asyncio.wait_for(collect(client.stream(jobs, max_in_flight=300)), 120)
    assert sorted(r.job_id for r in results) == sorted(j["job_id"] for j in jobs)
    assert all(r.status == "ok" for r in results)
    assert await emulator_stats.total() == 300  # no job of a batch was executed twice
    messages, sent = (a - b for a, b in zip(_batched_jobs("dedup"), before, strict=True))
    assert sent == 300 and messages < sent  # some messages carried more than one job


async def test_batching_off_sends_one_job_per_message(settings: Settings, redis: Redis, emulator: str) -> None:
    before = _batched_jobs("dedup")
    p = InProcessPipeline(settings.model_copy(update={"emulator_url": emulator, "batch_max": 1}))
    try:
        await p.start()
        jobs = [{"prompt": f"item {i}", "job_id": f"one{i}"} for i in range(40)]
        async with p.client() as client:
            results = await asyncio.wait_for(collect(client.stream(jobs, max_in_flight=40)), 60)
        assert sorted(r.job_id for r in results) == sorted(j["job_id"] for j in jobs)
    finally:
        await p.close()
    assert _batched_jobs("dedup") == before  # the batcher was never used


async def test_a_lone_job_is_not_held_for_the_linger(settings: Settings, redis: Redis, emulator: str) -> None:
    """With a linger of ten minutes, a job on its own still goes through every hop at once."""
    p = InProcessPipeline(settings.model_copy(update={"emulator_url": emulator, "batch_linger_ms": 600_000}))
    try:
        await p.start()
        async with p.client() as client:
            result = await client.complete({"prompt": "alone", "job_id": "lone-1"}, timeout=30)
        assert result.status == "ok"
    finally:
        await p.close()


def _envelope(job_id: str, tenant: str, reply_to: str) -> bytes:
    env = Envelope(
        job_id=job_id,
        job=Job(prompt=f"question {job_id}", tenant=tenant),
        reply_to=reply_to,
        correlation_id=job_id,
        received_at=time.time(),
        coalesce_key=f"job:{job_id}",
    )
    return env.model_dump_json(exclude_defaults=True).encode()


async def _publish_batch(settings: Settings, queue: str, bodies: Sequence[bytes], count: int | None = None) -> None:
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.default_exchange.publish(
            aio_pika.Message(b"\n".join(bodies), headers={H_BATCH: len(bodies) if count is None else count}),
            routing_key=queue,
        )


async def _replies(
    channel: aio_pika.abc.AbstractChannel, queue: aio_pika.abc.AbstractQueue, n: int
) -> list[dict[str, object]]:
    got = [json.loads((await get_message(queue, timeout=60)).body) for _ in range(n)]
    await asyncio.sleep(1.0)  # anything repeated would have arrived by now
    assert await queue.get(fail=False) is None, "a job of the batch was answered twice"
    return got


async def test_a_crashing_job_in_a_batch_is_retried_alone_and_the_rest_answered_once(
    pipeline: InProcessPipeline,
    settings: Settings,
    redis: Redis,
    monkeypatch: pytest.MonkeyPatch,
    emulator_stats: EmulatorStats,
) -> None:
    crash_route_on_poison(monkeypatch)
    await pipeline.start()
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        replies = await channel.declare_queue(exclusive=True)
        bodies = [
            _envelope("g-1", "acme", replies.name),
            _envelope("p-1", "poison", replies.name),
            _envelope("g-2", "acme", replies.name),
        ]
        await _publish_batch(settings, settings.topology.route, bodies)
        got = {r["job_id"]: r for r in await _replies(channel, replies, 3)}
        dead = await get_message(await channel.get_queue(settings.topology.dead))
    assert got["g-1"]["status"] == "ok" and got["g-2"]["status"] == "ok"
    poison = got["p-1"]
    assert poison["status"] == "error" and poison["error"]["code"] == "internal"  # type: ignore[index]
    assert "delivery limit" in poison["error"]["message"]  # type: ignore[index]
    assert sorted(await ledger_entries(redis, settings)) == ["g-1", "g-2", "p-1"]
    assert await emulator_stats.total() == 2
    assert json.loads(dead.body)["job_id"] == "p-1"  # the failing job alone is kept for inspection


async def test_retrying_a_job_of_a_batch_does_not_stall_a_full_stage_queue(
    settings: Settings, redis: Redis, emulator: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The route queue holds one message at most and route takes one at a time: while a batch
    with a crashing job is being retried, the queue is full behind it. The retries must not need
    room in that queue (republishing there would wait for ever while holding the batch)."""
    crash_route_on_poison(monkeypatch)
    tight = settings.model_copy(update={"emulator_url": emulator, "stage_max_length": 1, "prefetch": 1})
    p = InProcessPipeline(tight)
    try:
        await p.start()
        connection = await aio_pika.connect(tight.amqp_url)
        async with connection:
            channel = await connection.channel()
            replies = await channel.declare_queue(exclusive=True)
            await _publish_batch(
                tight,
                tight.topology.route,
                [_envelope("g-1", "acme", replies.name), _envelope("p-1", "poison", replies.name)],
            )
            accepted = ["g-1", "p-1"]
            for job_id in ("m-2", "m-3", "m-4"):  # fill the queue while the batch is held
                with contextlib.suppress(aio_pika.exceptions.DeliveryError):
                    await _publish_batch(tight, tight.topology.route, [_envelope(job_id, "acme", replies.name)])
                    accepted.append(job_id)
            assert len(accepted) < 5, "the route queue never filled up"
            got = {r["job_id"]: r for r in await _replies(channel, replies, len(accepted))}
        assert sorted(got) == sorted(accepted)
        assert got["p-1"]["status"] == "error"
        assert all(got[j]["status"] == "ok" for j in accepted if j != "p-1")
    finally:
        await p.close()


async def test_a_batch_the_broker_dead_letters_answers_every_caller_in_it(
    pipeline: InProcessPipeline, settings: Settings
) -> None:
    """A batch that crashes its consumer every time (here: this test, rejecting it) reaches the
    delivery limit; the broker dead-letters it whole, and each job's caller gets its error."""
    await pipeline.start("account")  # answers dead letters; no route stage, the test plays it
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        replies = await channel.declare_queue(exclusive=True)
        bodies = [_envelope(f"d-{i}", "acme", replies.name) for i in range(3)]
        await _publish_batch(settings, settings.topology.route, bodies)
        route = await channel.get_queue(settings.topology.route)
        for _ in range(settings.delivery_limit + 1):
            with contextlib.suppress(aio_pika.exceptions.QueueEmpty):
                message = await get_message_unacked(route)
                await message.nack(requeue=True)
        got = await _replies(channel, replies, 3)
    assert sorted(str(r["job_id"]) for r in got) == ["d-0", "d-1", "d-2"]
    for r in got:
        assert r["status"] == "error" and r["error"]["code"] == "internal"  # type: ignore[index]
        assert "delivery limit" in r["error"]["message"]  # type: ignore[index]


async def get_message_unacked(queue: aio_pika.abc.AbstractQueue) -> aio_pika.abc.AbstractIncomingMessage:
    for _ in range(100):
        message = await queue.get(no_ack=False, fail=False)
        if message is not None:
            return message
        await asyncio.sleep(0.1)
    raise aio_pika.exceptions.QueueEmpty


async def test_a_malformed_batch_is_dead_lettered_not_looped(pipeline: InProcessPipeline, settings: Settings) -> None:
    await pipeline.start("route", "account")
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        await _publish_batch(settings, settings.topology.route, [b'{"v":1}', b"garbage"], count=5)
        dead = await get_message(await channel.get_queue(settings.topology.dead), timeout=30)
        assert dead.headers is not None and "holds" in str(dead.headers.get("x-farebox-reason"))
        await asyncio.sleep(1.0)
        again = await (await channel.get_queue(settings.topology.dead)).get(fail=False)
        assert again is None  # answered once, not dead-lettered again


async def test_idle_flush_waits_behind_an_unconfirmed_batch_then_sends_what_joined() -> None:
    confirm = asyncio.Event()
    sent: list[Publish] = []

    async def send(p: Publish) -> None:
        sent.append(p)
        await confirm.wait()

    batcher = Batcher(send, "t", max_items=100, linger_s=60)
    first = batcher.add(Publish(routing_key="q", body=b"1"))
    batcher.flush_idle()
    await asyncio.sleep(0.01)
    assert [p.body for p in sent] == [b"1"]  # nothing in flight: sent at once
    later = [batcher.add(Publish(routing_key="q", body=f"{i}".encode())) for i in (2, 3)]
    batcher.flush_idle()
    other = batcher.add(Publish(routing_key="other", body=b"x"))
    batcher.flush_idle()
    await asyncio.sleep(0.01)
    assert [p.body for p in sent] == [b"1", b"x"]  # "q" waits behind its unconfirmed batch; "other" does not
    confirm.set()
    await asyncio.wait_for(asyncio.gather(first, other, *later), 5)
    assert [p.body for p in sent] == [b"1", b"x", b"2\n3"]


async def test_a_batch_stays_under_the_byte_cap_and_a_bigger_envelope_goes_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(batching, "BATCH_MAX_BYTES", 10)
    sent = Sent()
    batcher = Batcher(sent, "t", max_items=100, linger_s=60)
    bodies = [b"abcd"] * 5 + [b"x" * 30]
    await asyncio.wait_for(asyncio.gather(*(batcher.add(Publish(routing_key="q", body=b)) for b in bodies)), 5)
    assert _bodies(sent.messages) == [b"abcd\nabcd", b"abcd\nabcd", b"abcd", b"x" * 30]
