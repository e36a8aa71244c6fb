"""Provider health shared through Redis: the execute stage opens a circuit for a provider/model
(or a whole provider) after repeated failures; the router and the fallback read which ones are
open and route around them. Names are "provider" or "provider/model"."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from redis.asyncio import Redis

from farebox.constants import RedisKeys
from farebox.errors import REDIS_DOWN

LOCAL_CACHE_S = 1.0  # the router asks Redis at most once a second per process


class Circuits:
    def __init__(self, redis: Redis, keys: RedisKeys, *, clock: Callable[[], float] = time.time) -> None:
        self.redis = redis
        self.keys = keys
        self.clock = clock
        self._cached: frozenset[str] = frozenset()
        self._cached_at = -1e9
        self._names: list[str] = []

    async def unhealthy(self, providers: Iterable[str]) -> frozenset[str]:
        """Those of ``providers`` whose circuit is open."""
        now = self.clock()
        names = sorted(set(providers))
        if now - self._cached_at < LOCAL_CACHE_S and names == self._names:
            return self._cached
        self._names = names
        try:
            values = await self.redis.mget([self.keys.provider_health(p) for p in names]) if names else []
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
