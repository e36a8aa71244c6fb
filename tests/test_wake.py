"""The cache-hit fast path and the waking of coalesced waiters (issue 22), against the real broker and Redis.

A hit and a job_id replay are answered by the dedup stage itself; a coalesced waiter is held by its dedup process
and woken by the release of its leader's lease. The crash tests kill -9 real stage processes at named points
(tests/support/crash_points.py) and check the contract: one ledger entry, one or two identical results.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from farebox.client import FareboxClient
from farebox.emulator.knobs import EmulatorKnobs
from farebox.emulator.server import running
from farebox.errors import DeadlineExceeded
from farebox.routing.policy import Policy
from farebox.schemas import Envelope, Job, JobResult, Outcome, Usage
from farebox.settings import Settings
from farebox.stages.cache_keys import rules_from_policy
from farebox.stages.dedup import DedupStage
from farebox.stages.stage import Delivery, Handled
from farebox.stages.wake import DECIDING_AT_ONCE, Waker
from tests.conftest import EmulatorStats
from tests.support.pipeline import ALL_STAGES, InProcessPipeline, ProcessPipeline, drop_namespace, ledger_entries

PROMPT = "Name one quorum queue property."
# Neither safety net (a held waiter's re-check, a parked one's broker timer) comes due within these tests: only a
# wake answers a waiter in time.
NO_POLLING = {"coalesce_recheck_ms": 30_000, "coalesce_poll_ms": 30_000}


async def aggregate(redis: Redis, settings: Settings, metric: str) -> int:
    """A metric summed over today's aggregates (every tenant, provider and model)."""
    day = time.strftime("%Y-%m-%d", time.gmtime())
    fields = await redis.hgetall(settings.keys.ledger_agg(day))
    return sum(int(v) for k, v in fields.items() if k.decode().endswith(f"|{metric}"))


@pytest.fixture
async def slow_emulator() -> AsyncIterator[str]:
    async with running(EmulatorKnobs(port=0, latency_ms=1200)) as url:
        yield url


async def test_a_hit_and_a_replay_are_answered_with_the_account_stage_down(
    pipeline: InProcessPipeline, redis: Redis, settings: Settings
) -> None:
    await pipeline.start()
    async with pipeline.client() as client:
        first = await client.complete({"prompt": PROMPT, "job_id": "w-1"}, timeout=30)
        assert first.status == "ok" and first.cache == "miss"
        await pipeline.stop("account")
        hit = await client.complete({"prompt": PROMPT, "job_id": "h-1"}, timeout=10)
        replay = await client.complete({"prompt": PROMPT, "job_id": "w-1"}, timeout=10)
    assert hit.status == "ok" and hit.cache == "hit" and hit.cost_usd == 0 and hit.content == first.content
    assert hit.baseline_cost_usd > 0  # the saving is shown
    assert replay.model_dump(exclude={"latency_ms"}) == first.model_dump(exclude={"latency_ms"})
    assert sorted(await ledger_entries(redis, settings)) == ["h-1", "w-1"]
    assert await aggregate(redis, settings, "jobs") == 2 and await aggregate(redis, settings, "cache_hits") == 1


async def test_a_waiter_is_woken_when_its_leader_finishes(settings: Settings, redis: Redis, slow_emulator: str) -> None:
    s = settings.model_copy(update={"emulator_url": slow_emulator, **NO_POLLING})
    pipeline = InProcessPipeline(s)
    try:
        await pipeline.start()
        async with pipeline.client() as client:
            leading = asyncio.create_task(client.complete({"prompt": PROMPT, "job_id": "lead"}, timeout=20))
            await asyncio.sleep(0.3)  # the leader is at the provider
            waiting = asyncio.create_task(client.complete({"prompt": PROMPT, "job_id": "wait"}, timeout=20))
            lead = await leading
            led_at = time.monotonic()
            waiter = await asyncio.wait_for(waiting, 5)
            woken_after_s = time.monotonic() - led_at
        assert lead.cache == "miss" and waiter.cache == "coalesced" and waiter.content == lead.content
        assert woken_after_s < 2.0, woken_after_s  # a wake, not a 30 s re-check
        assert sorted(await ledger_entries(redis, s)) == ["lead", "wait"]
    finally:
        await pipeline.close()


