"""On one Redis server the ledger records a fresh job and does all that follows in one script
(ledger_scripts.WHOLE). Against the real Redis, each case here is recorded twice (a redelivery) by the split
ledger under one key prefix and by the one-server ledger under another, and the two keyspaces must hold the same
keys, values and expiry, every kind of job alike."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from redis.asyncio import Redis

from farebox.constants import RedisKeys, job_record
from farebox.schemas import BudgetHold, JobResult, Usage
from farebox.schemas.result import ErrorInfo, RouteInfo, StrategyRef
from farebox.settings import Settings
from farebox.stages.ledger import CacheFill, KeptPrompt, Ledger, Recorded

TS = time.time()
ENTRY = "c" * 64


def answered(job_id: str, **update: Any) -> JobResult:
    fields: dict[str, Any] = {
        "job_id": job_id,
        "tenant": "acme",
        "status": "ok",
        "content": "words",
        "provider": "openai",
        "model": "gpt-4o-mini",
        "usage": Usage(input_tokens=120, output_tokens=30),
        "cost_usd": 0.000036,
        "baseline_cost_usd": 0.0006,
        "route": RouteInfo(reason="cheapest"),
    }
    return JobResult(**{**fields, **update})


async def lease(redis: Redis, keys: RedisKeys, coalesce_key: str, owner: str) -> None:
    """The job's lease held, a waiter flagged on it (the release must take both)."""
    await redis.set(keys.inflight(coalesce_key), owner, ex=300)
    await redis.set(keys.waiters(coalesce_key), 1, ex=300)


async def reserved(redis: Redis, keys: RedisKeys, record: str) -> tuple[BudgetHold, ...]:
    budget = keys.budget("acme", "month:2026-12")
    await redis.set(keys.reservation(record), 5000, ex=3600)
    await redis.hset(budget, mapping={"reserved_nusd": 5000, "spent_nusd": 100})
    return (BudgetHold(key=budget, tenant="acme", period="month:2026-12", limit_usd=10.0),)


Case = Callable[[Redis, RedisKeys, str], Any]


async def shared_miss(redis: Redis, keys: RedisKeys, job_id: str) -> dict[str, Any]:
    await lease(redis, keys, ENTRY, job_record("acme", job_id))
    return {"result": answered(job_id), "cache": CacheFill(ENTRY, '{"a":1}', 600), "lease_key": ENTRY}


async def own_lease(redis: Redis, keys: RedisKeys, job_id: str) -> dict[str, Any]:
    own = f"job:{job_record('acme', job_id)}"
    await lease(redis, keys, own, job_record("acme", job_id))
    return {"result": answered(job_id), "cache": None, "lease_key": own}


async def interactive_lease(redis: Redis, keys: RedisKeys, job_id: str) -> dict[str, Any]:
    await lease(redis, keys, f"{ENTRY}|interactive", job_record("acme", job_id))
    return {"result": answered(job_id), "cache": CacheFill(ENTRY, '{"a":1}', 600), "lease_key": f"{ENTRY}|interactive"}


async def budgets(redis: Redis, keys: RedisKeys, job_id: str) -> dict[str, Any]:
    holds = await reserved(redis, keys, job_record("acme", job_id))
    return {"result": answered(job_id), "cache": None, "lease_key": None, "budgets": holds}


async def experiment(redis: Redis, keys: RedisKeys, job_id: str) -> dict[str, Any]:
    route = RouteInfo(reason="arm b", strategy=StrategyRef(experiment="e1", arm="b"))
    prompt = KeptPrompt('[{"role":"user","content":"hi"}]', 3600)
    return {"result": answered(job_id, route=route), "cache": None, "lease_key": None, "prompt": prompt}


async def evaluation(redis: Redis, keys: RedisKeys, job_id: str) -> dict[str, Any]:
    return {"result": answered(job_id), "cache": None, "lease_key": None, "evaluation": "grading"}


async def batch_lane(redis: Redis, keys: RedisKeys, job_id: str) -> dict[str, Any]:
    holds = await reserved(redis, keys, job_record("acme", job_id))
    result = answered(job_id, route=RouteInfo(reason="batch lane", lane="batch"), cost_usd=0.000018)
    return {"result": result, "cache": None, "lease_key": None, "budgets": holds, "sync_cost_usd": 0.000036}


