"""FAREBOX_AMQP_URL as a list of a cluster's nodes: what the list may hold, the order a process tries the nodes
in, and the robust connection moving past dead nodes, at the first connect and while running (against the real
broker, through TCP proxies that stand for nodes, and closed ports for dead ones). The run on a real 3-node
cluster is tests/test_rabbit_cluster.py."""

from __future__ import annotations

import asyncio
import json
import random
import socket
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import aio_pika.abc
import aiormq
import pytest
from pydantic import ValidationError

from farebox.amqp_connect import connect_any, connect_robust_nodes, failover_order, node_order, start_index
from farebox.client import FareboxClient
from farebox.patches import aio_pika_failover
from farebox.patches.aio_pika_failover import FailoverConnection
from farebox.settings import InvalidAmqpUrl, Settings, parse_amqp_urls
from farebox.stages.topology import queue_plan
from tests.support.pipeline import get_message
from tests.support.tcp_proxy import TcpProxy, proxy_in_front_of

GOOD = [
    ("amqp://guest:guest@localhost:5672/", 1, "guest", "/"),
    ("amqp://u:p@h1:5672/v,amqp://u:p@h2:5672/v", 2, "u", "v"),
    ("amqp://u:p@h1/v , amqps://u:p@h2:5671/v?heartbeat=30", 2, "u", "v"),  # scheme, port, query may differ
    ("amqp://u:p@h1/%2F,amqp://u:p@h2/", 2, "u", "/"),  # "/" spelled out or left to the default
    ("amqp://h1,amqp://h2,amqp://h3", 3, "guest", "/"),  # no user on any: PLAIN's default, no user_id stamped
    ("amqp://us%40r:p%2Cw@h1/v,amqp://us%40r:p%2Cw@h2/v", 2, "us@r", "v"),  # a comma in a password is %2C
]

BAD = [
    ("", "item 1 of 1 is empty"),
    ("amqp://h1,", "item 2 of 2 is empty"),
    ("amqp://h1,,amqp://h2", "item 2 of 3 is empty"),
    ("http://u:secret@h1/", "scheme 'http'"),
    ("amqp://u:p@h1/,h2:5672", "item 2 of 2 has scheme"),
    ("amqp://u:secret@h1:99999/", "readable host and port"),
    ("amqp://u:secret@h1/v,amqp://w:secret@h2/v", "disagree on the user"),
    ("amqp://u:secret@h1/v,amqp://u:other@h2/v", "its password"),
    ("amqp://u:secret@h1/a,amqp://u:secret@h2/b", "vhost"),
    ("amqp://u:secret@h1/v,amqp://h2/v", "disagree"),  # a user on one node and none on another
]


@pytest.mark.parametrize(("url", "count", "user", "vhost"), GOOD)
def test_a_list_of_nodes_of_one_cluster_is_read(url: str, count: int, user: str, vhost: str) -> None:
    settings = Settings(amqp_url=url)
    assert len(settings.amqp_urls) == count
    assert all(u == u.strip() and u for u in settings.amqp_urls)
    assert (settings.amqp_user, settings.amqp_vhost) == (user, vhost)
    assert settings.amqp_user_id == (None if user == "guest" and "guest@" not in url else user)


@pytest.mark.parametrize(("url", "says"), BAD)
def test_a_bad_list_is_a_settings_error_that_says_why(url: str, says: str) -> None:
    with pytest.raises(InvalidAmqpUrl, match=says) as raised:
        parse_amqp_urls(url)
    assert "secret" not in str(raised.value) and "other" not in str(raised.value)  # never a password
    with pytest.raises(ValidationError, match="amqp_url"):
        Settings(amqp_url=url)


@pytest.mark.parametrize(
    ("start", "expected"),
    [(0, ("a", "b", "c")), (1, ("b", "c", "a")), (2, ("c", "a", "b")), (3, ("a", "b", "c")), (-1, ("c", "a", "b"))],
)
def test_a_process_starts_at_its_node_and_keeps_the_listed_order(start: int, expected: tuple[str, ...]) -> None:
    assert node_order(["a", "b", "c"], start=start) == expected


def test_spreading_starts_processes_at_every_node_and_never_without_it() -> None:
    rng = random.Random(7)
    assert {start_index(3, spread=True, rng=rng) for _ in range(200)} == {0, 1, 2}
    assert {start_index(3, spread=False, rng=rng) for _ in range(50)} == {0}
    assert start_index(1, spread=True, rng=rng) == 0


@pytest.mark.parametrize(
    ("count", "in_use", "expected"),
    [
        (3, None, [0, 1, 2]),  # the first connect: from the first node of the process's order
        (3, 0, [1, 2, 0]),  # node 0 went away: the next one first, node 0 last
        (3, 1, [2, 0, 1]),
        (3, 2, [0, 1, 2]),  # wraps round
        (1, 0, [0]),  # one node: it again, as aio-pika's own reconnect does
    ],
)
def test_a_lost_node_is_tried_last(count: int, in_use: int | None, expected: list[int]) -> None:
    assert failover_order(count, in_use) == expected


