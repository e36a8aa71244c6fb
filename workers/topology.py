"""Declares every exchange and queue farebox uses. Idempotent: every worker runs it at start.

Stage queues are durable quorum queues with:
* a delivery limit, so a message that keeps killing its consumer is dead-lettered instead of
  looping forever (RabbitMQ 3.10 sets none by default);
* ``reject-publish`` overflow with a max length, so a full stage pushes back on whoever publishes
  into it (publisher confirms turn into nacks) instead of buffering without bound;
* at-least-once dead-lettering into the fanout DLX, which feeds ``<ns>.dead.notify``: the dead-letter
  stage answers the caller with a typed error result and writes a record of the message (never its
  body unless asked: it may hold prompts and secrets) to ``<ns>.dead``, which keeps the newest records
  within a count, a size and an age (``dead_queue_arguments``).

Coalesced waiters park in ``<ns>.waiting``, a quorum queue whose message TTL dead-letters them back
into ``<ns>.recheck``; a broker-side timer, so a waiting job survives any worker dying, and replicated, so
it survives a node of a cluster going. The classic ``<ns>.wait`` queues of before are no longer declared: a
stage that declared one would fail to restore its channel on another node while the queue's node is down.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
from collections.abc import Iterable
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel

from farebox.constants import Topology
from farebox.settings import Settings

log = logging.getLogger("farebox.topology")

_warned: set[str] = set()  # the policy commands already logged by this process: once each, not per worker


def quorum_arguments(settings: Settings) -> dict[str, Any]:
    """A quorum queue's type, with the number of nodes it starts on only when asked: RabbitMQ refuses to
    redeclare a queue that exists without that argument (FAREBOX_QUORUM_INITIAL_GROUP_SIZE in settings.py)."""
    args: dict[str, Any] = {"x-queue-type": "quorum"}
    if settings.quorum_initial_group_size is not None:
        args["x-quorum-initial-group-size"] = settings.quorum_initial_group_size
    return args


def stage_queue_arguments(settings: Settings, *, max_length: int | None) -> dict[str, Any]:
    args: dict[str, Any] = {
        **quorum_arguments(settings),
        "x-delivery-limit": settings.delivery_limit,
        "x-dead-letter-exchange": settings.topology.dead_exchange,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }
    if max_length is not None:
        args["x-max-length"] = max_length
    return args


def waiting_arguments(settings: Settings, ttl_ms: int) -> dict[str, Any]:
    """A wait queue: its messages expire after ``ttl_ms`` into recheck, dead-lettered at least once (a waiter
    is never lost on its way back), never consumed."""
    return {
        **quorum_arguments(settings),
        "x-message-ttl": ttl_ms,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": settings.topology.recheck,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


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
        topo.dead: dead_queue_arguments(settings),
        topo.dead_notify: {**quorum_arguments(settings), "x-delivery-limit": settings.delivery_limit},
        topo.waiting: waiting_arguments(settings, settings.coalesce_poll_ms),
        topo.waiting_batch: waiting_arguments(settings, settings.batch_wait_poll_ms),
    }
    for provider in sorted(set(providers)):
        plan[topo.execute(provider)] = stage_queue_arguments(settings, max_length=settings.stage_max_length)
        plan[topo.batch(provider)] = stage_queue_arguments(settings, max_length=settings.stage_max_length)
    # Each stage queue's interactive twin (Topology.lane), new queues with the same arguments: the queues of
    # before keep theirs (a redeclare with others would fail) and carry the background lane.
    for name in [n for n in plan if topo.has_lanes(n)]:
        plan[topo.lane(name, "interactive")] = dict(plan[name])
    return plan


def dead_retention(settings: Settings) -> dict[str, Any]:
    """The bounds of ``<ns>.dead`` as a RabbitMQ policy definition (the same as its queue arguments)."""
    return {
        "max-length": settings.dead_max_length,
        "max-length-bytes": settings.dead_max_bytes,
        "message-ttl": max(1, round(settings.dead_ttl_s * 1000)),
        # When full, the oldest record goes: the newest say what is failing now, and the dead-letter stage
        # must never be refused (reject-publish would hold every caller's answer behind a full queue).
        "overflow": "drop-head",
    }


def dead_queue_arguments(settings: Settings) -> dict[str, Any]:
    return {**quorum_arguments(settings), **{f"x-{k}": v for k, v in dead_retention(settings).items()}}


def dead_policy_command(settings: Settings) -> str:
    """The rabbitmqctl command giving an existing ``<ns>.dead`` its bounds: a queue's arguments cannot be
    changed once declared, a policy's can, and applies to the queue as it is."""
    vhost = settings.amqp_vhost  # the same on every node FAREBOX_AMQP_URL lists
    pattern = "^" + re.escape(settings.topology.dead) + "$"
    definition = json.dumps(dead_retention(settings), separators=(",", ":"))
    name = f"{settings.namespace}-dead-retention"
    return shlex.join(["rabbitmqctl", "set_policy", "-p", vhost, "--apply-to", "queues", name, pattern, definition])


