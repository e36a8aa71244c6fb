"""The batch worker (farebox/stages/batch_lane.py) against the real Redis and the emulator's batch APIs over
real HTTP, with what it publishes collected: jobs in, provider batches out, every job handed on exactly once,
whatever the batch does (ends, expires, fails lines, is refused) and whoever resumes it."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from farebox.emulator.knobs import EmulatorKnobs
from farebox.emulator.server import running
from farebox.errors import ProviderRejected
from farebox.providers.batch_openai import OpenAIBatchAdapter
from farebox.providers.batch_registry import build_batch_adapter
from farebox.providers.batch_types import BatchAdapter, BatchHandle, BatchStatus
from farebox.providers.calls import provider_client
from farebox.providers.registry import provider_configs
from farebox.routing.batch_lane import BatchPolicy
from farebox.schemas import Envelope, Job, RouteDecision
from farebox.settings import Settings
from farebox.stages.batch_lane import BatchIntake, BatchLane, BatchLoop
from farebox.stages.batch_onward import batch_request as _request
from farebox.stages.batch_onward import submit_order
from farebox.stages.batch_store import custom_id_of
from farebox.stages.stage import Delivery, Publish

MODELS = {"openai": "gpt-4o-mini", "anthropic": "claude-haiku-4-5", "google": "gemini-2.5-flash"}


def envelope(i: int, provider: str = "openai", **job: Any) -> Envelope:
    route = RouteDecision(
        provider=provider,
        model=MODELS[provider],
        reason="batch lane (test)",
        candidates=(f"{provider}/{MODELS[provider]}",),
        price_lane="batch",
    )
    return Envelope(
        job_id=f"job-{i}",
        job=Job(job_id=f"job-{i}", tenant="acme", prompt=f"summarize item {i}", **job),
        received_at=time.time() + i * 1e-3,
        route=route,
        deadline_at=job.get("deadline_s") and time.time() + job["deadline_s"],
    )


class Collected:
    """What the loop published, by queue."""

    def __init__(self) -> None:
        self.sent: list[Publish] = []

    async def __call__(self, p: Publish) -> None:
        self.sent.append(p)

    def envelopes(self, queue: str | None = None) -> list[Envelope]:
        return [
            Envelope.model_validate_json(p.body)
            for p in self.sent
            if (queue is None or p.routing_key == queue) and p.body.startswith(b'{"')  # not a raw corrupt record
        ]


@contextlib.asynccontextmanager
async def emulated(provider: str = "openai", **knobs: Any) -> AsyncIterator[tuple[Callable[[], BatchAdapter], str]]:
    async with running(EmulatorKnobs(port=0, **{"batch_delay_s": 0.2, **knobs})) as url:
        client = provider_client(max_connections=4, timeout_s=5.0)
        config = provider_configs({}, emulator_url=url)[provider]
        try:

            def make() -> BatchAdapter:
                adapter = build_batch_adapter(config, client)
                assert adapter is not None
                return adapter

            yield make, url
        finally:
            await client.aclose()


def lane_of(
    settings: Settings, redis: Redis, adapter: BatchAdapter, clock: Callable[[], float] = time.time, **policy: Any
) -> BatchLane:
    batch = BatchPolicy(**{"linger_s": 0.1, **policy})
    return BatchLane(settings, adapter.name, adapter, redis, policy=lambda: batch, clock=clock)


async def take(lane: BatchLane, envs: list[Envelope]) -> None:
    intake = BatchIntake(lane)
    for env in envs:
        handled = await intake.handle(env, Delivery(queue=intake.input_queues()[0], body=b""))
        assert handled.publishes == []  # the job is in Redis; nothing goes on until its batch ends


async def run_until(loop: BatchLoop, done: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, "the batch lane did not hand every job on"
        await loop.tick()
        await asyncio.sleep(0.05)


async def batches_made(url: str) -> int:
    """Batches the emulator was asked to create, of every provider."""
    async with httpx.AsyncClient() as c:
        stats = (await c.get(f"{url}/_emulator/stats")).json()
    return sum(stats.get("batches", {}).get("created", {}).values())


async def left_in_redis(redis: Redis, settings: Settings) -> list[bytes]:
    keys = [k async for k in redis.scan_iter(match=f"{settings.keys.prefix}{{batch:*")]
    return [k for k in keys if b":job:" not in k]  # the per-job markers stay (with their TTL) to refuse repeats


@pytest.mark.parametrize("provider", ["openai", "anthropic", "google"])
async def test_every_job_is_answered_once_through_one_batch(settings: Settings, redis: Redis, provider: str) -> None:
    async with emulated(provider) as (make, _):
        lane = lane_of(settings, redis, make())
        envs = [envelope(i, provider) for i in range(6)]
        await take(lane, envs)
        out = Collected()
        loop = BatchLoop(lane, out)
        await run_until(loop, lambda: len(out.sent) >= 6)
        await loop.tick()
    answered = out.envelopes(settings.topology.account)
    assert sorted(e.job_id for e in answered) == sorted(e.job_id for e in envs)  # each once
    assert all(e.outcome is not None and e.outcome.batch_id for e in answered)
    assert {e.outcome.batch_id for e in answered if e.outcome} == {
        answered[0].outcome.batch_id if answered[0].outcome else ""
    }
    assert all(e.route is not None and e.route.price_lane == "batch" for e in answered)
    assert all(e.outcome is not None and e.outcome.usage.input_tokens > 0 for e in answered)
    assert await left_in_redis(redis, settings) == []


@pytest.mark.parametrize("when", ["open", "submitted"])
async def test_a_redelivered_job_enters_no_second_batch(settings: Settings, redis: Redis, when: str) -> None:
    clock = Clock()
    async with emulated() as (make, url):
        lane = lane_of(settings, redis, make(), clock)
        await take(lane, [envelope(1), envelope(2)])
        out = Collected()
        loop = BatchLoop(lane, out)
        if when == "submitted":
            clock.now += 1
            await loop.tick()
            assert (await lane.store.meta((await lane.store.live())[0]))["state"] == "submitted"
        await take(lane, [envelope(1)])  # the intake message again, while its batch is live: its ack was lost
        await asyncio.sleep(0.3)
        await run_until(loop, lambda: len(out.sent) >= 2)
        for _ in range(3):
            await loop.tick()
        made = await batches_made(url)
    assert sorted(e.job_id for e in out.envelopes()) == ["job-1", "job-2"]
    assert made == 1


async def test_a_full_batch_is_sealed_at_the_policys_limit(settings: Settings, redis: Redis) -> None:
    async with emulated() as (make, url):
        lane = lane_of(settings, redis, make(), linger_s=3600, max_requests=4)
        await take(lane, [envelope(i) for i in range(10)])
        out = Collected()
        loop = BatchLoop(lane, out)
        await run_until(loop, lambda: len(out.sent) >= 8)  # two full batches; the third lingers
        for _ in range(3):
            await loop.tick()
        stats = await batches_made(url)
    assert len(out.sent) == 8
    assert stats == 2


class Clock:
    """The wall clock, moved on by ``now += s`` (a claim lapses without waiting for it)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return time.time() + self.now


