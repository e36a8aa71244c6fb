"""Execute stage, one per provider: call the provider with retries, fall back down the router's
candidate list when a provider gives out, and hand the answer to the account stage.

A provider answer is stored in Redis (keyed by job id) before the job is acked, so a redelivery
after a crash re-uses it instead of calling (and paying) again. The write goes out beside the hand-on,
under its publish confirm, and the message is settled only once it has finished (``Handled.settle_after``): acked,
or requeued when the hand-on failed, so a fresh job does not wait a Redis round trip for it, and a redelivery
finds the answer kept as surely as when it was written first.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

from redis.asyncio import Redis

from farebox import metrics
from farebox.constants import JobRecord
from farebox.errors import REDIS_DOWN, DeadlineExceeded, InvalidRequest, ProviderExhausted, RetryableError
from farebox.providers.base import ProviderRequest
from farebox.providers.calls import ProviderCalls
from farebox.providers.retry import call_with_retries
from farebox.routing.auth import AuthPolicy, internal_sender
from farebox.schemas import Envelope, Outcome
from farebox.settings import ProviderLimits, Settings
from farebox.stages.circuits import Circuits
from farebox.stages.decode import envelope_from_internal
from farebox.stages.limits import LimitedAdapter, SharedLimiter
from farebox.stages.stage import Delivery, EnvelopeStage, Handled, envelope_publish

log = logging.getLogger("farebox.execute")

OUTCOME_TTL_S = 3600
CIRCUIT_THRESHOLD = 5  # consecutive jobs on one provider/model that exhausted their retries
PROVIDER_CIRCUIT_THRESHOLD = 10  # the same across all of a provider's models: the provider is down
CIRCUIT_COOL_DOWN_S = 30.0


def next_target(env: Envelope, failed: str, unhealthy: frozenset[str] = frozenset()) -> str | None:
    """The next candidate the router listed that has not failed yet and whose provider's circuit
    is not open."""
    assert env.route is not None
    tried = set(env.fallbacks) | {failed}
    return next(
        (
            c
            for c in env.route.candidates
            if c not in tried and c not in unhealthy and c.split("/", 1)[0] not in unhealthy
        ),
        None,
    )


class ExecuteStage(EnvelopeStage):
    name = "execute"

    def __init__(
        self,
        settings: Settings,
        provider: str,
        adapters: ProviderCalls,
        redis: Redis,
        clock: Callable[[], float] = time.time,
        auth: Callable[[], AuthPolicy] = AuthPolicy,
    ) -> None:
        self.settings = settings
        self.auth = auth  # the policy's auth in force: who may send to this stage
        self.provider = provider
        self.adapters = adapters
        self.limiter = SharedLimiter(
            redis, settings.keys, provider, settings.provider_limits.get(provider, ProviderLimits()), clock=clock
        )
        # Enough unacked messages to keep every call slot busy (I/O-bound, not CPU-bound).
        self.prefetch = max(settings.prefetch, settings.provider_concurrency)
        # Every job held is handled at once, and waits for its provider call slot, where interactive jobs go
        # first and tenants take turns by weight (farebox/stages/slots.py): the order held jobs are served in.
        self.slots = self.prefetch * settings.batch_max
        self.redis = redis
        self.clock = clock
        self.topo = settings.topology
        self.account_queue = self.topo.account
        self.health = Circuits(redis, settings.keys, clock=clock)

    def input_queues(self) -> Sequence[str]:
        queue = self.topo.execute(self.provider)
        return (self.topo.lane(queue, "interactive"), queue)

    def decode(self, delivery: Delivery) -> Envelope:
        return envelope_from_internal(delivery, internal_sender(self.auth(), self.settings.amqp_user))

    async def handle(self, env: Envelope, delivery: Delivery) -> Handled:
        if env.route is None:
            raise InvalidRequest("internal: the job reached execute without a route")
        if env.deadline_at is not None and self.clock() >= env.deadline_at:
            raise DeadlineExceeded("the job passed its deadline_s before the provider call")
        if delivery.redelivered:
            kept = await self._kept_outcome(env.record)
            if kept is not None:
                return Handled([envelope_publish(env.model_copy(update={"outcome": kept}), self.account_queue)])
        request = ProviderRequest(
            model=env.route.model,
            messages=env.job.chat,
            max_tokens=env.job.max_tokens,
            temperature=env.job.temperature,
            timeout_s=self.settings.provider_timeout_s,
        )
        started = self.clock()
        # The retry budget is per job, across every candidate it falls back to.
        budget_left = max(0, self.settings.provider_retry_budget - env.retries)
        retried = 0

        def on_retry(err: BaseException, delay: float) -> None:
            nonlocal retried
            retried += 1
            metrics.RETRIES.labels(self.provider).inc()

        try:
            async with self.adapters.adapter(env.lane, env.job.tenant) as adapter:
                limited = (
                    LimitedAdapter(adapter, self.limiter, env.deadline_at, env.prompt_tokens)
                    if self.limiter.active
                    else adapter
                )
                reply, retries = await call_with_retries(
                    limited,
                    request,
                    max_attempts=min(self.settings.provider_max_attempts, budget_left + 1),
                    deadline_at=env.deadline_at,
                    on_retry=on_retry,
                )
        except RetryableError as err:
            return await self._fall_back(env.model_copy(update={"retries": env.retries + retried}), err)
        latency = self.clock() - started
        await self.health.succeeded((env.route.target, self.provider))
        metrics.child(metrics.LATENCY, env.route.model, self.provider).observe(latency)
        outcome = Outcome(
            content=reply.content,
            provider=self.provider,
            model=env.route.model,
            usage=reply.usage,
            latency_s=round(latency, 4),
            retries=retries,
        )
        keeping = asyncio.ensure_future(self._keep_outcome(env.record, outcome))
        handed_on = envelope_publish(env.model_copy(update={"outcome": outcome}), self.account_queue)
        return Handled([handed_on], settle_after=keeping)

    async def _fall_back(self, env: Envelope, err: RetryableError) -> Handled:
        assert env.route is not None
        failed = env.route.target
        for name, threshold in ((failed, CIRCUIT_THRESHOLD), (self.provider, PROVIDER_CIRCUIT_THRESHOLD)):
            opened_at = await self.health.exhausted(name, threshold, CIRCUIT_COOL_DOWN_S)
            if opened_at is not None:
                log.warning(
                    "%s: %d jobs in a row exhausted their retries; circuit open for %.0fs",
                    name,
                    opened_at,
                    CIRCUIT_COOL_DOWN_S,
                )
        names = {*env.route.candidates, *(c.split("/", 1)[0] for c in env.route.candidates)}
        target = next_target(env, failed, await self.health.unhealthy(names))
        if target is None:
            raise ProviderExhausted(
                f"{failed} failed after {env.retries} retries in all ({err}); no healthy fallback candidate left"
            )
        provider, model = target.split("/", 1)
        route = env.route.model_copy(
            update={
                "provider": provider,
                "model": model,
                "reason": f"{env.route.reason}; fell back from {failed} ({type(err).__name__})",
            }
        )
        moved = env.model_copy(update={"route": route, "fallbacks": (*env.fallbacks, failed)})
        return Handled([envelope_publish(moved, self.topo.execute(provider))])

    async def _kept_outcome(self, record: JobRecord) -> Outcome | None:
        try:
            raw = await self.redis.get(self.settings.keys.outcome(record))
        except REDIS_DOWN:
            return None
        return Outcome.model_validate_json(raw) if raw else None

    async def _keep_outcome(self, record: JobRecord, outcome: Outcome) -> None:
        """Never raises: it ends the job's handling after its publishes are confirmed, where an error would
        publish them again; a write that failed only costs a repeat call if this exact message is redelivered."""
        try:
            await self.redis.set(self.settings.keys.outcome(record), outcome.model_dump_json(), ex=OUTCOME_TTL_S)
        except REDIS_DOWN:
            pass
        except Exception as err:  # a Redis refusing the write (out of memory, an ACL): the answer goes on
            log.warning("execute: the answer of %s was not kept (%s: %s)", record, type(err).__name__, err)