def dedup_stage(settings: Settings, redis: Redis, **update: object) -> DedupStage:
    return DedupStage(settings.model_copy(update=update), redis, lambda: rules_from_policy(Policy()))


def shared(job_id: str, key: str = "k", deadline_at: float | None = None) -> Envelope:
    """A job that shares the cache entry ``key`` (its coalescing key too)."""
    job = Job(job_id=job_id, tenant="acme", prompt="the same prompt")
    return Envelope(
        job_id=job_id, job=job, received_at=time.time(), cache_key=key, coalesce_key=key, deadline_at=deadline_at
    )


async def handled(stage: DedupStage, env: Envelope, redelivered: bool = False) -> Handled:
    delivery = Delivery(queue=stage.topo.intake, body=b"", redelivered=redelivered)
    return await stage.handle(env, delivery)


def queues(h: Handled) -> list[str]:
    return [p.routing_key for p in h.publishes]


async def test_the_waker_wakes_the_waiters_of_a_published_key_and_survives_a_broken_subscription(
    settings: Settings, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    waker = Waker(redis, settings.keys.wake_channel, capacity=4)
    broken = {"left": 1}
    listen_once = waker._listen_once

    async def flaky(stop: asyncio.Event) -> None:
        if broken["left"]:
            broken["left"] -= 1
            raise AttributeError("'NoneType' object has no attribute 'writelines'")  # redis-py's lost writer
        await listen_once(stop)

    monkeypatch.setattr(waker, "_listen_once", flaky)
    monkeypatch.setattr("farebox.stages.wake.RESUBSCRIBE_S", 0.05)
    stop = asyncio.Event()
    listening = asyncio.create_task(waker.listen(stop))
    try:
        await asyncio.wait_for(waker.listening.wait(), 5)  # subscribed again after the failure
        assert not waker.draining
        one, other = waker.expect("lease-a"), waker.expect("lease-b")
        await redis.publish(settings.keys.wake_channel, "lease-a")
        await asyncio.wait_for(one, 5)
        assert not other.done()
        waker.forget("lease-b", other)
        assert waker._waiting == {}
        held = waker.expect("lease-c")
        stop.set()  # a stopping stage: every held waiter parks at once
        await asyncio.wait_for(held, 5)
        assert waker.draining and not waker.can_hold()
    finally:
        stop.set()
        await asyncio.wait_for(listening, 5)


async def test_waiters_are_held_up_to_the_cap_and_a_copy_of_the_same_job_id_parks(
    settings: Settings, redis: Redis
) -> None:
    stage = dedup_stage(settings, redis, coalesce_hold_max=1)
    assert stage.prefetch == settings.prefetch + 1 and stage.slots == settings.prefetch
    assert queues(await handled(stage, shared("lead"))) == [stage.topo.route]
    # A producer's retry of the leader's own job_id waits too, but parked: held, a crash would redeliver it
    # marked redelivered, and it would go on as a second leader.
    own = await handled(stage, shared("lead"))
    assert own.resume is None and queues(own) == [stage.topo.waiting]
    first = await handled(stage, shared("w-1"))
    second = await handled(stage, shared("w-2"))
    assert first.resume is not None and first.publishes == []  # held
    assert second.resume is None and queues(second) == [stage.topo.waiting]  # beyond the cap: parked
    stage.waker.draining = True
    assert first.resume is not None
    assert queues(await first.resume()) == [stage.topo.waiting]
    assert stage.waker.held == 0


async def test_a_held_waiter_parks_after_the_hold_and_fails_at_its_deadline(settings: Settings, redis: Redis) -> None:
    stage = dedup_stage(settings, redis, coalesce_hold_s=0.3, coalesce_recheck_ms=50)
    await handled(stage, shared("lead"))
    waiting = await handled(stage, shared("w-1"))
    assert waiting.resume is not None
    started = time.monotonic()
    assert queues(await waiting.resume()) == [stage.topo.waiting]
    assert 0.25 <= time.monotonic() - started < 2.0
    late = await handled(stage, shared("w-2", deadline_at=time.time() + 0.2))
    assert late.resume is not None
    with pytest.raises(DeadlineExceeded):
        await late.resume()
    assert stage.waker.held == 0 and stage.waker._waiting == {}


async def test_a_woken_waiter_that_waits_for_its_turn_parks_when_the_stage_stops_meanwhile(
    settings: Settings, redis: Redis
) -> None:
    """Woken waiters decide again a few at a time; one whose turn comes after the stage began to stop parks,
    though the leader's answer is there by then."""
    stage = dedup_stage(settings, redis)
    await handled(stage, shared("lead"))
    waiting = await handled(stage, shared("w-1"))
    assert waiting.resume is not None
    for _ in range(DECIDING_AT_ONCE):  # every turn taken
        await stage.waker.deciding.acquire()
    resumed = asyncio.create_task(waiting.resume())
    await asyncio.sleep(0.05)
    assert stage.waker.wake(stage._lease_key(shared("w-1"))) == 1  # woken: it waits for its turn
    await asyncio.sleep(0.05)
    stage.waker.draining = True
    answer = Outcome(content="a", provider="openai", model="m", usage=Usage(input_tokens=1, output_tokens=1))
    await redis.set(settings.keys.cache("k"), answer.model_dump_json())
    for _ in range(DECIDING_AT_ONCE):
        stage.waker.deciding.release()
    assert queues(await asyncio.wait_for(resumed, 5)) == [stage.topo.waiting]


async def test_a_release_wakes_the_waiters_only_of_a_lease_it_held_or_that_is_gone(
    settings: Settings, redis: Redis
) -> None:
    """The cache fill's release wakes: its own lease's waiters, and an expired lease's; not another job's."""
    from farebox.constants import job_record
    from farebox.stages.ledger import Ledger

    ledger = Ledger(redis, settings.keys, result_ttl_s=60, entry_ttl_s=60, days_kept=1)
    waker = Waker(redis, settings.keys.wake_channel, capacity=4)
    stop = asyncio.Event()
    listening = asyncio.create_task(waker.listen(stop))
    try:
        await asyncio.wait_for(waker.listening.wait(), 5)
        lease, flag = settings.keys.inflight("k"), settings.keys.waiters("k")
        for holder, releaser, wakes in (("acme/other", "acme/lead", False), (None, "acme/lead", True)):
            if holder is not None:
                await redis.set(lease, holder)
            await redis.set(flag, 1)
            woken = waker.expect(lease)
            await ledger._fill_and_release(job_record("acme", releaser.split("/")[1]), None, "k")
            await asyncio.sleep(0.3)
            assert woken.done() is wakes, (holder, releaser)
            assert await redis.exists(flag) == (0 if wakes else 1)
            waker.forget(lease, woken)
            await redis.delete(lease, flag)
    finally:
        stop.set()
        await asyncio.wait_for(listening, 5)


async def flagged(redis: Redis, settings: Settings, within_s: float = 5.0) -> bool:
    """Whether a waiter has flagged a lease (it is held, waiting for the release to wake it)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        async for _ in redis.scan_iter(match=f"{settings.keys.prefix}*:waiters"):
            return True
        await asyncio.sleep(0.05)
    return False


class Replies:
    """Every reply on a client's queue, repeats included (the client's streams drop those)."""

    def __init__(self, client: FareboxClient) -> None:
        self.inbox: asyncio.Queue[JobResult] = asyncio.Queue()
        client._stream_inbox = self.inbox  # a reply no waiter awaits lands here

    async def all_within(self, first_s: float, quiet_s: float) -> list[JobResult]:
        got = [await asyncio.wait_for(self.inbox.get(), first_s)]
        while True:
            try:
                got.append(await asyncio.wait_for(self.inbox.get(), quiet_s))
            except TimeoutError:
                return got


def died(procs: ProcessPipeline, spec: str, within_s: float = 20.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if procs.procs[spec].poll() is not None:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize(
    ("point", "replies", "hot"),
    [
        pytest.param("after_record", 1, False, marks=pytest.mark.chaos),  # about 11 s each
        ("after_served", 1, True),
        pytest.param("after_reply", 2, False, marks=pytest.mark.chaos),
    ],
)
async def test_kill9_of_dedup_on_the_hit_path_keeps_one_entry_and_identical_results(
    settings: Settings, redis: Redis, emulator: str, point: str, replies: int, hot: bool
) -> None:
    """``hot``: a hit of a key the dedup process served before, looked up and recorded in one round trip
    (farebox/stages/one_trip.py); else the key's first hit there, recorded on a second trip."""
    s = settings.model_copy(update={"emulator_url": emulator})
    procs = ProcessPipeline(s)
    procs.start([spec for spec in ALL_STAGES if spec != "dedup"])
    procs.start_one("dedup", crash=(point, "hit-1"))
    try:
        async with FareboxClient.from_settings(s, wait_for_pipeline_s=60) as client:
            warm = await client.complete({"prompt": PROMPT, "job_id": "warm"}, timeout=60)
            if hot:
                assert (await client.complete({"prompt": PROMPT, "job_id": "hit-0"}, timeout=60)).cache == "hit"
            seen = Replies(client)
            await client.publish({"prompt": PROMPT, "job_id": "hit-1"}, correlation_id="hit-1")
            assert await asyncio.to_thread(died, procs, "dedup"), "the dedup process did not reach its crash point"
            procs.start_one("dedup")
            results = await seen.all_within(first_s=60, quiet_s=3)
        assert len(results) == replies
        assert all(r.model_dump() == results[0].model_dump() for r in results)  # a repeat is the stored result
        assert results[0].cache == "hit" and results[0].cost_usd == 0 and results[0].content == warm.content
        assert sorted(await ledger_entries(redis, s)) == sorted(["hit-1", "warm", *(["hit-0"] if hot else [])])
        hits = 2 if hot else 1
        assert await aggregate(redis, s, "jobs") == hits + 1 and await aggregate(redis, s, "cache_hits") == hits
    finally:
        procs.terminate()
        await drop_namespace(s)


