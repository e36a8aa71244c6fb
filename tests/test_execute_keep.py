"""The execute stage keeps a provider's answer in Redis before the job is acked, beside its hand-on to the account
stage rather than before it (farebox/stages/execute.py), against the real Redis and the emulator over HTTP."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import aiormq
import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from farebox.routing.store import CatalogStore
from farebox.schemas import Envelope, Job, Outcome, RouteDecision
from farebox.settings import Settings
from farebox.stages.execute import ExecuteStage
from farebox.stages.main import Closable, stage_cores
from farebox.stages.runtime import Worker
from farebox.stages.stage import Delivery, Handled
from tests.conftest import EmulatorStats


@pytest.fixture
async def execute(settings: Settings, redis: Redis, emulator: str) -> AsyncIterator[ExecuteStage]:
    """The openai execute stage as `farebox worker execute --provider openai` builds it, calling the emulator."""
    s = settings.model_copy(update={"emulator_url": emulator})
    calls: list[Closable] = []
    (stage,) = stage_cores(s, "execute", "openai", CatalogStore(s.catalog, s.policy), redis, calls)
    assert isinstance(stage, ExecuteStage)
    yield stage
    for call in calls:
        await call.aclose()


def routed(job_id: str) -> Envelope:
    job = Job(job_id=job_id, tenant="acme", prompt="keep my answer")
    route = RouteDecision(provider="openai", model="gpt-4o-mini", reason="test", candidates=("openai/gpt-4o-mini",))
    return Envelope(job_id=job_id, job=job, received_at=time.time(), route=route, reply_to="r")


async def handle(stage: ExecuteStage, env: Envelope, redelivered: bool = False) -> Handled:
    return await stage.handle(env, Delivery(queue=stage.input_queues()[0], body=b"", redelivered=redelivered))


def handed_on(h: Handled) -> Outcome:
    (published,) = h.publishes
    outcome = Envelope.model_validate_json(published.body).outcome
    assert outcome is not None
    return outcome


async def test_the_answer_is_kept_before_the_ack_not_before_the_hand_on(
    execute: ExecuteStage, redis: Redis, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = routed("keep-1")
    key = settings.keys.outcome(env.record)
    real_set = redis.set

    async def slow_set(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(0.2)  # a slow Redis: the hand-on does not wait for it
        return await real_set(*args, **kwargs)

    monkeypatch.setattr(execute.redis, "set", slow_set)
    handled = await handle(execute, env)
    assert await redis.exists(key) == 0  # handed on while the write is under way
    assert handled.settle_after is not None  # the runtime awaits it before the message is settled
    await handled.settle_after
    assert Outcome.model_validate_json(await redis.get(key)) == handed_on(handled)


async def test_a_redelivered_job_hands_on_the_kept_answer_without_a_second_call(
    execute: ExecuteStage, emulator_stats: EmulatorStats
) -> None:
    env = routed("keep-2")
    first = await handle(execute, env)
    assert first.settle_after is not None
    await first.settle_after
    calls = await emulator_stats.total()
    again = await handle(execute, env, redelivered=True)  # a crash after the write, before the ack
    assert handed_on(again) == handed_on(first)
    assert await emulator_stats.total() == calls


@pytest.mark.parametrize("error", [RedisConnectionError("gone"), ResponseError("OOM command not allowed")])
async def test_a_failed_write_never_fails_the_job_after_its_publishes(
    execute: ExecuteStage, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, error: Exception
) -> None:
    async def failing_set(*args: Any, **kwargs: Any) -> Any:
        raise error

    monkeypatch.setattr(execute.redis, "set", failing_set)
    handled = await handle(execute, routed("keep-3"))
    assert handled.settle_after is not None
    with caplog.at_level(logging.WARNING, logger="farebox.execute"):
        await handled.settle_after  # raising here would publish the job again
    assert handed_on(handled).content
    assert ("was not kept" in caplog.text) == isinstance(error, ResponseError)


def worker(execute: ExecuteStage, publish: Any) -> Worker:
    """The stage's runtime, its publishes replaced by ``publish`` (no broker: the job is handed to it directly)."""
    w = Worker(execute.settings.model_copy(update={"batch_max": 1}), execute, [execute.provider])
    w._publish = publish  # type: ignore[method-assign]
    return w


def delivered(execute: ExecuteStage, env: Envelope) -> Delivery:
    return Delivery(queue=execute.input_queues()[1], body=env.model_dump_json().encode())


async def test_a_hand_on_that_failed_is_requeued_only_once_the_answer_is_kept(
    execute: ExecuteStage, redis: Redis, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = routed("keep-4")
    real_set = redis.set

    async def slow_set(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(0.2)
        return await real_set(*args, **kwargs)

    async def failing(p: Any) -> None:
        raise aiormq.exceptions.ChannelInvalidStateError("the account queue's channel closed")

    monkeypatch.setattr(execute.redis, "set", slow_set)
    with pytest.raises(aiormq.exceptions.ChannelInvalidStateError):
        await worker(execute, failing)._attempt(delivered(execute, env), lambda: None)
    # The runtime requeues the message now; its redelivery, on any replica, must find the answer paid for.
    assert await redis.exists(settings.keys.outcome(env.record)) == 1


async def test_a_job_of_a_batch_whose_hand_on_failed_is_not_sent_to_the_provider_twice(
    execute: ExecuteStage, emulator_stats: EmulatorStats
) -> None:
    failures = [aiormq.exceptions.ChannelInvalidStateError("closed")]
    sent: list[Any] = []

    async def flaky(p: Any) -> None:
        if failures:
            raise failures.pop()
        sent.append(p)

    calls = await emulator_stats.total()
    # Retried by the shell (farebox/stages/runtime.py, _job_of_batch), not redelivered by the broker.
    await asyncio.wait_for(worker(execute, flaky)._job_of_batch(delivered(execute, routed("keep-5")), lambda: None), 10)
    assert await emulator_stats.total() == calls + 1
    (published,) = sent
    assert Envelope.model_validate_json(published.body).outcome is not None