async def failed(redis: Redis, keys: RedisKeys, job_id: str) -> dict[str, Any]:
    await lease(redis, keys, ENTRY, job_record("acme", job_id))
    error = ErrorInfo(code="provider_error", message="down")
    result = JobResult(job_id=job_id, tenant="acme", status="error", error=error)
    return {"result": result, "cache": None, "lease_key": ENTRY}


async def hit(redis: Redis, keys: RedisKeys, job_id: str) -> dict[str, Any]:
    return {"result": answered(job_id, cache="hit", cost_usd=0.0), "cache": None, "lease_key": ENTRY}


async def another_jobs_lease(redis: Redis, keys: RedisKeys, job_id: str) -> dict[str, Any]:
    await lease(redis, keys, ENTRY, job_record("acme", "someone-else"))  # left alone, and its waiters
    return {"result": answered(job_id), "cache": CacheFill(ENTRY, '{"a":1}', 600), "lease_key": ENTRY}


async def lease_gone_waiters_flagged(redis: Redis, keys: RedisKeys, job_id: str) -> dict[str, Any]:
    await redis.set(keys.waiters(ENTRY), 1, ex=300)  # the lease expired: its waiters are woken
    return {"result": answered(job_id), "cache": CacheFill(ENTRY, '{"a":1}', 600), "lease_key": ENTRY}


async def fill_beside_own_lease(redis: Redis, keys: RedisKeys, job_id: str) -> dict[str, Any]:
    own = f"job:{job_record('acme', job_id)}"
    await lease(redis, keys, own, job_record("acme", job_id))
    return {"result": answered(job_id), "cache": CacheFill(ENTRY, '{"a":1}', 600), "lease_key": own}


async def two_budgets_one_old_and_settled(redis: Redis, keys: RedisKeys, job_id: str) -> dict[str, Any]:
    record = job_record("acme", job_id)
    day = keys.budget("acme", "day:2026-12-03", "free")
    await redis.set(keys.reservation(record), "settled", ex=3600)  # a copy settled it already
    await redis.hset(day, mapping={"reserved_nusd": 0, "spent_nusd": 7})
    holds = (
        BudgetHold(key=keys.budget("acme", "month:2026-12"), tenant="acme", period="month:2026-12", limit_usd=1.0),
        BudgetHold(key=day, tenant="acme", period="day:2026-12-03", limit_usd=1.0),
        BudgetHold(key=f"{keys.prefix}budget:acme:old", tenant="acme", period="old", limit_usd=1.0),  # not settled
    )
    return {"result": answered(job_id), "cache": None, "lease_key": None, "budgets": holds}


async def no_reservation(redis: Redis, keys: RedisKeys, job_id: str) -> dict[str, Any]:
    holds = (BudgetHold(key=keys.budget("acme", "m"), tenant="acme", period="m", limit_usd=1.0),)
    return {"result": answered(job_id), "cache": None, "lease_key": None, "budgets": holds}


async def two_entries_fill(redis: Redis, keys: RedisKeys, job_id: str) -> dict[str, Any]:
    """A fill and a lease of two entries: the split way on one server too."""
    await lease(redis, keys, "d" * 64, job_record("acme", job_id))
    return {"result": answered(job_id), "cache": CacheFill(ENTRY, '{"a":1}', 600), "lease_key": "d" * 64}


CASES = [
    two_entries_fill,
    shared_miss,
    own_lease,
    interactive_lease,
    budgets,
    experiment,
    evaluation,
    batch_lane,
    failed,
    hit,
    another_jobs_lease,
    lease_gone_waiters_flagged,
    fill_beside_own_lease,
    two_budgets_one_old_and_settled,
    no_reservation,
]


@pytest.fixture
async def prefixes(settings: Settings, redis: Redis) -> AsyncIterator[tuple[RedisKeys, RedisKeys]]:
    run = uuid.uuid4().hex[:8]
    split, whole = RedisKeys(f"{settings.redis_prefix}split{run}:"), RedisKeys(f"{settings.redis_prefix}whole{run}:")
    yield split, whole
    for keys in (split, whole):
        async for key in redis.scan_iter(match=f"{keys.prefix}*"):
            await redis.delete(key)


