"""What a stage core sees: the incoming ``Delivery``, and the ``Publish``es it asks for (``Handled``).

Cores never touch channels or acks; the shell in farebox/stages/runtime.py does that for them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from farebox.constants import CONTENT_TYPE
from farebox.errors import FareboxError
from farebox.schemas import Envelope, ErrorInfo


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
    user_id: str | None = None  # the pipeline's own AMQP user, on messages the pipeline sends itself (shadow grades)
    # The job's lane: the runtime sends it to ``routing_key``'s twin for that lane, if it has one (Topology.lane).
    lane: str = "background"


@dataclass(frozen=True)
class Handled:
    publishes: Sequence[Publish]
    # Runs after every publish is confirmed and before the ack (the account stage finishes a
    # ledger write here when Redis was away at first).
    after_publish: Callable[[], Awaitable[None]] | None = None
    # Work begun beside the publishes, already running (the execute stage keeps the provider's answer): the message
    # is acked, or requeued when a publish failed, only once it has finished, so a redelivery finds what it wrote.
    # Never raises. Only a final verdict's counts: a held one's (``resume``) is not awaited.
    settle_after: asyncio.Future[None] | None = None
    # Not an answer yet: the job waits (a coalesced waiter held by the dedup stage), outside the stage's slots,
    # and this gives what it becomes; the input stays unacked meanwhile. Its publishes are sent at once.
    resume: Callable[[], Awaitable[Handled]] | None = None


@dataclass(frozen=True)
class Delivery:
    """What a core may know about the incoming message: never the channel."""

    queue: str
    body: bytes
    redelivered: bool = False
    delivery_count: int = 0
    headers: Mapping[str, Any] = field(default_factory=dict)
    reply_to: str | None = None
    correlation_id: str | None = None
    message_id: str | None = None
    timestamp: float | None = None
    user_id: str | None = None  # the sender's RabbitMQ user, which the broker checked


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
        lane=env.lane,
    )


def with_error(env: Envelope, err: FareboxError) -> Envelope:
    return env.model_copy(update={"error": ErrorInfo(code=err.code, message=str(err))})