async def test_a_worker_that_died_after_submitting_is_resumed_without_a_second_submit(
    settings: Settings, redis: Redis
) -> None:
    clock = Clock()
    async with emulated() as (make, url):
        first = lane_of(settings, redis, make(), clock)
        await take(first, [envelope(i) for i in range(5)])
        clock.now += 1
        await BatchLoop(first, Collected()).tick()  # sealed and submitted; then the worker is gone
        meta = await first.store.meta((await first.store.live())[0])
        assert meta["state"] == "submitted"
        second = lane_of(settings, redis, make(), clock)
        out = Collected()
        loop = BatchLoop(second, out)
        await loop.tick()
        assert out.sent == []  # the first worker's claim still holds
        clock.now += 31  # past its claim
        await asyncio.sleep(0.3)
        await run_until(loop, lambda: len(out.sent) >= 5)
        stats = await batches_made(url)
    assert sorted(e.job_id for e in out.envelopes()) == [f"job-{i}" for i in range(5)]
    assert stats == 1


@pytest.mark.parametrize(("provider", "jobs"), [("openai", 3), ("google", 150), ("anthropic", 3)])
async def test_a_worker_that_died_during_the_create_call_is_found_not_resubmitted(
    settings: Settings, redis: Redis, provider: str, jobs: int
) -> None:
    clock = Clock()
    async with emulated(provider) as (make, url):
        first = lane_of(settings, redis, make(), clock)
        await take(first, [envelope(i, provider) for i in range(jobs)])
        batch = (await first.store.live())[0]
        clock.now += 1
        assert await first.store.move(batch, first.owner, "open", "submitting", submitting_at=repr(clock() - 1))
        # The create call reached the provider, and the worker died before writing the handle down.
        order = submit_order(await first.store.jobs(batch))
        sent = await first.adapter.submit(MODELS[provider], [_request(c, e) for c, e in order], batch)
        second = lane_of(settings, redis, make(), clock)
        clock.now += 31
        loop = BatchLoop(second, out := Collected())
        await loop.tick()  # found, not submitted again
        found = BatchHandle.model_validate_json((await second.store.meta(batch))["handle"])
        await asyncio.sleep(0.3)
        await run_until(loop, lambda: len(out.sent) >= jobs)
        made = await batches_made(url)
    assert found.batch_id == sent.batch_id and found.model == MODELS[provider]  # Anthropic: by time and count
    assert found.custom_ids == sent.custom_ids  # a found Gemini batch's lines map by position: same order
    assert len(out.envelopes(settings.topology.account)) == jobs
    assert made == 1


