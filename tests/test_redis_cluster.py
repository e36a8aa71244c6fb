"""The whole pipeline on a 3-master Redis Cluster this module starts (tests/support/redis_cluster.py), with
``FAREBOX_REDIS_URL=redis+cluster://...``: the delivery, cache, coalescing and budget tests of the single
server, run as they are on the cluster, and ``farebox report`` totals. On a cluster a script whose keys sit in
two slots fails (CROSSSLOT), so these runs prove the hash tags of farebox/constants.py in the real thing.
The cluster not starting is a failure, never a skip."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from farebox.errors import REDIS_DOWN
from farebox.redis_connect import connect_redis, ready_redis
from farebox.settings import Settings
from tests import test_budgets, test_cache_modes, test_coalescing, test_ledger_folds, test_pipeline
from tests.conftest import EmulatorStats
from tests.support.pipeline import InProcessPipeline, ledger_entries, report_json
from tests.support.redis_cluster import RedisClusterNodes, redis_cluster


@pytest.fixture(scope="module")
def cluster_nodes() -> Iterator[RedisClusterNodes]:
    with redis_cluster(3) as nodes:
        yield nodes


@pytest.fixture
def on_cluster(settings: Settings, cluster_nodes: RedisClusterNodes, emulator: str) -> Settings:
    """The test's settings (its own namespace and prefix), with the cluster as its Redis."""
    return settings.model_copy(update={"redis_url": cluster_nodes.url, "emulator_url": emulator})


@pytest.fixture
async def cluster_redis(on_cluster: Settings) -> AsyncIterator[Redis]:
    client = connect_redis(on_cluster.redis_url)
    assert isinstance(client, RedisCluster)
    yield client
    await client.aclose()


@pytest.fixture
async def cluster_pipeline(on_cluster: Settings) -> AsyncIterator[InProcessPipeline]:
    p = InProcessPipeline(on_cluster)
    yield p
    await p.close()


async def test_the_cluster_has_three_masters_and_every_slot(cluster_redis: Redis) -> None:
    info = await cluster_redis.cluster_info()  # type: ignore[attr-defined]
    assert info["cluster_state"] == "ok" and int(info["cluster_slots_assigned"]) == 16384
    assert int(info["cluster_size"]) == 3


async def test_jobs_end_in_one_result_and_one_ledger_entry(
    cluster_pipeline: InProcessPipeline, cluster_redis: Redis, on_cluster: Settings, emulator_stats: EmulatorStats
) -> None:
    await test_pipeline.test_jobs_flow_through_every_stage(cluster_pipeline, cluster_redis, on_cluster, emulator_stats)


async def test_repeats_are_served_from_the_cache(
    cluster_pipeline: InProcessPipeline, emulator_stats: EmulatorStats
) -> None:
    await test_pipeline.test_repeat_is_served_from_cache(cluster_pipeline, emulator_stats)


async def test_a_job_id_sent_twice_is_one_call_and_one_charge(
    cluster_pipeline: InProcessPipeline, cluster_redis: Redis, on_cluster: Settings, emulator_stats: EmulatorStats
) -> None:
    await test_pipeline.test_same_job_id_is_one_call_and_one_charge(
        cluster_pipeline, cluster_redis, on_cluster, emulator_stats
    )


async def test_identical_jobs_coalesce_into_one_call(
    cluster_pipeline: InProcessPipeline, cluster_redis: Redis, on_cluster: Settings, emulator_stats: EmulatorStats
) -> None:
    await test_coalescing.test_200_identical_jobs_make_one_provider_call(
        cluster_pipeline, cluster_redis, on_cluster, emulator_stats
    )


async def test_cache_modes_bypass_and_refresh(
    cluster_pipeline: InProcessPipeline, emulator_stats: EmulatorStats
) -> None:
    await test_cache_modes.test_bypass_and_refresh(cluster_pipeline, emulator_stats)


