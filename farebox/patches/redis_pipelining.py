"""A Redis client that sends the commands issued in one turn of the event loop as one pipeline.

A stage handles the jobs of a batch concurrently, and each job makes its own Redis call (the
dedup script, the ledger script, ...). Sent one by one, each call costs a socket write, a read
and a connection-pool round of its own; on loopback the write alone was a fifth of the dedup
stage's CPU in a profile. Gathered into one pipeline they cost one write and one read for the
lot. This is what ioredis calls auto-pipelining; redis-py has no such mode.

Nothing changes for the caller: every command still gets its own reply or its own error
(``ResponseError`` included, so a script's ``NoScriptError`` still makes ``Script`` load it; an
argument redis-py cannot encode fails only its own command). A connection failure fails every
command of that pipeline, as it would have failed each of them alone, and the commands queued
behind it too: they have waited out its timeout already, and every stage treats Redis being
away as an answer (it fails open or retries later). The pipeline is not a transaction: commands
from different jobs stay independent. A caller cancelled before its command went out has it
dropped, as redis-py would. Blocking and connection-state commands are never pipelined.

What it relies on in redis-py (pinned ``redis[hiredis]>=8.1,<8.2`` in pyproject.toml), and the
tests of tests/test_redis_pipelining.py that fail when that changes:

| relied on                               | how                       | pinned by                                  |
|-----------------------------------------|---------------------------|--------------------------------------------|
| ``Redis.execute_command`` (asyncio)     | overridden: queued, then  | test_concurrent_commands_go_out_together*, |
|                                         | one pipeline per turn     | test_one_commands_error_is_its_own         |
| ``redis.connection.HiredisRespSerializer`` | packs asyncio commands | test_hiredis_packing_matches_redis_py,     |
| (not exported)                          | with hiredis              | test_hiredis_packing_refuses_what_*        |
| ``Connection.pack_command`` and the     | a subclass the pool       | the same two, and every stage test (the    |
| pool's ``connection_class``             | builds from then on       | stages' Redis comes from ``make_redis``)   |
| ``RedisCluster.execute_command``        | overridden: an            | tests/test_redis_cluster.py::              |
| (asyncio) raising AttributeError from   | AttributeError of a lost  | test_a_master_away_is_redis_away_to_the_   |
| a connection whose writer is gone       | writer is ConnectionError | stages                                     |
| ``RedisCluster.pipeline`` returning a   | a subclass whose          | tests/test_redis_pipelining.py::           |
| ``ClusterPipeline(client, transaction)``| ``execute`` maps the same | test_a_cluster_pipelines_lost_writer_*     |

The last row is a workaround for redis-py 8.1: when its cluster client learns the nodes again (a master
stopped, its slots moved), commands already under way on the connections it replaces fail with
``AttributeError: 'NoneType' object has no attribute 'writelines'`` (seen here on 8 of 30 commands issued
together after a master stopped, in 4 of 5 runs). Farebox takes it for what it is, the connection gone.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterPipeline, RedisCluster
from redis.asyncio.connection import ConnectionPool
from redis.connection import HiredisRespSerializer
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError
from redis.utils import HIREDIS_AVAILABLE

from farebox import metrics
from farebox.errors import REDIS_DOWN

_Queued = tuple[tuple[Any, ...], dict[str, Any], "asyncio.Future[Any]"]
# They would hold up every other job's commands, or change the connection under them.
_ALONE = frozenset(
    {
        "BLPOP",
        "BRPOP",
        "BLMOVE",
        "BLMPOP",
        "BRPOPLPUSH",
        "BZPOPMIN",
        "BZPOPMAX",
        "BZMPOP",
        "XREAD",
        "XREADGROUP",
        "WAIT",
        "WAITAOF",
        "MULTI",
        "EXEC",
        "DISCARD",
        "WATCH",
        "UNWATCH",
        "SELECT",
        "CLIENT",
        "MONITOR",
        "SUBSCRIBE",
        "PSUBSCRIBE",
        "SSUBSCRIBE",
        "RESET",
        "AUTH",
        "HELLO",
        "QUIT",
    }
)


class HiredisPacking:
    """Commands packed by hiredis's C packer. redis-py's own (synchronous) connections use it when
    hiredis is installed; its asyncio connections pack every argument in Python, and that was the
    largest cost in the account stage's CPU profile (the ledger script's dozen arguments per job).
    An argument hiredis cannot pack fails its command with ``DataError``, as redis-py's packer
    does; hiredis also refuses an int subclass such as ``IntEnum``, which redis-py would pack
    (farebox passes plain str, bytes, int and float). Strings go out as UTF-8, redis-py's default;
    a client built with another ``encoding`` must not use this (farebox/stages/main.py sets none)."""

    _packer = HiredisRespSerializer()

    def pack_command(self, *args: Any) -> list[bytes]:
        return self._packer.pack(*args)  # type: ignore[no-any-return]


def pack_with_hiredis(pool: ConnectionPool) -> None:
    """Connections the pool makes from now on pack with hiredis (TCP, TLS or Unix socket alike)."""
    cls = pool.connection_class
    if HIREDIS_AVAILABLE and not issubclass(cls, HiredisPacking):
        pool.connection_class = type(f"Hiredis{cls.__name__}", (HiredisPacking, cls), {})


class NotReplicated(RedisConnectionError):
    """The replicas did not confirm a pipeline's writes in time: its master may have been replaced by one
    of them (a Sentinel failover), and writes only it holds would be lost. Its callers treat it as Redis
    being away and write again; farebox's scripts are idempotent, so a write that did arrive counts once."""