def test_the_private_hook_is_there() -> None:
    """aio-pika's reconnect loop calls this private coroutine for every attempt; without it no failover."""
    assert aio_pika_failover.supported
    assert aio_pika.__version__.startswith("10.2."), "re-check farebox/patches/aio_pika_failover.py's table"
    factory = aio_pika.RobustConnection._RobustConnection__connection_factory  # type: ignore[attr-defined]
    assert "_RobustConnection__connect_transport" in factory.__code__.co_names  # the name the override takes


@pytest.mark.parametrize("size", [None, 3])
def test_the_quorum_group_size_is_sent_only_when_set(size: int | None) -> None:
    plan = queue_plan(Settings(quorum_initial_group_size=size), ["openai"])
    quorum = [args for args in plan.values() if args["x-queue-type"] == "quorum"]
    assert len(quorum) > 10
    for args in plan.values():
        expected = size if args["x-queue-type"] == "quorum" else None
        assert args.get("x-quorum-initial-group-size") == expected


def dead_port() -> int:
    """A loopback port nothing listens on (taken, then freed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def at_port(url: str, port: int) -> str:
    parts = urlsplit(url)
    auth = parts.netloc.rpartition("@")[0]
    return urlunsplit(parts._replace(netloc=f"{auth + '@' if auth else ''}127.0.0.1:{port}"))


async def test_no_node_answering_fails_fast() -> None:
    nodes = [at_port("amqp://guest:guest@127.0.0.1/", dead_port()) for _ in range(3)]
    with pytest.raises(aiormq.exceptions.AMQPConnectionError):
        await connect_robust_nodes(nodes, name="farebox-test")
    with pytest.raises(aiormq.exceptions.AMQPConnectionError):
        await connect_any(",".join(nodes))


async def test_the_first_connect_skips_dead_nodes(settings: Settings) -> None:
    dead = at_port(settings.amqp_url, dead_port())
    connection = await connect_robust_nodes([dead, dead, settings.amqp_url], name="farebox-test")
    try:
        assert isinstance(connection, FailoverConnection) and connection.in_use == 2
        # Never consumed, an auto-delete queue would stay: it is deleted here.
        queue = await (await connection.channel()).declare_queue(settings.topology.intake, auto_delete=True)
        await queue.delete(if_unused=False, if_empty=False)
    finally:
        await connection.close()
    plain = await connect_any(f"{dead},{settings.amqp_url}")
    await plain.close()


@pytest.fixture
async def proxies(settings: Settings) -> AsyncIterator[list[TcpProxy]]:
    made = [await proxy_in_front_of(settings.amqp_url) for _ in range(2)]
    yield [proxy for proxy, _ in made]
    for proxy, _ in made:
        await proxy.stop()


async def test_a_lost_node_moves_the_connection_past_a_dead_one(settings: Settings, proxies: list[TcpProxy]) -> None:
    """Nodes [A, dead, C]: when A goes (its connections cut, new ones refused) the connection skips the dead node,
    lands on C and its consumer gets what is published after the move."""
    a, c = proxies
    nodes = [
        at_port(settings.amqp_url, a.port),
        at_port(settings.amqp_url, dead_port()),
        at_port(settings.amqp_url, c.port),
    ]
    connection = await connect_robust_nodes(nodes, name="farebox-test", reconnect_interval=0.2, move_pause_s=0.5)
    assert isinstance(connection, FailoverConnection)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(f"{settings.namespace}.failover", durable=False, auto_delete=True)
        got: asyncio.Queue[bytes] = asyncio.Queue()

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            await got.put(message.body)

        await queue.consume(on_message, no_ack=True)
        assert connection.in_use == 0 and a.open_connections == 1
        a.refusing = True
        a.cut()
        for _ in range(300):  # the move is robust's reconnect: within its interval and a round of attempts
            if connection.in_use == 2 and connection.connected.is_set():
                break
            await asyncio.sleep(0.1)
        assert connection.in_use == 2 and c.open_connections == 1
        publisher = await aio_pika.connect(settings.amqp_url)
        async with publisher:
            await (await publisher.channel()).default_exchange.publish(aio_pika.Message(b"after"), queue.name)
            assert await asyncio.wait_for(got.get(), 30) == b"after"
    finally:
        await connection.close()


async def test_the_client_connects_through_a_dead_first_node(
    settings: Settings, bare_intake: aio_pika.abc.AbstractQueue
) -> None:
    dead = at_port(settings.amqp_url, dead_port())
    client = FareboxClient(f"{dead},{settings.amqp_url}", namespace=settings.namespace, spread=False)
    async with client:
        job = await client.publish({"prompt": "hi", "tenant": "acme"})
    body = json.loads((await get_message(bare_intake)).body)
    assert body["job_id"] == job.job_id
