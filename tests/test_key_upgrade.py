"""Moving a single server's keys from the names of before the Redis Cluster layout (farebox/key_upgrade.py):
what an upgraded pipeline then finds (results, entries, budgets of the period, cache, the ledger's history)."""

from __future__ import annotations

from redis.asyncio import Redis

from farebox.constants import RedisKeys, job_record
from farebox.key_upgrade import new_name, upgrade
from farebox.report import load_rows
from farebox.settings import Settings


def test_old_names_map_to_the_new_layout_and_new_names_are_left_alone() -> None:
    keys = RedisKeys("fb:")
    record = job_record("acme", "a/b:c")
    assert new_name(keys, "fb:result:acme/a/b:c") == ("result", keys.result(record))
    assert new_name(keys, "fb:ledger:job:acme/a/b:c") == ("ledger entry", keys.ledger_entry(record))
    assert new_name(keys, "fb:feedback:arms:2026-12-01") == ("feedback arms", keys.feedback_arms("2026-12-01"))
    assert new_name(keys, "fb:feedback:acme/j") == ("feedback", keys.feedback(job_record("acme", "j")))
    assert new_name(keys, "fb:budget:acme:free:day:2026-12-01") == (
        "budget",
        keys.budget("acme", "day:2026-12-01", "free"),
    )
    assert new_name(keys, "fb:budget:acme:month:2026-12:alerts") == (
        "budget",
        keys.budget("acme", "month:2026-12") + ":alerts",
    )
    assert new_name(keys, "fb:inflight:abc|interactive") == ("lease", keys.inflight("abc|interactive"))
    assert new_name(keys, keys.result(record)) is None and new_name(keys, "other:result:x") is None
    assert new_name(keys, "fb:rate:openai:rpm") is None  # lasts two minutes


async def test_an_upgraded_server_keeps_its_records_budgets_and_history(redis: Redis, settings: Settings) -> None:
    p, keys = settings.redis_prefix, settings.keys
    await redis.set(f"{p}result:acme/j-1", "{}")
    await redis.set(f"{p}ledger:job:acme/j-1", "{}")
    await redis.hset(f"{p}budget:acme:month:2026-12", mapping={"spent_nusd": 500, "reserved_nusd": 0})
    await redis.hset(f"{p}budget:globex:month:2026-12", mapping={"spent_nusd": 7})
    await redis.hset(keys.budget("globex", "month:2026-12"), mapping={"spent_nusd": 3})  # the new version ran
    await redis.sadd(f"{p}ledger:days", "2026-12-01")
    await redis.hset(f"{p}ledger:day:2026-12-01", mapping={"acme|openai|m|jobs": 2, "acme|openai|m|cost_nusd": 9})
    assert sum((await upgrade(redis, keys, apply=False)).values()) == 6
    assert await redis.exists(f"{p}result:acme/j-1")  # counting moves nothing
    counts = await upgrade(redis, keys, apply=True)
    assert counts["budget"] == 2 and counts["result"] == 1 and not any(k.startswith("kept") for k in counts)
    assert await redis.get(keys.result(job_record("acme", "j-1"))) == b"{}"
    assert await redis.exists(keys.ledger_entry(job_record("acme", "j-1")))
    assert int(await redis.hget(keys.budget("acme", "month:2026-12"), "spent_nusd") or 0) == 500
    assert int(await redis.hget(keys.budget("globex", "month:2026-12"), "spent_nusd") or 0) == 10
    rows = await load_rows(redis, keys, by=("day",))
    assert [(r["day"], r["jobs"]) for r in rows] == [("2026-12-01", 2)]
    assert not [k async for k in redis.scan_iter(match=f"{p}result:*")]


async def test_the_report_adds_the_aggregates_kept_under_old_names(redis: Redis, settings: Settings) -> None:
    p, keys = settings.redis_prefix, settings.keys
    await redis.sadd(f"{p}ledger:days", "2026-12-01", "2026-11-30")
    await redis.hset(f"{p}ledger:day:2026-12-01", mapping={"acme|openai|m|jobs": 2})
    await redis.hset(f"{p}ledger:day:2026-11-30", mapping={"acme|openai|m|jobs": 1})
    await redis.sadd(keys.ledger_days, "2026-12-01")
    await redis.hset(keys.ledger_agg("2026-12-01"), mapping={"acme|openai|m|jobs": 5})
    rows = await load_rows(redis, keys, by=("day",))
    assert [(r["day"], r["jobs"]) for r in rows] == [("2026-11-30", 1), ("2026-12-01", 7)]
