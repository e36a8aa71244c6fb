"""AMQP write coalescing (farebox/patches/aiormq_writes.py): the pure joining, the writer's generator, and
over the real broker that a channel's publishes share socket writes and still all arrive, in order."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import aiormq
import pytest
from aiormq.abc import ChannelFrame
from redis.asyncio import Redis

from farebox.constants import job_record
from farebox.patches import aiormq_writes
from farebox.patches.aiormq_writes import CoalescedFrame, CoalescingFrameGenerator, coalesce
from tests.conftest import Services
from tests.support.pipeline import InProcessPipeline
from tests.support.workload import ticket_jobs


def frame(payload: bytes, *, drain: asyncio.Future[None] | None = None, close: bool = False) -> ChannelFrame:
    return ChannelFrame(payload=payload, should_close=close, drain_future=drain)


async def test_coalesce_keeps_order_and_drains_every_part() -> None:
    loop = asyncio.get_running_loop()
    # Only a later part waits for the drain: the joined frame must still be drained.
    waits = [None, None, loop.create_future()]
    parts = [frame(b"a", drain=waits[0]), frame(b"bb", drain=waits[1]), frame(b"ccc", drain=waits[2])]
    joined = coalesce(parts[0], parts[1:])
    assert joined.payload == b"abbccc"
    assert joined.should_drain and not joined.should_close
    joined.drain()
    assert all(w.done() for w in waits if w is not None)
    assert not joined.should_drain


async def test_a_large_frame_behind_small_ones_ends_the_write() -> None:
    big = b"x" * aiormq_writes.MAX_COALESCED_BYTES
    queue = await queue_of(frame(b"small"), frame(big), frame(b"next"))
    written = await CoalescingFrameGenerator(queue).__anext__()
    assert written.payload == b"small" + big  # the frame that crosses the cap is the last one taken
    assert queue.qsize() == 1


def test_a_lone_frame_is_written_as_it_is() -> None:
    only = frame(b"x")
    assert coalesce(only, []) is only


async def queue_of(*frames: ChannelFrame) -> asyncio.Queue[ChannelFrame]:
    queue: asyncio.Queue[ChannelFrame] = asyncio.Queue()
    for f in frames:
        queue.put_nowait(f)
    return queue


async def test_the_generator_takes_everything_queued_in_one_write() -> None:
    queue = await queue_of(frame(b"1"), frame(b"2"), frame(b"3"))
    written = await CoalescingFrameGenerator(queue).__anext__()
    assert isinstance(written, CoalescedFrame)
    assert written.payload == b"123"
    assert queue.empty()
    await asyncio.wait_for(queue.join(), 1)  # every frame is marked done, as aiormq's own generator does


async def test_nothing_is_joined_after_a_close_frame() -> None:
    queue = await queue_of(frame(b"1"), frame(b"close", close=True), frame(b"after"))
    written = await CoalescingFrameGenerator(queue).__anext__()
    assert written.payload == b"1close" and written.should_close
    assert queue.qsize() == 1


async def test_a_write_stops_growing_at_the_byte_cap() -> None:
    big = b"x" * aiormq_writes.MAX_COALESCED_BYTES
    queue = await queue_of(frame(big), frame(b"next"))
    written = await CoalescingFrameGenerator(queue).__anext__()
    assert written.payload == big
    assert queue.qsize() == 1


def test_install_is_idempotent_and_takes_effect() -> None:
    assert aiormq_writes.install() and aiormq_writes.install()
    assert aiormq.connection.FrameGenerator is CoalescingFrameGenerator
    assert aiormq.connection.Connection.FRAME_BUFFER_SIZE == aiormq_writes.WRITE_QUEUE_FRAMES


@pytest.fixture
async def channel(services: Services) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    aiormq_writes.install()
    connection = await aio_pika.connect(services.amqp_url)
    async with connection:
        yield await connection.channel(publisher_confirms=True)


async def test_publishes_of_one_turn_share_writes_and_all_arrive_in_order(
    channel: aio_pika.abc.AbstractChannel, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue = await channel.declare_queue(f"fbtest-writes-{uuid.uuid4().hex[:8]}", exclusive=True)
    writes: list[int] = []
    real_write = asyncio.StreamWriter.write

    def counting_write(self: asyncio.StreamWriter, data: bytes | bytearray | memoryview) -> None:
        writes.append(len(data))
        real_write(self, data)

    monkeypatch.setattr(asyncio.StreamWriter, "write", counting_write)
    underlay = await channel.get_underlay_channel()
    n = 200
    # As the stage runtime publishes: without waiting for the socket, each awaiting its confirm.
    await asyncio.gather(
        *(underlay.basic_publish(str(i).encode(), routing_key=queue.name, wait=False) for i in range(n))
    )
    assert len(writes) < n / 4, f"{len(writes)} socket writes for {n} publishes"
    got = []
    async with queue.iterator() as messages:
        async for message in messages:
            got.append(int(message.body))
            await message.ack()
            if len(got) == n:
                break
    assert got == list(range(n))


async def test_the_stages_and_the_client_publish_without_waiting_for_the_socket(
    pipeline: InProcessPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A publish that waits for the socket holds aiormq's channel lock across a turn: the stage's
    # publishes would go out one per turn, each in its own write, whatever the writer does.
    seen: list[tuple[str, bool]] = []
    real = aiormq.Channel.basic_publish

    async def recording(self: aiormq.Channel, body: bytes, **kwargs: Any) -> Any:
        seen.append((kwargs.get("routing_key", ""), kwargs.get("wait", True)))
        return await real(self, body, **kwargs)

    monkeypatch.setattr(aiormq.Channel, "basic_publish", recording)
    await pipeline.start()
    jobs = ticket_jobs(10)
    async with pipeline.client() as client:
        results = [r async for r in client.stream(jobs, max_in_flight=10, idle_timeout_s=60)]
    assert all(r.status == "ok" for r in results)
    intake = pipeline.settings.topology.intake
    assert len([key for key, _ in seen if key != intake]) >= 4  # route, execute, account hops and replies
    assert [key for key, _ in seen].count(intake) == len(jobs)  # the client's publishes
    assert not any(wait for _, wait in seen)


def test_persistent_properties_are_what_an_aio_pika_message_gives() -> None:
    fields = {
        "content_type": "application/json",
        "headers": {"x-farebox-batch": 3},
        "correlation_id": "c",
        "reply_to": "amq.gen-1",
        "message_id": "job-1",
    }
    ours = aiormq_writes.persistent_properties(**fields)  # type: ignore[arg-type]
    theirs = aio_pika.Message(
        b"", delivery_mode=aio_pika.DeliveryMode.PERSISTENT, timestamp=ours.timestamp, **fields
    ).properties  # type: ignore[arg-type]
    assert ours == theirs
    assert ours.delivery_mode == 2 and ours.timestamp is not None
    bare = aiormq_writes.persistent_properties(content_type="text/plain")
    assert (
        bare
        == aio_pika.Message(
            b"", content_type="text/plain", delivery_mode=aio_pika.DeliveryMode.PERSISTENT, timestamp=bare.timestamp
        ).properties
    )


async def test_a_graceful_stop_leaves_no_handled_message_unacked(
    pipeline: InProcessPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Acks do not wait for the socket. With a writer that lags (a busy process), the acks of the
    # jobs a stopping stage finishes are still queued when it closes its connection, which drops
    # them: the broker would hand those jobs out again, marked redelivered. The stop waits for them.
    real = CoalescingFrameGenerator.__anext__

    async def lagging(self: CoalescingFrameGenerator) -> ChannelFrame:
        frame = await real(self)
        await asyncio.sleep(0.03)
        return frame

    monkeypatch.setattr(CoalescingFrameGenerator, "__anext__", lagging)
    await pipeline.start()
    jobs = ticket_jobs(400)
    async with pipeline.client() as client:
        got = 0
        async for _ in client.stream(jobs, max_in_flight=400, idle_timeout_s=60):
            got += 1
            if got == 40:
                break
        await pipeline.stop("account")  # mid-stream: it finishes what it holds, then closes
    returned = await _jobs_left_in(pipeline.settings.topology.account, pipeline.settings.amqp_url)
    assert returned["fresh"] or returned["redelivered"], "the stop came after every job: nothing was tested"
    # RabbitMQ may deliver a message after it confirmed the cancel, and aiormq drops it unseen: such
    # a job comes back redelivered without having been handled, which is harmless. A job that was
    # handled (its result recorded) must not come back.
    redis = Redis.from_url(pipeline.settings.redis_url)
    async with redis:
        handled = [
            job
            for job in returned["redelivered"]
            if await redis.exists(pipeline.settings.keys.result(job_record("default", job)))
        ]
    assert handled == [], f"{len(handled)} job(s) the account stage had handled came back"


async def _jobs_left_in(queue_name: str, amqp_url: str) -> dict[str, list[str]]:
    """The job ids still in a queue, by whether their message was delivered before."""
    left: dict[str, list[str]] = {"fresh": [], "redelivered": []}
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(queue_name, passive=True)
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            ids = [json.loads(line)["job_id"] for line in message.body.split(b"\n")]
            left["redelivered" if message.redelivered else "fresh"] += ids
    return left
