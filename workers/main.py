"""Builds one stage worker from settings and runs it until SIGTERM/SIGINT, then drains.

``farebox worker STAGE`` lands here; ``farebox up`` runs one of these per OS process.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import httpx
import uvloop
from redis.asyncio import Redis

from farebox import health, metrics
from farebox.errors import REDIS_DOWN, InvalidRequest
from farebox.providers.batch_registry import build_batch_adapter
from farebox.providers.batch_types import TIMEOUT_S as BATCH_TIMEOUT_S
from farebox.providers.calls import ProviderCalls
from farebox.providers.registry import build_adapter, emulator_url, provider_configs
from farebox.redis_connect import connect_redis, parse_redis_url, ready_redis
from farebox.routing.priority import LANES
from farebox.routing.store import CatalogStore
from farebox.settings import Settings
from farebox.stages.account import AccountStage
from farebox.stages.batch_lane import BatchIntake, BatchLane
from farebox.stages.cache_keys import CacheRules, rules_from_policy
from farebox.stages.config_sync import ConfigSync
from farebox.stages.deadletter import DeadLetterStage
from farebox.stages.dedup import DedupStage
from farebox.stages.execute import ExecuteStage
from farebox.stages.feedback import FeedbackStage
from farebox.stages.one_trip import one_trip_hits
from farebox.stages.route import RouteStage
from farebox.stages.runtime import DRAIN_TIMEOUT_S, Worker
from farebox.stages.slots import LaneSlots
from farebox.stages.stage import StageCore

log = logging.getLogger("farebox.worker")


class Closable(Protocol):
    async def aclose(self) -> None: ...


def make_redis(settings: Settings) -> Redis:
    # The commands of concurrently handled jobs go out together (farebox/patches/redis_pipelining.py).
    # Short timeouts: a Redis outage must be noticed in about a second, not stall the pipeline.
    if not settings.redis_wait_replicas and parse_redis_url(settings.redis_url).kind == "sentinel":
        log.warning(
            "Redis through Sentinel with FAREBOX_REDIS_WAIT_REPLICAS=0: writes the master takes just before a "
            "failover can be lost (ledger entries included); set it to 1 or more"
        )
    return connect_redis(
        settings.redis_url,
        pipelining=True,
        wait_replicas=settings.redis_wait_replicas,
        wait_timeout_ms=settings.redis_wait_timeout_ms,
        socket_connect_timeout=1.0,
        socket_timeout=2.0,
        health_check_interval=10,
    )


async def refuse_keys_of_before(redis: Redis, settings: Settings) -> None:
    """Refuse to start on a Redis that holds a farebox's data of before the Redis Cluster key names and none of
    today's: stages of this version would not find its stored results (answering a job_id again, a second
    charge) nor settle its budgets. `farebox keys upgrade --apply` moves it (README, Redis keys)."""
    try:
        old, new = await asyncio.gather(
            redis.exists(settings.keys.legacy_ledger_days), redis.exists(settings.keys.ledger_days)
        )
    except REDIS_DOWN:
        return  # Redis away at start is an outage the stages ride out; the check is made at the next start
    if old and not new:
        raise InvalidRequest(
            f"Redis holds farebox data under the key names of before this version ({settings.keys.legacy_ledger_days}"
            " and the rest): stop the old pipeline, drain its queues and run `farebox keys upgrade --apply` "
            "first (or delete those keys to start afresh)"
        )


def current_cache_rules(store: CatalogStore) -> Callable[[], CacheRules]:
    """The cache rules of the policy in force, rebuilt only when a reload brings a new Policy (not
    once per job)."""
    seen: object = None
    rules: CacheRules | None = None

    def current() -> CacheRules:
        nonlocal seen, rules
        policy = store.current()[1]
        if rules is None or policy is not seen:
            seen, rules = policy, rules_from_policy(policy)
        return rules

    return current


def stages_of(stage: str, provider: str | None, settings: Settings) -> list[tuple[str, str | None]]:
    """The (stage, provider) pairs one process runs: ``all`` is every stage, execute for each provider."""
    if stage != "all":
        return [(stage, provider)]
    configured = sorted(provider_configs(os.environ, emulator_url=emulator_url(settings)))
    return [("dedup", None), ("route", None), *(("execute", p) for p in configured), ("account", None), ("batch", None)]


def stage_cores(
    settings: Settings, stage: str, provider: str | None, store: CatalogStore, redis: Redis, calls: list[Closable]
) -> list[StageCore]:
    """The cores of one stage (``account`` also answers dead letters and records feedback); an execute or batch
    stage's provider clients are added to ``calls``, for the caller to close."""

    def weight(tenant: str) -> float:  # a tenant's share of its lane, as the policy in force says
        return store.current()[1].priority.weight(tenant)

    if stage == "dedup":
        account = AccountStage(settings, store, redis, stage="dedup")  # hits and replays are answered here
        return [
            DedupStage(
                settings,
                redis,
                current_cache_rules(store),
                auth=lambda: store.current()[1].auth,
                lanes=lambda: store.current()[1].priority,
                batch=lambda: store.current()[1].batch,
                finish=account.finish,
                one_trip=one_trip_hits(settings, redis, account),
            )
        ]
    if stage == "route":
        return [RouteStage(settings, store, redis)]
    if stage == "execute":
        if not provider:
            raise SystemExit("farebox worker execute needs --provider NAME")
        configs = provider_configs(os.environ, emulator_url=emulator_url(settings))
        if provider not in configs:
            raise SystemExit(f"unknown provider {provider!r}; configured: {', '.join(sorted(configs))}")
        config = configs[provider]
        slots = LaneSlots(
            settings.provider_concurrency,
            settings.interactive_reserve,
            weight,
            background_every=settings.background_every,
        )
        calls.append(
            ProviderCalls(
                lambda client: build_adapter(config, client),
                max_in_flight=settings.provider_concurrency,
                timeout_s=settings.provider_timeout_s,
                slot=slots.slot,
                max_connections=settings.provider_concurrency + settings.interactive_reserve,
            )
        )
        execute_calls = calls[-1]
        assert isinstance(execute_calls, ProviderCalls)
        return [ExecuteStage(settings, provider, execute_calls, redis, auth=lambda: store.current()[1].auth)]
    if stage == "batch":
        return batch_cores(settings, provider, store, redis, calls)
    if stage == "account":
        return [
            AccountStage(settings, store, redis),
            DeadLetterStage(settings, redis, auth=lambda: store.current()[1].auth),
            FeedbackStage(settings, store, redis),
        ]
    raise SystemExit(f"unknown stage {stage!r}; one of dedup, route, execute, account, batch, all")


