"""Account stage: price the job, record it once in the ledger, fill the cache, release the
coalescing lease and publish the caller's result.

Order: ledger (atomic, idempotent) -> publish result -> ack. A crash between any two steps
redelivers the message; the ledger script then finds the job recorded and the stored result is
published again (a repeat with the same job_id, never a second charge). With Redis away the
result is published first and the ledger write is retried until Redis returns, before the ack.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial

from redis.asyncio import Redis

from farebox import metrics
from farebox.errors import REDIS_DOWN, FareboxError
from farebox.routing.auth import internal_sender
from farebox.routing.policy import Policy
from farebox.routing.store import CatalogStore
from farebox.schemas import BudgetHold, Envelope, JobResult
from farebox.settings import Settings
from farebox.stages.budgets import BudgetAlerts
from farebox.stages.cache_keys import prompt_hash
from farebox.stages.decode import envelope_from_internal
from farebox.stages.ledger import CacheFill, KeptPrompt, Ledger, Recorded
from farebox.stages.lua import one_server
from farebox.stages.redis_health import RedisHealth
from farebox.stages.results import build_result, sync_cost_usd
from farebox.stages.shadow import Shadowing
from farebox.stages.stage import Delivery, Handled, Publish

log = logging.getLogger("farebox.account")

LEDGER_RETRY_MAX_S = 5.0


def result_publish(result_json: bytes, reply_to: str | None, correlation_id: str | None, job_id: str) -> list[Publish]:
    if not reply_to:
        return []
    return [
        Publish(
            routing_key=reply_to, body=result_json, correlation_id=correlation_id, message_id=job_id, caller_reply=True
        )
    ]


def observe(result: JobResult, named: frozenset[str] = frozenset()) -> None:
    """Per-job metrics, counted once per recorded job (not on replays). ``named``: the tenants the policy
    names, the only ones with a tenant label of their own."""
    model, provider = result.model or "-", result.provider or "-"
    if result.status == "ok":
        metrics.child(metrics.REQUESTS, model, provider, "false" if result.cache == "miss" else "true").inc()
        metrics.child(metrics.COST, model, provider).inc(result.cost_usd)
        metrics.child(metrics.TENANT_COST, metrics.tenant_label(result.tenant, named)).inc(result.cost_usd)
        if result.cache == "miss":
            metrics.child(metrics.TOKENS_IN, model).inc(result.usage.input_tokens)
            metrics.child(metrics.TOKENS_OUT, model).inc(result.usage.output_tokens)
        metrics.SAVINGS.inc(max(0.0, result.baseline_cost_usd - result.cost_usd))
    # Labels from the policy: the arm was one of its experiments' when the job was routed.
    strategy = result.route.strategy if result.route else None
    if strategy is not None:
        metrics.child(metrics.EXPERIMENT_JOBS, strategy.experiment, strategy.arm).inc()
        metrics.child(metrics.EXPERIMENT_COST, strategy.experiment, strategy.arm).inc(result.cost_usd)
    if result.status != "ok":
        metrics.ERRORS.labels("account", result.error.code if result.error else "internal").inc()


class AccountStage:
    name = "account"

    def __init__(
        self,
        settings: Settings,
        store: CatalogStore,
        redis: Redis,
        clock: Callable[[], float] = time.time,
        stage: str = "account",  # the stage whose process records (dedup's, for hits and replays): metric labels
    ) -> None:
        self.settings = settings
        self.store = store
        self.clock = clock
        self.recorder = Recorder(settings, redis, stage, clock, policy=lambda: store.current_unit()[1])
        self.shadow = Shadowing(settings, redis, clock)

    def input_queues(self) -> Sequence[str]:
        topo = self.settings.topology
        return (topo.lane(topo.account, "interactive"), topo.account)

    def decode(self, delivery: Delivery) -> Envelope:
        return envelope_from_internal(delivery, internal_sender(self.store.current()[1].auth, self.settings.amqp_user))

    def fail(self, item: object, err: FareboxError) -> Handled:
        # Nothing after this stage can carry an error; log it and drop the message.
        log.error("account: permanent failure recording a job: %s", err)
        return Handled([])

    async def handle(self, env: Envelope, delivery: Delivery) -> Handled:
        return await self.finish(env)

    async def finish(self, env: Envelope) -> Handled:
        """Price, record once and answer ``env``: for this stage's input, and for the dedup stage, which answers
        cache hits and job_id replays itself (the same result, entry and replies as through this stage)."""
        return await self.record_prepared(self.prepare(env))

    async def record_prepared(self, ready: Prepared) -> Handled:
        """Record ``ready`` once and answer it with its result as prepared (a repeat of the write finds that very
        result stored, and replays it)."""
        self._log(ready)
        return await self.recorder.record_and_reply(ready.recording, then=ready.then, result_json=ready.result_json)

    async def recorded(self, ready: Prepared) -> Handled:
        """The replies of ``ready``, recorded fresh by another script: a cache hit recorded in the same round trip
        as its lookup (farebox/stages/one_trip.py)."""
        self._log(ready)
        return await self.recorder.answered(ready.recording, ready.result_json, (), ready.then)

    def prepare(self, env: Envelope) -> Prepared:
        """``env``'s result and everything its recording needs, before anything is written."""
        unit = self.store.current_unit()
        catalog, policy, _ = unit
        result = build_result(env, catalog, policy, now=self.clock())
        if env.evaluation is not None:
            then: Callable[[], Awaitable[list[Publish]]] | None = partial(self.shadow.graded, env, result, unit)
        elif policy.experiments:
            then = partial(self.shadow.launch, env, result, unit)
        else:
            then = None
        recording = Recording(
            result=result,
            cache=self._cache_fill(env, result),
            lease_key=env.coalesce_key,
            reply_to=env.reply_to,
            correlation_id=env.correlation_id,
            budgets=env.budgets,
            prompt=kept_prompt(env, policy),
            evaluation=env.evaluation.kind if env.evaluation else None,
            sync_cost_usd=sync_cost_usd(env, catalog),
        )
        return Prepared(env, recording, then, result.model_dump_json())

    def _log(self, ready: Prepared) -> None:
        """One structured line per job; the prompt only as a hash."""
        result = ready.recording.result
        log.info(
            "job %s %s",
            result.job_id,
            result.status,
            extra={
                "job_id": result.job_id,
                "tenant": result.tenant,
                "stage": self.name,
                "model": result.model,
                "provider": result.provider,
                "cost_usd": result.cost_usd,
                "cache": result.cache,
                "latency_ms": result.latency_ms,
                "retries": result.retries,
                "prompt_hash": prompt_hash(ready.env.job),
                "code": result.error.code if result.error else None,
            },
        )

    def _cache_fill(self, env: Envelope, result: JobResult) -> CacheFill | None:
        if env.cache_key is None or result.status != "ok" or env.cache_status != "miss" or env.outcome is None:
            return None
        if env.route is not None and env.route.strategy is not None:
            # An experiment arm's answer (a fixed-model arm's, a worse-on-purpose one's) must not be served to
            # jobs outside that arm; the cache key does not name the arm.
            return None
        ttl = env.job.cache.ttl_s if env.job.cache.ttl_s is not None else self.settings.cache_ttl_s
        if ttl <= 0:
            return None
        return CacheFill(env.cache_key, env.outcome.model_dump_json(), ttl)


