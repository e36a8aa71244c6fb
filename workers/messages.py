"""An AMQP message as a stage core sees it (``Delivery``), what dead-letters it, and settling it."""

from __future__ import annotations

import logging
from dataclasses import replace

from aio_pika.abc import AbstractIncomingMessage

from farebox.constants import H_CODE, H_DELIVERY_COUNT, H_LANE, H_REASON, H_STAGE, H_USER, Topology
from farebox.errors import FareboxError
from farebox.patches import aiormq_writes
from farebox.settings import Settings
from farebox.stages.stage import Delivery, Publish

log = logging.getLogger("farebox.runtime")

# Also set on the dead letters farebox publishes itself: a republish loses the queue the message was
# refused from (its routing key) and its sender's timestamp, which the record in <ns>.dead gives.
H_SOURCE_QUEUE = "x-farebox-queue"
H_SENT_AT = "x-farebox-sent-at"  # the original message's AMQP timestamp, seconds since the epoch


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
        user_id=message.user_id,
    )


def dead_letter_publish(settings: Settings, delivery: Delivery, stage: str, err: FareboxError) -> Publish:
    # The reason is our own error text, which never quotes the body (see farebox.errors).
    headers: dict[str, object] = {
        H_REASON: str(err)[:500],
        H_STAGE: stage,
        H_CODE: err.code,
        H_SOURCE_QUEUE: delivery.queue,
    }
    if delivery.user_id:
        # This publish is the pipeline's, so its user_id property cannot be the sender's: the dead-letter
        # stage reads who sent a producer's body from here (RabbitMQ checked it on the original publish).
        headers[H_USER] = delivery.user_id
    if delivery.timestamp is not None:
        headers[H_SENT_AT] = delivery.timestamp
    return Publish(
        exchange=settings.topology.dead_exchange,
        routing_key=delivery.queue,
        body=delivery.body,
        headers=headers,
        reply_to=delivery.reply_to,
        correlation_id=delivery.correlation_id,
        message_id=delivery.message_id,
        # RabbitMQ checks it: the dead-letter stage trusts H_USER only on a message the pipeline's user sent.
        user_id=settings.amqp_user_id,
    )


async def settle(message: AbstractIncomingMessage, *, ack: bool = False, requeue: bool = False) -> None:
    # After a connection loss the delivery tag belongs to a dead channel: the broker has already
    # requeued the message, so failing to settle it here is expected and harmless.
    try:
        if ack:
            await aiormq_writes.ack(message)
        else:
            await message.nack(requeue=requeue)
    except Exception as err:
        log.info("could not settle a message (%s); the broker redelivers it", type(err).__name__)


def in_lane(topology: Topology, p: Publish) -> Publish:
    """``p`` sent to its lane's twin of its queue; to a queue without a twin (a coalesced waiter's ``wait``)
    with the lane in a header instead, so that it comes back through ``recheck`` to its lane's slots."""
    twin = topology.lane(p.routing_key, p.lane)
    if twin == p.routing_key:
        return replace(p, headers={**p.headers, H_LANE: p.lane})
    return replace(p, routing_key=twin)


def slot_lane(topology: Topology, delivery: Delivery) -> str:
    """The lane whose slots a message waits for: its queue's, or on a queue without a twin the header's."""
    if topology.has_lanes(delivery.queue) or topology.lane_of(delivery.queue) == "interactive":
        return topology.lane_of(delivery.queue)
    return "interactive" if delivery.headers.get(H_LANE) == "interactive" else "background"
