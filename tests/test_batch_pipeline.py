"""The batch lane end to end: the real RabbitMQ, Redis and the emulator's batch APIs over HTTP, the pipeline's
stages in process or as OS processes (kill -9 of the batch worker). Every job is answered once, recorded once
and priced at the batch rate."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from farebox.emulator.knobs import EmulatorKnobs
from farebox.emulator.server import running
from farebox.routing.catalog import cost_usd, load_catalog
from farebox.schemas import JobResult
from farebox.settings import CATALOG_DIR, Settings
from farebox.stages.batch_store import BatchStore
from tests.support.pipeline import ALL_STAGES, InProcessPipeline, ProcessPipeline, drop_namespace, ledger_entries


def batch_job(i: int, **kw: object) -> dict[str, object]:
    return {
        "prompt": f"Summarize support ticket {i}: the printer is offline again",
        "tenant": "acme",
        "job_id": str(uuid.uuid4()),
        "task": "summarize",
        "lane": "batch",
        "max_tokens": 40,
        **kw,
    }


def batch_policy(tmp_path: Path, **batch: Any) -> Path:
    policy = json.loads((CATALOG_DIR / "policy.json").read_text())
    policy["router"] = {"kind": "rules"}
    policy["batch"] = {"linger_s": 0.5, **batch}
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(policy))
    return path


@contextlib.asynccontextmanager
async def batch_emulator(settings: Settings, tmp_path: Path, **batch: Any) -> AsyncIterator[tuple[Settings, str]]:
    async with running(EmulatorKnobs(port=0, batch_delay_s=0.5)) as url:
        yield settings.model_copy(update={"emulator_url": url, "policy": batch_policy(tmp_path, **batch)}), url


async def created(url: str, what: str = "created") -> int:
    """Batches the emulator was asked to create (``what="requests"``: requests in them), of every provider."""
    async with httpx.AsyncClient() as c:
        stats = (await c.get(f"{url}/_emulator/stats")).json()
    return sum(stats.get("batches", {}).get(what, {}).values())


def priced_at_the_batch_rate(results: list[JobResult]) -> None:
    catalog = load_catalog(CATALOG_DIR / "model_costs.json")
    for r in results:
        info = catalog.get(f"{r.provider}/{r.model}")
        assert info is not None and info.batch_input_cost_per_1k is not None
        assert r.route is not None and r.route.lane == "batch", r.route
        assert abs(r.cost_usd - round(cost_usd(info, r.usage, batch=True), 9)) < 1e-12
        assert r.cost_usd < cost_usd(info, r.usage)  # the discount is real


@pytest.mark.parametrize("n_jobs", [500, pytest.param(2000, marks=pytest.mark.slow)])
async def test_a_backfill_in_the_batch_lane_is_answered_once_at_the_batch_rate(
    settings: Settings, redis: Redis, tmp_path: Path, n_jobs: int
) -> None:
    async with batch_emulator(settings, tmp_path, max_requests=n_jobs // 4) as (s, url):
        pipeline = InProcessPipeline(s)
        try:
            await pipeline.start(*ALL_STAGES, "batch")
            jobs = [batch_job(i) for i in range(n_jobs)]
            async with pipeline.client() as client:
                results = [r async for r in client.stream(jobs, max_in_flight=n_jobs)]
            batches = await created(url)
        finally:
            await pipeline.close()
    assert sorted(r.job_id for r in results) == sorted(str(j["job_id"]) for j in jobs)
    assert all(r.status == "ok" and r.content for r in results), [r.error for r in results if r.error][:3]
    priced_at_the_batch_rate(results)
    assert sorted(await ledger_entries(redis, s)) == sorted(str(j["job_id"]) for j in jobs)
    assert batches >= 4  # at most a quarter of the jobs a batch


async def test_a_sync_lane_job_beside_them_is_not_batched(settings: Settings, tmp_path: Path) -> None:
    async with batch_emulator(settings, tmp_path) as (s, url):
        pipeline = InProcessPipeline(s)
        try:
            await pipeline.start(*ALL_STAGES, "batch")
            async with pipeline.client() as client:
                batched, synced = await asyncio.gather(
                    client.complete(batch_job(1), timeout=30), client.complete(batch_job(2, lane="sync"), timeout=30)
                )
            batches = await created(url)
        finally:
            await pipeline.close()
    assert batched.route is not None and batched.route.lane == "batch" and "batch lane" in batched.route.reason
    assert synced.route is not None and synced.route.lane == "sync"
    assert batches == 1


@pytest.mark.chaos  # about 13 s; .ci/run runs it
async def test_kill9_of_the_batch_worker_after_submit_loses_and_repeats_nothing(
    settings: Settings, redis: Redis, tmp_path: Path
) -> None:
    async with batch_emulator(settings, tmp_path) as (s, url):
        s = s.model_copy(update={"batch_claim_s": 2.0, "batch_poll_first_s": 3.0})  # polled only after the kill
        procs = ProcessPipeline(s)
        store = BatchStore(redis, s.keys, "openai")
        jobs = [batch_job(i, model="openai/gpt-4o-mini") for i in range(300)]
        try:
            procs.start([*ALL_STAGES, "batch"])
            async with InProcessPipeline(s).client() as client:
                answers = asyncio.ensure_future(_all(client, jobs))
                await _until_submitted(store)
                procs.kill9("batch")
                procs.start_one("batch")
                results = await asyncio.wait_for(answers, 120)
            submitted = await created(url, "requests")
        finally:
            procs.terminate()
            await drop_namespace(s)
    assert sorted(r.job_id for r in results) == sorted(str(j["job_id"]) for j in jobs)
    assert all(r.status == "ok" for r in results), [r.error for r in results if r.error][:3]
    priced_at_the_batch_rate(results)
    assert sorted(await ledger_entries(redis, s)) == sorted(str(j["job_id"]) for j in jobs)
    assert submitted == len(jobs)  # the restarted worker resumed the batches it found: no job went twice


async def _all(client: Any, jobs: list[dict[str, object]]) -> list[JobResult]:
    return [r async for r in client.stream(jobs, max_in_flight=len(jobs))]


async def _until_submitted(store: BatchStore, timeout_s: float = 60) -> None:
    """Until every batch the worker holds is submitted (and at least one is)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        states = [(await store.meta(b)).get("state") for b in await store.live()]
        if states and all(state == "submitted" for state in states):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the batch worker submitted nothing")