def kept_prompt(env: Envelope, policy: Policy) -> KeptPrompt | None:
    """An experiment job's messages as sent (redacted when the policy redacts), for `farebox feedback export`,
    kept as long as its experiment says (7 days when the experiment has since left the policy)."""
    strategy = env.route.strategy if env.route else None
    if strategy is None:
        return None
    experiment = policy.experiment(strategy.experiment)
    ttl = experiment.keep_prompts_s if experiment is not None else 7 * 86_400
    if ttl <= 0:
        return None
    messages = [{"role": m.role, "content": m.content} for m in env.job.chat]
    return KeptPrompt(json.dumps(messages, ensure_ascii=False, separators=(",", ":")), ttl)


@dataclass(frozen=True)
class Recording:
    """Everything the ledger script needs for one finished job."""

    result: JobResult
    cache: CacheFill | None = None
    lease_key: str | None = None
    reply_to: str | None = None
    correlation_id: str | None = None
    budgets: tuple[BudgetHold, ...] = ()
    prompt: KeptPrompt | None = None
    evaluation: str | None = None  # an evaluation job's kind (shadow grading): its cost is evaluation spend
    sync_cost_usd: float | None = None  # a batch job's cost at its model's sync price (the ledger's batch_sync_nusd)


@dataclass(frozen=True)
class Prepared:
    """A job's recording built ahead of the write, with what follows it and the result as sent."""

    env: Envelope
    recording: Recording
    then: Callable[[], Awaitable[list[Publish]]] | None
    result_json: str


