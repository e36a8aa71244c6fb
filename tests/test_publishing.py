"""The one publish-retry loop (farebox/publishing.py) and its two callers' use of it: what is waited
out (a full queue's nack, the broker away), what is raised at once (a return, a bug), the waits."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from types import SimpleNamespace
from typing import Any

import aiormq
import pytest

from farebox import metrics, publishing
from farebox.errors import FareboxError
from farebox.patches import aiormq_writes
from farebox.publishing import Backoff, publish_confirmed
from farebox.settings import Settings
from farebox.stages import runtime
from farebox.stages.stage import Delivery, Handled, Publish

FAST = Backoff(first_s=0.001, max_s=0.004)


def nack() -> Exception:
    return aiormq.exceptions.DeliveryError(None, None)  # type: ignore[arg-type]


def returned() -> Exception:
    unroutable = aiormq.spec.Basic.Return(reply_code=312, reply_text="NO_ROUTE", routing_key="q")
    return aiormq.exceptions.PublishError(SimpleNamespace(delivery=unroutable), None)  # type: ignore[arg-type]


class FakeBroker:
    """Stands in for ``aiormq_writes.publish``: raises the given errors in turn, then confirms."""

    def __init__(self, *failures: Exception) -> None:
        self.failures = list(failures)
        self.calls: list[dict[str, Any]] = []

    async def publish(self, channel: object, body: bytes, **kwargs: Any) -> None:
        self.calls.append(kwargs)
        if self.failures:
            raise self.failures.pop(0)


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The loop's waits, recorded instead of slept (only the publishing module's asyncio is replaced)."""
    waited: list[float] = []

    async def sleep(delay: float) -> None:
        waited.append(delay)

    monkeypatch.setattr(publishing, "asyncio", SimpleNamespace(sleep=sleep))
    return waited


def broker(monkeypatch: pytest.MonkeyPatch, *failures: Exception) -> FakeBroker:
    fake = FakeBroker(*failures)
    monkeypatch.setattr(aiormq_writes, "publish", fake.publish)
    return fake


async def send(backoff: Backoff = FAST, told: list[Exception] | None = None) -> None:
    made = iter(range(1000))
    await publish_confirmed(
        object(),  # type: ignore[arg-type]  # the fake broker never looks at it
        b"{}",
        routing_key="q",
        properties=lambda: aiormq.spec.Basic.Properties(message_id=f"attempt-{next(made)}"),
        backoff=backoff,
        on_broker_down=(told if told is not None else []).append,
    )


async def test_nacks_and_outages_are_waited_out_with_doubling_waits_and_fresh_properties(
    monkeypatch: pytest.MonkeyPatch, sleeps: list[float]
) -> None:
    down = [
        aiormq.exceptions.AMQPConnectionError(),
        aiormq.exceptions.ChannelInvalidStateError(),
        ConnectionResetError(),
        TimeoutError(),
    ]
    fake = broker(monkeypatch, nack(), *down, nack())
    told: list[Exception] = []
    await asyncio.wait_for(send(Backoff(first_s=0.1, max_s=0.5), told), 5)
    assert len(fake.calls) == 7
    assert told == down  # the outages are reported, the nacks (back-pressure) are not
    assert sleeps == [0.1, 0.2, 0.4, 0.5, 0.5, 0.5]
    # Each attempt has properties of its own: a late return of one must not match the next.
    assert [c["properties"].message_id for c in fake.calls] == [f"attempt-{i}" for i in range(7)]


@pytest.mark.parametrize(
    "error",
    [returned(), RuntimeError("a bug"), ValueError("a bug"), aiormq.exceptions.ChannelPreconditionFailed()],
    ids=["return", "RuntimeError", "ValueError", "precondition"],
)
async def test_a_return_or_a_bug_is_raised_at_once_not_retried(
    monkeypatch: pytest.MonkeyPatch, sleeps: list[float], error: Exception
) -> None:
    fake = broker(monkeypatch, error, *[error] * 50)
    with pytest.raises(type(error)):
        # A loop that kept retrying would outlive the timeout and fail the test with TimeoutError.
        await asyncio.wait_for(send(), 2)
    assert len(fake.calls) == 1 and sleeps == []


# --- the stage runtime's publish -------------------------------------------------------------
class Core:
    name = "teststage"

    def input_queues(self) -> list[str]:
        return []

    def decode(self, delivery: Delivery) -> Any:
        return delivery

    async def handle(self, item: Any, delivery: Delivery) -> Handled:
        return Handled([])

    def fail(self, item: Any, err: FareboxError) -> Handled:
        return Handled([])


def worker() -> runtime.Worker:
    w = runtime.Worker(Settings(batch_max=1), Core(), [])
    w.consumption.channel = object()  # type: ignore[assignment]  # the fake broker takes any channel
    return w


def reply(caller_reply: bool) -> Publish:
    return Publish(routing_key="amq.gen-caller", body=b"{}", caller_reply=caller_reply, message_id="m-1")


async def within(aw: Awaitable[None]) -> None:
    await asyncio.wait_for(aw, 2)


async def test_stage_publish_raises_a_runtime_error_instead_of_retrying_it(
    monkeypatch: pytest.MonkeyPatch, sleeps: list[float]
) -> None:
    fake = broker(monkeypatch, *[RuntimeError("a bug")] * 50)
    with pytest.raises(RuntimeError):
        await within(worker()._publish(reply(caller_reply=False)))
    assert len(fake.calls) == 1


async def test_stage_publish_waits_out_a_full_queue_and_logs_an_outage(
    monkeypatch: pytest.MonkeyPatch, sleeps: list[float], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="farebox.runtime")
    fake = broker(monkeypatch, nack(), ConnectionResetError())
    await within(worker()._publish(reply(caller_reply=False)))
    assert len(fake.calls) == 3
    assert sleeps == [0.02, 0.04]  # the stage's own waits
    assert fake.calls[0]["properties"].message_id == "m-1" and fake.calls[0]["mandatory"] is True
    assert [r.getMessage() for r in caplog.records] == [
        "stage teststage: publish failed (ConnectionResetError); retrying"
    ]


async def test_stage_publish_drops_an_unroutable_caller_reply_and_raises_any_other_return(
    monkeypatch: pytest.MonkeyPatch, sleeps: list[float]
) -> None:
    dropped = metrics.MESSAGES.labels("teststage", "reply_unroutable")
    before = dropped._value.get()
    broker(monkeypatch, returned())
    await within(worker()._publish(reply(caller_reply=True)))
    assert dropped._value.get() == before + 1
    broker(monkeypatch, returned())
    with pytest.raises(aiormq.exceptions.PublishError):
        await within(worker()._publish(reply(caller_reply=False)))


def test_each_caller_keeps_its_own_waits() -> None:
    from farebox import client

    assert runtime.PUBLISH_BACKOFF == Backoff(first_s=0.02, max_s=1.0)
    assert client.PUBLISH_BACKOFF == Backoff(first_s=0.05, max_s=2.0)
