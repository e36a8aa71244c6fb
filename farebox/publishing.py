"""One publish with its broker confirm, waited out through back-pressure and broker outages.

The client's intake publishes and a stage's publishes to the next queue must both lose nothing and
give up on nothing that only needs time: a full queue (its ``reject-publish`` overflow nacks the
publish, ``DeliveryError``), a connection being restored or a confirm that does not come
(``BROKER_DOWN_OR_TIMEOUT``). Those are tried again with a doubling delay. A return (``PublishError``:
nothing is bound to take the message) and any other error are raised to the caller at once: the
first is the caller's to judge, and the rest are bugs, which must fail instead of spinning as if
the broker were down.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import aio_pika.abc
import aiormq

from farebox.errors import BROKER_DOWN_OR_TIMEOUT
from farebox.patches import aiormq_writes

# Publishes of one stream awaiting their broker confirms at once.
PUBLISH_WINDOW = 64


@dataclass(frozen=True)
class Backoff:
    """The wait before the second attempt, doubled after each failure up to ``max_s``."""

    first_s: float
    max_s: float


async def publish_confirmed(
    channel: aio_pika.abc.AbstractChannel,
    body: bytes,
    *,
    routing_key: str,
    properties: Callable[[], aiormq.spec.Basic.Properties],
    backoff: Backoff,
    on_broker_down: Callable[[Exception], None],
    exchange: str = "",
    mandatory: bool = True,
    timeout: float = 30.0,
) -> None:
    """Publish ``body`` and return once the broker confirms it, retrying while the target queue
    is full or the broker is away (``on_broker_down`` is told of each such failure).

    ``properties`` is called for every attempt: aiormq writes a random message_id into properties
    that have none, and a late return of an earlier attempt must not match a later one."""
    delay = backoff.first_s
    while True:
        try:
            # Not waiting for the socket: publishes of one loop turn can share a write (aiormq_writes).
            await aiormq_writes.publish(
                channel,
                body,
                exchange=exchange,
                routing_key=routing_key,
                properties=properties(),
                mandatory=mandatory,
                timeout=timeout,
            )
            return
        except aiormq.exceptions.PublishError:
            raise  # a DeliveryError too, but a return is not back-pressure
        except aiormq.exceptions.DeliveryError:
            pass  # nacked: the queue is full; waiting here holds the producer back, nothing is lost
        except BROKER_DOWN_OR_TIMEOUT as err:
            on_broker_down(err)
        await asyncio.sleep(delay)
        delay = min(delay * 2, backoff.max_s)


class PublishWindow:
    """Up to ``size`` publishes awaiting their broker confirms at once: one at a time, a producer
    could not publish faster than one confirm round trip per job. The first failure is kept in
    ``failure`` and raised by the next ``start`` or by ``drain``."""

    def __init__(self, size: int = PUBLISH_WINDOW) -> None:
        self._room = asyncio.Semaphore(size)
        self._pending: set[asyncio.Task[Any]] = set()
        self.failure: BaseException | None = None

    async def start(self, publish: Callable[[], Coroutine[Any, Any, Any]]) -> None:
        """Wait for room, then start ``publish()`` without waiting for its confirm."""
        await self._room.acquire()
        if self.failure is not None:
            self._room.release()
            raise self.failure
        task = asyncio.create_task(publish())
        self._pending.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._room.release()
        self._pending.discard(task)
        if not task.cancelled() and task.exception() is not None and self.failure is None:
            self.failure = task.exception()

    async def drain(self) -> None:
        """Wait for every confirm; raise the first failure."""
        await asyncio.gather(*self._pending, return_exceptions=True)
        if self.failure is not None:
            raise self.failure

    def cancel(self) -> None:
        for task in self._pending:
            task.cancel()