def batch_cores(
    settings: Settings, provider: str | None, store: CatalogStore, redis: Redis, calls: list[Closable]
) -> list[StageCore]:
    """The batch lane of ``provider``, or of every configured provider with a Batch API."""
    configs = provider_configs(os.environ, emulator_url=emulator_url(settings))
    if provider is not None and provider not in configs:
        raise SystemExit(f"unknown provider {provider!r}; configured: {', '.join(sorted(configs))}")
    cores: list[StageCore] = []
    for name in [provider] if provider is not None else sorted(configs):
        client = httpx.AsyncClient(timeout=BATCH_TIMEOUT_S)
        calls.append(client)
        adapter = build_batch_adapter(configs[name], client)
        if adapter is None:
            if provider is not None:
                raise SystemExit(f"provider {provider!r} has no Batch API; its jobs stay on the synchronous lane")
            continue
        lane = BatchLane(settings, name, adapter, redis, policy=lambda: store.current()[1].batch)
        cores.append(BatchIntake(lane, auth=lambda: store.current()[1].auth))
    return cores


def settle_collector(settings: Settings) -> None:
    """Tune this process's garbage collector for a stage's life: what is there once started stays for good, so it
    is collected once and frozen (no later collection walks it), and young objects are collected less often (most
    go by reference counting anyway)."""
    if settings.gc_gen0_threshold:
        _, gen1, gen2 = gc.get_threshold()
        gc.set_threshold(settings.gc_gen0_threshold, gen1, gen2)
    if settings.gc_freeze:
        gc.collect()
        gc.freeze()


