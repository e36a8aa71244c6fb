"""Provider health shared through Redis: the execute stage opens a circuit for a provider/model
(or a whole provider) after repeated failures; the router and the fallback read which ones are
open and route around them. Names are "provider" or "provider/model".

The failures are counted in Redis too, by every execute replica together: with N replicas a dead
model's circuit opens after the same number of failed jobs as with one, not N times as many. A job
that succeeds resets its target's count; a replica learns that another one has counted failures at
most ``LOCAL_CACHE_S`` late, so a success costs a Redis command only while a count may be running."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable

from redis.asyncio import Redis

from farebox.constants import RedisKeys
from farebox.errors import REDIS_DOWN
from farebox.stages.lua import Layout, NamedScript

LOCAL_CACHE_S = 1.0  # the router asks Redis at most once a second per process
# A count no failure has added to for this long starts again: failures an hour apart are not "in a row".
FAILURES_KEPT_S = 600
# One script, so a count never outlives its expiry: an INCR that landed without its EXPIRE (the connection
# lost between the two) would keep counting failures hours apart as in a row.
_COUNT_LAYOUT = Layout(keys=("failures_key",), args=("kept_s",))
_COUNT = """
local count = redis.call('INCR', failures_key)
redis.call('EXPIRE', failures_key, tonumber(kept_s))
return count
"""


class Circuits:
    def __init__(self, redis: Redis, keys: RedisKeys, *, clock: Callable[[], float] = time.time) -> None:
        self.redis = redis
        self.keys = keys
        self.clock = clock
        self._cached: frozenset[str] = frozenset()
        self._cached_at = -1e9
        self._names: list[str] = []
        self._counting: set[str] = set()  # names whose failure count may be above 0
        self._counts_read_at: dict[str, float] = {}
        self._count = NamedScript(redis, _COUNT_LAYOUT, _COUNT, "failure count")

    async def unhealthy(self, providers: Iterable[str]) -> frozenset[str]:
        """Those of ``providers`` whose circuit is open."""
        now = self.clock()
        names = sorted(set(providers))
        if now - self._cached_at < LOCAL_CACHE_S and names == self._names:
            return self._cached
        self._names = names
        try:
            # One GET per name, not an MGET: on a Redis Cluster the names' keys sit in different slots. Issued
            # together, they are still one round trip (auto-pipelined on one server, in parallel on a cluster).
            values = await asyncio.gather(*(self.redis.get(self.keys.provider_health(p)) for p in names))
        except REDIS_DOWN:
            values = [None] * len(names)  # without Redis every provider counts as healthy
        self._cached = frozenset(p for p, v in zip(names, values, strict=True) if v is not None)
        self._cached_at = now
        return self._cached

    async def open_circuit(self, name: str, cool_down_s: float) -> None:
        try:
            await self.redis.set(self.keys.provider_health(name), b"open", px=int(cool_down_s * 1000))
        except REDIS_DOWN:
            pass

    async def exhausted(self, name: str, threshold: int, cool_down_s: float) -> int | None:
        """One more job in a row whose calls to ``name`` exhausted their retries, counted by all replicas
        together; at ``threshold`` the circuit opens (for ``cool_down_s``) and the count starts again. Returns
        the count that opened it, else None (also when Redis is away: then no circuit opens)."""
        key = self.keys.provider_failures(name)
        self._counting.add(name)
        try:
            count = await self._count(keys={"failures_key": key}, args={"kept_s": FAILURES_KEPT_S})
            if int(count) < threshold:
                return None
            await asyncio.gather(self.open_circuit(name, cool_down_s), self.redis.delete(key))
        except REDIS_DOWN:
            return None
        return int(count)

    async def succeeded(self, names: Iterable[str]) -> None:
        """A job's call to these names worked: their counts start again. Costs a Redis command only for a name
        with a count running, which this process learns from Redis once a second per name."""
        now = self.clock()
        names = list(names)
        unread = [n for n in names if n not in self._counting and now - self._counts_read_at.get(n, -1e9) >= 1.0]
        try:
            if unread:
                for n in unread:
                    self._counts_read_at[n] = now
                counts = await asyncio.gather(*(self.redis.exists(self.keys.provider_failures(n)) for n in unread))
                self._counting.update(n for n, c in zip(unread, counts, strict=True) if c)
            reset = [n for n in names if n in self._counting]
            if reset:
                await self.redis.delete(*(self.keys.provider_failures(n) for n in reset))
                self._counting.difference_update(reset)
        except REDIS_DOWN:
            pass  # the next success tries again
