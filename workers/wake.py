"""Waking coalesced waiters when their leader finishes, instead of a broker timer polling for them.

A job that must wait for an identical job's leader is held by the dedup process that received it, unacked, so
that a dedup process that dies hands it back to the broker, which gives it to another: no waiter depends on one
worker staying alive. While it waits, a flag beside the lease says so (the decide script sets it), and the
script that releases the lease (the ledger record for a job's own lease, the cache fill for a shared entry's)
deletes the flag and publishes the lease's key on one Redis channel, atomically with the release. Each dedup
process listens on that channel and wakes its waiters of that key, which then decide again (the cached answer
is there by then).

A wake is a hint, never needed for correctness: a waiter also re-checks every ``coalesce_recheck_ms`` (a
wake lost with a connection, a leader that died, a lease that expired), is held at most ``coalesce_hold_s``
and then parks in the broker's wait queue as before the wake, and so are the waiters beyond
``coalesce_hold_max`` held at once (each holds one of the stage's prefetch) and those of batch-lane jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random

from redis.asyncio import ConnectionPool, Redis, RedisCluster
from redis.asyncio.client import PubSub

from farebox.constants import as_text

log = logging.getLogger("farebox.wake")

RESUBSCRIBE_S = 0.5
# Woken waiters decide again (and are answered) this many at a time: one release may wake hundreds, whose Redis
# work at once would open as many connections (and a Redis Cluster client's pool of a node holds 100).
DECIDING_AT_ONCE = 16


class Waker:
    """Who waits for which lease in this process, and the Redis subscription that wakes them."""

    def __init__(self, redis: Redis, channel: str, *, capacity: int) -> None:
        self.redis = redis
        self.channel = channel
        self.capacity = capacity  # waiters held at once; the rest park in the broker
        self.held = 0
        self.draining = False  # the stage is stopping: held waiters park at once
        self.listening = asyncio.Event()  # subscribed (a test waits for it)
        self.deciding = asyncio.Semaphore(DECIDING_AT_ONCE)
        self._waiting: dict[str, set[asyncio.Future[None]]] = {}

    def can_hold(self) -> bool:
        return not self.draining and self.held < self.capacity

    def expect(self, lease_key: str) -> asyncio.Future[None]:
        """A future done when ``lease_key``'s release is published: taken before the decide script runs, so a
        release right after it cannot slip past."""
        woken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(lease_key, set()).add(woken)
        return woken

    def forget(self, lease_key: str, woken: asyncio.Future[None]) -> None:
        waiting = self._waiting.get(lease_key)
        if waiting is not None:
            waiting.discard(woken)
            if not waiting:
                del self._waiting[lease_key]

    def wake(self, lease_key: str) -> int:
        woken = self._waiting.pop(lease_key, set())
        for future in woken:
            if not future.done():
                future.set_result(None)
        return len(woken)

    def wake_all(self) -> None:
        for key in list(self._waiting):
            self.wake(key)

    async def listen(self, stop: asyncio.Event) -> None:
        """Wake waiters as releases are published, until ``stop``; from then on every held waiter parks. A lost
        subscription (Redis away, or anything else going wrong with it) is logged and taken again: meanwhile the
        held waiters re-check on their timer."""
        parking = asyncio.create_task(self._park_all_on(stop))
        try:
            while not stop.is_set():
                try:
                    await self._listen_once(stop)
                except Exception as err:  # Redis away, a cluster client's lost writer, an ACL refusing the channel
                    self.listening.clear()
                    log.warning(
                        "wake: subscription to %s lost (%s: %s); re-subscribing", self.channel, type(err).__name__, err
                    )
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), RESUBSCRIBE_S)
        finally:
            parking.cancel()
            self.listening.clear()
            if stop.is_set():
                self._park_all()

    async def _park_all_on(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self._park_all()

    def _park_all(self) -> None:
        """The stage stops: every held waiter wakes and parks, and no more are held."""
        self.draining = True
        self.wake_all()

    async def _listen_once(self, stop: asyncio.Event) -> None:
        pubsub, own = await _subscriber(self.redis)
        try:
            await pubsub.subscribe(self.channel)
            self.listening.set()
            while not stop.is_set():
                message = await pubsub.get_message(timeout=1.0)
                if message is not None and message.get("type") == "message":
                    self.wake(as_text(message["data"]))
        finally:
            with contextlib.suppress(Exception):  # closing a connection that is gone already
                await pubsub.aclose()  # type: ignore[no-untyped-call]  # untyped in redis-py 8.1
            if own is not None:
                with contextlib.suppress(Exception):
                    await own.aclose(close_connection_pool=True)


async def _subscriber(redis: Redis) -> tuple[PubSub, Redis | None]:
    """A subscription on a connection of its own (and the client that holds it, to close, if one was made for it).
    A cluster client's own pubsub borrows a node's connection pool, and on redis-py 8.1 that broke the stage's
    commands under way (connections closed by the server, its lost writer); a PUBLISH reaches every node of a
    cluster, so a plain connection to any one node hears every release."""
    if not isinstance(redis, RedisCluster):
        return redis.pubsub(ignore_subscribe_messages=True), None
    if not redis.get_nodes():  # a client whose start found the cluster away knows no node yet
        await redis.initialize()
    nodes = redis.get_nodes()
    if not nodes:
        raise ConnectionError("no Redis Cluster node known to subscribe on")
    node = random.choice(nodes)
    own = Redis(connection_pool=ConnectionPool(connection_class=node.connection_class, **node.connection_kwargs))
    return own.pubsub(ignore_subscribe_messages=True), own
