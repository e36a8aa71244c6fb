"""Provider rate and concurrency limits shared by every replica of a provider's execute stage.

State lives in Redis, so four execute replicas for "openai" together stay under openai's limits:
* requests/min and tokens/min: a token bucket per dimension (capacity = the per-minute limit,
  refilled continuously), checked and debited atomically in one Lua script on Redis's clock;
* concurrency: a sorted set of in-flight call leases (scored by expiry, so a replica killed
  mid-call frees its slot when the lease runs out).

A job waiting for its slot only holds its own provider's execute process; other providers have
their own processes and queues. With Redis away the limits are not enforced (fail open, logged
once by the caller's RedisHealth), since refusing all traffic would be worse.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from redis.asyncio import Redis

from farebox.constants import RedisKeys
from farebox.errors import REDIS_DOWN, DeadlineExceeded
from farebox.providers.base import ProviderAdapter, ProviderReply, ProviderRequest
from farebox.settings import ProviderLimits
from farebox.stages.lua import Layout, NamedScript
from farebox.tokens import count_messages

LEASE_S = 300  # a call holding a concurrency slot longer than this is presumed dead

# Returns '0' when the call may go now (and debits it), else the seconds to wait.
_BUCKETS_LAYOUT = Layout(
    key_tail="buckets",
    arg_tail="limits_and_needs",  # per bucket, in KEYS order: its per-minute limit, then what this call takes
)
_BUCKETS = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) + tonumber(now_parts[2]) / 1e6
local wait = 0
local states = {}
for i, key in ipairs(buckets) do
  local limit = tonumber(limits_and_needs[2 * i - 1])
  local need = tonumber(limits_and_needs[2 * i])
  local rate = limit / 60.0
  local state = redis.call('HMGET', key, 'tokens', 'ts')
  local tokens = tonumber(state[1]) or limit
  local ts = tonumber(state[2]) or now
  tokens = math.min(limit, tokens + (now - ts) * rate)
  need = math.min(need, limit)  -- a single call larger than the bucket waits for a full one
  if tokens < need then
    wait = math.max(wait, (need - tokens) / rate)
  end
  states[i] = {tokens, need}
end
if wait > 0 then
  return tostring(wait)
end
for i, key in ipairs(buckets) do
  redis.call('HSET', key, 'tokens', states[i][1] - states[i][2], 'ts', now)
  redis.call('EXPIRE', key, 120)
end
return '0'
"""

# Returns 1 and takes a slot (a lease that expires by itself) when fewer than max_slots are held, else 0.
_SLOT_LAYOUT = Layout(keys=("slots_key",), args=("max_slots", "lease_id", "lease_s"))
_SLOT = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) + tonumber(now_parts[2]) / 1e6
redis.call('ZREMRANGEBYSCORE', slots_key, '-inf', now)
if redis.call('ZCARD', slots_key) < tonumber(max_slots) then
  redis.call('ZADD', slots_key, now + tonumber(lease_s), lease_id)
  redis.call('EXPIRE', slots_key, tonumber(lease_s))
  return 1
end
return 0
"""


class SharedLimiter:
    def __init__(
        self,
        redis: Redis,
        keys: RedisKeys,
        provider: str,
        limits: ProviderLimits,
        *,
        clock: Callable[[], float] = time.time,
        poll_max_s: float = 1.0,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.provider = provider
        self.limits = limits
        self.clock = clock
        self.poll_max_s = poll_max_s
        self._buckets = NamedScript(redis, _BUCKETS_LAYOUT, _BUCKETS, "rate buckets")  # the provider's slot
        self._slot = NamedScript(redis, _SLOT_LAYOUT, _SLOT, "concurrency slot")

    @property
    def active(self) -> bool:
        return any(v is not None for v in (self.limits.rpm, self.limits.tpm, self.limits.concurrency))

    async def try_rate(self, tokens: int) -> float:
        """Debit one request and ``tokens`` if the buckets allow now (returns 0), else the wait in s."""
        keys: list[str] = []
        args: list[int] = []
        if self.limits.rpm:
            keys.append(self.keys.rate_bucket(self.provider, "rpm"))
            args += [self.limits.rpm, 1]
        if self.limits.tpm:
            keys.append(self.keys.rate_bucket(self.provider, "tpm"))
            args += [self.limits.tpm, tokens]
        if not keys:
            return 0.0
        return float(await self._buckets(key_tail=keys, arg_tail=args))

    async def try_slot(self, lease_id: str) -> bool:
        if not self.limits.concurrency:
            return True
        got = await self._slot(
            keys={"slots_key": self.keys.concurrency(self.provider)},
            args={"max_slots": self.limits.concurrency, "lease_id": lease_id, "lease_s": LEASE_S},
        )
        return bool(got)

    async def release_slot(self, lease_id: str) -> None:
        if self.limits.concurrency:
            await self.redis.zrem(self.keys.concurrency(self.provider), lease_id)

    @asynccontextmanager
    async def call(self, tokens: int, deadline_at: float | None) -> AsyncIterator[None]:
        """Wait (no longer than the deadline) until the call fits every limit, then hold its slot."""
        if not self.active:
            yield
            return
        lease_id = uuid.uuid4().hex
        try:
            await self._wait_until(lambda: self.try_slot(lease_id), deadline_at, "a concurrency slot")
            await self._wait_for_rate(tokens, deadline_at)
        except REDIS_DOWN:
            with contextlib.suppress(*REDIS_DOWN):
                await self.release_slot(lease_id)  # its ZADD may have landed (a replica had not confirmed it)
            yield  # fail open
            return
        try:
            yield
        finally:
            try:
                await self.release_slot(lease_id)
            except REDIS_DOWN:
                pass  # the lease expires by itself

    async def _wait_for_rate(self, tokens: int, deadline_at: float | None) -> None:
        while (wait := await self.try_rate(tokens)) > 0:
            await self._sleep(wait, deadline_at, "its rate limit")

    async def _wait_until(self, attempt: Callable[[], Awaitable[bool]], deadline_at: float | None, what: str) -> None:
        delay = 0.01
        while not await attempt():
            await self._sleep(delay, deadline_at, what)
            delay = min(delay * 2, self.poll_max_s)

    async def _sleep(self, seconds: float, deadline_at: float | None, what: str) -> None:
        if deadline_at is not None and self.clock() + seconds >= deadline_at:
            raise DeadlineExceeded(f"the job's deadline passed while waiting for {self.provider}'s {what}")
        await asyncio.sleep(min(seconds, self.poll_max_s))


class LimitedAdapter:
    """An adapter whose every attempt (retries included) first passes the shared limits; the
    token reservation is the prompt plus max_tokens, as providers count it for their limits.
    ``prompt_tokens`` is the prompt's count when the route stage measured it (``Envelope.prompt_tokens``);
    without it the prompt is counted here."""

    def __init__(
        self,
        adapter: ProviderAdapter,
        limiter: SharedLimiter,
        deadline_at: float | None,
        prompt_tokens: int | None = None,
    ) -> None:
        self.name = adapter.name
        self._adapter = adapter
        self._limiter = limiter
        self._deadline_at = deadline_at
        self._prompt_tokens = prompt_tokens

    async def complete(self, request: ProviderRequest) -> ProviderReply:
        tokens = 0
        if self._limiter.limits.tpm:  # only a tokens-per-minute limit reads the count
            prompt = self._prompt_tokens
            if prompt is None:
                prompt = count_messages((m.role, m.content) for m in request.messages)
            tokens = prompt + request.max_tokens
        async with self._limiter.call(tokens, self._deadline_at):
            return await self._adapter.complete(request)
