"""Builds one stage worker from settings and runs it until SIGTERM/SIGINT, then drains.

``farebox worker STAGE`` lands here; ``farebox up`` runs one of these per OS process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import uvloop
from redis.asyncio import Redis

from farebox import metrics
from farebox.patches.redis_pipelining import PipeliningRedis
from farebox.providers.calls import ProviderCalls
from farebox.providers.registry import build_adapter, emulator_url, provider_configs
from farebox.routing.store import CatalogStore
from farebox.settings import Settings
from farebox.stages.account import AccountStage
from farebox.stages.cache_keys import CacheRules, rules_from_policy
from farebox.stages.deadletter import DeadLetterStage
from farebox.stages.dedup import DedupStage
from farebox.stages.execute import ExecuteStage
from farebox.stages.feedback import FeedbackStage
from farebox.stages.route import RouteStage
from farebox.stages.runtime import Worker
from farebox.stages.stage import StageCore

log = logging.getLogger("farebox.worker")


def make_redis(settings: Settings) -> Redis:
    # The commands of concurrently handled jobs go out together (farebox/patches/redis_pipelining.py).
    # Short timeouts: a Redis outage must be noticed in about a second, not stall the pipeline.
    return PipeliningRedis.from_url(
        settings.redis_url, socket_connect_timeout=1.0, socket_timeout=2.0, health_check_interval=10
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


async def run_stage(
    settings: Settings,
    stage: str,
    *,
    provider: str | None = None,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Run one stage (``account`` also answers dead letters and records feedback) until ``stop`` is set."""
    stop = stop or asyncio.Event()
    store = CatalogStore(settings.catalog, settings.policy)
    catalog, _ = store.current()
    providers = catalog.providers()
    redis = make_redis(settings)
    calls: ProviderCalls | None = None
    cores: list[StageCore]
    if stage == "dedup":
        cores = [DedupStage(settings, redis, current_cache_rules(store), auth=lambda: store.current()[1].auth)]
    elif stage == "route":
        cores = [RouteStage(settings, store, redis)]
    elif stage == "execute":
        if not provider:
            raise SystemExit("farebox worker execute needs --provider NAME")
        configs = provider_configs(os.environ, emulator_url=emulator_url(settings))
        if provider not in configs:
            raise SystemExit(f"unknown provider {provider!r}; configured: {', '.join(sorted(configs))}")
        config = configs[provider]
        calls = ProviderCalls(
            lambda client: build_adapter(config, client),
            max_in_flight=settings.provider_concurrency,
            timeout_s=settings.provider_timeout_s,
        )
        cores = [ExecuteStage(settings, provider, calls, redis)]
    elif stage == "account":
        cores = [
            AccountStage(settings, store, redis),
            DeadLetterStage(settings, redis),
            FeedbackStage(settings, store, redis),
        ]
    else:
        raise SystemExit(f"unknown stage {stage!r}; one of dedup, route, execute, account")
    workers = [Worker(settings, core, providers) for core in cores]
    try:
        tasks = [asyncio.create_task(w.run(stop)) for w in workers]
        if on_ready is not None:
            all_ready = asyncio.ensure_future(asyncio.gather(*(w.ready.wait() for w in workers)))
            pending: list[asyncio.Future[Any]] = [all_ready, *tasks]
            await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if all_ready.done():
                await on_ready()
            else:
                all_ready.cancel()
        await asyncio.gather(*tasks)
    finally:
        stop.set()
        if calls is not None:
            await calls.aclose()
        await redis.aclose()


def worker_main(settings: Settings, stage: str, provider: str | None) -> int:
    if settings.metrics_port:
        with contextlib.suppress(OSError):
            metrics.serve_metrics(settings.metrics_port, settings.metrics_host)
            log.info("stage %s: metrics on %s:%d/metrics", stage, settings.metrics_host, settings.metrics_port)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run_stage(settings, stage, provider=provider, stop=stop)

    # uvloop's event loop and transports cost less CPU per message than asyncio's own.
    uvloop.run(main())
    return 0