async def declare_topology(channel: AbstractChannel, settings: Settings, providers: Iterable[str]) -> None:
    topo = settings.topology
    dlx = await channel.declare_exchange(topo.dead_exchange, aio_pika.ExchangeType.FANOUT, durable=True)
    await channel.declare_exchange(topo.alerts_exchange, aio_pika.ExchangeType.TOPIC, durable=True)
    for name, arguments in queue_plan(settings, providers).items():
        if name == topo.dead:
            continue
        queue = await channel.declare_queue(name, durable=True, arguments=arguments)
        if name == topo.dead_notify:
            await queue.bind(dlx, routing_key="#")
    await declare_dead_queue(channel, settings)


async def declare_dead_queue(channel: AbstractChannel, settings: Settings) -> None:
    """Declare ``<ns>.dead`` with its bounds, on channels of its own: an install whose queue was declared
    without them refuses the declare (PRECONDITION_FAILED), which closes the channel it came on, and a worker
    must still start there. It then gets one warning with the policy that bounds the queue as it is.
    Either way the queue is unbound from the DLX (a no-op when it is not bound): before, it took a raw copy
    of every dead letter, body included; now the dead-letter stage writes it a record instead."""
    topo = settings.topology
    connection = (await channel.get_underlay_channel()).connection
    probe = await connection.channel(publisher_confirms=False)
    try:
        await probe.queue_declare(topo.dead, durable=True, arguments=dead_queue_arguments(settings))
    except aiormq.exceptions.ChannelPreconditionFailed as err:
        _warn_unbounded(settings, err)
        probe = await connection.channel(publisher_confirms=False)
    try:
        await probe.queue_unbind(topo.dead, topo.dead_exchange, routing_key="#")
    finally:
        await probe.close()


def _warn_unbounded(settings: Settings, err: Exception) -> None:
    command = dead_policy_command(settings)
    if command in _warned:
        return
    _warned.add(command)
    log.warning(
        "queue %s exists with other arguments (%s), so it is used without the bounds FAREBOX_DEAD_MAX_LENGTH, "
        "FAREBOX_DEAD_MAX_BYTES and FAREBOX_DEAD_TTL_S give it; a policy bounds it as it is, its messages kept "
        "(those from before it, raw bodies of earlier versions included, stay until purged): %s",
        settings.topology.dead,
        err,
        command,
    )


async def delete_topology(channel: AbstractChannel, settings: Settings, providers: Iterable[str]) -> None:
    """Remove a namespace's queues and exchanges (tests clean up with this)."""
    for name in queue_plan(settings, providers):
        await channel.queue_delete(name)
    await channel.exchange_delete(settings.topology.dead_exchange)
    await channel.exchange_delete(settings.topology.alerts_exchange)
