"""Connections to the pipeline's broker: one RabbitMQ node or several nodes of one cluster (FAREBOX_AMQP_URL).

Every process of the pipeline (each stage, the client, the CLI) connects through here. With several nodes
listed, a process starts at a node picked at random and keeps the listed order from there (a rotation), so the
processes of a pipeline spread over the cluster while each one's failover order stays the list's. When the
node in use goes away, the robust connection moves to the next node that answers, skipping dead ones, and
restores its channels and consumers there (farebox/patches/aio_pika_failover.py). With ``amqp_spread`` off,
every process starts at the first node listed: the others are standbys.

A quorum queue lives on every node of its group (``quorum_initial_group_size``), so a connection to any node
reaches every queue; which node leads a queue is RabbitMQ's business.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence

import aio_pika
import aiormq
from aio_pika.abc import AbstractConnection, AbstractRobustConnection
from pamqp.common import FieldTable
from yarl import URL

from farebox.patches import aio_pika_failover
from farebox.patches.aio_pika_failover import FailoverConnection, censored, failover_order
from farebox.settings import Settings, parse_amqp_urls

log = logging.getLogger("farebox.amqp_connect")

__all__ = ["connect_any", "connect_robust_nodes", "failover_order", "node_order", "pipeline_nodes"]

# Per node and attempt: a node that takes the TCP connection and never answers (a host gone without a reset)
# must not hold the move to the next one for the OS's connect timeout (minutes).
CONNECT_TIMEOUT_S = 10.0

# How long a connection whose node went away waits before it opens channels on another node. RabbitMQ 3.10.8
# nacks, for as long as the channel lives, every publish to a quorum queue from a channel opened while that queue
# is electing a leader to replace one on the lost node (seen on the 3-node cluster of tests/test_rabbit_cluster.py:
# every stage reconnected within half a second of a kill -9, and the backfill stalled for good; with this pause it
# finished). A lost node's queues elect within a second or two once their peers see it go.
MOVE_PAUSE_S = 5.0

# Raised by a node that does not answer (refused, reset, handshake failed or timed out).
UNREACHABLE: tuple[type[BaseException], ...] = (aiormq.exceptions.AMQPConnectionError, ConnectionError, OSError)


def node_order(urls: Sequence[str], *, start: int) -> tuple[str, ...]:
    """The nodes rotated to begin at ``start`` (modulo their count), the listed order kept after it."""
    if not urls:
        raise ValueError("no AMQP node given")
    first = start % len(urls)
    return (*urls[first:], *urls[:first])


def start_index(count: int, *, spread: bool, rng: random.Random | None = None) -> int:
    """Which node a process starts at: one at random when spreading, else the first listed."""
    if not spread or count <= 1:
        return 0
    return (rng or random).randrange(count)


def pipeline_nodes(settings: Settings, *, rng: random.Random | None = None) -> tuple[str, ...]:
    """The settings' nodes in the order this connection tries them first."""
    urls = settings.amqp_urls
    return node_order(urls, start=start_index(len(urls), spread=settings.amqp_spread, rng=rng))


async def connect_robust_nodes(
    nodes: Sequence[str] | str,
    *,
    name: str,
    reconnect_interval: float = 1.0,
    timeout: float = CONNECT_TIMEOUT_S,
    move_pause_s: float = MOVE_PAUSE_S,
) -> AbstractRobustConnection:
    """A robust connection to the first of ``nodes`` that answers (a comma-separated FAREBOX_AMQP_URL is split,
    and keeps its order), moving over them when the one in use goes away. Raises what the last node raised when
    none answers. After losing its node it waits ``move_pause_s`` before it reconnects (see MOVE_PAUSE_S)."""
    urls = parse_amqp_urls(nodes) if isinstance(nodes, str) else tuple(nodes)
    properties: FieldTable = {"connection_name": name}
    if len(urls) > 1 and not aio_pika_failover.supported:
        log.warning(
            "this aio-pika has no hook for failing over (farebox/patches/aio_pika_failover.py): connecting to %s "
            "alone, and a reconnect waits for it",
            censored(URL(urls[0])),
        )
    if len(urls) == 1 or not aio_pika_failover.supported:
        return await aio_pika.connect_robust(
            urls[0], reconnect_interval=reconnect_interval, timeout=timeout, client_properties=properties
        )
    connection = FailoverConnection(
        [URL(u) for u in urls],
        move_pause_s=move_pause_s,
        reconnect_interval=reconnect_interval,
        client_properties=properties,
    )
    await connection.connect(timeout=timeout)
    return connection


async def connect_any(nodes: Sequence[str] | str, *, timeout: float = CONNECT_TIMEOUT_S) -> AbstractConnection:
    """A plain (not robust) connection to the first of ``nodes`` that answers, for a short task (a probe, a
    clean-up); raises what the last one raised when none does."""
    urls = parse_amqp_urls(nodes) if isinstance(nodes, str) else tuple(nodes)
    for index in failover_order(len(urls), None):
        try:
            return await aio_pika.connect(urls[index], timeout=timeout)
        except UNREACHABLE:
            if index == len(urls) - 1:
                raise
            log.info("RabbitMQ node %s did not answer; trying the next", censored(URL(urls[index])))
    raise AssertionError("unreachable: the loop returns or raises")
