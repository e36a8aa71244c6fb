"""PipeliningRedis against the real Redis: concurrent commands share a pipeline, yet each caller
gets its own reply or its own error, as with plain redis-py; a Redis that is away fails every
queued caller; a cancelled caller's command is never sent."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterNode, ClusterPipeline
from redis.asyncio.connection import Connection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from farebox import metrics
from farebox.patches.redis_pipelining import ClusterClient, HiredisPacking, PipeliningRedis
from farebox.settings import Settings

INCR = "return redis.call('INCRBY', KEYS[1], ARGV[1])"


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[PipeliningRedis]:
    r = PipeliningRedis.from_url(settings.redis_url)
    yield r
    await r.aclose()


def pipelines() -> tuple[float, float]:
    """(pipelines sent, commands in them) so far."""
    samples = {s.name: s.value for s in metrics.REDIS_PIPELINE.collect()[0].samples}
    return samples["farebox_redis_pipeline_commands_count"], samples["farebox_redis_pipeline_commands_sum"]


async def test_concurrent_commands_go_out_together_and_each_gets_its_reply(
    client: PipeliningRedis, settings: Settings
) -> None:
    key = settings.redis_prefix + "n"
    script = client.register_script(INCR)
    # Loaded first: a later test flushes Redis's script cache, and the server keeps that state
    # between runs, so unloaded every NOSCRIPT would add a SCRIPT LOAD and a second EVALSHA.
    await client.script_load(INCR)
    sent, commands = pipelines()
    replies = await asyncio.gather(*(script(keys=[key], args=[1]) for _ in range(40)))
    after_sent, after_commands = pipelines()
    assert sorted(replies) == list(range(1, 41))
    assert after_commands - commands == 40
    assert after_sent - sent < 40  # fewer pipelines than commands: they were sent together
    assert await client.get(key) == b"40"


async def test_one_commands_error_is_its_own(client: PipeliningRedis, settings: Settings) -> None:
    text, number = settings.redis_prefix + "text", settings.redis_prefix + "number"
    await client.set(text, "hello")
    replies = await asyncio.gather(
        client.hget(text, "field"),  # WRONGTYPE from the server
        client.set(number, None),  # type: ignore[arg-type]  # redis-py refuses to encode None
        client.incr(number),
        client.get(text),
        return_exceptions=True,
    )
    assert isinstance(replies[0], ResponseError)
    assert isinstance(replies[1], DataError)
    assert replies[2] == 1 and replies[3] == b"hello"


async def test_a_flushed_script_is_loaded_again_mid_pipeline(client: PipeliningRedis, settings: Settings) -> None:
    script = client.register_script(INCR)
    await script(keys=[settings.redis_prefix + "warm"], args=[1])
    await client.script_flush()  # every caller below gets NOSCRIPT first
    replies = await asyncio.gather(*(script(keys=[settings.redis_prefix + "s"], args=[2]) for _ in range(10)))
    assert sorted(replies) == list(range(2, 22, 2))


async def test_a_cancelled_callers_command_is_not_sent(client: PipeliningRedis, settings: Settings) -> None:
    key = settings.redis_prefix + "cancelled"
    task = asyncio.create_task(client.set(key, "1"))
    await asyncio.sleep(0)  # the task queued its SET; the flush is due next turn
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await client.exists(key) == 0
    assert await client.set(key, "2") and await client.get(key) == b"2"  # and the client goes on


async def test_a_failed_pipeline_fails_its_callers_and_the_client_goes_on(
    client: PipeliningRedis, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = Pipeline.execute
    failures = [RedisConnectionError("gone")]

    async def once_down(self: Pipeline, raise_on_error: bool = True) -> list[object]:
        if failures:
            raise failures.pop()
        return await real(self, raise_on_error)

    monkeypatch.setattr(Pipeline, "execute", once_down)
    replies = await asyncio.gather(*(client.get(settings.redis_prefix + "x") for _ in range(5)), return_exceptions=True)
    assert all(isinstance(r, RedisConnectionError) for r in replies)
    assert await asyncio.gather(*(client.incr(settings.redis_prefix + "y") for _ in range(5))) == [1, 2, 3, 4, 5]


async def test_commands_queued_behind_a_stalled_redis_fail_with_it_unsent() -> None:
    """A Redis that accepts and never answers: the pipeline in flight times out, and what queued
    behind it fails with the same error instead of being sent to wait out a timeout of its own."""
    received: list[bytes] = []

    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                received.append(data)
                writer.write(b"+OK\r\n" * data.count(b"SETINFO"))  # the handshake is answered, nothing else

    server = await asyncio.start_server(stall, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    r = PipeliningRedis.from_url(
        f"redis://127.0.0.1:{port}", socket_timeout=0.5, socket_connect_timeout=0.5, protocol=2
    )
    try:
        first = asyncio.create_task(r.get("first"))
        await asyncio.sleep(0.1)  # in flight now
        behind = [asyncio.create_task(r.get(f"behind-{i}")) for i in range(3)]
        replies = await asyncio.gather(first, *behind, return_exceptions=True)
    finally:
        await r.aclose()
        server.close()
    assert all(isinstance(x, (RedisTimeoutError, RedisConnectionError, TimeoutError)) for x in replies), replies
    assert b"first" in b"".join(received)
    assert not any(b"behind" in chunk for chunk in received)


async def test_blocking_commands_are_never_pipelined(client: PipeliningRedis, settings: Settings) -> None:
    key = settings.redis_prefix + "list"
    waiting = asyncio.create_task(client.blpop([key], timeout=5))
    await asyncio.sleep(0.1)
    # Were BLPOP in the one pipeline in flight, this would wait behind it for 5 s.
    assert await asyncio.wait_for(client.rpush(key, "v"), 2) == 1
    assert list(await asyncio.wait_for(waiting, 5)) == [key.encode(), b"v"]


async def test_a_plain_pipeline_on_the_client_still_works(client: PipeliningRedis, settings: Settings) -> None:
    key = settings.redis_prefix + "p"
    async with client.pipeline(transaction=True) as pipe:
        pipe.set(key, "1").incr(key)
        assert await pipe.execute() == [True, 2]


async def test_closing_fails_what_is_still_queued(settings: Settings) -> None:
    r: Redis = PipeliningRedis.from_url(settings.redis_url)
    assert await r.ping()
    task = asyncio.create_task(r.get(settings.redis_prefix + "late"))
    await asyncio.sleep(0)  # queued, not sent
    await r.aclose()
    with pytest.raises(RedisConnectionError, match="closed"):
        await asyncio.wait_for(task, 2)


@pytest.mark.parametrize(
    "args",
    [
        ("SET", "k", "v"),
        ("EVALSHA", "a" * 40, 2, "k1", "k2", "résumé ✓", 3, 1.5, -7, b"\x00raw\r\n"),
        ("SET", "k", memoryview(b"view")),
        ("SET", "k", bytearray(b"array")),
        ("CONFIG GET", "maxmemory"),
        ("SET", "k", "x" * 100_000),
    ],
)
def test_hiredis_packing_matches_redis_py(args: tuple[object, ...]) -> None:
    fast = PipeliningRedis.from_url("redis://localhost:6379/0").connection_pool.make_connection()
    plain = Connection()
    assert isinstance(fast, HiredisPacking)
    assert b"".join(bytes(c) for c in fast.pack_command(*args)) == b"".join(bytes(c) for c in plain.pack_command(*args))


@pytest.mark.parametrize("bad", [True, None, 1.0j, object()])
def test_hiredis_packing_refuses_what_redis_py_refuses(bad: object) -> None:
    fast = PipeliningRedis.from_url("redis://localhost:6379/0").connection_pool.make_connection()
    with pytest.raises(DataError):
        fast.pack_command("SET", "k", bad)
    with pytest.raises(DataError):
        Connection().pack_command("SET", "k", bad)


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (AttributeError("'NoneType' object has no attribute 'writelines'"), RedisConnectionError),
        (AttributeError("'Foo' object has no attribute 'bar'"), AttributeError),  # a bug stays a bug
    ],
)
async def test_a_cluster_pipelines_lost_writer_is_a_connection_error(
    monkeypatch: pytest.MonkeyPatch, raised: AttributeError, expected: type[Exception]
) -> None:
    """redis-py 8.1's cluster pipeline fails with the AttributeError of a replaced connection as its commands
    do (farebox/patches/redis_pipelining.py); no cluster is needed to see how farebox's client maps it."""

    async def execute(self: ClusterPipeline, raise_on_error: bool = True, allow_redirections: bool = True) -> None:
        raise raised

    monkeypatch.setattr(ClusterPipeline, "execute", execute)
    client = ClusterClient(startup_nodes=[ClusterNode("127.0.0.1", 1)])
    try:
        pipe = client.pipeline(transaction=False)
        assert isinstance(pipe, ClusterPipeline)
        with pytest.raises(expected, match="no attribute"):
            await pipe.execute()
    finally:
        await client.aclose()
