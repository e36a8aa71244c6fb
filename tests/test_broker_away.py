"""What counts as the broker being away: aiormq's and aio-pika's errors, and a bare RuntimeError only
while the connection really is closed or reconnecting (a bug must fail, not be retried for ever)."""

from __future__ import annotations

import asyncio
import gc
from types import SimpleNamespace
from typing import Any

import aio_pika
import aiormq
import pytest
from yarl import URL

from farebox.errors import broker_away
from farebox.settings import Settings
from farebox.stages import consuming, main, runtime
from farebox.stages.main import run_stage
from tests.support.pipeline import drop_namespace


@pytest.mark.parametrize(
    ("err", "closed", "reconnecting", "away"),
    [
        (aiormq.exceptions.AMQPConnectionError(), False, False, True),
        (aiormq.exceptions.ChannelInvalidStateError(), False, False, True),
        (ConnectionResetError(), False, False, True),
        (RuntimeError("connection closed"), True, False, True),
        (RuntimeError("reconnecting right now"), False, True, True),
        (RuntimeError("a bug"), False, False, False),
        (ValueError("a bug"), True, True, False),
        (KeyError("x"), True, False, False),
    ],
)
def test_broker_away(err: BaseException, closed: bool, reconnecting: bool, away: bool) -> None:
    assert broker_away(err, SimpleNamespace(is_closed=closed, reconnecting=reconnecting)) is away


@pytest.mark.parametrize(("underneath_closed", "away"), [(True, True), (False, False)])
def test_a_runtime_error_counts_while_the_amqp_connection_under_a_robust_one_is_closed(
    underneath_closed: bool, away: bool
) -> None:
    robust = SimpleNamespace(
        is_closed=False,
        reconnecting=False,
        transport=SimpleNamespace(connection=SimpleNamespace(is_closed=underneath_closed)),
    )
    assert broker_away(RuntimeError("<Connection> closed"), robust) is away


class FlakyConnection:
    """``channel()`` fails with the given errors in turn, then with a sentinel that ends the test."""

    def __init__(self, errors: list[BaseException], *, is_closed: bool) -> None:
        self.errors = errors
        self.is_closed = is_closed
        self.reconnecting = False
        self.calls = 0

    async def channel(self, **_: Any) -> None:
        self.calls += 1
        raise self.errors.pop(0) if self.errors else LookupError("the end")


class Core:
    name = "dedup"

    def __init__(self, queues: list[str] | None = None) -> None:
        self.queues = queues or []

    def input_queues(self) -> list[str]:
        return self.queues


async def test_a_stage_start_retries_a_closed_connections_runtime_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real_sleep = asyncio.sleep

    async def no_sleep(_: float) -> None:
        await real_sleep(0)

    monkeypatch.setattr(consuming.asyncio, "sleep", no_sleep)
    worker = runtime.Worker(Settings(), Core(), [])  # type: ignore[arg-type]
    closed = FlakyConnection([RuntimeError("closed"), RuntimeError("closed")], is_closed=True)
    with pytest.raises(LookupError):
        await worker.consumption.start(closed, worker._callback)  # type: ignore[arg-type]
    assert closed.calls == 3
    open_one = FlakyConnection([RuntimeError("a bug")], is_closed=False)
    with pytest.raises(RuntimeError, match="a bug"):
        await worker.consumption.start(open_one, worker._callback)  # type: ignore[arg-type]
    assert open_one.calls == 1


async def test_a_robust_connection_that_is_reconnecting_counts_as_the_broker_away() -> None:
    """While a robust connection reconnects it has no transport, and aio-pika 10's ``reconnecting`` stays
    False: ``channel()`` raises "Connection was not opened"."""
    connection = aio_pika.RobustConnection(URL("amqp://guest:guest@127.0.0.1:1/"))  # never opened: no transport
    with pytest.raises(RuntimeError) as raised:
        await connection.channel().__aenter__()
    assert not connection.is_closed and not connection.reconnecting
    assert broker_away(raised.value, connection)