async def test_an_expired_batch_sends_its_unfinished_jobs_to_the_sync_lane_or_to_timeout(
    settings: Settings, redis: Redis
) -> None:
    async with emulated(batch_expire_rate=1.0) as (make, _):
        lane = lane_of(settings, redis, make(), min_deadline_s=0)
        envs = [envelope(i) for i in range(4)]
        envs[3] = envs[3].model_copy(update={"deadline_at": time.time() + 0.01})  # it cannot wait for a retry
        await take(lane, envs)
        out = Collected()
        await run_until(BatchLoop(lane, out), lambda: len(out.sent) >= 4)
    topo = settings.topology
    answered = {e.job_id for e in out.envelopes(topo.account) if e.outcome}
    moved = out.envelopes(topo.execute("openai"))
    timed_out = [e for e in out.envelopes(topo.account) if e.error]
    assert answered == {"job-0", "job-1"}  # the emulator runs the first half of an expiring batch
    assert [e.job_id for e in moved] == ["job-2"]
    assert moved[0].route is not None and moved[0].route.price_lane == "sync"
    assert "moved to the synchronous lane" in moved[0].route.reason and "expired" in moved[0].route.reason
    assert [(e.job_id, e.error.code if e.error else None) for e in timed_out] == [("job-3", "timeout")]


@pytest.mark.parametrize(("on_line_error", "queue"), [("sync", "execute"), ("error", "account")])
async def test_error_lines_go_to_the_sync_lane_or_to_their_error(
    settings: Settings, redis: Redis, on_line_error: str, queue: str
) -> None:
    async with emulated(batch_error_line_rate=1.0) as (make, _):
        lane = lane_of(settings, redis, make(), on_line_error=on_line_error)
        await take(lane, [envelope(i) for i in range(3)])
        out = Collected()
        await run_until(BatchLoop(lane, out), lambda: len(out.sent) >= 3)
    target = settings.topology.execute("openai") if queue == "execute" else settings.topology.account
    envs = out.envelopes(target)
    assert len(envs) == 3 and all(e.outcome is None for e in envs)
    if queue == "account":
        assert all(e.error is not None and e.error.code == "provider_error" for e in envs)


async def test_a_batch_the_provider_refuses_goes_to_the_sync_lane(settings: Settings, redis: Redis) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, json={"error": {"message": "batches are not enabled for this organization"}})

    async with httpx.AsyncClient(transport=httpx.MockTransport(refuse)) as client:
        adapter = OpenAIBatchAdapter(client, "http://openai.invalid/v1", "sk-x")
        lane = lane_of(settings, redis, adapter)
        await take(lane, [envelope(i) for i in range(3)])
        out = Collected()
        await run_until(BatchLoop(lane, out), lambda: len(out.sent) >= 3)
    moved = out.envelopes(settings.topology.execute("openai"))
    assert len(moved) == 3
    assert all(e.route is not None and "refused" in e.route.reason and e.route.price_lane == "sync" for e in moved)
    assert await left_in_redis(redis, settings) == []


async def test_a_job_with_an_unknown_custom_id_rule_still_fits(settings: Settings) -> None:
    # job_ids may hold anything the contract allows; the batch line's id is a hash of the record.
    cid = custom_id_of("acme/some job/with spaces: and ünicode")
    assert len(cid) == 32 and cid.isalnum()


