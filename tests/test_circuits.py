"""Circuit breaking: after repeated exhausted retries a provider/model's circuit opens in Redis,
the router leaves it out, and fallback skips it."""

from __future__ import annotations

import asyncio
import time

import pytest
from redis.asyncio import Redis

from farebox.schemas import Envelope, Job, RouteDecision
from farebox.settings import Settings
from farebox.stages.circuits import Circuits
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
