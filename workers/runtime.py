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

A message between stages may hold a batch of jobs (farebox/stages/batching.py). Its jobs are handled
concurrently and each is settled on its own: a job to retry is retried here, up to the delivery
limit, then dead-lettered alone, and the batch is acked once every job is settled. Only a crash
(or a lost connection) brings the whole batch back, marked redelivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal

import aiormq
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from farebox import health, metrics
from farebox.amqp_connect import connect_robust_nodes, pipeline_nodes
from farebox.errors import (
    BlockedError,
    DeliveryLimitReached,
    FareboxError,
    PermanentError,
    RetryableError,
    job_failure,
)
from farebox.patches import aiormq_writes
from farebox.publishing import Backoff, publish_confirmed
from farebox.routing.priority import LANES
from farebox.settings import Settings
from farebox.stages.batching import Batcher, batch_count, split_batch
from farebox.stages.consuming import Consumption
from farebox.stages.inflight import Unhandled
from farebox.stages.messages import dead_letter_publish, in_lane, settle, slot_lane, to_delivery
from farebox.stages.slots import LaneSlots
from farebox.stages.stage import Delivery, Handled, Publish, StageCore

log = logging.getLogger("farebox.runtime")

PUBLISH_BACKOFF = Backoff(first_s=0.02, max_s=1.0)
PREFERRED = 10  # consumer priority (x-priority) of a worker that serves the interactive lane alone
DRAIN_TIMEOUT_S = 30.0


