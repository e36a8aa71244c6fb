"""The ledger and `farebox report` by price lane, against the real Redis: a batch job's aggregates add to the
batch_* fields, the sync lane is the rest, and a ledger without batch jobs reports as it always did."""

from __future__ import annotations

import io
import json
import time
from typing import Any

import pytest
from redis.asyncio import Redis
from rich.console import Console

from farebox.constants import NANO, as_text
from farebox.report import load_report, render
from farebox.schemas import JobResult, Usage
from farebox.schemas.result import RouteInfo
from farebox.settings import Settings
from farebox.stages.ledger import Ledger
from farebox.stages.ledger_entry import utc_day

TS = time.time()  # now: a day of the past would expire its aggregates at once
DAY = utc_day(TS)


def result(job_id: str, tenant: str, cost: float, baseline: float, lane: str = "sync") -> JobResult:
    return JobResult(
        job_id=job_id,
        status="ok",
        tenant=tenant,
        provider="openai",
        model="gpt-4o-mini",
        usage=Usage(input_tokens=100, output_tokens=50),
        cost_usd=cost,
        baseline_cost_usd=baseline,
        route=RouteInfo(reason="r", lane="batch" if lane == "batch" else "sync"),
    )


def ledger(settings: Settings, redis: Redis) -> Ledger:
    return Ledger(redis, settings.keys, result_ttl_s=600, entry_ttl_s=600, days_kept=2)


async def record(settings: Settings, redis: Redis, *jobs: tuple[JobResult, float | None]) -> None:
    book = ledger(settings, redis)
    for res, sync in jobs:
        await book.record(res, ts=TS, cache=None, lease_key=None, sync_cost_usd=sync)


def rendered(report: Any, by: tuple[str, ...], fmt: str) -> str:
    buf = io.StringIO()
    render(report.rows, by, fmt, Console(file=buf, width=240), report.by_lane)
    return buf.getvalue()


async def test_a_batch_job_adds_to_the_batch_fields_and_its_entry_names_the_lane(
    settings: Settings, redis: Redis
) -> None:
    await record(
        settings,
        redis,
        (result("b-1", "acme", 0.002, 0.01, "batch"), 0.004),
        (result("s-1", "acme", 0.003, 0.01), None),
    )
    agg = {as_text(k): int(v) for k, v in (await redis.hgetall(settings.keys.ledger_agg(DAY))).items()}
    p = "acme|openai|gpt-4o-mini|"
    assert agg[p + "jobs"] == 2 and agg[p + "cost_nusd"] == 5 * NANO // 1000
    assert agg[p + "batch_jobs"] == 1
    assert agg[p + "batch_cost_nusd"] == 2 * NANO // 1000
    assert agg[p + "batch_baseline_nusd"] == 10 * NANO // 1000
    assert agg[p + "batch_sync_nusd"] == 4 * NANO // 1000
    assert agg[p + "batch_input_tokens"] == 100 and agg[p + "batch_output_tokens"] == 50
    stream = await redis.xrange(settings.keys.ledger_stream) or []
    entries = [json.loads(e[b"entry"]) for _, e in stream if e is not None]
    assert {e["job_id"]: e["lane"] for e in entries} == {"b-1": "batch", "s-1": "sync"}


async def test_report_by_lane_splits_rows_and_totals(settings: Settings, redis: Redis) -> None:
    await record(
        settings,
        redis,
        (result("b-1", "acme", 0.002, 0.01, "batch"), 0.004),
        (result("b-2", "acme", 0.001, 0.005, "batch"), 0.002),
        (result("s-1", "acme", 0.003, 0.01), None),
        (result("s-2", "zeta", 0.004, 0.01), None),
    )
    report = await load_report(redis, settings.keys, by=("tenant", "lane"))
    got = {(r["tenant"], r["lane"]): (r["jobs"], r["cost_usd"], r["baseline_cost_usd"]) for r in report.rows}
    assert got == {
        ("acme", "batch"): (2, pytest.approx(0.003), pytest.approx(0.015)),
        ("acme", "sync"): (1, pytest.approx(0.003), pytest.approx(0.01)),
        ("zeta", "sync"): (1, pytest.approx(0.004), pytest.approx(0.01)),
    }
    assert [(r["tenant"], r["lane"]) for r in report.rows] == sorted(got)
    assert report.by_lane is not None
    batch, sync = report.by_lane["batch"], report.by_lane["sync"]
    assert batch["jobs"] == 2 and sync["jobs"] == 2
    assert batch["sync_cost_usd"] == pytest.approx(0.006)
    assert batch["batch_savings_usd"] == pytest.approx(0.003)  # vs the same models sync
    assert batch["savings_usd"] == pytest.approx(0.012) and sync["savings_usd"] == pytest.approx(0.013)
    total = json.loads(rendered(report, ("tenant", "lane"), "json"))["total"]
    assert total["by_lane"]["batch"]["batch_savings_usd"] == pytest.approx(0.003)
    table = rendered(report, ("tenant", "lane"), "table")
    assert "by lane: sync 2 jobs $0.007000" in table and "batch 2 jobs $0.003000" in table
    # The lane follows --tenant, and lane on its own sums over the rest.
    only = await load_report(redis, settings.keys, by=("lane",), tenant="zeta")
    assert [(r["lane"], r["jobs"]) for r in only.rows] == [("sync", 1)] and only.by_lane is None


async def test_without_batch_jobs_the_report_is_as_before(settings: Settings, redis: Redis) -> None:
    await record(settings, redis, (result("s-1", "acme", 0.003, 0.01), None))
    report = await load_report(redis, settings.keys, by=("tenant", "model"))
    assert report.by_lane is None
    assert list(report.rows[0]) == [
        "tenant",
        "model",
        "jobs",
        "cost_usd",
        "baseline_cost_usd",
        "savings_usd",
        "input_tokens",
        "output_tokens",
        "cache_hits",
        "errors",
        "evaluation_cost_usd",
        "cache_hit_rate",
    ]
    assert "by_lane" not in json.loads(rendered(report, ("tenant", "model"), "json"))["total"]
    assert "by lane" not in rendered(report, ("tenant", "model"), "table")


async def test_aggregates_of_before_the_batch_lane_read_as_sync(settings: Settings, redis: Redis) -> None:
    """A day written by a release without the batch_* fields: every job on the sync lane."""
    p = "acme|openai|gpt-4o-mini|"
    await redis.hset(settings.keys.ledger_agg(DAY), mapping={p + "jobs": 3, p + "cost_nusd": 6000})
    await redis.sadd(settings.keys.ledger_days, DAY)
    report = await load_report(redis, settings.keys, by=("lane",))
    assert [(r["lane"], r["jobs"], r["cost_usd"]) for r in report.rows] == [("sync", 3, 6000 / NANO)]
    assert report.by_lane is None