@pytest.mark.parametrize(("lane", "wait_queue"), [("batch", "waiting_batch"), ("sync", "waiting")])
async def test_a_coalesced_waiter_of_a_batch_job_rechecks_slowly(
    settings: Settings, redis: Redis, lane: str, wait_queue: str
) -> None:
    from farebox.routing.policy import Policy
    from farebox.stages.cache_keys import rules_from_policy
    from farebox.stages.dedup import DedupStage

    for hold_max in (0, 32):  # waiters parked in the broker; held by dedup, but for a batch job's
        dedup = DedupStage(
            settings.model_copy(update={"coalesce_hold_max": hold_max}), redis, lambda: rules_from_policy(Policy())
        )
        sent, held = [], []
        for i in (1, 2):  # the same prompt twice: the second waits for the first
            key = f"k{hold_max}"
            env = envelope(i, lane=lane).model_copy(update={"route": None, "cache_key": key, "coalesce_key": key})
            handled = await dedup.handle(env, Delivery(queue=settings.topology.intake, body=b""))
            sent += [p.routing_key for p in handled.publishes]
            held.append(handled.resume is not None)
        if hold_max and lane == "sync":
            assert sent == [settings.topology.route] and held == [False, True]
            dedup.waker.draining = True  # as when the stage stops: the held waiter parks
            handled = await handled.resume()  # type: ignore[misc]
            sent += [p.routing_key for p in handled.publishes]
        assert sent == [settings.topology.route, getattr(settings.topology, wait_queue)]


async def test_the_batch_worker_keeps_a_leaders_lease_for_as_long_as_a_batch_takes(
    settings: Settings, redis: Redis
) -> None:
    env = envelope(1).model_copy(update={"coalesce_key": "same-prompt"})
    lease = settings.keys.inflight("same-prompt")
    await redis.set(lease, env.record, ex=300)  # the dedup stage's lease: minutes
    await redis.set(settings.keys.inflight("other"), "someone-else", ex=300)
    async with httpx.AsyncClient(transport=httpx.MockTransport(lambda r: httpx.Response(500))) as client:
        lane = lane_of(settings, redis, OpenAIBatchAdapter(client, "http://openai.invalid/v1", "sk-x"))
        await take(lane, [env, envelope(2).model_copy(update={"coalesce_key": "other"})])
    assert await redis.ttl(lease) > 86_400
    assert await redis.ttl(settings.keys.inflight("other")) <= 300  # not its job's lease: left alone


async def test_the_progress_line_says_what_is_queued_and_what_is_submitted(settings: Settings, redis: Redis) -> None:
    from farebox.stages.batch_store import lane_progress

    clock = Clock()
    async with emulated() as (make, _):
        lane = lane_of(settings, redis, make(), clock, max_requests=3, linger_s=3600)
        await take(lane, [envelope(i) for i in range(5)])  # one full batch of 3, one open with 2
        assert (await lane_progress(redis, settings.keys, ["openai", "google"])).describe() == (
            "batch lane: 5 queued for a batch"
        )
        meta = await lane.store.meta((await lane.store.live())[0])
        assert meta["state"] == "open"
        await BatchLoop(lane, Collected()).tick()  # the full one is submitted; the other lingers
        progress = await lane_progress(redis, settings.keys, ["openai"])
    assert (progress.queued, progress.submitted, len(progress.batch_ids)) == (2, 3, 1)
    assert progress.describe() == f"batch lane: 2 queued for a batch, 3 submitted as batch {progress.batch_ids[0]}"


async def test_a_job_sent_again_after_its_batch_finished_enters_a_new_batch(settings: Settings, redis: Redis) -> None:
    # Its marker outlives the stored result (a day): once that is gone, the same job_id is a job to run again.
    async with emulated() as (make, url):
        lane = lane_of(settings, redis, make())
        out = Collected()
        loop = BatchLoop(lane, out)
        await take(lane, [envelope(1)])
        await run_until(loop, lambda: len(out.sent) == 1)
        await take(lane, [envelope(1)])
        await run_until(loop, lambda: len(out.sent) == 2)
        assert await batches_made(url) == 2