class Worker:
    """Runs one stage core against the broker until ``stop`` is set, then drains."""

    def __init__(
        self, settings: Settings, core: StageCore, providers: Sequence[str], *, lanes: tuple[str, ...] = LANES
    ) -> None:
        self.settings = settings
        self._topology = settings.topology  # built once: _batches asks it for every publish
        self.core = core
        self.queues = [q for q in core.input_queues() if self._topology.lane_of(q) in lanes]
        # A worker of the interactive lane alone (`farebox worker all --lane interactive`) is the broker's first
        # choice for those queues: its event loop is not busy with a backfill, as the stage workers' may be.
        self._consumer_args: dict[str, Any] | None = {"x-priority": PREFERRED} if lanes == ("interactive",) else None
        self._inflight = 0  # messages (a batch is one)
        # Jobs received and not yet handled, by lane; at 0 a part-full batch of that lane goes out.
        self._busy: dict[str, int] = dict.fromkeys(LANES, 0)
        self._prefetch: int = getattr(core, "prefetch", settings.prefetch)  # a core may need more (execute)
        # Jobs handled at once: what the prefetch allows for messages of one job each (a core may want more:
        # execute's jobs wait for a provider call), interactive ones first and with a reserve of their own.
        self._slots = LaneSlots(
            getattr(core, "slots", self._prefetch),
            settings.interactive_reserve,
            background_every=settings.background_every,
        )
        self._batcher = (
            Batcher(self._publish, core.name, max_items=settings.batch_max, linger_s=settings.batch_linger_ms / 1000)
            if settings.batch_max > 1
            else None
        )
        self._idle = asyncio.Event()
        self._idle.set()
        self.consumption = Consumption(
            settings, core.name, providers, self.queues, prefetch=self._prefetch, consumer_args=self._consumer_args
        )
        self.ready = asyncio.Event()
        self.readiness = health.StageReadiness(core.name)  # what /readyz says of this worker

    async def run(self, stop: asyncio.Event) -> None:
        aiormq_writes.install()
        connection: AbstractRobustConnection = await connect_robust_nodes(
            pipeline_nodes(self.settings),  # a cluster's nodes, from one of its own; failing over (amqp_connect.py)
            reconnect_interval=1.0,
            name=f"farebox-{self.settings.namespace}-{self.core.name}",
        )
        beside: asyncio.Task[None] | None = None
        try:
            if await self.consumption.start_unless_stopped(connection, self._callback, stop):
                log.info("stage %s consuming %s", self.core.name, ", ".join(self.queues))
                self.ready.set()
                self.readiness.consuming(connection)
                run_beside = getattr(self.core, "beside", None)  # a core's own loop (the batch lane's)
                if run_beside is not None:
                    beside = asyncio.create_task(run_beside(stop, self.publish))
                await stop.wait()
            # Stopped before the start finished, some of its queues may be consuming already: drained the same way.
            self.readiness.draining()
            log.info("stage %s draining %d in-flight message(s)", self.core.name, self._inflight)
            await self.consumption.cancel()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), DRAIN_TIMEOUT_S)
            await self.consumption.acks_reached_the_broker()
            if beside is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(beside), DRAIN_TIMEOUT_S)
        finally:
            if beside is not None:
                beside.cancel()
                await asyncio.gather(beside, return_exceptions=True)
            await connection.close()

    def _callback(self, queue: str) -> Callable[[AbstractIncomingMessage], Awaitable[None]]:
        async def on_message(message: AbstractIncomingMessage) -> None:
            self._inflight += 1
            self._idle.clear()
            owed = Unhandled(self._busy, self._done_handling, self._topology.lane_of(queue))
            try:
                await self._process(message, queue, owed)
            except BaseException as err:  # the shell must never die on one message
                if not job_failure(err):
                    raise
                log.exception("stage %s: unexpected failure handling a message", self.core.name)
                await settle(message, requeue=True)
            finally:
                owed.release_all()
                self._inflight -= 1
                if self._inflight == 0:
                    self._idle.set()

        return on_message

    async def _process(self, message: AbstractIncomingMessage, queue: str, owed: Unhandled) -> None:
        delivery = to_delivery(message, queue)
        count = batch_count(delivery)
        if count is None:
            verdict = await self._attempt(delivery, owed.release)
            if verdict is not True:
                await asyncio.sleep(verdict)
            await settle(message, ack=verdict is True, requeue=verdict is not True)
            return
        try:
            jobs = split_batch(delivery, count)
        except PermanentError as err:
            owed.release()
            await self._dead_letter(delivery, err)
            await settle(message, ack=True)
            return
        owed.add(len(jobs) - 1)
        done = await asyncio.gather(*(self._job_of_batch(job, owed.release) for job in jobs), return_exceptions=True)
        failed = [d for d in done if isinstance(d, BaseException)]
        if failed:  # only when even dead-lettering a job failed: every job has finished either way
            log.error(
                "stage %s: %d job(s) of a batch of %d could not be settled (%s); batch requeued",
                self.core.name,
                len(failed),
                len(jobs),
                type(failed[0]).__name__,
            )
        await settle(message, ack=not failed, requeue=bool(failed))

    async def _job_of_batch(self, delivery: Delivery, release: Callable[[], None]) -> None:
        """A job of a batch is settled on its own, so the rest of the batch is never repeated for
        it: retried here (not republished: its queue may be full, and waiting for room while
        holding the batch could stall the stage), up to the delivery limit, then dead-lettered."""
        attempt = delivery.delivery_count + 1
        while True:
            try:
                verdict = await self._attempt(delivery, release)
            except BaseException as err:  # publishing failed in a way _publish does not wait out, a decode panicked
                if not job_failure(err):
                    raise
                log.exception("stage %s: job of a batch failed (attempt %d)", self.core.name, attempt)
                verdict = 0.5
            if verdict is True:
                return
            release = _nothing  # counted once, on the first attempt
            if attempt >= self.settings.delivery_limit:
                await self._dead_letter(
                    delivery,
                    DeliveryLimitReached(
                        f"the job failed {attempt} times in {delivery.queue} and hit the delivery limit; "
                        "it is kept in the dead-letter queue for inspection"
                    ),
                )
                return
            attempt += 1
            # Tried again as the broker would redeliver it: a stage that reads ``redelivered`` (execute, for the answer
            # it kept) must know that an earlier attempt may have done part of the work.
            delivery = dataclasses.replace(delivery, redelivered=True, delivery_count=attempt - 1)
            await asyncio.sleep(verdict)

    async def _attempt(self, delivery: Delivery, release: Callable[[], None]) -> Literal[True] | float:
        """Decode, handle and publish one job: True once it is settled (published, or dead-lettered
        as undecodable), else the delay before trying again. ``release`` runs once the job's
        publishes are queued, so an idle flush of the batcher takes them."""
        sending: tuple[list[Publish], list[asyncio.Future[None]]] = ([], [])
        release = _once(release)
        settle_after: asyncio.Future[None] | None = None
        try:
            try:
                # A job waits for its slot undecoded: a batch's jobs decoded at once would hold up the event loop,
                # and the interactive job behind them.
                async with self._slots.slot(slot_lane(self._topology, delivery)):
                    item, verdict = await self._decide(delivery)
                held = isinstance(verdict, Handled) and verdict.resume is not None
                if held:
                    release()  # a job that waits is not busy: part-full batches go out without it
                while isinstance(verdict, Handled) and verdict.resume is not None:  # outside the slots
                    verdict = await self._handled(item, delivery, verdict.resume)
                if isinstance(verdict, Handled):
                    settle_after = verdict.settle_after
                    sending = self._enqueue(verdict, batching=not held)
            finally:
                release()
            if isinstance(verdict, FareboxError):
                await self._dead_letter(delivery, verdict)
                return True
            if not isinstance(verdict, Handled):
                return verdict
            direct, confirms = sending
            for p in direct:
                await self._publish(p)
            for confirmed in confirms:
                await confirmed
        finally:
            if settle_after is not None:
                # Acked or requeued (a publish failed), the message is settled after it: a redelivery finds what it
                # wrote. Shielded, so a stop that cancels this attempt does not cancel the write with it.
                await asyncio.shield(settle_after)
        if verdict.after_publish is not None:
            await verdict.after_publish()
        return True

    async def _decide(self, delivery: Delivery) -> tuple[Any, Handled | PermanentError | float]:
        """Decode and handle: the decoded item, and what to publish, an undecodable body's error, or a retry delay."""
        try:
            item = self.core.decode(delivery)
        except PermanentError as err:
            return None, err
        return item, await self._handled(item, delivery, functools.partial(self.core.handle, item, delivery))

    async def _handled(
        self, env: Any, delivery: Delivery, handle: Callable[[], Awaitable[Handled]]
    ) -> Handled | PermanentError | float:
        """What ``handle`` gives, or what its error means: an error result (permanent, blocked) or a retry delay."""
        stage = self.core.name
        try:
            handled = await handle()
            if handled.resume is None:
                metrics.child(metrics.MESSAGES, stage, "ok").inc()
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
        except BaseException as err:
            if not job_failure(err):
                raise  # a cancel or an exit: the process's, not this job's
            metrics.ERRORS.labels(stage, "internal").inc()
            log.exception(
                "stage %s: job %s failed (delivery %d); it will be retried",
                stage,
                _job_id(env),
                delivery.delivery_count + 1,
            )
            return 0.5

    def _done_handling(self, lane: str) -> None:
        self._busy[lane] -= 1
        if self._busy[lane] == 0 and self._batcher is not None:
            # Nothing else of this lane can join: do not make these wait (an interactive job does not wait for
            # a backfill to pause). A job of the plain intake may go on in either lane: only the whole worker
            # idle sends what such jobs left in the other lane's batches, as before the lanes.
            idle = not any(self._busy.values())
            self._batcher.flush_idle(lambda queue: idle or self._topology.lane_of(queue) == lane)

    def _enqueue(self, handled: Handled, *, batching: bool = True) -> tuple[list[Publish], list[asyncio.Future[None]]]:
        """Hand the batchable publishes to the batcher now; the rest are published one by one (all of them when
        not ``batching``: a job that waited, whose batch nothing else may fill now)."""
        batcher, direct = self._batcher if batching else None, []
        batched: list[asyncio.Future[None]] = []
        for p in handled.publishes:
            if p.lane != "background":  # each hop publishes a job to its lane's queue
                p = in_lane(self._topology, p)
            if batcher is not None and self._batches(p):
                batched.append(batcher.add(p))
            else:
                direct.append(p)
        return direct, batched

    def _batches(self, p: Publish) -> bool:
        return (
            not p.exchange
            and not p.headers
            and p.mandatory
            and not p.caller_reply
            and self._topology.is_batched(p.routing_key)
        )

    async def _dead_letter(self, delivery: Delivery, err: PermanentError) -> None:
        stage = self.core.name
        metrics.ERRORS.labels(stage, err.code).inc()
        metrics.MESSAGES.labels(stage, "dead_lettered").inc()
        log.warning("stage %s: dead-lettering a job: %s", stage, err)
        await self._publish(dead_letter_publish(self.settings, delivery, stage, err))

    async def publish(self, p: Publish) -> None:
        """Publish one message with confirms, to its lane's queue: for a core's own loop (``beside``)."""
        await self._publish(in_lane(self._topology, p) if p.lane != "background" else p)

    async def _publish(self, p: Publish) -> None:
        """Publish with confirms; wait and retry while the target queue is full (reject-publish
        nack) or the connection is being restored, so nothing is acked before it is safe."""
        channel = self.consumption.channel
        assert channel is not None
        try:
            await publish_confirmed(
                channel,
                p.body,
                exchange=p.exchange,
                routing_key=p.routing_key,
                properties=functools.partial(
                    aiormq_writes.persistent_properties,
                    content_type=p.content_type,
                    headers=p.headers,
                    correlation_id=p.correlation_id,
                    reply_to=p.reply_to,
                    message_id=p.message_id,
                    # Every message the pipeline sends says it is the pipeline's (RabbitMQ checks it), so stages
                    # in auth mode user_id can refuse what a producer publishes past the intake.
                    user_id=p.user_id or self.settings.amqp_user_id,
                ),
                mandatory=p.mandatory,
                backoff=PUBLISH_BACKOFF,
                on_broker_down=self._publish_interrupted,
            )
        except aiormq.exceptions.PublishError:
            if not p.caller_reply:
                raise
            metrics.MESSAGES.labels(self.core.name, "reply_unroutable").inc()
            log.warning(
                "stage %s: reply queue is gone; result dropped (it stays in the "
                "result store for a retry with the same job_id)",
                self.core.name,
            )

    def _publish_interrupted(self, err: Exception) -> None:
        log.warning("stage %s: publish failed (%s); retrying", self.core.name, type(err).__name__)


def _nothing() -> None:
    pass


def _once(call: Callable[[], None]) -> Callable[[], None]:
    done = False

    def once() -> None:
        nonlocal done
        if not done:
            done = True
            call()

    return once


def _job_id(item: Any) -> str:
    return str(getattr(item, "job_id", "?"))
