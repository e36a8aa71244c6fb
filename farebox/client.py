"""The Python producer library.

    async with FareboxClient.from_settings(Settings()) as fb:
        result = await fb.complete({"prompt": "Say hi", "tenant": "acme"}, timeout=30)
        async for result in fb.stream(jobs, max_in_flight=256):
            ...

Every publish waits for the broker's confirm. When the intake is full (it rejects publishes
beyond its max length) the publish is retried with backoff: the producer is slowed down, and no
job is dropped. Results come back on an exclusive reply queue, matched by correlation id.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Mapping
from types import TracebackType
from typing import Any
from urllib.parse import unquote, urlsplit

import aiormq
from aio_pika.abc import (
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from pydantic import ValidationError

from farebox.amqp_connect import connect_robust_nodes, node_order, start_index
from farebox.constants import CONTENT_TYPE, DEFAULT_NAMESPACE, Topology
from farebox.errors import (
    DeadlineExceeded,
    DependencyUnavailable,
    InvalidRequest,
    broker_away,
    describe_validation_error,
)
from farebox.intake import PROBE_FAILED, IntakeLanes, queue_consumers, wait_for_intake
from farebox.patches import aiormq_writes
from farebox.publishing import Backoff, PublishWindow, publish_confirmed
from farebox.schemas import ErrorInfo, Feedback, FeedbackReceipt, Job, JobResult
from farebox.schemas.job import Priority
from farebox.settings import Settings, parse_amqp_urls

log = logging.getLogger("farebox.client")
# While the intake is full or the broker away, publishes are tried again this often.
PUBLISH_BACKOFF = Backoff(first_s=0.05, max_s=2.0)
# How long after connecting the intake may still have no consumer before on_no_pipeline is told.
NO_PIPELINE_GRACE_S = 1.0


JobLike = Job | Mapping[str, Any] | str


def as_job(job: JobLike) -> Job:
    """A Job from a Job, a dict in the wire format, or a bare prompt string."""
    if isinstance(job, Job):
        return job
    try:
        if isinstance(job, str):
            return Job(prompt=job)
        return Job.model_validate(dict(job))
    except ValidationError as err:
        raise InvalidRequest("invalid job: " + describe_validation_error(err)) from None


def client_timeout_result(job_id: str, waited_s: float) -> JobResult:
    return JobResult(
        job_id=job_id,
        status="error",
        error=ErrorInfo(
            code="timeout",
            message=f"no result within {waited_s:.0f}s (client-side wait); the job may still "
            "finish: resubmit with the same job_id to get its result without a second charge",
        ),
    )


class FareboxClient:
    """``coalesce_writes``: switch aiormq, for the whole process, to one socket write per
    event-loop turn (farebox/patches/aiormq_writes.py) before connecting. Off by default, since it
    changes every other aio-pika connection of the process too; farebox's CLI and stages turn it on.

    ``on_no_pipeline``: called once with a message for people when, a second after connecting,
    nothing consumes the intake (no pipeline is running); the client keeps waiting either way.

    ``amqp_url``: one node, or a cluster's nodes comma-separated (FAREBOX_AMQP_URL); ``spread``: start at one of
    them at random (False: the first listed), moving to the next when the one in use goes away. Replies that
    arrive while the client's connection moves are lost with its reply queue: a stream's idle timeout ends
    those jobs, and resubmitting them with their job_id gets their results without a second charge."""

    def __init__(
        self,
        amqp_url: str,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        wait_for_pipeline_s: float = 30.0,
        coalesce_writes: bool = False,
        on_no_pipeline: Callable[[str], None] | None = None,
        spread: bool = True,
    ) -> None:
        self.amqp_url = amqp_url
        # Sent as each message's user_id: RabbitMQ checks it is the connection's user, and a policy in auth mode
        # user_id maps it to the tenants it may act for (farebox/routing/auth.py). None without a user in the URL.
        # FAREBOX_AMQP_URL may list a cluster's nodes (farebox/amqp_connect.py): they all name the same user.
        self.nodes = parse_amqp_urls(amqp_url)
        self.user_id = unquote(urlsplit(self.nodes[0]).username or "") or None
        self.spread = spread
        self.topology = Topology(namespace)
        self.wait_for_pipeline_s = wait_for_pipeline_s
        self.coalesce_writes = coalesce_writes
        self.on_no_pipeline = on_no_pipeline
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractRobustChannel | None = None
        self._reply_queue: AbstractQueue | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._waiters: dict[str, asyncio.Future[JobResult]] = {}
        self._receipts: dict[str, asyncio.Future[FeedbackReceipt]] = {}
        self._stream_inbox: asyncio.Queue[JobResult] | None = None
        self._intake = IntakeLanes(self.topology)  # which intake a job goes to (farebox/intake.py)
        self.repeats_dropped = 0  # repeated results (same job_id) that stream() did not yield again

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs: Any) -> FareboxClient:
        kwargs.setdefault("spread", settings.amqp_spread)
        return cls(settings.amqp_url, namespace=settings.namespace, **kwargs)

    async def __aenter__(self) -> FareboxClient:
        await self.connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def connect(self) -> None:
        """Connect, then wait (up to ``wait_for_pipeline_s``) for the pipeline to declare the intake."""
        if self.coalesce_writes:
            aiormq_writes.install()
        try:
            nodes = node_order(self.nodes, start=start_index(len(self.nodes), spread=self.spread))
            self._connection = await connect_robust_nodes(nodes, name="farebox-client")
        except (aiormq.exceptions.AMQPConnectionError, ConnectionError, OSError) as err:
            raise DependencyUnavailable(
                f"cannot reach RabbitMQ at the configured FAREBOX_AMQP_URL ({type(err).__name__})"
            ) from None
        try:
            if self.on_no_pipeline is not None:
                self._watcher = asyncio.create_task(self._warn_if_no_pipeline(self.on_no_pipeline))
            channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
            self._channel = channel
            await wait_for_intake(self._connection, self.topology, self.wait_for_pipeline_s)
            await self._intake.check(self._connection)  # looked at again while publishing (IntakeLanes)
            self._reply_queue = await channel.declare_queue(exclusive=True, auto_delete=True)
            await self._reply_queue.consume(self._on_reply, no_ack=True)
        except BaseException as err:  # a failed or cancelled connect leaves nothing open behind it
            connection = self._connection
            await self.close()
            if isinstance(err, Exception) and broker_away(err, connection):
                raise DependencyUnavailable(f"RabbitMQ went away while connecting ({type(err).__name__})") from None
            raise

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        if self._connection is not None:
            await self._connection.close()
            self._connection = None

    async def intake_consumers(self) -> int:
        """How many consumers the intake queue has now. 0 (also when the queue does not exist)
        means no pipeline is taking jobs: what is published meanwhile waits in the queue."""
        assert self._connection is not None, "call connect() first"
        return await queue_consumers(self._connection, self.topology.intake) or 0

    async def _warn_if_no_pipeline(self, warn: Callable[[str], None]) -> None:
        # A pipeline starting beside the client gets a moment to attach before anyone is told.
        await asyncio.sleep(NO_PIPELINE_GRACE_S)
        try:
            consumers = await self.intake_consumers()
        except PROBE_FAILED as err:
            log.info("could not count the intake's consumers (%s)", type(err).__name__)
            return
        if consumers == 0:
            warn(
                f"nothing is consuming queue {self.topology.intake!r}: no farebox pipeline is running "
                f"for namespace {self.topology.namespace!r}. Start one with `farebox up`; "
                "waiting for it meanwhile"
            )

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        receipt_waiter = self._receipts.pop(message.correlation_id or "", None)
        if receipt_waiter is not None:
            try:
                receipt_waiter.set_result(FeedbackReceipt.model_validate_json(message.body))
            except ValidationError:
                log.warning("dropping a reply that is not a feedback receipt")
            return
        try:
            result = JobResult.model_validate_json(message.body)
        except ValidationError:
            log.warning("dropping a reply that is not a farebox result")
            return
        waiter = self._waiters.pop(message.correlation_id or "", None)
        if waiter is not None and not waiter.done():
            waiter.set_result(result)
        elif self._stream_inbox is not None:
            self._stream_inbox.put_nowait(result)

    async def publish(
        self, job: JobLike, *, correlation_id: str | None = None, priority: Priority | None = None
    ) -> Job:
        """Publish one job (confirmed; retried while the intake is full). Returns it with its job_id. ``priority``:
        its lane if it names none (None: the policy's); interactive jobs go through the interactive intake
        while something consumes it (see farebox/intake.py), else all go to the plain intake as before the lanes."""
        assert self._connection and self._channel and self._reply_queue is not None, "call connect() first"
        parsed = as_job(job)
        if parsed.job_id is None:
            parsed = parsed.model_copy(update={"job_id": str(uuid.uuid4())})
        parsed, routing_key = await self._intake.address(self._connection, parsed, priority)
        assert parsed.job_id is not None
        body = parsed.model_dump_json(exclude_none=True, exclude_defaults=True).encode()
        try:
            await publish_confirmed(
                self._channel,
                body,
                routing_key=routing_key,
                properties=functools.partial(
                    aiormq_writes.persistent_properties,
                    content_type=CONTENT_TYPE,
                    reply_to=self._reply_queue.name,
                    correlation_id=correlation_id or parsed.job_id,
                    message_id=parsed.job_id,
                    user_id=self.user_id,
                ),
                backoff=PUBLISH_BACKOFF,
                on_broker_down=_publish_interrupted,
            )
        except aiormq.exceptions.PublishError:
            raise DependencyUnavailable(f"queue {self.topology.intake!r} is gone: is the pipeline running?") from None
        return parsed

    async def feedback(
        self,
        job_id: str,
        score: float | str,
        *,
        tenant: str | None = None,
        source: str = "user",
        label: str | None = None,
        wait: bool = True,
        timeout: float = 30.0,
    ) -> FeedbackReceipt | None:
        """Publish feedback on a finished job to the feedback queue (confirmed). ``score`` is in [0, 1] or
        "good"/"bad". With ``wait`` (the default) return the stage's receipt: ``status`` "error" with a typed
        ``error`` when it was refused (malformed, unknown job, another tenant's job)."""
        assert self._channel is not None and self._reply_queue is not None, "call connect() first"
        try:
            named = {"tenant": tenant} if tenant is not None else {}  # none: the sender's only tenant, or "default"
            fb = Feedback.model_validate({"job_id": job_id, "score": score, "source": source, "label": label, **named})
        except ValidationError as err:
            raise InvalidRequest("invalid feedback: " + describe_validation_error(err)) from None
        correlation_id = str(uuid.uuid4())
        future: asyncio.Future[FeedbackReceipt] = asyncio.get_running_loop().create_future()
        if wait:
            self._receipts[correlation_id] = future
        try:
            await publish_confirmed(
                self._channel,
                fb.model_dump_json(exclude_none=True, exclude_unset=True).encode(),
                routing_key=self.topology.feedback,
                properties=functools.partial(
                    aiormq_writes.persistent_properties,
                    content_type=CONTENT_TYPE,
                    reply_to=self._reply_queue.name if wait else None,
                    correlation_id=correlation_id,
                    user_id=self.user_id,
                ),
                backoff=PUBLISH_BACKOFF,
                on_broker_down=_publish_interrupted,
            )
            return await asyncio.wait_for(future, timeout) if wait else None
        except aiormq.exceptions.PublishError:
            raise DependencyUnavailable(f"queue {self.topology.feedback!r} is gone: is the pipeline running?") from None
        except TimeoutError:
            raise DeadlineExceeded(f"no feedback receipt within {timeout:.0f}s") from None
        finally:
            self._receipts.pop(correlation_id, None)

    async def complete(
        self, job: JobLike, *, timeout: float = 120.0, priority: Priority | None = "interactive"
    ) -> JobResult:
        """Publish one job and wait for its result (DeadlineExceeded after ``timeout`` seconds); interactive
        unless the job or ``priority`` says otherwise (see ``publish``)."""
        correlation_id = str(uuid.uuid4())
        future: asyncio.Future[JobResult] = asyncio.get_running_loop().create_future()
        self._waiters[correlation_id] = future
        try:
            await self.publish(job, correlation_id=correlation_id, priority=priority)
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise DeadlineExceeded(f"no result within {timeout:.0f}s") from None
        finally:
            self._waiters.pop(correlation_id, None)

    async def stream(
        self,
        jobs: Iterable[JobLike] | AsyncIterable[JobLike],
        *,
        max_in_flight: int = 256,
        idle_timeout_s: float = 300.0,
        priority: Priority | None = "background",
    ) -> AsyncIterator[JobResult]:
        """Publish jobs with at most ``max_in_flight`` unanswered, yielding results as they arrive
        (in completion order). A repeated result for a job already answered is dropped. Background work
        unless a job or ``priority`` says otherwise (see ``publish``)."""
        inbox: asyncio.Queue[JobResult] = asyncio.Queue()
        self._stream_inbox = inbox
        outstanding: set[str] = set()
        slots = asyncio.Semaphore(max_in_flight)
        done_publishing = asyncio.Event()

        window = PublishWindow()

        async def feed() -> None:
            try:
                async for job in _aiter(jobs):
                    await slots.acquire()
                    parsed = as_job(job)
                    if parsed.job_id is None:
                        parsed = parsed.model_copy(update={"job_id": str(uuid.uuid4())})
                    assert parsed.job_id is not None
                    outstanding.add(parsed.job_id)
                    await window.start(functools.partial(self.publish, parsed, priority=priority))
                await window.drain()
            finally:
                window.cancel()
                done_publishing.set()

        feeder = asyncio.create_task(feed())
        last_result = time.monotonic()
        try:
            while not (done_publishing.is_set() and not outstanding):
                if window.failure is not None:  # checked at least once a second, whatever the feeder waits for
                    raise window.failure
                if feeder.done() and feeder.exception() is not None:
                    raise feeder.exception()  # type: ignore[misc]
                try:
                    # wait_for wraps the get in a task of its own: only when there is nothing to take.
                    result = inbox.get_nowait() if not inbox.empty() else await asyncio.wait_for(inbox.get(), 1.0)
                except TimeoutError:
                    if outstanding and time.monotonic() - last_result > idle_timeout_s:
                        expired = sorted(outstanding)
                        outstanding.clear()
                        for job_id in expired:
                            slots.release()
                            yield client_timeout_result(job_id, idle_timeout_s)
                        last_result = time.monotonic()
                    continue
                last_result = time.monotonic()
                if result.job_id not in outstanding:
                    self.repeats_dropped += 1
                    continue
                outstanding.discard(result.job_id)
                slots.release()
                yield result
        finally:
            feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await feeder
            self._stream_inbox = None


def _publish_interrupted(err: Exception) -> None:
    log.warning("publish interrupted; retrying once the connection is back")


async def _aiter(jobs: Iterable[JobLike] | AsyncIterable[JobLike]) -> AsyncIterator[JobLike]:
    if isinstance(jobs, AsyncIterable):
        async for job in jobs:
            yield job
    else:
        for i, job in enumerate(jobs, 1):
            yield job
            if i % 64 == 0:  # a long list must not hold the loop while nothing else blocks the feeder
                await asyncio.sleep(0)