class PipeliningRedis(Redis):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        pack_with_hiredis(self.connection_pool)
        self._queued: list[_Queued] = []
        self._sending: asyncio.Task[None] | None = None
        self._wait_replicas = 0
        self._wait_timeout_ms = 0

    def require_replicas(self, replicas: int, timeout_ms: int) -> None:
        """Every pipeline ends in ``WAIT replicas timeout_ms`` on its own connection (WAIT counts only the
        writes made on the connection it is sent on), and fails with ``NotReplicated`` unless that many
        replicas have its writes. 0: no WAIT (a reply may then rest on writes the master alone holds)."""
        self._wait_replicas, self._wait_timeout_ms = replicas, timeout_ms

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        if str(args[0]).upper() in _ALONE:
            return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[Any] = loop.create_future()
        self._queued.append((args, options, reply))
        if len(self._queued) == 1:
            # Runs after every task already ready in this turn has queued its commands.
            loop.call_soon(self._flush)
        return await reply

    def _flush(self) -> None:
        # One pipeline in flight at a time: what is queued meanwhile goes out when it returns
        # (as Nagle's algorithm does), so a lone command waits for nothing and a busy stage's
        # pipelines grow with the load instead of a fixed delay.
        if self._sending is not None:
            return
        queued = [q for q in self._queued if not q[2].done()]  # a cancelled caller's command is not sent
        self._queued = []
        if queued:
            self._sending = asyncio.get_running_loop().create_task(self._send(queued))
            self._sending.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._sending = None
        if task.cancelled():  # the worker is stopping (even before the task ever ran)
            for _, _, reply in self._queued:
                reply.cancel()
            self._queued = []
        else:
            self._flush()

    async def _send(self, queued: list[_Queued]) -> None:
        metrics.REDIS_PIPELINE.observe(len(queued))
        try:
            if len(queued) == 1 and not self._wait_replicas:
                replies = [await self._alone(*queued[0][:2])]
            else:
                replies = await self._pipelined(queued)
        except REDIS_DOWN as err:
            queued, self._queued = [*queued, *self._queued], []
            _settle(queued, [err] * len(queued))
            if isinstance(err, NotReplicated):
                # Connect again: a Sentinel's pool then asks which server is the master now.
                with contextlib.suppress(*REDIS_DOWN):
                    await self.connection_pool.disconnect()
        except Exception as err:  # not the connection, not one command's own error: it fails them all
            _settle(queued, [err] * len(queued))
        except BaseException:  # cancelled: so are its callers
            for _, _, reply in queued:
                reply.cancel()
            raise
        else:
            _settle(queued, replies)

    async def _alone(self, args: tuple[Any, ...], options: dict[str, Any]) -> Any:
        """One command by itself: its own error (not the connection's) is its reply."""
        try:
            return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]
        except REDIS_DOWN:
            raise
        except Exception as err:
            return err

    async def _pipelined(self, queued: list[_Queued]) -> list[Any]:
        pipe = self.pipeline(transaction=False)
        for args, options, _ in queued:
            pipe.execute_command(*args, **options)
        if self._wait_replicas:
            pipe.execute_command("WAIT", self._wait_replicas, self._wait_timeout_ms)
        try:
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        except DataError:
            # An argument redis-py cannot encode fails the whole pipeline before anything is
            # sent: send each command alone, so only its own caller hears of it (and wait for the
            # replicas after them, as after the pipeline).
            replies = [await self._alone(args, options) for args, options, _ in queued]
            if self._wait_replicas:
                replies.append(await self._alone(("WAIT", self._wait_replicas, self._wait_timeout_ms), {}))
        if self._wait_replicas:
            acked = replies.pop()
            if isinstance(acked, BaseException) or int(acked) < self._wait_replicas:
                raise NotReplicated(f"{acked} of {self._wait_replicas} Redis replica(s) confirmed the writes in time")
        return replies

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        if self._sending is not None:
            with contextlib.suppress(BaseException):
                await self._sending
        _settle(self._queued, [RedisConnectionError("the Redis client was closed")] * len(self._queued))
        self._queued = []
        await super().aclose(close_connection_pool)


def _settle(queued: list[_Queued], replies: list[Any]) -> None:
    for (_, _, reply), value in zip(queued, replies, strict=True):
        if reply.done():  # its caller was cancelled
            continue
        if isinstance(value, BaseException):
            reply.set_exception(value)
        else:
            reply.set_result(value)


def _lost_writer(err: AttributeError) -> RedisConnectionError:
    if "'NoneType' object has no attribute" not in str(err):
        raise err
    return RedisConnectionError(f"the connection to a cluster node went away ({err})")


class ClusterClient(RedisCluster):
    """redis-py's cluster client, with a lost connection's AttributeError raised as the ConnectionError it is,
    by its commands and by its pipelines."""

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().execute_command(*args, **kwargs)
        except AttributeError as err:
            raise _lost_writer(err) from err

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> ClusterPipeline:
        if shard_hint:
            return super().pipeline(transaction, shard_hint)  # raises as redis-py does
        return _ClusterPipeline(self, transaction)  # type: ignore[abstract]  # redis-py makes its own the same way


class _ClusterPipeline(ClusterPipeline):
    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> list[Any]:
        try:
            return await super().execute(raise_on_error, allow_redirections)
        except AttributeError as err:
            raise _lost_writer(err) from err
