"""The ledger split for Redis Cluster (farebox/stages/ledger.py): the exactly-once record in the job's slot, the
aggregates, budgets and cache folded in after it. A crash between the two parts is repaired by the redelivery
and never counted twice; a job_id recorded long ago is not counted again. Run on the single server here and on
a Redis Cluster by tests/test_redis_cluster.py."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace
from typing import Any, cast

import pytest
from redis.asyncio import Redis

from farebox.constants import NANO, RedisKeys, as_text, job_record
from farebox.schemas import BudgetHold, Feedback, JobResult, Usage
from farebox.schemas.result import RouteInfo, StrategyRef
from farebox.settings import Settings
from farebox.stages import ledger as ledger_module
from farebox.stages.feedback import FeedbackItem, FeedbackStage
from farebox.stages.ledger import CacheFill, Ledger
from farebox.stages.ledger_entry import entry_json, utc_day
from farebox.stages.stage import Delivery

TS = time.time()  # the aggregates expire some days after their day: a day of now
DAY = utc_day(TS)
RESULT_TTL_S = 600


class Crash(Exception):
    """The account process dying between the record and the folds."""


def book(redis: Redis, settings: Settings, result_ttl_s: int = RESULT_TTL_S) -> Ledger:
    return Ledger(redis, settings.keys, result_ttl_s=result_ttl_s, entry_ttl_s=86_400, days_kept=2)


def crash(*calls: Any) -> Any:
    """In place of the gather of the folds: the process dies before any of them is sent."""
    for call in calls:
        call.close()
    raise Crash


def result(job_id: str = "j-1", cost: float = 0.000125) -> JobResult:
    route = RouteInfo(reason="test", strategy=StrategyRef(experiment="ab", arm="rules"))
    return JobResult(
        job_id=job_id,
        status="ok",
        content="4",
        provider="openai",
        model="gpt-4o-mini",
        usage=Usage(input_tokens=10, output_tokens=3),
        cost_usd=cost,
        baseline_cost_usd=0.001,
        tenant="acme",
        route=route,
    )


def holds(keys: RedisKeys) -> list[BudgetHold]:
    return [
        BudgetHold(key=keys.budget("acme", "month:2026-12"), tenant="acme", period="month:2026-12", limit_usd=5),
        BudgetHold(key=keys.budget("acme", "day:x", "free"), tenant="acme", period="day:x", limit_usd=1),
    ]


async def reserve(redis: Redis, keys: RedisKeys, nusd: int, job_id: str = "j-1") -> None:
    """What the route stage's reserve leaves: the estimate in every budget and in the job's reservation key."""
    for hold in holds(keys):
        await redis.hincrby(hold.key, "reserved_nusd", nusd)
    await redis.set(keys.reservation(job_record("acme", job_id)), nusd)


async def record(ledger: Ledger, keys: RedisKeys, res: JobResult, ts: float = TS) -> Any:
    return await ledger.record(
        res,
        ts=ts,
        cache=CacheFill("k" * 64, '{"content":"4"}', 60),
        lease_key="k" * 64,
        budgets=holds(keys),
    )


async def aggregates(redis: Redis, keys: RedisKeys) -> dict[str, int]:
    agg = await redis.hgetall(keys.ledger_agg(DAY))
    return {as_text(k).removeprefix("acme|openai|gpt-4o-mini|"): int(v) for k, v in agg.items()}


async def assert_counted_once(redis: Redis, keys: RedisKeys, cost: float = 0.000125) -> None:
    agg = await aggregates(redis, keys)
    assert agg["jobs"] == 1 and agg["cost_nusd"] == round(cost * NANO) and agg["input_tokens"] == 10
    assert len(await redis.xrange(keys.ledger_stream)) == 1
    arms = await redis.hgetall(keys.ledger_arms(DAY))
    assert int(arms[b"ab|rules|jobs"]) == 1
    for hold in holds(keys):
        budget = await redis.hgetall(hold.key)
        assert int(budget[b"spent_nusd"]) == round(cost * NANO) and int(budget[b"reserved_nusd"]) == 0
    assert await redis.get(keys.reservation(job_record("acme", "j-1"))) == b"settled"
    assert [as_text(d) for d in await redis.smembers(keys.ledger_days)] == [DAY]


async def test_a_crash_between_the_record_and_the_folds_is_repaired_by_the_redelivery(
    redis: Redis, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = settings.keys
    await reserve(redis, keys, 200_000)
    await redis.set(keys.inflight("k" * 64), job_record("acme", "j-1"))  # the leader's lease
    ledger = book(redis, settings)
    with monkeypatch.context() as patched:
        patched.setattr(ledger_module.asyncio, "gather", crash)
        with pytest.raises(Crash):
            await record(ledger, keys, result())
    entry_key = keys.ledger_entry(job_record("acme", "j-1"))
    assert await redis.exists(entry_key) and not await redis.exists(keys.ledger_agg(DAY))  # recorded, not folded
    assert await redis.exists(keys.inflight("k" * 64))  # the lease is released after the result is stored
    again = await record(ledger, keys, result())  # the redelivery
    assert again.existing is not None  # replayed: the stored result goes out again
    await assert_counted_once(redis, keys)
    assert await redis.get(keys.cache("k" * 64)) == b'{"content":"4"}'
    assert not await redis.exists(keys.inflight("k" * 64))
    assert json.loads(await redis.get(entry_key))["job_id"] == "j-1"


async def test_a_redelivery_after_the_folds_counts_nothing_twice(redis: Redis, settings: Settings) -> None:
    keys = settings.keys
    await reserve(redis, keys, 200_000)
    ledger = book(redis, settings)
    first = await record(ledger, keys, result())
    assert first.existing is None and first.spent_usd == (0.000125, 0.000125)
    for _ in range(3):  # crashes after the folds, before the ack
        await record(ledger, keys, result())
    # A second copy of the job (a second provider call at another cost) is not counted either: the entry is
    # the first one's, and the folds repeat what the entry says.
    await record(ledger, keys, result(cost=0.5))
    await assert_counted_once(redis, keys)


async def test_the_folds_repeat_what_the_entry_says_on_the_day_it_was_recorded(
    redis: Redis, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = settings.keys
    await reserve(redis, keys, 200_000)
    ledger = book(redis, settings, result_ttl_s=7200)
    with monkeypatch.context() as patched:
        patched.setattr(ledger_module.asyncio, "gather", crash)
        with pytest.raises(Crash):
            await record(ledger, keys, result())
    # Redelivered an hour later (past midnight, perhaps) and priced anew: the entry's day and cost count.
    await record(ledger, keys, result(cost=0.9), ts=TS + 3600)
    await assert_counted_once(redis, keys)


async def test_a_job_id_recorded_longer_ago_than_the_fold_window_is_not_counted_again(
    redis: Redis, settings: Settings
) -> None:
    keys = settings.keys
    await reserve(redis, keys, 200_000)
    ledger = book(redis, settings)
    await record(ledger, keys, result())
    # Later than the window: the stored result has expired and the fold markers with it; the entry is there.
    await redis.delete(keys.result(job_record("acme", "j-1")))
    await redis.delete(keys.ledger_folded(DAY))
    later = await record(ledger, keys, result(), ts=TS + RESULT_TTL_S + 1)
    assert later.existing is None and later.spent_usd == ()
    await assert_counted_once(redis, keys)


async def test_feedback_after_a_crash_between_attach_and_fold_is_folded_once(
    redis: Redis, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = settings.keys
    await record(book(redis, settings), keys, result())  # an experiment job's entry (arm ab/rules)
    policy = SimpleNamespace(feedback_sources=(), auth=None)
    stage = FeedbackStage(settings, cast(Any, SimpleNamespace(current=lambda: (None, policy, None))), redis)
    delivery = Delivery(queue=settings.topology.feedback, body=b"", user_id=settings.amqp_user)

    async def send(score: float) -> Any:
        item = FeedbackItem(Feedback(job_id="j-1", tenant="acme", score=score, source="grader"), delivery)
        return await stage.handle(item, delivery)

    with monkeypatch.context() as patched:
        patched.setattr(FeedbackStage, "_index", lambda *a: (_ for _ in ()).throw(Crash()))
        with pytest.raises(Crash):
            await send(0.5)
    await send(0.5)  # the redelivery: the score was attached, the fold was not
    await send(0.5)  # and again, after the fold
    await send(0.75)  # a replacement from the same source adjusts the sums
    arms = {as_text(k): float(v) for k, v in (await redis.hgetall(keys.feedback_arms(DAY))).items()}
    assert arms == {"ab|rules|grader|n": 1, "ab|rules|grader|sum": 0.75, "ab|rules|grader|sumsq": 0.5625}
    assert await redis.zscore(keys.feedback_jobs, job_record("acme", "j-1")) is not None


async def test_a_job_reserved_under_the_old_budget_key_names_is_recorded_without_settling_them(
    redis: Redis, settings: Settings
) -> None:
    """In flight across an upgrade that did not drain: its holds name `budget:<tenant>:<period>`."""
    old = BudgetHold(key=f"{settings.redis_prefix}budget:acme:month:2026-12", tenant="acme", period="m", limit_usd=5)
    done = await book(redis, settings).record(result(), ts=TS, cache=None, lease_key=None, budgets=[old])
    assert done.existing is None and done.spent_usd == ()
    assert (await aggregates(redis, settings.keys))["jobs"] == 1 and not await redis.exists(old.key)


async def test_the_settle_releases_what_was_reserved_not_what_a_copy_says(redis: Redis, settings: Settings) -> None:
    """A second copy of the job reserved nothing (the reservation existed) and may reach the account stage
    first: the settle releases the reservation key's amount, once, whichever copy comes first (no copy's own
    idea of what it reserved is passed in at all)."""
    keys = settings.keys
    await reserve(redis, keys, 200_000)
    ledger = book(redis, settings)
    await ledger.record(result(), ts=TS, cache=None, lease_key=None, budgets=holds(keys))
    await ledger.record(result(), ts=TS, cache=None, lease_key=None, budgets=holds(keys))
    await assert_counted_once(redis, keys)


async def test_an_entry_moved_from_before_the_split_is_not_folded_again(redis: Redis, settings: Settings) -> None:
    """`farebox keys upgrade` moves entries whose aggregates the single script of before counted already:
    a replay or a redelivery of such a job within the window folds nothing (the entry has no "v")."""
    keys = settings.keys
    entry = json.loads(entry_json(result(), ts=TS))
    del entry["v"]
    record_key = job_record("acme", "j-1")
    await redis.set(keys.ledger_entry(record_key), json.dumps(entry))
    await redis.set(keys.result(record_key), result().model_dump_json())
    again = await record(book(redis, settings), keys, result())
    assert again.existing is not None
    assert not await redis.exists(keys.ledger_agg(DAY)) and not await redis.exists(keys.ledger_stream)


async def test_a_score_kept_before_the_split_is_replaced_not_added(
    redis: Redis, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The feedback attach of before folded the score into the arm's sums itself: replacing such a score after
    `farebox keys upgrade` adjusts the sums (n stays 1), as it would have before."""
    keys = settings.keys
    await record(book(redis, settings), keys, result())
    job = job_record("acme", "j-1")
    await redis.hset(keys.feedback(job), "grader", json.dumps({"score": 0.5, "ts": TS - 60}))  # no "v"
    arms = keys.feedback_arms(DAY)
    await redis.hset(arms, mapping={"ab|rules|grader|n": 1, "ab|rules|grader|sum": 0.5, "ab|rules|grader|sumsq": 0.25})
    policy = SimpleNamespace(feedback_sources=(), auth=None)
    stage = FeedbackStage(settings, cast(Any, SimpleNamespace(current=lambda: (None, policy, None))), redis)
    delivery = Delivery(queue=settings.topology.feedback, body=b"", user_id=settings.amqp_user)
    item = FeedbackItem(Feedback(job_id="j-1", tenant="acme", score=0.75, source="grader"), delivery)
    await stage.handle(item, delivery)
    got = {as_text(k): float(v) for k, v in (await redis.hgetall(arms)).items()}
    assert got == {"ab|rules|grader|n": 1, "ab|rules|grader|sum": 0.75, "ab|rules|grader|sumsq": 0.5625}


@pytest.mark.parametrize("result_ttl_s", [86_400, 60 * 86_400])
async def test_the_settled_mark_outlives_the_fold_window(redis: Redis, settings: Settings, result_ttl_s: int) -> None:
    """A copy of the job settles again while its entry is young (the result TTL): the mark that says the budgets
    were settled must still be there then, or a replay on day 41 of a 60-day result TTL would charge again."""
    keys = settings.keys
    await reserve(redis, keys, 1000)
    await record(book(redis, settings, result_ttl_s), keys, result())
    ttl = await redis.ttl(keys.reservation(job_record("acme", "j-1")))
    assert ttl >= min(result_ttl_s, 40 * 86_400) and ttl > result_ttl_s