async def test_a_batch_finished_by_another_worker_is_not_made_again_under_its_id(
    settings: Settings, redis: Redis
) -> None:
    clock = Clock()
    async with emulated() as (make, url):
        first = lane_of(settings, redis, make(), clock)
        await take(first, [envelope(1)])  # first's open batch X
        (x,) = await first.store.live()
        clock.now += 31  # first stalls past its claim; second takes X over and finishes it
        second = lane_of(settings, redis, make(), clock)
        out = Collected()
        await run_until(BatchLoop(second, out), lambda: len(out.sent) == 1)
        await take(first, [envelope(2)])  # first still has X as its open batch
        live = await first.store.live()
        await run_until(BatchLoop(first, out), lambda: len(out.sent) == 2)
        assert await batches_made(url) == 2
    assert len(live) == 1 and live != [x]


async def test_a_batch_never_takes_more_than_its_byte_limit(settings: Settings, redis: Redis) -> None:
    size = len(envelope(1).model_dump_json(exclude_defaults=True))
    async with emulated() as (make, url):
        lane = lane_of(settings, redis, make(), linger_s=3600, max_bytes=int(size * 2.5))
        await take(lane, [envelope(i) for i in range(7)])
        metas = [await lane.store.meta(b) for b in await lane.store.live()]
        out = Collected()
        await run_until(BatchLoop(lane, out), lambda: len(out.sent) >= 6)
        assert await batches_made(url) == 3  # 2 + 2 + 2 sealed as full; the seventh lingers
    assert sorted(int(m["count"]) for m in metas) == [1, 2, 2, 2]
    assert all(e.outcome is not None for e in out.envelopes())  # none refused, none sent to sync


class PollFails:
    """The emulator's adapter, except that polling ``broken`` fails for good (a batch the provider lost)."""

    def __init__(self, adapter: BatchAdapter) -> None:
        self.inner = adapter
        self.name, self.max_requests, self.max_bytes = adapter.name, adapter.max_requests, adapter.max_bytes
        self.broken: str | None = None
        self.cancelled: list[str] = []

    async def submit(self, model: str, requests: Any, key: str) -> BatchHandle:
        handle = await self.inner.submit(model, requests, key)
        self.broken = self.broken or handle.batch_id
        return handle

    async def find(self, key: str, hint: Any = None) -> BatchHandle | None:
        return await self.inner.find(key, hint)

    async def poll(self, handle: BatchHandle) -> BatchStatus:
        if handle.batch_id == self.broken:
            raise ProviderRejected("openai: HTTP 404 (no such batch)")
        return await self.inner.poll(handle)

    async def results(self, handle: BatchHandle) -> Any:
        return await self.inner.results(handle)

    async def cancel(self, handle: BatchHandle) -> None:
        self.cancelled.append(handle.batch_id)


async def test_a_batch_that_keeps_failing_stops_no_other_and_goes_to_the_sync_lane(
    settings: Settings, redis: Redis
) -> None:
    clock = Clock()
    async with emulated() as (make, _):
        adapter = PollFails(make())
        lane = lane_of(settings, redis, adapter, clock, max_requests=2)  # type: ignore[arg-type]
        await take(lane, [envelope(i) for i in range(6)])  # three batches; the first one's polls fail
        out = Collected()
        loop = BatchLoop(lane, out)
        deadline = time.monotonic() + 20
        while len(out.sent) < 6:
            assert time.monotonic() < deadline, out.sent
            await loop.tick()
            clock.now += 70  # past every backoff
            await asyncio.sleep(0.05)
    answered = [e.job_id for e in out.envelopes(settings.topology.account)]
    moved = [e.job_id for e in out.envelopes(settings.topology.execute("openai"))]
    assert len(answered) == 4 and len(moved) == 2  # the two healthy batches answered, the lost one's jobs moved
    assert adapter.cancelled == [adapter.broken]


async def test_only_the_batchs_owner_may_change_it(settings: Settings, redis: Redis) -> None:
    clock = Clock()
    async with emulated() as (make, _):
        first = lane_of(settings, redis, make(), clock)
        await take(first, [envelope(1)])
        (batch,) = await first.store.live()
        clock.now += 31
        second = lane_of(settings, redis, make(), clock)
        assert await second.store.claim(batch, second.owner, now=clock(), claim_s=30)
        store = first.store
        assert not await store.update(batch, first.owner, {"retry_at": "0"})
        assert not await store.handed_on(batch, first.owner, [custom_id_of(envelope(1).record)])
        assert not await store.finish(batch, first.owner)
        assert not await store.move(batch, first.owner, "open", "sealed")
        assert len(await store.jobs(batch)) == 1 and await store.live() == [batch]
        assert await store.finish(batch, second.owner)


