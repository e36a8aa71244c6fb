"""A stage worker's channel and consumers (farebox/stages/runtime.py runs the messages they deliver).

Opening them means a channel with publisher confirms, the topology declared and every input queue consumed;
that is tried again while the broker is away, and given up when the worker is stopped first. Draining means
cancelling the consumers, then one round trip on the channel so the acks sent without waiting reach the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from aio_pika.abc import AbstractIncomingMessage, AbstractRobustChannel, AbstractRobustConnection

from farebox.errors import broker_away
from farebox.settings import Settings
from farebox.stages.topology import declare_topology, queue_plan

log = logging.getLogger("farebox.runtime")

OnMessage = Callable[[AbstractIncomingMessage], Awaitable[None]]


class Consumption:
    def __init__(
        self,
        settings: Settings,
        name: str,
        providers: Sequence[str],
        queues: Sequence[str],
        *,
        prefetch: int,
        consumer_args: dict[str, Any] | None,
    ) -> None:
        self.settings = settings
        self.name = name
        self.providers = list(providers)
        self.queues = list(queues)
        self.prefetch = prefetch
        self.consumer_args = consumer_args
        self.channel: AbstractRobustChannel | None = None
        self.consumers: list[tuple[Any, Any]] = []  # (queue, consumer tag) of every consume started

    async def start_unless_stopped(
        self, connection: AbstractRobustConnection, on_message: Callable[[str], OnMessage], stop: asyncio.Event
    ) -> bool:
        """``start``, given up when ``stop`` comes first (False): a SIGTERM while the broker is away (``start``
        retrying) ends the process now, not when the pod's grace period runs out."""
        starting = asyncio.create_task(self.start(connection, on_message))
        stopping = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            starting.cancel()  # no-op once done
            stopping.cancel()
            await asyncio.gather(starting, stopping, return_exceptions=True)
        if starting.cancelled():
            log.info("stage %s: stopped before it could consume", self.name)
            return False
        starting.result()  # what made it fail, if anything
        return True

    async def start(
        self, connection: AbstractRobustConnection, on_message: Callable[[str], OnMessage]
    ) -> list[tuple[Any, Any]]:
        """Open the channel, declare the topology and consume; tried again while the connection
        fails under it. RabbitMQ can close the connection with INTERNAL_ERROR when a consume
        reaches a quorum queue another process declared a moment before (its Ra server is not up
        yet: seen here on 2 of about 150 pipeline starts). The robust connection comes back by
        itself; a stage that gave up then would never consume, and its jobs would wait for ever."""
        delay = 0.5
        while True:
            channel: AbstractRobustChannel | None = None
            try:
                channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
                self.channel = channel  # before the first consume: its messages publish on it
                await channel.set_qos(prefetch_count=self.prefetch)
                await declare_topology(channel, self.settings, self.providers)
                self.consumers = []  # kept as they start: a stop halfway cancels the ones that did
                plan = queue_plan(self.settings, self.providers)
                for name in self.queues:
                    # Declared (not just looked up) so the robust channel re-consumes it after a reconnect.
                    queue = await channel.declare_queue(name, durable=True, arguments=plan[name])
                    tag = await queue.consume(on_message(name), arguments=self.consumer_args)
                    self.consumers.append((queue, tag))
                return self.consumers
            except Exception as err:
                if not broker_away(err, connection):
                    raise
                log.warning(
                    "stage %s: could not start consuming (%s: %s); trying again in %.1fs",
                    self.name,
                    type(err).__name__,
                    err,
                    delay,
                )
                if channel is not None:
                    with contextlib.suppress(Exception):
                        await channel.close()  # a half-set-up robust channel must not be restored as well
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def cancel(self) -> None:
        """No more deliveries: every consumer started is cancelled (what is in flight stays to be settled)."""
        for queue, tag in self.consumers:
            with contextlib.suppress(Exception):
                await queue.cancel(tag)

    async def acks_reached_the_broker(self) -> None:
        """Acks are sent without waiting for the socket (``aiormq_writes.ack``), and closing the connection
        drops what aiormq's writer still holds, so the broker would redeliver jobs already done.
        A round trip on the channel, queued behind the acks, returns once the broker has them."""
        if self.channel is None:
            return
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.channel.set_qos(prefetch_count=self.prefetch), 5)
