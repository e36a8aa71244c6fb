"""Several jobs per AMQP message between stages.

A hop costs the same per message whatever the message holds: publish, confirm, deliver and ack
came to about 1 ms of CPU per job per hop here, worker and broker together (bench/ceiling.py, the
bare chain). So a stage's outgoing messages to the same internal queue are coalesced into one
message of up to ``batch_max`` envelopes, one per line (pydantic's JSON never holds a raw newline),
with ``x-farebox-batch`` giving the count. Only the internal hops are batched (route, execute.*,
account); the intake, replies, alerts and the coalescing queues keep one message per job, as
CONTRACT.md and the broker-side timers need.

When a batch is sent (Nagle's algorithm, with the worker's own idleness as the push):
* at ``batch_max`` envelopes;
* as soon as nothing else in this worker is still being handled, unless an earlier batch to the
  same queue still awaits its confirm: then when that confirm comes, with whatever joined
  meanwhile. A job on its own is never held back; under load the batch size follows the confirm
  latency by itself;
* at the latest ``batch_linger_ms`` after its first envelope, so a slow neighbour (a provider call
  of a second) does not hold finished jobs back.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace

from farebox import metrics
from farebox.constants import H_BATCH
from farebox.errors import PermanentError
from farebox.stages.stage import Delivery, Publish

BATCH_CONTENT_TYPE = "application/x-ndjson"
# Far below any broker's message size limit (16 MiB by default on RabbitMQ 4); an envelope that is
# bigger on its own (a prompt near FAREBOX_MAX_BODY_BYTES) still goes, alone.
BATCH_MAX_BYTES = 4 * 1024 * 1024


def batch_count(delivery: Delivery) -> int | None:
    """How many envelopes the message holds, or None for a message with one job."""
    count = delivery.headers.get(H_BATCH)
    return count if isinstance(count, int) and not isinstance(count, bool) else None


def split_batch(delivery: Delivery, count: int) -> list[Delivery]:
    """One Delivery per envelope; each keeps the batch's headers and redelivery state (a batch
    redelivered after a crash is redelivered for every job in it)."""
    bodies = delivery.body.split(b"\n")
    if count < 1 or len(bodies) != count:
        raise PermanentError(f"a batch message says it holds {count} job(s) but holds {len(bodies)}")
    return [replace(delivery, body=body) for body in bodies]


class Batcher:
    """Coalesces publishes to the same queue; ``add`` returns a future that resolves when the
    message holding the publish is confirmed (or fails as the publish failed)."""

    def __init__(
        self, send: Callable[[Publish], Awaitable[None]], stage: str, *, max_items: int, linger_s: float
    ) -> None:
        self._send = send
        self._sizes = metrics.BATCH_SIZE.labels(stage)
        self._max = max_items
        self._linger_s = linger_s
        self._pending: dict[str, list[tuple[Publish, asyncio.Future[None]]]] = {}
        self._bytes: dict[str, int] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._sending: set[asyncio.Task[None]] = set()
        self._unconfirmed: dict[str, int] = {}  # batches sent to a queue and not yet confirmed

    def add(self, publish: Publish) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        key = publish.routing_key
        if key in self._pending and self._bytes[key] + len(publish.body) > BATCH_MAX_BYTES:
            self._flush(key)
        batch = self._pending.setdefault(key, [])
        batch.append((publish, done))
        self._bytes[key] = self._bytes.get(key, 0) + len(publish.body) + 1
        if len(batch) >= self._max or self._bytes[key] > BATCH_MAX_BYTES:
            self._flush(key)
        elif len(batch) == 1:
            self._timers[key] = loop.call_later(self._linger_s, self._flush, key)
        return done

    def flush_idle(self, idle: Callable[[str], bool] = lambda queue: True) -> None:
        """Nothing else can join now (for the queues ``idle`` names): send what waits, except behind a batch
        still awaiting its confirm (that batch's confirm sends it, with whatever joined meanwhile)."""
        for key in list(self._pending):
            if not self._unconfirmed.get(key) and idle(key):
                self._flush(key)

    def _flush(self, key: str) -> None:
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        batch = self._pending.pop(key, None)
        self._bytes.pop(key, None)
        if batch:
            self._unconfirmed[key] = self._unconfirmed.get(key, 0) + 1
            task = asyncio.get_running_loop().create_task(self._send_batch(key, batch))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send_batch(self, key: str, batch: Sequence[tuple[Publish, asyncio.Future[None]]]) -> None:
        self._sizes.observe(len(batch))
        if len(batch) == 1:
            message = batch[0][0]
        else:
            message = replace(
                batch[0][0],
                body=b"\n".join(p.body for p, _ in batch),
                headers={H_BATCH: len(batch)},
                content_type=BATCH_CONTENT_TYPE,
                reply_to=None,
                correlation_id=None,
                message_id=None,
            )
        error: BaseException | None = None
        try:
            await self._send(message)
        except BaseException as err:  # every waiter hears of it; a cancellation still propagates
            error = err
        self._confirmed(key)
        for _, done in batch:
            if not done.done():
                if error is None:
                    done.set_result(None)
                else:
                    done.set_exception(error)
        if error is not None and not isinstance(error, Exception):
            raise error

    def _confirmed(self, key: str) -> None:
        self._unconfirmed[key] -= 1
        if not self._unconfirmed[key] and key in self._pending:
            self._flush(key)
