"""Circuit breaking: after repeated exhausted retries a provider/model's circuit opens in Redis,
the router leaves it out, and fallback skips it."""

from __future__ import annotations

import asyncio
import time

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from farebox.schemas import Envelope, Job, RouteDecision
from farebox.settings import Settings
from farebox.stages.circuits import FAILURES_KEPT_S, Circuits
from farebox.stages.execute import next_target

CANDIDATES = ("google/flash", "google/pro", "openai/mini", "anthropic/haiku")


def env(fallbacks: tuple[str, ...] = ()) -> Envelope:
    route = RouteDecision(provider="google", model="flash", reason="r", candidates=CANDIDATES)
    return Envelope(job_id="j", job=Job(prompt="p"), received_at=time.time(), route=route, fallbacks=fallbacks)


@pytest.mark.parametrize(
    "failed, fallbacks, unhealthy, expected",
    [
        ("google/flash", (), frozenset(), "google/pro"),
        ("google/flash", (), frozenset({"google/pro"}), "openai/mini"),  # model circuit open
        ("google/flash", (), frozenset({"google"}), "openai/mini"),  # provider circuit open
        ("openai/mini", ("google/flash", "google/pro"), frozenset(), "anthropic/haiku"),
        ("anthropic/haiku", ("google/flash", "google/pro", "openai/mini"), frozenset(), None),
        ("google/flash", (), frozenset({"google", "openai", "anthropic"}), None),
    ],
)
def test_next_target(failed: str, fallbacks: tuple[str, ...], unhealthy: frozenset[str], expected: str | None) -> None:
    assert next_target(env(fallbacks), failed, unhealthy) == expected


async def test_open_circuits_are_shared_and_expire(redis: Redis, settings: Settings) -> None:
    opener = Circuits(redis, settings.keys)
    reader = Circuits(redis, settings.keys)  # another process
    await opener.open_circuit("google/pro", 0.3)
    await opener.open_circuit("openai", 0.3)
    names = ["google", "openai", "google/flash", "google/pro"]
    assert await reader.unhealthy(names) == frozenset({"google/pro", "openai"})
    await asyncio.sleep(0.35)
    fresh = Circuits(redis, settings.keys)
    assert await fresh.unhealthy(names) == frozenset()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_failures_are_counted_across_replicas(redis: Redis, settings: Settings) -> None:
    """Five failed jobs open a circuit whichever replicas saw them (not five per replica)."""
    replicas = [Circuits(redis, settings.keys) for _ in range(3)]
    opened = [await replicas[i % 3].exhausted("google/pro", 5, 30) for i in range(5)]
    assert opened == [None, None, None, None, 5]
    assert await Circuits(redis, settings.keys).unhealthy(["google/pro"]) == frozenset({"google/pro"})
    assert not await redis.exists(settings.keys.provider_failures("google/pro"))  # counting starts again


async def test_a_failure_count_always_expires(
    redis: Redis, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The count and its expiry are one script: an EXPIRE sent on its own, and lost with the connection, would
    leave a count that never expires (here a separate EXPIRE always fails)."""

    async def lost(*args: object, **kwargs: object) -> None:
        raise RedisConnectionError("the connection went away")

    monkeypatch.setattr(redis, "expire", lost)
    key = settings.keys.provider_failures("openai/gpt")
    assert await Circuits(redis, settings.keys).exhausted("openai/gpt", 5, 30) is None
    assert await redis.get(key) == b"1"
    assert 0 < await redis.ttl(key) <= FAILURES_KEPT_S


async def test_a_success_on_any_replica_resets_the_count(redis: Redis, settings: Settings) -> None:
    clock = Clock()
    failing, working = Circuits(redis, settings.keys, clock=clock), Circuits(redis, settings.keys, clock=clock)
    await working.succeeded(["openai/mini"])  # reads the count once: none yet
    for _ in range(4):
        await failing.exhausted("openai/mini", 5, 30)
    await working.succeeded(["openai/mini"])  # within the second: trusts what it read, costs nothing
    assert await redis.get(settings.keys.provider_failures("openai/mini")) == b"4"
    clock.now += 1.0
    await working.succeeded(["openai/mini"])  # learns of the count and resets it
    assert not await redis.exists(settings.keys.provider_failures("openai/mini"))
    assert await failing.exhausted("openai/mini", 5, 30) is None  # 1 of 5 again, not 5 of 5
    await failing.succeeded(["openai/mini"])  # its own count: reset at once
    assert not await redis.exists(settings.keys.provider_failures("openai/mini"))


async def test_counting_without_redis_opens_nothing_and_does_not_raise(settings: Settings) -> None:
    dead = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    try:
        circuits = Circuits(dead, settings.keys)
        assert await circuits.exhausted("google", 1, 30) is None
        await circuits.succeeded(["google"])
    finally:
        await dead.aclose()