async def run_stage(
    settings: Settings,
    stage: str,
    *,
    provider: str | None = None,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[], Awaitable[None]] | None = None,
    lanes: tuple[str, ...] = LANES,
    own_process: bool = False,
) -> None:
    """Run one stage (or ``all``) until ``stop`` is set, serving the queues of ``lanes``. ``own_process``: the
    process is the stage's alone (``settle_collector`` once the stage is built)."""
    stop = stop or asyncio.Event()
    redis = make_redis(settings)
    try:
        await ready_redis(redis)
        # The policy and catalog as last pushed to Redis, written to files the hot reload follows, or the files.
        synced = await ConfigSync.start(redis, settings.keys) if settings.config_source == "redis" else None
        store = CatalogStore(*(synced.paths if synced else (settings.catalog, settings.policy)))
    except BaseException:
        await redis.aclose()
        raise
    catalog, _ = store.current()
    providers = catalog.providers()
    calls: list[Closable] = []
    cores: list[StageCore] = []
    for one, one_provider in stages_of(stage, provider, settings):
        cores += stage_cores(settings, one, one_provider, store, redis, calls)
    # A worker of one lane serves only its queues; cores with none there (feedback, dead letters) stay out.
    workers = [w for w in (Worker(settings, core, providers, lanes=lanes) for core in cores) if w.queues]
    if own_process:
        settle_collector(settings)
    probes = health.watch(redis.ping, [w.readiness for w in workers])  # /livez and /readyz (farebox/health.py)
    tasks: list[asyncio.Task[None]] = []
    try:
        await refuse_keys_of_before(redis, settings)  # the probes report meanwhile (a Redis that hangs shows)
        tasks += [asyncio.create_task(w.run(stop)) for w in workers]
        if synced is not None:
            tasks.append(asyncio.create_task(synced.run(stop)))
        if on_ready is not None:
            all_ready = asyncio.ensure_future(asyncio.gather(*(w.ready.wait() for w in workers)))
            pending: list[asyncio.Future[Any]] = [all_ready, *tasks]
            await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if all_ready.done():
                await on_ready()
            else:
                all_ready.cancel()
                await asyncio.gather(all_ready, return_exceptions=True)  # retrieved: no "never retrieved" log
        await asyncio.gather(*tasks)
    finally:
        stop.set()
        await wind_down(tasks)
        await probes.aclose()
        for c in calls:
            await c.aclose()
        await redis.aclose()
        if synced is not None:
            synced.close()


async def wind_down(tasks: list[asyncio.Task[None]]) -> None:
    """Let the workers drain once ``stop`` is set (one failing stops the others), then cancel any still
    starting against an absent broker, so that the provider clients and Redis close after every worker."""
    if not tasks:
        return
    _, late = await asyncio.wait(tasks, timeout=DRAIN_TIMEOUT_S + 10)
    for task in late:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def worker_main(settings: Settings, stage: str, provider: str | None, lanes: tuple[str, ...] = LANES) -> int:
    if settings.metrics_port:
        with contextlib.suppress(OSError):
            metrics.serve_metrics(settings.metrics_port, settings.metrics_host)
            log.info("stage %s: metrics and probes on %s:%d", stage, settings.metrics_host, settings.metrics_port)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        # Removing a loop's handler installs Python's default one, not what was there: a caller that goes on (a
        # test run under nohup, which ignores SIGINT) gets its own handlers back from here.
        saved = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
        try:
            for sig in STOP_SIGNALS:
                loop.add_signal_handler(sig, stop.set)
            await run_stage(settings, stage, provider=provider, stop=stop, lanes=lanes, own_process=True)
        finally:
            for sig, handler in saved.items():
                loop.remove_signal_handler(sig)  # False for one never added: nothing to do
                if handler is not None:  # None: a handler set from C, which Python cannot put back
                    with contextlib.suppress(OSError, ValueError):  # a signal no handler may take
                        signal.signal(sig, handler)

    # uvloop's event loop and transports cost less CPU per message than asyncio's own.
    uvloop.run(main())
    return 0