@pytest.mark.parametrize(
    ("killed", "latency_ms"),
    [pytest.param("account", 1200, marks=pytest.mark.chaos), pytest.param("dedup", 8000, marks=pytest.mark.chaos)],
)
async def test_a_waiter_is_answered_when_the_waking_or_the_holding_worker_dies(
    settings: Settings, redis: Redis, killed: str, latency_ms: float
) -> None:
    """``account``: the leader's account process dies after its record, before the release that wakes; its
    redelivery releases and wakes. ``dedup``: the process holding the waiter dies; the broker gives the waiter to
    the next dedup process, which holds it until the wake (the leader's call, 4 to 12 s, outlasts the restart)."""
    async with running(EmulatorKnobs(port=0, latency_ms=latency_ms)) as slow_emulator:
        await waiter_answered(settings, redis, slow_emulator, killed)


async def waiter_answered(settings: Settings, redis: Redis, slow_emulator: str, killed: str) -> None:
    s = settings.model_copy(update={"emulator_url": slow_emulator, **NO_POLLING})
    stats = EmulatorStats(slow_emulator)
    procs = ProcessPipeline(s)
    procs.start([spec for spec in ALL_STAGES if spec != killed])
    procs.start_one(killed, crash=("before_fill", "lead") if killed == "account" else None)
    try:
        async with FareboxClient.from_settings(s, wait_for_pipeline_s=60) as client:
            await stats.reset()
            leading = asyncio.create_task(client.complete({"prompt": PROMPT, "job_id": "lead"}, timeout=40))
            await asyncio.sleep(0.3)
            waiting = asyncio.create_task(client.complete({"prompt": PROMPT, "job_id": "wait"}, timeout=40))
            if killed == "dedup":
                assert await flagged(redis, s), "the waiter was not held"
                procs.kill9("dedup")
            else:
                assert await asyncio.to_thread(died, procs, "account"), "the account process did not crash"
            procs.start_one(killed)
            lead = await leading
            led_at = time.monotonic()
            waiter = await waiting
            woken_after_s = time.monotonic() - led_at
        assert woken_after_s < 3.0, woken_after_s  # woken, not answered by a 30 s re-check
        assert lead.cache == "miss" and waiter.cache == "coalesced" and waiter.content == lead.content
        assert await stats.total() == 1
        assert sorted(await ledger_entries(redis, s)) == ["lead", "wait"]
    finally:
        procs.terminate()
        await drop_namespace(s)
