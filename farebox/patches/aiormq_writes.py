"""One socket write for every AMQP frame queued in one event-loop turn.

aiormq's connection writer takes one queued ``ChannelFrame`` (a publish, an ack, ...) at a time and
writes each to the socket with its own ``send`` system call. A stage that settles a batch queues
dozens of them in one turn: acks, a reply per job, batch publishes. On loopback every ``send`` also
runs the broker's side of TCP, and the profile showed ``StreamWriter.write`` as the largest single
cost in the dedup, route and account stages (13-18% of their CPU; strace: the account stage made
one AMQP write per job). This module makes the writer take everything already queued when it
wakes and write it as one buffer; order on the wire and every frame's drain future are kept, and
nothing waits for more frames to arrive, so latency is what it was. The runtime publishes without
waiting for the socket buffer (``wait=False``, see farebox/stages/runtime.py), else aiormq holds the
channel lock across that wait and a channel's publishes could never share a write.

It swaps the ``FrameGenerator`` that aiormq's writer task looks up by name when it starts and
deepens its write queue (aiormq 7.x, pinned in pyproject.toml); ``install`` refuses, with a warning,
when aiormq's ``FrameGenerator`` is not the class it found at import or has no ``__anext__``.
It is process-wide: every aiormq connection opened afterwards writes this way (the stages, the
client, and any other aio-pika connection of the same process; their semantics do not change).
Connections opened before ``install`` keep aiormq's own writer. farebox's stages install it;
``FareboxClient`` only when the application asks (``coalesce_writes=True``), so a host
application's own aio-pika connections keep aiormq's writer unless it opts in.

What it relies on in aiormq (pinned ``aiormq>=7.2,<7.3`` in pyproject.toml), and the tests of
tests/test_aiormq_writes.py that fail when that changes:

| relied on                               | how                        | pinned by                                |
|-----------------------------------------|----------------------------|------------------------------------------|
| ``aiormq.connection.FrameGenerator``    | swapped for a subclass     | test_install_is_idempotent_and_*,        |
| (internal, looked up by name)           | that joins what is queued  | test_publishes_of_one_turn_share_writes* |
| ``Connection.FRAME_BUFFER_SIZE``        | raised from 10 frames      | test_install_is_idempotent_and_*         |
| ``ChannelFrame`` (payload, should_close,| one frame made of several  | test_coalesce_keeps_order_and_drains*,   |
| drain)                                  |                            | test_nothing_is_joined_after_a_close_*   |
| ``basic_publish`` / ``basic_ack`` with  | no wait for the socket     | test_the_stages_and_the_client_publish*, |
| ``wait=False``                          | buffer to drain            | test_a_graceful_stop_leaves_no_handled*  |
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import aio_pika.abc
import aiormq.connection
from aiormq.abc import ChannelFrame

log = logging.getLogger("farebox.patches.aiormq_writes")

# A write stops taking more frames once it holds this much (the frame that crosses it included):
# enough for a few hundred small frames, without copying one large body after another.
MAX_COALESCED_BYTES = 256 * 1024
# aiormq's connection queue holds 10 frames. Publishes on a channel take its lock while they
# enqueue, so the 11th publish of a turn holds the lock waiting for room and every later one
# waits for the lock: from there on one publish, and one write, per turn. Prefetch and the
# confirm window bound how many frames a stage queues; this only has to be above that.
WRITE_QUEUE_FRAMES = 4096

_Original = aiormq.connection.FrameGenerator


@dataclasses.dataclass(frozen=True)
class CoalescedFrame(ChannelFrame):
    """Several frames as one write; drained (every part's waiter told) when the socket has it."""

    parts: tuple[ChannelFrame, ...] = ()

    @property
    def should_drain(self) -> bool:
        return any(part.should_drain for part in self.parts)

    def drain(self) -> None:
        for part in self.parts:
            part.drain()


def coalesce(first: ChannelFrame, queued: list[ChannelFrame]) -> ChannelFrame:
    """``first`` followed by ``queued`` as one frame (``first`` itself when nothing is queued)."""
    if not queued:
        return first
    parts = (first, *queued)
    return CoalescedFrame(
        payload=b"".join(part.payload for part in parts), should_close=parts[-1].should_close, parts=parts
    )


class CoalescingFrameGenerator(_Original):
    async def __anext__(self) -> ChannelFrame:
        frame: ChannelFrame = await super().__anext__()
        queued: list[ChannelFrame] = []
        size = len(frame.payload)
        closing = frame.should_close
        # A close frame ends the connection: nothing after it may be joined to it.
        while not closing and size < MAX_COALESCED_BYTES and not self.queue.empty():
            more: ChannelFrame = self.queue.get_nowait()
            self.queue.task_done()
            queued.append(more)
            size += len(more.payload)
            closing = more.should_close
        return coalesce(frame, queued)


def install() -> bool:
    """Make every aiormq connection started from now on coalesce its writes; True when in effect."""
    current = aiormq.connection.FrameGenerator
    if current is CoalescingFrameGenerator:
        return True
    if current is not _Original or not hasattr(_Original, "__anext__"):
        log.warning("aiormq's FrameGenerator is not the one farebox knows; AMQP writes are not coalesced")
        return False
    aiormq.connection.FrameGenerator = CoalescingFrameGenerator  # type: ignore[misc]  # swapping the class is the point
    aiormq.connection.Connection.FRAME_BUFFER_SIZE = WRITE_QUEUE_FRAMES
    return True


def persistent_properties(
    *,
    content_type: str,
    headers: Mapping[str, Any] | None = None,
    correlation_id: str | None = None,
    reply_to: str | None = None,
    message_id: str | None = None,
    user_id: str | None = None,
) -> aiormq.spec.Basic.Properties:
    """What aio-pika's ``Message(..., delivery_mode=PERSISTENT, timestamp=now).properties`` gives,
    without building the Message (it checks a lock on every attribute it sets)."""
    return aiormq.spec.Basic.Properties(
        content_type=content_type,
        delivery_mode=2,
        priority=0,
        headers=dict(headers) if headers else {},
        correlation_id=correlation_id,
        reply_to=reply_to,
        message_id=message_id,
        user_id=user_id,
        timestamp=datetime.now(tz=UTC),
    )


async def ack(message: aio_pika.abc.AbstractIncomingMessage) -> None:
    """aio-pika's ``message.ack()`` without its wait for the socket buffer: the acks of a turn share
    one write and no handler wakes again per ack. Whoever closes the connection must first make
    sure the acks went out (a round trip on the channel): closing drops what the writer holds."""
    if message.delivery_tag is not None:
        await message.channel.basic_ack(message.delivery_tag, wait=False)


async def publish(
    channel: aio_pika.abc.AbstractChannel,
    body: bytes,
    *,
    routing_key: str,
    exchange: str = "",
    properties: aiormq.spec.Basic.Properties | None = None,
    mandatory: bool = True,
    timeout: float | None = None,
) -> None:
    """Publish and wait for the broker's confirm, not for the socket buffer to drain. The channel
    must have publisher confirms on: without them this returns before the frame is even written.

    aio-pika's ``Exchange.publish`` waits for the drain inside aiormq's channel lock, which holds
    the lock across a turn of the loop: a channel's publishes then go out one per turn, one write
    each, whatever the writer does. The confirm still bounds what is in flight. Errors are
    aio-pika's: ``DeliveryError`` on a nack, ``PublishError`` on a return (channels opened with
    ``on_return_raises``), ``ChannelInvalidStateError`` while the channel is being restored."""
    if channel.is_closed:
        raise aiormq.exceptions.ChannelInvalidStateError("the channel is closed")
    underlay = await channel.get_underlay_channel()
    assert isinstance(underlay, aiormq.Channel)
    await underlay.basic_publish(
        body,
        exchange=exchange,
        routing_key=routing_key,
        properties=properties,
        mandatory=mandatory,
        timeout=timeout,
        wait=False,
    )