async def keyspace(redis: Redis, prefix: str) -> dict[str, Any]:
    """Every key under ``prefix`` (named without it): its kind, its value and its expiry time (-1: none)."""
    seen: dict[str, Any] = {}
    async for raw in redis.scan_iter(match=f"{prefix}*"):
        key = raw.decode().removeprefix(prefix)
        kind = (await redis.type(raw)).decode()
        if kind == "string":
            value: Any = await redis.get(raw)
        elif kind == "hash":
            value = await redis.hgetall(raw)
        elif kind == "set":
            value = sorted(await redis.smembers(raw))
        else:
            value = [fields for _, fields in await redis.xrange(raw)]
        seen[key] = (kind, value, await redis.expiretime(raw))
    return seen


def same_keyspaces(split: dict[str, Any], whole: dict[str, Any]) -> None:
    """The same keys, kinds and values; the same expiry to the second (one scan follows the other)."""
    assert {k: v[:2] for k, v in split.items()} == {k: v[:2] for k, v in whole.items()}
    for key, (_, _, expires) in split.items():
        assert abs(expires - whole[key][2]) <= 2 or expires == whole[key][2] == -1, key


async def record(ledger: Ledger, job: dict[str, Any]) -> Recorded:
    return await ledger.record(ts=TS, **job)


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
async def test_the_one_server_record_writes_what_the_split_record_writes(
    settings: Settings, redis: Redis, prefixes: tuple[RedisKeys, RedisKeys], case: Case
) -> None:
    ledgers = [
        Ledger(redis, keys, result_ttl_s=600, entry_ttl_s=86_400, days_kept=2, one_server=one)
        for keys, one in zip(prefixes, (False, True), strict=True)
    ]
    whole_calls: list[Any] = []
    whole = ledgers[1]._whole

    async def counted(**kwargs: Any) -> Any:
        whole_calls.append(reply := await whole(**kwargs))
        return reply

    ledgers[1]._whole = counted  # type: ignore[method-assign]
    wakes = redis.pubsub()
    await wakes.subscribe(*(keys.wake_channel for keys in prefixes))
    jobs = [await case(redis, ledger.keys, "j-1") for ledger in ledgers]
    first = [await record(ledger, job) for ledger, job in zip(ledgers, jobs, strict=True)]
    assert first[0] == first[1]
    same_keyspaces(await keyspace(redis, prefixes[0].prefix), await keyspace(redis, prefixes[1].prefix))
    # the one-server ledger wrote it in one script (but where the fill and the lease are two entries')
    assert [c[1] for c in whole_calls] == ([] if case is two_entries_fill else [1])
    # a redelivery of the same message: found recorded, its stored result replayed, counted no second time
    again = [await record(ledger, job) for ledger, job in zip(ledgers, jobs, strict=True)]
    assert again[0] == again[1] and again[0].existing is not None
    same_keyspaces(await keyspace(redis, prefixes[0].prefix), await keyspace(redis, prefixes[1].prefix))
    woken: dict[str, list[str]] = {keys.wake_channel: [] for keys in prefixes}
    while (message := await wakes.get_message(ignore_subscribe_messages=True, timeout=0.2)) is not None:
        woken[message["channel"].decode()].append(
            message["data"]
            .decode()
            .removeprefix(next(k.prefix for k in prefixes if k.wake_channel == message["channel"].decode()))
        )
    assert woken[prefixes[0].wake_channel] == woken[prefixes[1].wake_channel]
    await wakes.aclose()


async def test_the_one_server_record_is_one_script_call(
    settings: Settings, redis: Redis, prefixes: tuple[RedisKeys, RedisKeys], monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger = Ledger(redis, prefixes[1], result_ttl_s=600, entry_ttl_s=86_400, days_kept=2, one_server=True)
    sent: list[str] = []
    execute = redis.execute_command

    async def counted(*args: Any, **kwargs: Any) -> Any:
        sent.append(str(args[0]))
        return await execute(*args, **kwargs)

    job = await budgets(redis, ledger.keys, "j-1")
    await redis.script_load(ledger._whole.source)
    monkeypatch.setattr(redis, "execute_command", counted)
    recorded = await record(ledger, job)
    assert sent == ["EVALSHA"] and recorded.existing is None
    assert recorded.spent_usd == ((100 + 36_000) / 1e9,)
