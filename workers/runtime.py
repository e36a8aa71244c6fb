"""The one shell every stage runs in: decode -> handle -> publish with confirms -> ack.

A stage core never sees channels or acks. It turns a decoded ``Envelope`` into the messages to
publish next (``Handled``); this module publishes them with publisher confirms and acks the input
only after every publish is confirmed, so a crash at any point leaves the input unacked and the
broker redelivers it. What each error family means for the message is decided here and only here:

* decode failure (``PermanentError`` from ``decode``) -> dead-letter with the reason;
* ``PermanentError``/``BlockedError`` from ``handle`` -> an error result through the account stage;
* ``RetryableError`` -> requeue after the hinted delay (the queue's delivery limit bounds this);
* anything else -> requeue; a message that keeps failing hits the delivery limit and is
  dead-lettered by the broker, and the dead-letter consumer sends the caller an ``internal`` error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import aio_pika
import aiormq
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustChannel, AbstractRobustConnection

from farebox import metrics
from farebox.constants import CONTENT_TYPE, H_CODE, H_DELIVERY_COUNT, H_REASON, H_STAGE
from farebox.errors import BlockedError, FareboxError, PermanentError, RetryableError
from farebox.settings import Settings
from schemas import Envelope, ErrorInfo
from workers.batching import Batcher, batch_count, split_batch
from workers.topology import declare_topology, queue_plan

log = logging.getLogger("farebox.runtime")

MAX_PUBLISH_BACKOFF_S = 1.0
DRAIN_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Publish:
    """One message a stage wants sent. ``caller_reply``: a result for a caller whose queue may be
    gone; unroutable is then logged and dropped rather than retried."""

    routing_key: str
    body: bytes
    exchange: str = ""
    headers: Mapping[str, Any] = field(default_factory=dict)
    correlation_id: str | None = None
    reply_to: str | None = None
    message_id: str | None = None
    caller_reply: bool = False
    content_type: str = CONTENT_TYPE
    mandatory: bool = True  # False: no queue bound is fine (alerts nobody listens to yet)


@dataclass(frozen=True)
class Handled:
    publishes: Sequence[Publish]
    # Runs after every publish is confirmed and before the ack (the account stage finishes a
    # ledger write here when Redis was away at first).
    after_publish: Callable[[], Awaitable[None]] | None = None


@dataclass(frozen=True)
class Delivery:
    """What a core may know about the incoming message: never the channel."""

    queue: str
    body: bytes
    redelivered: bool
    delivery_count: int
    headers: Mapping[str, Any]
    reply_to: str | None
    correlation_id: str | None
    message_id: str | None
    timestamp: float | None


class StageCore(Protocol):
    name: str

    def input_queues(self) -> Sequence[str]: ...

    def decode(self, delivery: Delivery) -> Any: ...

    async def handle(self, item: Any, delivery: Delivery) -> Handled: ...

    def fail(self, item: Any, err: FareboxError) -> Handled:
        """What a permanent/blocked error from ``handle`` turns into (normally an error result)."""
        ...


class EnvelopeStage:
    """Mixin for stages whose input is an Envelope: a permanent error becomes an error result,
    which the account stage records and sends to the caller."""

    account_queue: str

    def fail(self, item: Any, err: FareboxError) -> Handled:
        assert isinstance(item, Envelope)
        return Handled([envelope_publish(with_error(item, err), self.account_queue)])


def envelope_publish(env: Envelope, queue: str) -> Publish:
    """Hand an envelope to the next stage; reply_to/correlation_id ride along in the properties so
    that a dead-lettered internal message can still be answered."""
    return Publish(
        routing_key=queue,
        body=env.model_dump_json(exclude_defaults=True).encode(),
        reply_to=env.reply_to,
        correlation_id=env.correlation_id,
        message_id=env.job_id,
    )


def with_error(env: Envelope, err: FareboxError) -> Envelope:
    return env.model_copy(update={"error": ErrorInfo(code=err.code, message=str(err))})


def to_delivery(message: AbstractIncomingMessage, queue: str) -> Delivery:
    headers = dict(message.headers or {})
    count = headers.get(H_DELIVERY_COUNT, 0)
    ts = message.timestamp
    return Delivery(
        queue=queue,
        body=message.body,
        redelivered=bool(message.redelivered),
        delivery_count=int(count) if isinstance(count, int) else 0,
        headers=headers,
        reply_to=message.reply_to,
        correlation_id=message.correlation_id,
        message_id=message.message_id,
        timestamp=ts.timestamp() if ts is not None else None,
    )


def dead_letter_publish(settings: Settings, delivery: Delivery, stage: str, err: FareboxError) -> Publish:
    # The reason is our own error text, which never quotes the body (see farebox.errors).
    return Publish(
        exchange=settings.topology.dead_exchange,
        routing_key=delivery.queue,
        body=delivery.body,
        headers={H_REASON: str(err)[:500], H_STAGE: stage, H_CODE: err.code},
        reply_to=delivery.reply_to,
        correlation_id=delivery.correlation_id,
        message_id=delivery.message_id,
    )


class Worker:
    """Runs one stage core against the broker until ``stop`` is set, then drains."""

    def __init__(self, settings: Settings, core: StageCore, providers: Sequence[str]) -> None:
        self.settings = settings
        self.core = core
        self.providers = list(providers)
        self._inflight = 0  # messages (a batch is one)
        self._busy = 0  # jobs received and not yet handled; at 0 a part-full batch goes out
        # Jobs handled at once: what the prefetch allows for messages of one job each.
        self._slots = asyncio.Semaphore(getattr(core, "prefetch", settings.prefetch))
        self._batcher = (Batcher(self._publish, core.name, max_items=settings.batch_max,
                                 linger_s=settings.batch_linger_ms / 1000) if settings.batch_max > 1 else None)
        self._idle = asyncio.Event()
        self._idle.set()
        self._channel: AbstractRobustChannel | None = None
        self.ready = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        connection: AbstractRobustConnection = await aio_pika.connect_robust(
            self.settings.amqp_url,
            reconnect_interval=1.0,
            client_properties={"connection_name": f"farebox-{self.settings.namespace}-{self.core.name}"},
        )
        try:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            self._channel = channel
            await channel.set_qos(prefetch_count=getattr(self.core, "prefetch", self.settings.prefetch))
            await declare_topology(channel, self.settings, self.providers)
            consumers = []
            plan = queue_plan(self.settings, self.providers)
            for name in self.core.input_queues():
                # Declared (not just looked up) so the robust channel re-consumes it after a reconnect.
                queue = await channel.declare_queue(name, durable=True, arguments=plan[name])
                tag = await queue.consume(self._callback(name))
                consumers.append((queue, tag))
            log.info("stage %s consuming %s", self.core.name, ", ".join(self.core.input_queues()))
            self.ready.set()
            await stop.wait()
            log.info("stage %s draining %d in-flight message(s)", self.core.name, self._inflight)
            for queue, tag in consumers:
                with contextlib.suppress(Exception):
                    await queue.cancel(tag)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), DRAIN_TIMEOUT_S)
        finally:
            await connection.close()

    def _callback(self, queue: str) -> Callable[[AbstractIncomingMessage], Awaitable[None]]:
        async def on_message(message: AbstractIncomingMessage) -> None:
            self._inflight += 1
            self._busy += 1
            self._idle.clear()
            try:
                await self._process(message, queue)
            except Exception:  # the shell must never die on one message
                log.exception("stage %s: unexpected failure handling a message", self.core.name)
                await _settle(message, requeue=True)
            finally:
                self._inflight -= 1
                if self._inflight == 0:
                    self._idle.set()

        return on_message

    async def _process(self, message: AbstractIncomingMessage, queue: str) -> None:
        delivery = to_delivery(message, queue)
        count = batch_count(delivery)
        if count is None:
            ack = await self._job(delivery, batched=False)
            await _settle(message, ack=ack, requeue=not ack)
            return
        try:
            jobs = split_batch(delivery, count)
        except PermanentError as err:
            self._done_handling()
            await self._dead_letter(delivery, err)
            await _settle(message, ack=True)
            return
        self._busy += len(jobs) - 1  # on_message counted the message as one
        done = await asyncio.gather(*(self._job(job, batched=True) for job in jobs), return_exceptions=True)
        failed = [d for d in done if isinstance(d, BaseException)]
        if failed:
            # Every job was settled its own way except these; requeueing the batch repeats the
            # others downstream, which every stage tolerates (at-least-once, idempotent ledger).
            log.error("stage %s: %d job(s) of a batch of %d failed unexpectedly (%s); batch requeued",
                      self.core.name, len(failed), len(jobs), type(failed[0]).__name__)
        await _settle(message, ack=not failed, requeue=bool(failed))

    async def _job(self, delivery: Delivery, *, batched: bool) -> bool:
        """One job: True when its input may be acked, False to requeue it (a message of its own).
        A job of a batch that must be retried goes back to its queue alone, so the rest of the
        batch is not repeated; its retries are then bounded by the delivery limit as usual."""
        sending: tuple[list[Publish], list[asyncio.Future[None]]] = ([], [])
        try:
            async with self._slots:
                verdict = await self._decide(delivery)
            if isinstance(verdict, Handled):
                sending = self._enqueue(verdict)  # before the count drops, so a flush takes them
        finally:
            self._done_handling()
        if isinstance(verdict, Handled):
            direct, confirms = sending
            for p in direct:
                await self._publish(p)
            for confirmed in confirms:
                await confirmed
            if verdict.after_publish is not None:
                await verdict.after_publish()
            return True
        if isinstance(verdict, FareboxError):
            await self._dead_letter(delivery, verdict)
            return True
        await asyncio.sleep(verdict)
        if not batched:
            return False
        await self._publish(Publish(routing_key=delivery.queue, body=delivery.body))
        return True

    async def _decide(self, delivery: Delivery) -> Handled | PermanentError | float:
        """Decode and handle: what to publish, an undecodable body's error, or a retry delay."""
        stage = self.core.name
        try:
            env = self.core.decode(delivery)
        except PermanentError as err:
            return err
        try:
            handled = await self.core.handle(env, delivery)
            metrics.MESSAGES.labels(stage, "ok").inc()
            return handled
        except (PermanentError, BlockedError) as err:
            metrics.ERRORS.labels(stage, err.code).inc()
            metrics.MESSAGES.labels(stage, err.code).inc()
            return self.core.fail(env, err)
        except RetryableError as err:
            metrics.ERRORS.labels(stage, "retryable").inc()
            delay = min(err.retry_after_s or 1.0, 10.0)
            log.warning("stage %s: job %s will be retried in %.1fs: %s", stage, _job_id(env), delay, err)
            return delay
        except Exception:
            metrics.ERRORS.labels(stage, "internal").inc()
            log.exception("stage %s: job %s failed (delivery %d); requeued", stage, _job_id(env),
                          delivery.delivery_count + 1)
            return 0.5

    def _done_handling(self) -> None:
        self._busy -= 1
        if self._busy == 0 and self._batcher is not None:
            self._batcher.flush_idle()  # nothing else can join: do not make these wait

    def _enqueue(self, handled: Handled) -> tuple[list[Publish], list[asyncio.Future[None]]]:
        """Hand the batchable publishes to the batcher now; the rest are published one by one."""
        batcher, direct = self._batcher, []
        batched: list[asyncio.Future[None]] = []
        for p in handled.publishes:
            if batcher is not None and self._batches(p):
                batched.append(batcher.add(p))
            else:
                direct.append(p)
        return direct, batched

    def _batches(self, p: Publish) -> bool:
        return (not p.exchange and not p.headers and p.mandatory and not p.caller_reply
                and self.settings.topology.is_batched(p.routing_key))

    async def _dead_letter(self, delivery: Delivery, err: PermanentError) -> None:
        stage = self.core.name
        metrics.ERRORS.labels(stage, err.code).inc()
        metrics.MESSAGES.labels(stage, "dead_lettered").inc()
        log.warning("stage %s: dead-lettering an undecodable message: %s", stage, err)
        await self._publish(dead_letter_publish(self.settings, delivery, stage, err))

    async def _publish(self, p: Publish) -> None:
        """Publish with confirms; wait and retry while the target queue is full (reject-publish
        nack) or the connection is being restored, so nothing is acked before it is safe."""
        assert self._channel is not None
        message = aio_pika.Message(
            body=p.body,
            content_type=p.content_type,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            headers=dict(p.headers) or None,
            correlation_id=p.correlation_id,
            reply_to=p.reply_to,
            message_id=p.message_id,
            timestamp=time.time(),
        )
        delay = 0.02
        while True:
            try:
                channel = self._channel
                if p.exchange:
                    exchange = await channel.get_exchange(p.exchange, ensure=False)
                else:
                    exchange = channel.default_exchange
                await exchange.publish(message, p.routing_key, mandatory=p.mandatory, timeout=30)
                return
            except aiormq.exceptions.PublishError:
                if p.caller_reply:
                    metrics.MESSAGES.labels(self.core.name, "reply_unroutable").inc()
                    log.warning("stage %s: reply queue is gone; result dropped (it stays in the "
                                "result store for a retry with the same job_id)", self.core.name)
                    return
                raise
            except aiormq.exceptions.DeliveryError:
                pass  # nacked: the next queue is full; hold the input and wait (back-pressure)
            except (aiormq.exceptions.AMQPConnectionError, aiormq.exceptions.ChannelInvalidStateError,
                    ConnectionError, TimeoutError, RuntimeError) as err:
                log.warning("stage %s: publish failed (%s); retrying", self.core.name, type(err).__name__)
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_PUBLISH_BACKOFF_S)


def _job_id(item: Any) -> str:
    return str(getattr(item, "job_id", "?"))


async def _settle(message: AbstractIncomingMessage, *, ack: bool = False, requeue: bool = False) -> None:
    # After a connection loss the delivery tag belongs to a dead channel: the broker has already
    # requeued the message, so failing to settle it here is expected and harmless.
    try:
        if ack:
            await message.ack()
        else:
            await message.nack(requeue=requeue)
    except Exception as err:
        log.info("could not settle a message (%s); the broker redelivers it", type(err).__name__)
