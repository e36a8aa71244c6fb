"""Provider limits shared through Redis hold across replicas (several limiter instances stand for
several execute processes), and a job waiting for a slot never outlives its deadline."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable

import pytest
from redis.asyncio import Redis

import farebox.stages.limits as limits_module
from farebox.emulator.knobs import EmulatorKnobs
from farebox.emulator.server import running
from farebox.errors import DeadlineExceeded
from farebox.providers.base import ProviderReply, ProviderRequest
from farebox.schemas import ChatMessage, Usage
from farebox.settings import ProviderLimits, Settings
from farebox.stages.limits import LimitedAdapter, SharedLimiter
from farebox.tokens import count_messages
from tests.conftest import EmulatorStats
from tests.support.pipeline import InProcessPipeline, collect


def replicas(redis: Redis, settings: Settings, limits: ProviderLimits, n: int = 2) -> list[SharedLimiter]:
    return [SharedLimiter(redis, settings.keys, "openai", limits) for _ in range(n)]


async def test_requests_per_minute_hold_across_replicas(redis: Redis, settings: Settings) -> None:
    a, b = replicas(redis, settings, ProviderLimits(rpm=6))
    waits = [await (a if i % 2 else b).try_rate(1) for i in range(6)]
    assert waits == [0.0] * 6  # the bucket starts full
    wait = await a.try_rate(1)
    assert 5.0 < wait <= 10.5  # one request refills every 10 s
    assert await b.try_rate(1) > 0


async def test_tokens_per_minute_hold_across_replicas(redis: Redis, settings: Settings) -> None:
    a, b = replicas(redis, settings, ProviderLimits(tpm=1000))
    assert await a.try_rate(600) == 0.0
    wait = await b.try_rate(600)
    assert 10.0 < wait <= 12.5  # 200 tokens short at 1000/60 per second


async def test_concurrency_slots_hold_across_replicas(redis: Redis, settings: Settings) -> None:
    a, b = replicas(redis, settings, ProviderLimits(concurrency=2))
    assert await a.try_slot("x1") and await a.try_slot("x2")
    assert not await b.try_slot("y1")
    await a.release_slot("x1")
    assert await b.try_slot("y1")


class Instant:
    name = "openai"

    async def complete(self, request: ProviderRequest) -> ProviderReply:
        raise AssertionError("must not be called while over the limit")


async def test_waiting_for_a_slot_ends_at_the_deadline(redis: Redis, settings: Settings) -> None:
    limiter = SharedLimiter(redis, settings.keys, "openai", ProviderLimits(rpm=1))
    assert await limiter.try_rate(1) == 0.0  # the only request this minute
    adapter = LimitedAdapter(Instant(), limiter, deadline_at=time.time() + 1.0)
    request = ProviderRequest(
        model="m", messages=(ChatMessage(role="user", content="hi"),), max_tokens=5, temperature=0, timeout_s=5
    )
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        await adapter.complete(request)
    assert time.monotonic() - started < 5  # did not wait out the minute


async def test_two_execute_replicas_share_one_concurrency_limit(settings: Settings) -> None:
    async with running(EmulatorKnobs(port=0, latency_ms=300)) as url:
        s = settings.model_copy(
            update={"emulator_url": url, "provider_limits": {"google": ProviderLimits(concurrency=3)}}
        )
        p = InProcessPipeline(s)
        try:
            await p.start("dedup", "route", "execute:google", "execute:google#2", "account")
            jobs = [
                {"prompt": f"Summarize item {i}.", "task": "summarize", "quality": "low", "job_id": f"c{i}"}
                for i in range(30)
            ]
            async with p.client() as client:
                results = await asyncio.wait_for(collect(client.stream(jobs, max_in_flight=30)), 120)
            stats = await EmulatorStats(url).snapshot()
        finally:
            await p.close()
    assert len(results) == 30 and all(r.status == "ok" and r.provider == "google" for r in results)
    assert 1 <= stats["peak_in_flight"] <= 3


class Echo:
    name = "openai"

    async def complete(self, request: ProviderRequest) -> ProviderReply:
        return ProviderReply(content="ok", usage=Usage(input_tokens=1, output_tokens=1), model="m", usage_reported=True)


def counted(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = limits_module.count_messages

    def counting(messages: Iterable[tuple[str, str]]) -> int:
        calls.append(1)
        return real(messages)

    monkeypatch.setattr(limits_module, "count_messages", counting)
    return calls


PROMPT = (ChatMessage(role="user", content="Count the words in this sentence, please."),)


@pytest.mark.parametrize(
    ("prompt_tokens", "debit", "counts"),
    [
        (100, 100 + 5, 0),  # the route stage's count, carried on the envelope
        (None, count_messages((m.role, m.content) for m in PROMPT) + 5, 1),  # an older envelope: counted here
    ],
)
async def test_tokens_per_minute_debit_the_carried_count_or_count_once(
    redis: Redis,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    prompt_tokens: int | None,
    debit: int,
    counts: int,
) -> None:
    limiter = SharedLimiter(redis, settings.keys, "openai", ProviderLimits(tpm=10_000))
    calls = counted(monkeypatch)
    adapter = LimitedAdapter(Echo(), limiter, deadline_at=None, prompt_tokens=prompt_tokens)
    request = ProviderRequest(model="m", messages=PROMPT, max_tokens=5, temperature=0, timeout_s=5)
    await adapter.complete(request)
    assert len(calls) == counts
    left = float(await redis.hget(settings.keys.rate_bucket("openai", "tpm"), "tokens"))
    assert left == pytest.approx(10_000 - debit, abs=1.0)  # plus what refilled meanwhile (1/6 token per ms)


async def test_the_execute_stage_uses_the_count_the_route_stage_carried(
    settings: Settings, emulator: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    limits = {p: ProviderLimits(tpm=10_000_000) for p in ("openai", "anthropic", "google")}
    s = settings.model_copy(update={"emulator_url": emulator, "provider_limits": limits})
    calls = counted(monkeypatch)
    p = InProcessPipeline(s)
    try:
        await p.start()
        async with p.client() as client:
            clean = await client.complete({"prompt": "Summarize: tokens are counted once.", "task": "summarize"})
            assert clean.status == "ok" and calls == []  # counted by the route stage only
            redacted = await client.complete({"prompt": "Summarize: mail jane@example.com today.", "task": "summarize"})
    finally:
        await p.close()
    assert redacted.status == "ok" and len(calls) == 1  # the redacted text is counted where it is sent
