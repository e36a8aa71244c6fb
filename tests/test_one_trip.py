"""A cache hit looked up and recorded in one Redis round trip on one server (farebox/stages/one_trip.py), against
the real Redis: the commands a hit sends, and that it writes what the three-step path writes, exactly once."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any, cast

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from farebox.routing.store import CatalogStore
from farebox.schemas import Envelope, Job, JobResult, Outcome, Usage
from farebox.settings import Settings
from farebox.stages.dedup import DedupStage
from farebox.stages.main import stage_cores
from farebox.stages.one_trip import OneTripHits
from farebox.stages.stage import Delivery, Handled
from tests.support.pipeline import ledger_entries

KEY = "e" * 64


def answer(content: str) -> Outcome:
    return Outcome(
        provider="openai", model="gpt-4o-mini", content=content, usage=Usage(input_tokens=40, output_tokens=9)
    )


async def dedup(settings: Settings, redis: Redis, **update: Any) -> DedupStage:
    """The dedup stage as `farebox worker dedup` builds it (the one-trip path included, Redis being one server),
    its scripts loaded (so a count of commands holds no SCRIPT LOAD)."""
    s = settings.model_copy(update=update)
    (stage,) = stage_cores(s, "dedup", None, CatalogStore(s.catalog, s.policy), redis, [])
    assert isinstance(stage, DedupStage) and stage.one_trip is not None and stage.finish is not None
    ledger = stage.one_trip.ledger
    scripts = (stage._decide_cached, stage._decide_own, stage.one_trip._serve, stage.one_trip._record)
    for script in (*scripts, ledger._record, ledger._fold, ledger._fill):
        await redis.script_load(script.source)
    return stage


def hit_job(job_id: str) -> Envelope:
    job = Job(job_id=job_id, tenant="acme", prompt="the same prompt")
    return Envelope(job_id=job_id, job=job, received_at=time.time(), cache_key=KEY, coalesce_key=KEY, reply_to="r")


async def handle(stage: DedupStage, env: Envelope) -> Handled:
    return await stage.handle(env, Delivery(queue=stage.topo.intake, body=b""))


def reply(h: Handled) -> JobResult:
    (published,) = [p for p in h.publishes if p.caller_reply]
    return JobResult.model_validate_json(published.body)


@contextmanager
def commands(redis: Redis) -> Iterator[list[str]]:
    """The names of the commands ``redis`` sends meanwhile (a script by its name's first word: EVALSHA)."""
    sent: list[str] = []
    execute = redis.execute_command

    async def counted(*args: Any, **kwargs: Any) -> Any:
        sent.append(str(args[0]))
        return await execute(*args, **kwargs)

    redis.execute_command = counted  # type: ignore[method-assign]
    try:
        yield sent
    finally:
        del redis.execute_command


async def aggregates(redis: Redis, settings: Settings) -> dict[str, int]:
    day = time.strftime("%Y-%m-%d", time.gmtime())
    fields = await redis.hgetall(settings.keys.ledger_agg(day))
    return {k.decode().rpartition("|")[2]: int(v) for k, v in fields.items()}


async def test_a_hit_takes_two_round_trips_then_one_and_is_recorded_once(settings: Settings, redis: Redis) -> None:
    stage = await dedup(settings, redis)
    await redis.set(settings.keys.cache(KEY), answer("cached words").model_dump_json())
    with commands(redis) as first:
        one = reply(await handle(stage, hit_job("h-1")))
    with commands(redis) as hot:
        two = reply(await handle(stage, hit_job("h-2")))
    assert first == ["EXISTS", "EVALSHA", "EVALSHA"]  # the lookup (two commands, one write), then record + fold
    assert hot == ["EVALSHA"]  # lookup, record and fold
    for r in (one, two):
        assert r.status == "ok" and r.cache == "hit" and r.content == "cached words" and r.cost_usd == 0
        assert r.baseline_cost_usd > 0
    assert sorted(await ledger_entries(redis, settings)) == ["h-1", "h-2"]
    assert await redis.xlen(settings.keys.ledger_stream) == 2
    agg = await aggregates(redis, settings)
    assert agg["jobs"] == 2 and agg["cache_hits"] == 2 and agg["cost_nusd"] == 0
    assert agg["input_tokens"] == 80 and agg["baseline_nusd"] == 2 * round(one.baseline_cost_usd * 1e9)
    # A replay of either is the stored result, recorded no second time.
    again = reply(await handle(stage, hit_job("h-2")))
    assert again.model_dump() == two.model_dump()
    assert (await aggregates(redis, settings))["jobs"] == 2 and await redis.xlen(settings.keys.ledger_stream) == 2


async def test_the_one_trip_path_writes_what_the_three_step_path_writes(settings: Settings, redis: Redis) -> None:
    one_trip = await dedup(settings, redis)
    three_step = await dedup(settings, redis)
    three_step.one_trip = None
    await redis.set(settings.keys.cache(KEY), answer("same").model_dump_json())
    await handle(one_trip, hit_job("warm"))  # remembered: the next one takes one round trip
    before = await aggregates(redis, settings)
    with commands(redis) as sent:
        results = [reply(await handle(one_trip, hit_job("a")))]
    assert sent == ["EVALSHA"]
    between = await aggregates(redis, settings)
    results.append(reply(await handle(three_step, hit_job("b"))))
    after = await aggregates(redis, settings)
    assert {k: between[k] - before[k] for k in after} == {k: after[k] - between[k] for k in after}
    assert results[0].model_dump(exclude={"job_id", "latency_ms"}) == results[1].model_dump(
        exclude={"job_id", "latency_ms"}
    )
    streamed = [json.loads(fields[b"entry"]) for _, fields in await redis.xrange(settings.keys.ledger_stream)][-2:]
    stored = [await redis.get(settings.keys.result(f"acme/{j}")) for j in ("a", "b")]
    assert [JobResult.model_validate_json(s or b"").job_id for s in stored] == ["a", "b"]
    entries = [json.loads(await redis.get(settings.keys.ledger_entry(f"acme/{j}")) or b"") for j in ("a", "b")]
    assert [{k: v for k, v in e.items() if k not in ("job_id", "ts")} for e in entries] == [
        {k: v for k, v in entries[1].items() if k not in ("job_id", "ts")}
    ] * 2
    assert list(entries[0]) == list(entries[1])  # the same fields, in the same order
    assert streamed == entries
    assert (await aggregates(redis, settings))["jobs"] == 3


async def test_a_changed_entry_is_served_not_the_remembered_answer(settings: Settings, redis: Redis) -> None:
    stage = await dedup(settings, redis)
    await redis.set(settings.keys.cache(KEY), answer("old").model_dump_json())
    assert reply(await handle(stage, hit_job("h-1"))).content == "old"
    await redis.set(settings.keys.cache(KEY), answer("new").model_dump_json())  # refilled meanwhile
    with commands(redis) as sent:
        assert reply(await handle(stage, hit_job("h-2"))).content == "new"
    assert sent == ["EVALSHA", "EVALSHA"]  # the entry came back; recorded on a second trip
    entry = json.loads(await redis.get(settings.keys.ledger_entry("acme/h-2")) or b"")
    assert entry["cache"] == "hit" and entry["output_tokens"] == 9
    with commands(redis) as sent:
        assert reply(await handle(stage, hit_job("h-3"))).content == "new"  # the new answer is the one remembered
    assert sent == ["EVALSHA"]


async def test_a_remembered_key_whose_entry_is_gone_takes_the_lease(settings: Settings, redis: Redis) -> None:
    stage = await dedup(settings, redis)
    await redis.set(settings.keys.cache(KEY), answer("x").model_dump_json())
    await handle(stage, hit_job("h-1"))
    await redis.delete(settings.keys.cache(KEY))  # expired
    h = await handle(stage, hit_job("lead"))
    assert [p.routing_key for p in h.publishes] == [stage.topo.route]
    assert await redis.get(settings.keys.inflight(KEY)) == b"acme/lead"
    assert await ledger_entries(redis, settings) == ["h-1"]
    assert stage.one_trip is not None and KEY not in stage.one_trip.answers  # forgotten with its entry
    assert stage.one_trip.held_bytes == 0 and not stage.one_trip.sizes


async def test_an_entry_already_there_and_redis_away_go_the_ledgers_way(
    settings: Settings, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    stage = await dedup(settings, redis)
    await redis.set(settings.keys.cache(KEY), answer("x").model_dump_json())
    await handle(stage, hit_job("h-1"))
    # An entry whose stored result expired: the ledger's record stores the result and keeps the entry.
    earlier = (await redis.get(settings.keys.ledger_entry("acme/h-1"))) or b""
    await redis.delete(settings.keys.result("acme/h-1"))
    assert reply(await handle(stage, hit_job("h-1"))).content == "x"
    assert await redis.get(settings.keys.ledger_entry("acme/h-1")) == earlier
    assert await redis.get(settings.keys.result("acme/h-1")) is not None
    assert (await aggregates(redis, settings))["jobs"] == 1
    # Redis away on the second trip: answered, and the ledger written after the reply (the account stage's way).
    assert stage.one_trip is not None
    stage.one_trip.clear()
    assert not stage.one_trip.answers and stage.one_trip.held_bytes == 0

    async def away(**_: Any) -> Any:
        raise RedisConnectionError("gone")

    monkeypatch.setattr(stage.one_trip, "_record", away)
    ledger = stage.one_trip.ledger
    assert ledger.one_server  # its first write is the whole record
    record, failed = ledger._whole, []

    async def away_once(**kwargs: Any) -> Any:
        if not failed:
            failed.append(1)
            raise RedisConnectionError("gone")
        return await record(**kwargs)

    monkeypatch.setattr(ledger, "_whole", away_once)
    h = await handle(stage, hit_job("h-2"))
    assert reply(h).content == "x" and h.after_publish is not None
    assert await ledger_entries(redis, settings) == ["h-1"]
    await h.after_publish()
    assert sorted(await ledger_entries(redis, settings)) == ["h-1", "h-2"]


async def test_a_reply_lost_after_the_one_trip_script_ran_never_sends_the_hit_to_the_route_stage(
    settings: Settings, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The script ran (the hit recorded) and its reply was lost (a dropped connection, a write no replica
    confirmed): answered from memory with the result stored, not routed to a provider call."""
    stage = await dedup(settings, redis)
    assert stage.one_trip is not None
    await redis.set(settings.keys.cache(KEY), answer("x").model_dump_json())
    await handle(stage, hit_job("h-1"))
    serve = stage.one_trip._serve

    async def ran_then_lost(**kwargs: Any) -> Any:
        await serve(**kwargs)
        raise RedisConnectionError("reply lost")

    monkeypatch.setattr(stage.one_trip, "_serve", ran_then_lost)
    h = await handle(stage, hit_job("h-2"))
    assert [p.routing_key for p in h.publishes] == ["r"]
    stored = await redis.get(settings.keys.result("acme/h-2"))
    assert h.publishes[0].body == stored  # the very result stored
    assert sorted(await ledger_entries(redis, settings)) == ["h-1", "h-2"]
    assert (await aggregates(redis, settings))["jobs"] == 2


async def test_the_remembered_answers_are_the_most_recently_used(settings: Settings, redis: Redis) -> None:
    account = cast(Any, SimpleNamespace(recorder=SimpleNamespace(ledger=None)))
    hits = OneTripHits(settings.model_copy(update={"hit_memo_entries": 2}), redis, account)
    raw = {k: answer(k).model_dump_json().encode() for k in "abc"}
    hits.remember("a", raw["a"])
    hits.remember("b", raw["b"])
    hits.answers.move_to_end("a")  # a lookup of a
    hits.remember("c", raw["c"])
    assert list(hits.answers) == ["a", "c"]
    assert hits.answers["c"] == (hashlib.sha1(raw["c"]).hexdigest(), answer("c"))
    none = OneTripHits(settings.model_copy(update={"hit_memo_entries": 0}), redis, account)
    none.remember("a", raw["a"])
    assert not none.answers


async def test_the_remembered_answers_are_bounded_in_bytes(settings: Settings, redis: Redis) -> None:
    account = cast(Any, SimpleNamespace(recorder=SimpleNamespace(ledger=None)))
    raw = {k: answer(k * n).model_dump_json().encode() for k, n in (("a", 1), ("b", 1), ("c", 1), ("d", 300))}
    bound = len(raw["a"]) + len(raw["b"]) + len(raw["c"]) // 2  # two small answers fit, not three
    hits = OneTripHits(settings.model_copy(update={"hit_memo_bytes": bound}), redis, account)
    hits.remember("a", raw["a"])
    hits.remember("b", raw["b"])
    hits.remember("c", raw["c"])
    assert list(hits.answers) == ["b", "c"] and hits.held_bytes == len(raw["b"]) + len(raw["c"])
    hits.remember("c", raw["c"])  # remembered again: counted once
    assert hits.held_bytes == len(raw["b"]) + len(raw["c"])
    assert len(raw["d"]) > bound
    hits.remember("d", raw["d"])  # larger than the whole memo: not kept, and nothing else pushed out for it
    assert list(hits.answers) == ["b", "c"]
    hits.forget("b")
    assert list(hits.answers) == ["c"] and hits.held_bytes == len(raw["c"])