class Recorder:
    """Ledger write (once), result publish, budget alerts: shared by the account and dead-letter stages."""

    def __init__(
        self,
        settings: Settings,
        redis: Redis,
        stage: str,
        clock: Callable[[], float],
        policy: Callable[[], Policy] | None = None,  # for metric labels; without it no tenant is named
    ) -> None:
        self.ledger = Ledger(
            redis,
            settings.keys,
            result_ttl_s=settings.result_ttl_s,
            entry_ttl_s=settings.ledger_entry_keep_s,
            days_kept=settings.ledger_days_kept,
            one_server=one_server(redis),
        )
        self.alerts = BudgetAlerts(redis, settings, policy)
        self.policy = policy
        self.health = RedisHealth(stage)
        self.stage = stage
        self.clock = clock

    async def record_and_reply(
        self,
        rec: Recording,
        then: Callable[[], Awaitable[list[Publish]]] | None = None,
        result_json: str | None = None,
    ) -> Handled:
        """Record ``rec`` once and answer its caller; ``then`` gives what else to publish once it is freshly
        recorded (never for a replay, and not while Redis is away). ``result_json``: the result serialised."""
        result = rec.result
        result_json = result_json or result.model_dump_json()
        try:
            recorded = await self._record(rec, result_json)
        except REDIS_DOWN as err:
            self.health.down(err)

            async def settle_ledger() -> None:
                delay = 0.2
                while True:
                    await asyncio.sleep(delay)
                    try:
                        if (await self._record(rec, result_json)).existing is None:
                            observe(result, self._named())
                        self.health.ok()
                        return
                    except REDIS_DOWN:
                        delay = min(delay * 2, LEDGER_RETRY_MAX_S)

            reply = result_publish(result_json.encode(), rec.reply_to, rec.correlation_id, result.job_id)
            return Handled(reply, after_publish=settle_ledger)
        self.health.ok()
        if recorded.existing is not None:
            metrics.MESSAGES.labels(self.stage, "replayed").inc()
            return Handled(result_publish(recorded.existing, rec.reply_to, rec.correlation_id, result.job_id))
        return await self.answered(rec, result_json, recorded.spent_usd, then)

    async def answered(
        self,
        rec: Recording,
        result_json: str,
        spent_usd: tuple[float, ...],
        then: Callable[[], Awaitable[list[Publish]]] | None,
    ) -> Handled:
        """The replies of a job recorded fresh just now (``spent_usd``: its budgets' spend after it): the result,
        the budget alerts and what follows."""
        result = rec.result
        observe(result, self._named())
        alerts = await self.alerts.check(rec.budgets, spent_usd) if rec.budgets else []
        more = await self._then(then, result.job_id)
        reply = result_publish(result_json.encode(), rec.reply_to, rec.correlation_id, result.job_id)
        return Handled([*reply, *alerts, *more])

    def _named(self) -> frozenset[str]:
        return self.policy().named_tenants if self.policy is not None else frozenset()

    async def _then(self, then: Callable[[], Awaitable[list[Publish]]] | None, job_id: str) -> list[Publish]:
        # What follows a recording (shadow grading) is best effort: the job is recorded and answered either way.
        if then is None:
            return []
        try:
            return await then()
        except REDIS_DOWN as err:
            log.warning("account: follow-up of job %s skipped, Redis away (%s)", job_id, type(err).__name__)
            return []

    async def _record(self, rec: Recording, result_json: str) -> Recorded:
        return await self.ledger.record(
            rec.result,
            ts=self.clock(),
            cache=rec.cache,
            lease_key=rec.lease_key,
            budgets=rec.budgets,
            result_json=result_json,
            prompt=rec.prompt,
            evaluation=rec.evaluation,
            sync_cost_usd=rec.sync_cost_usd,
        )
