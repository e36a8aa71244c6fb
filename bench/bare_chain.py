"""The ceiling: a bare aio-pika chain with farebox's hops (intake -> dedup -> route -> execute ->
account -> reply), the same durability (quorum queues, persistent messages, publisher confirms,
ack after the next publish is confirmed, prefetch 64, uvloop), one OS process per hop, and no work.

    python bench/bare_chain.py hop NAMESPACE I N [coalesced]   # one hop process (the driver starts these)

``coalesced`` hops publish as farebox's stages do since farebox/patches/aiormq_writes.py: without waiting
for the socket, one write per event-loop turn. The stock chain is the ceiling; this variant says
how much of farebox's gain over it is that write path alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator

import aio_pika
import uvloop

from farebox.constants import CONTENT_TYPE
from farebox.errors import BROKER_DOWN
from farebox.patches import aiormq_writes
from farebox.publishing import PublishWindow

AMQP = os.environ.get("FAREBOX_AMQP_URL", "amqp://guest:guest@localhost:5672/")
HOPS = 4
QUEUE_ARGS = {"x-queue-type": "quorum"}


def queue(ns: str, i: int) -> str:
    return f"{ns}.h{i}"


async def hop(ns: str, i: int, n_hops: int, coalesced: bool = False) -> None:
    if coalesced:
        aiormq_writes.install()
    while True:
        # RabbitMQ may close the connection with INTERNAL_ERROR when a consume reaches a quorum
        # queue declared a moment before (its Ra server is not up yet): start again, as the
        # farebox stages do (farebox/stages/runtime.py Worker._start).
        connection = await aio_pika.connect_robust(AMQP)
        try:
            channel = await connection.channel(publisher_confirms=True)
            await channel.set_qos(prefetch_count=64)
            source = await channel.declare_queue(queue(ns, i), durable=True, arguments=QUEUE_ARGS)
            if i + 1 < n_hops:
                await channel.declare_queue(queue(ns, i + 1), durable=True, arguments=QUEUE_ARGS)
            await source.consume(functools.partial(forward, channel, ns, i, n_hops, coalesced))
            break
        except BROKER_DOWN:
            with contextlib.suppress(Exception):
                await connection.close()
            await asyncio.sleep(0.5)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await connection.close()


async def forward(
    channel: aio_pika.abc.AbstractChannel,
    ns: str,
    i: int,
    n_hops: int,
    coalesced: bool,
    message: aio_pika.abc.AbstractIncomingMessage,
) -> None:
    target = queue(ns, i + 1) if i + 1 < n_hops else message.reply_to
    if coalesced:  # build properties, publish and ack as farebox's stages do
        properties = aiormq_writes.persistent_properties(
            content_type=CONTENT_TYPE, correlation_id=message.correlation_id, reply_to=message.reply_to
        )
        await aiormq_writes.publish(channel, message.body, routing_key=target or "", properties=properties)
        await aiormq_writes.ack(message)
    else:
        out = aio_pika.Message(
            message.body,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            correlation_id=message.correlation_id,
            reply_to=message.reply_to,
        )
        await channel.default_exchange.publish(out, target or "")
        await message.ack()


@contextlib.asynccontextmanager
async def bare_chain(n_hops: int = HOPS, *, coalesced: bool = False) -> AsyncIterator[str]:
    ns = f"fbbare-{uuid.uuid4().hex[:8]}"
    procs = [
        subprocess.Popen(  # noqa: ASYNC220
            [sys.executable, __file__, "hop", ns, str(i), str(n_hops)] + (["coalesced"] if coalesced else [])
        )
        for i in range(n_hops)
    ]
    try:
        connection = await aio_pika.connect(AMQP)
        async with connection:
            channel = await connection.channel()
            for i in range(n_hops):  # wait until each hop has declared its queue and consumes
                for _ in range(200):
                    try:
                        q = await channel.declare_queue(queue(ns, i), passive=True)
                        if q.declaration_result.consumer_count:
                            break
                    except aio_pika.exceptions.ChannelNotFoundEntity:
                        channel = await connection.channel()
                    await asyncio.sleep(0.05)
        yield ns
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(20)
        connection = await aio_pika.connect(AMQP)
        async with connection:
            channel = await connection.channel()
            for i in range(n_hops):
                await channel.queue_delete(queue(ns, i))


async def drive(ns: str, n: int, *, max_in_flight: int, body: bytes, coalesced: bool = False) -> float:
    """Jobs/s for n messages through the chain, at most max_in_flight unanswered (like the client);
    ``coalesced``: publishing as farebox's client does (farebox/patches/aiormq_writes.py)."""
    connection = await aio_pika.connect(AMQP)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        replies = await channel.declare_queue(exclusive=True)
        done = asyncio.Event()
        slots = asyncio.Semaphore(max_in_flight)
        count = 0

        async def on_reply(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal count
            count += 1
            slots.release()
            if count == n:
                done.set()

        await replies.consume(on_reply, no_ack=True)
        # Like farebox's client: several publishes await their confirms at once.
        window = PublishWindow()
        t0 = time.perf_counter()
        for k in range(n):
            await slots.acquire()
            if coalesced:
                properties = aiormq_writes.persistent_properties(
                    content_type=CONTENT_TYPE, reply_to=replies.name, correlation_id=str(k)
                )
                await window.start(
                    lambda p=properties: aiormq_writes.publish(channel, body, routing_key=queue(ns, 0), properties=p)
                )
            else:
                message = aio_pika.Message(
                    body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, reply_to=replies.name, correlation_id=str(k)
                )
                await window.start(lambda m=message: channel.default_exchange.publish(m, queue(ns, 0)))
        await window.drain()
        await done.wait()
        return n / (time.perf_counter() - t0)


async def one_at_a_time(ns: str, n: int, body: bytes, target: str | None = None) -> list[float]:
    """Round trips of one message at a time to the chain's first queue (or ``target``: farebox's intake, so that
    farebox is timed with the very same client as the bare chain)."""
    connection = await aio_pika.connect(AMQP)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        replies = await channel.declare_queue(exclusive=True)
        inbox: asyncio.Queue[None] = asyncio.Queue()

        async def on_reply(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            inbox.put_nowait(None)

        await replies.consume(on_reply, no_ack=True)
        lat = []
        for k in range(n):
            t = time.perf_counter()
            await channel.default_exchange.publish(
                aio_pika.Message(
                    body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, reply_to=replies.name, correlation_id=str(k)
                ),
                target or queue(ns, 0),
            )
            await inbox.get()
            lat.append((time.perf_counter() - t) * 1000)
        return lat


if __name__ == "__main__" and sys.argv[1:2] == ["hop"]:
    uvloop.run(hop(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), coalesced=sys.argv[5:6] == ["coalesced"]))