async def test_a_stage_starts_when_the_broker_closed_its_connection_a_moment_before(settings: Settings) -> None:
    """Between the broker closing the AMQP connection and the robust connection noticing, ``channel()`` raises
    a bare RuntimeError while the robust one is neither closed nor reconnecting: a stage that took it for a bug
    died on CI. It waits for the reconnect and consumes."""
    worker = runtime.Worker(settings, Core([settings.topology.intake]), [])  # type: ignore[arg-type]
    connection = await aio_pika.connect_robust(settings.amqp_url, reconnect_interval=0.2)
    try:
        await connection.transport.connection.close()  # type: ignore[union-attr]  # as the broker would
        assert not connection.is_closed and not connection.reconnecting
        consumers = await asyncio.wait_for(worker.consumption.start(connection, worker._callback), 30)
        assert [queue.name for queue, _ in consumers] == [settings.topology.intake]
    finally:
        await connection.close()
        await drop_namespace(settings)


async def test_one_worker_failing_stops_the_others_and_leaves_nothing_unretrieved(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    stopped: list[str] = []

    async def run(self: runtime.Worker, stop: asyncio.Event) -> None:
        if self.core.name == "route":
            raise RuntimeError("a bug")
        await stop.wait()
        stopped.append(self.core.name)

    monkeypatch.setattr(runtime.Worker, "run", run)

    async def on_ready() -> None:
        raise AssertionError("not every worker was ready")

    with pytest.raises(RuntimeError, match="a bug"):
        await run_stage(settings, "all", on_ready=on_ready)
    gc.collect()  # an unretrieved gather would log now
    assert "route" not in stopped and len(stopped) >= 4 and "dedup" in stopped  # the others saw stop and ended
    assert "never retrieved" not in caplog.text


async def test_winding_down_cancels_a_worker_that_does_not_stop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(main, "DRAIN_TIMEOUT_S", -9.9)
    done = asyncio.create_task(asyncio.sleep(0))
    stuck = asyncio.create_task(asyncio.sleep(3600))
    await main.wind_down([done, stuck])
    assert done.done() and not done.cancelled() and stuck.cancelled()


async def test_a_stop_while_the_stage_cannot_consume_ends_it_at_once(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM while the broker will not let a stage consume (``Consumption.start`` retrying with backoff) ends
    the worker now: before, it went on retrying until the drain timeout cancelled it, past a grace period."""
    retrying = asyncio.Event()

    async def away(self: consuming.Consumption, connection: Any, on_message: Any) -> list[tuple[Any, Any]]:
        while True:  # what start does while every channel() fails as the broker away
            retrying.set()
            await asyncio.sleep(0.05)

    monkeypatch.setattr(consuming.Consumption, "start", away)
    worker = runtime.Worker(settings, Core([settings.topology.intake]), [])  # type: ignore[arg-type]
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop))
    await asyncio.wait_for(retrying.wait(), 10)
    await asyncio.sleep(0.2)  # a few rounds of retrying
    stop.set()
    started = asyncio.get_running_loop().time()
    await asyncio.wait_for(running, 5)
    assert asyncio.get_running_loop().time() - started < 2
    assert not worker.ready.is_set()


async def test_a_stop_halfway_through_the_start_cancels_the_consumers_already_started(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stop after the first of a stage's queues began consuming, before the rest: that consumer is cancelled
    and its messages drained as in a normal stop, not cut off when the connection closes."""
    cancelled: list[str] = []

    class Queue:
        async def cancel(self, tag: str) -> None:
            cancelled.append(tag)

    halfway = asyncio.Event()

    async def first_only(self: consuming.Consumption, connection: Any, on_message: Any) -> list[tuple[Any, Any]]:
        self.consumers = [(Queue(), "ctag-1")]
        halfway.set()
        await asyncio.Event().wait()  # the second queue's consume never comes back
        raise AssertionError("unreachable")

    monkeypatch.setattr(consuming.Consumption, "start", first_only)
    worker = runtime.Worker(settings, Core([settings.topology.intake]), [])  # type: ignore[arg-type]
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop))
    await asyncio.wait_for(halfway.wait(), 10)
    stop.set()
    await asyncio.wait_for(running, 5)
    assert cancelled == ["ctag-1"] and not worker.ready.is_set()
