"""Account stage: price the job, record it once in the ledger, fill the cache, release the
coalescing lease and publish the caller's result.

Order: ledger (atomic, idempotent) -> publish result -> ack. A crash between any two steps
redelivers the message; the ledger script then finds the job recorded and the stored result is
published again (a repeat with the same job_id, never a second charge). With Redis away the
result is published first and the ledger write is retried until Redis returns, before the ack.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

from redis.asyncio import Redis

from catalog.store import CatalogStore
from farebox import metrics
from farebox.errors import FareboxError
from farebox.settings import Settings
from schemas import Envelope, JobResult
from workers.decode import envelope_from_internal
from workers.ledger import CacheFill, Ledger
from workers.redis_health import REDIS_DOWN, RedisHealth
from workers.results import build_result
from workers.runtime import Delivery, Handled, Publish

log = logging.getLogger("farebox.account")

LEDGER_RETRY_MAX_S = 5.0


def result_publish(result_json: bytes, reply_to: str | None, correlation_id: str | None,
                   job_id: str) -> list[Publish]:
    if not reply_to:
        return []
    return [Publish(routing_key=reply_to, body=result_json, correlation_id=correlation_id,
                    message_id=job_id, caller_reply=True)]


def observe(result: JobResult) -> None:
    """Per-job metrics, counted once per recorded job (not on replays)."""
    model, provider = result.model or "-", result.provider or "-"
    if result.status == "ok":
        metrics.REQUESTS.labels(model, provider, "false" if result.cache == "miss" else "true").inc()
        metrics.COST.labels(model, provider).inc(result.cost_usd)
        if result.cache == "miss":
            metrics.TOKENS_IN.labels(model).inc(result.usage.input_tokens)
            metrics.TOKENS_OUT.labels(model).inc(result.usage.output_tokens)
        metrics.SAVINGS.inc(max(0.0, result.baseline_cost_usd - result.cost_usd))
    else:
        metrics.ERRORS.labels("account", result.error.code if result.error else "internal").inc()


class AccountStage:
    name = "account"

    def __init__(self, settings: Settings, store: CatalogStore, redis: Redis,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.store = store
        self.clock = clock
        self.ledger = Ledger(redis, settings.keys, result_ttl_s=settings.result_ttl_s)
        self.health = RedisHealth(self.name)

    def input_queues(self) -> Sequence[str]:
        return (self.settings.topology.account,)

    def decode(self, delivery: Delivery) -> Envelope:
        return envelope_from_internal(delivery)

    def fail(self, item: object, err: FareboxError) -> Handled:
        # Nothing after this stage can carry an error; log it and drop the message.
        log.error("account: permanent failure recording a job: %s", err)
        return Handled([])

    async def handle(self, env: Envelope, delivery: Delivery) -> Handled:
        catalog, policy = self.store.current()
        result = build_result(env, catalog, policy, now=self.clock())
        return await record_and_reply(self.ledger, self.health, result, self._cache_fill(env, result),
                                      env.coalesce_key, env.reply_to, env.correlation_id, self.clock)

    def _cache_fill(self, env: Envelope, result: JobResult) -> CacheFill | None:
        if env.cache_key is None or result.status != "ok" or env.cache_status != "miss" or env.outcome is None:
            return None
        ttl = env.job.cache.ttl_s if env.job.cache.ttl_s is not None else self.settings.cache_ttl_s
        if ttl <= 0:
            return None
        return CacheFill(env.cache_key, env.outcome.model_dump_json(), ttl)


async def record_and_reply(ledger: Ledger, health: RedisHealth, result: JobResult, cache: CacheFill | None,
                           lease_key: str | None, reply_to: str | None, correlation_id: str | None,
                           clock: Callable[[], float]) -> Handled:
    body = result.model_dump_json().encode()
    try:
        existing = await ledger.record(result, ts=clock(), cache=cache, lease_key=lease_key)
    except REDIS_DOWN as err:
        health.down(err)

        async def settle_ledger() -> None:
            delay = 0.2
            while True:
                await asyncio.sleep(delay)
                try:
                    if await ledger.record(result, ts=clock(), cache=cache, lease_key=lease_key) is None:
                        observe(result)
                    health.ok()
                    return
                except REDIS_DOWN:
                    delay = min(delay * 2, LEDGER_RETRY_MAX_S)

        return Handled(result_publish(body, reply_to, correlation_id, result.job_id), after_publish=settle_ledger)
    health.ok()
    if existing is not None:
        metrics.MESSAGES.labels("account", "replayed").inc()
        return Handled(result_publish(existing, reply_to, correlation_id, result.job_id))
    observe(result)
    return Handled(result_publish(body, reply_to, correlation_id, result.job_id))