async def test_anthropic_finds_the_one_batch_made_since_with_that_many_requests() -> None:
    from farebox.providers.batch_types import FindHint

    async with emulated("anthropic") as (make, _):
        adapter = make()
        since = time.time() - 1
        two = [_request(f"a{i}", envelope(i, "anthropic")) for i in range(2)]
        three = [_request(f"b{i}", envelope(i, "anthropic")) for i in range(3)]
        first = await adapter.submit(MODELS["anthropic"], two, "k1")
        found = await adapter.find("k2", FindHint(created_after=since, requests=2))
        await adapter.submit(MODELS["anthropic"], two, "k2")
        third = await adapter.submit(MODELS["anthropic"], three, "k3")
        ambiguous = await adapter.find("k2", FindHint(created_after=since, requests=2))
        by_count = await adapter.find("k3", FindHint(created_after=since, requests=3))
        too_late = await adapter.find("k3", FindHint(created_after=time.time() + 120, requests=3))
    assert found is not None and found.batch_id == first.batch_id
    assert ambiguous is None  # two candidates: none is taken
    assert by_count is not None and by_count.batch_id == third.batch_id
    assert too_late is None


async def test_a_batch_with_an_unreadable_job_is_given_up_without_stopping_the_others(
    settings: Settings, redis: Redis
) -> None:
    clock = Clock()
    async with emulated() as (make, _):
        lane = lane_of(settings, redis, make(), clock, max_requests=2)
        await take(lane, [envelope(i) for i in range(4)])  # batches A (jobs 0, 1) and B (jobs 2, 3)
        cid = custom_id_of(envelope(0).record)
        (broken,) = [b for b in await lane.store.live() if cid in await lane.store.jobs(b)]
        await redis.hset(settings.keys.batch_jobs("openai", broken), cid, "{not json")
        out = Collected()
        loop = BatchLoop(lane, out)
        deadline = time.monotonic() + 20
        while len(out.sent) < 4:
            assert time.monotonic() < deadline, out.sent
            await loop.tick()
            clock.now += 70
            await asyncio.sleep(0.05)
    topo = settings.topology
    answered = sorted(e.job_id for e in out.envelopes(topo.account) if e.outcome)
    raw = [p for p in out.sent if p.body == b"{not json"]
    assert answered == ["job-2", "job-3"]  # the healthy batch went on
    assert [e.job_id for e in out.envelopes(topo.execute("openai"))] == ["job-1"]  # the rest of A: sync lane
    assert len(raw) == 1 and raw[0].routing_key == topo.account  # dead-lettered there, with its reason
    assert await lane.store.live() == []


async def test_an_abandoned_batch_takes_no_more_jobs(settings: Settings, redis: Redis) -> None:
    async with emulated() as (make, _):
        lane = lane_of(settings, redis, make(), linger_s=3600)
        await take(lane, [envelope(1)])
        (batch,) = await lane.store.live()
        assert await lane.store.move(batch, lane.owner, "open", "abandoned")
        await take(lane, [envelope(2)])
        others = [b for b in await lane.store.live() if b != batch]
    assert len(others) == 1 and list(await lane.store.jobs(others[0])) == [custom_id_of(envelope(2).record)]


@pytest.mark.parametrize(("lane", "suffix"), [("batch", "|batch"), ("sync", "")])
async def test_batch_and_sync_jobs_never_coalesce_with_each_other(
    settings: Settings, redis: Redis, lane: str, suffix: str
) -> None:
    import json

    from farebox.routing.policy import Policy
    from farebox.stages.cache_keys import rules_from_policy
    from farebox.stages.dedup import DedupStage

    dedup = DedupStage(settings, redis, lambda: rules_from_policy(Policy()))
    body = json.dumps({"job_id": "j1", "tenant": "acme", "prompt": "same words", "lane": lane}).encode()
    env = dedup.decode(Delivery(queue=settings.topology.intake, body=body))
    assert env.cache_key is not None and env.coalesce_key == env.cache_key + suffix