async def test_per_job_cache_ttl_and_errors_never_cached(
    cluster_pipeline: InProcessPipeline, cluster_redis: Redis, on_cluster: Settings, emulator_stats: EmulatorStats
) -> None:
    await test_cache_modes.test_per_job_ttl_and_errors_never_cached(
        cluster_pipeline, cluster_redis, on_cluster, emulator_stats
    )


async def test_budgets_alert_then_reject(on_cluster: Settings, emulator: str, tmp_path: Path) -> None:
    await test_budgets.test_tiny_budget_alerts_once_each_then_rejects(on_cluster, emulator, tmp_path)


async def test_a_crash_between_the_ledger_record_and_its_folds_is_repaired(
    cluster_redis: Redis, on_cluster: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    await test_ledger_folds.test_a_crash_between_the_record_and_the_folds_is_repaired_by_the_redelivery(
        cluster_redis, on_cluster, monkeypatch
    )


async def test_a_redelivered_ledger_record_counts_nothing_twice(cluster_redis: Redis, on_cluster: Settings) -> None:
    await test_ledger_folds.test_a_redelivery_after_the_folds_counts_nothing_twice(cluster_redis, on_cluster)


async def test_feedback_is_folded_once_across_a_crash(
    cluster_redis: Redis, on_cluster: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    await test_ledger_folds.test_feedback_after_a_crash_between_attach_and_fold_is_folded_once(
        cluster_redis, on_cluster, monkeypatch
    )


async def test_report_totals_equal_the_results(
    cluster_pipeline: InProcessPipeline, cluster_redis: Redis, on_cluster: Settings
) -> None:
    """Jobs with repeats, then `farebox report` (a process, reading the cluster): totals equal the results."""
    await cluster_pipeline.start()
    prompts = [f"Report item {i % 12}" for i in range(40)]  # 12 distinct, 28 repeats
    jobs = [{"prompt": p, "tenant": "acme", "job_id": str(uuid.uuid4()), "max_tokens": 40} for p in prompts]
    async with cluster_pipeline.client() as client:
        results = [r async for r in client.stream(jobs, max_in_flight=8)]
    assert len(results) == 40 and all(r.status == "ok" for r in results)
    assert len(await ledger_entries(cluster_redis, on_cluster)) == 40
    total = (await report_json(on_cluster, "--by", "tenant,model"))["total"]
    assert total["jobs"] == 40
    assert abs(total["cost_usd"] - sum(r.cost_usd for r in results)) < 1e-6
    assert total["cache_hits"] == sum(1 for r in results if r.cache != "miss") == 28


async def test_a_master_away_is_redis_away_to_the_stages() -> None:
    """With one master of three stopped, commands on every node fail (CLUSTERDOWN once the cluster notices,
    or no connection to the stopped one): each error is one the stages take for Redis being away (REDIS_DOWN:
    dedup serves without the cache, account holds its ledger writes), never one that crashes a job."""
    with redis_cluster(3, node_timeout_ms=1000) as nodes:
        client = connect_redis(nodes.url, socket_timeout=1.0, socket_connect_timeout=0.5)
        await ready_redis(client)
        try:
            keys = [f"fb:away:{i}" for i in range(30)]  # some on every node
            await asyncio.gather(*(client.set(k, "1") for k in keys))
            stop = ["redis-cli", "-p", str(nodes.ports[0]), "shutdown", "nosave"]
            await asyncio.to_thread(subprocess.run, stop, check=False, timeout=10)
            seen: list[BaseException] = []
            for _ in range(40):  # until the surviving nodes say CLUSTERDOWN too (cluster-node-timeout)
                outcomes = await asyncio.gather(*(client.get(k) for k in keys), return_exceptions=True)
                seen += [o for o in outcomes if isinstance(o, BaseException)]
                if len([o for o in outcomes if isinstance(o, BaseException)]) == len(keys):
                    break
                await asyncio.sleep(0.5)
            assert seen
            assert all(isinstance(err, REDIS_DOWN) for err in seen), {type(e).__name__ for e in seen}
        finally:
            await client.aclose()
