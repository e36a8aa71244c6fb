"""Moving a single server's keys from the names of before the Redis Cluster layout (farebox/key_upgrade.py):
what an upgraded pipeline then finds (results, entries, budgets of the period, cache, the ledger's history)."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

from farebox.constants import RedisKeys, job_record
from farebox.key_upgrade import new_name, upgrade
from farebox.report import load_rows
from farebox.settings import Settings
from tests.support.pipeline import drop_namespace


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


async def test_a_stage_refuses_to_start_on_keys_of_before_until_they_are_moved(
    settings: Settings, redis: Redis
) -> None:
    """Stages of this version on a Redis of an older farebox would not find its results (a job_id answered
    again, a second charge): they refuse to start, saying what to run; once moved, they start."""
    from farebox.errors import InvalidRequest
    from farebox.stages.main import run_stage

    await redis.sadd(settings.keys.legacy_ledger_days, "2026-12-01")
    with pytest.raises(InvalidRequest, match="farebox keys upgrade --apply"):
        await asyncio.wait_for(run_stage(settings, "route"), 30)
    await upgrade(redis, settings.keys, apply=True)
    stop = asyncio.Event()
    started = asyncio.Event()

    async def on_ready() -> None:
        started.set()
        stop.set()

    try:
        await asyncio.wait_for(run_stage(settings, "route", stop=stop, on_ready=on_ready), 60)
    finally:
        await drop_namespace(settings)  # the stage declared the topology
    assert started.is_set()


def test_the_cli_counts_then_moves(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import redis as sync_redis

    from farebox.cli import main as cli_main

    for name, value in (("REDIS_URL", settings.redis_url), ("REDIS_PREFIX", settings.redis_prefix)):
        monkeypatch.setenv(f"FAREBOX_{name}", value)
    monkeypatch.setattr("farebox.cli.setup_logging", lambda *args, **kwargs: None)
    with sync_redis.Redis.from_url(settings.redis_url) as r:
        r.set(f"{settings.redis_prefix}result:acme/j-1", "{}")
    assert cli_main(["keys", "upgrade"]) == 0
    assert "1 keys to move" in capsys.readouterr().out
    assert cli_main(["keys", "upgrade", "--apply"]) == 0
    assert "1 keys moved" in capsys.readouterr().out
    with sync_redis.Redis.from_url(settings.redis_url) as r:
        assert r.exists(settings.keys.result(job_record("acme", "j-1")))
