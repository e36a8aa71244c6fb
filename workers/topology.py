"""Declares every exchange and queue farebox uses. Idempotent: every worker runs it at start.

Stage queues are durable quorum queues with:
* a delivery limit, so a message that keeps killing its consumer is dead-lettered instead of
  looping forever (RabbitMQ 3.10 sets none by default);
* ``reject-publish`` overflow with a max length, so a full stage pushes back on whoever publishes
  into it (publisher confirms turn into nacks) instead of buffering without bound;
* at-least-once dead-lettering into the fanout DLX, which feeds ``<ns>.dead`` (kept for people)
  and ``<ns>.dead.notify`` (consumed so the caller still gets a typed error result).

Coalesced waiters park in ``<ns>.wait``, a classic queue whose message TTL dead-letters them back
into ``<ns>.recheck``; a broker-side timer, so a waiting job survives any worker dying.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel

from farebox.constants import Topology
from farebox.settings import Settings


def stage_queue_arguments(settings: Settings, *, max_length: int | None) -> dict[str, Any]:
    args: dict[str, Any] = {
        "x-queue-type": "quorum",
        "x-delivery-limit": settings.delivery_limit,
        "x-dead-letter-exchange": settings.topology.dead_exchange,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }
    if max_length is not None:
        args["x-max-length"] = max_length
    return args


def queue_plan(settings: Settings, providers: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Every queue name with its arguments. Pure, so tests and docker checks can read it."""
    topo: Topology = settings.topology
    plan: dict[str, dict[str, Any]] = {
        topo.intake: stage_queue_arguments(settings, max_length=settings.intake_max_length),
        topo.route: stage_queue_arguments(settings, max_length=settings.stage_max_length),
        topo.account: stage_queue_arguments(settings, max_length=settings.stage_max_length),
        topo.feedback: stage_queue_arguments(settings, max_length=settings.stage_max_length),
        # Dead-letter targets must never refuse a message, so they have no max length.
        topo.recheck: stage_queue_arguments(settings, max_length=None),
        topo.dead: {"x-queue-type": "quorum"},
        topo.dead_notify: {"x-queue-type": "quorum", "x-delivery-limit": settings.delivery_limit},
        topo.wait: {
            "x-queue-type": "classic",
            "x-message-ttl": settings.coalesce_poll_ms,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": topo.recheck,
        },
    }
    for provider in sorted(set(providers)):
        plan[topo.execute(provider)] = stage_queue_arguments(settings, max_length=settings.stage_max_length)
    return plan


async def declare_topology(channel: AbstractChannel, settings: Settings, providers: Iterable[str]) -> None:
    topo = settings.topology
    dlx = await channel.declare_exchange(topo.dead_exchange, aio_pika.ExchangeType.FANOUT, durable=True)
    await channel.declare_exchange(topo.alerts_exchange, aio_pika.ExchangeType.TOPIC, durable=True)
    for name, arguments in queue_plan(settings, providers).items():
        queue = await channel.declare_queue(name, durable=True, arguments=arguments)
        if name in (topo.dead, topo.dead_notify):
            await queue.bind(dlx, routing_key="#")


async def delete_topology(channel: AbstractChannel, settings: Settings, providers: Iterable[str]) -> None:
    """Remove a namespace's queues and exchanges (tests clean up with this)."""
    for name in queue_plan(settings, providers):
        await channel.queue_delete(name)
    await channel.exchange_delete(settings.topology.dead_exchange)
    await channel.exchange_delete(settings.topology.alerts_exchange)
