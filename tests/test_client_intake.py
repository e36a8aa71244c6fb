"""The client against the real broker: the intake's consumer count, the warning when no pipeline
takes jobs, what a failed connect leaves behind, the opt-in write coalescing, and a bug in a publish
failing out of the retry loop."""

from __future__ import annotations

import asyncio
import time

import aio_pika
import aiormq
import pytest

from farebox.client import NO_PIPELINE_GRACE_S, FareboxClient
from farebox.patches import aiormq_writes
from farebox.settings import Settings
from tests.support.pipeline import InProcessPipeline


async def first_warning(warnings: list[str], within_s: float) -> float | None:
    """Seconds until ``warnings`` got one, or None when it got none within ``within_s``."""
    started = time.monotonic()
    while time.monotonic() - started < within_s:
        if warnings:
            return time.monotonic() - started
        await asyncio.sleep(0.05)
    return None


async def test_intake_consumers_counts_what_takes_jobs(
    settings: Settings, bare_intake: aio_pika.abc.AbstractQueue
) -> None:
    async with FareboxClient.from_settings(settings) as client:
        assert await client.intake_consumers() == 0

        async def take(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            await message.ack()

        tag = await bare_intake.consume(take)
        assert await client.intake_consumers() == 1
        await bare_intake.cancel(tag)
        await bare_intake.delete(if_unused=False, if_empty=False)
        assert await client.intake_consumers() == 0  # no queue at all: no pipeline either


async def test_no_pipeline_at_all_is_said_within_3s_while_the_client_keeps_waiting(settings: Settings) -> None:
    warnings: list[str] = []
    client = FareboxClient.from_settings(settings, on_no_pipeline=warnings.append, wait_for_pipeline_s=60)
    connecting = asyncio.create_task(client.connect())
    try:
        assert await first_warning(warnings, 3.0) is not None, "no warning within 3 s"
        assert not connecting.done()  # still waiting for a pipeline to declare the intake
    finally:
        connecting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await connecting
    assert len(warnings) == 1
    assert repr(settings.topology.intake) in warnings[0] and "`farebox up`" in warnings[0]


async def test_a_cancelled_connect_closes_what_it_opened(settings: Settings) -> None:
    warnings: list[str] = []
    client = FareboxClient.from_settings(settings, on_no_pipeline=warnings.append, wait_for_pipeline_s=60)
    connecting = asyncio.create_task(client.connect())
    assert await first_warning(warnings, 5.0) is not None  # connected, and waiting for the intake
    opened = client._connection
    assert opened is not None
    connecting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await connecting
    assert opened.is_closed
    assert client._connection is None and client._watcher is None


async def test_an_intake_nobody_consumes_is_said_within_3s(
    settings: Settings, bare_intake: aio_pika.abc.AbstractQueue
) -> None:
    warnings: list[str] = []
    async with FareboxClient.from_settings(settings, on_no_pipeline=warnings.append):
        assert await first_warning(warnings, 3.0) is not None, "no warning within 3 s"


async def test_no_warning_while_a_pipeline_consumes(pipeline: InProcessPipeline, settings: Settings) -> None:
    await pipeline.start("dedup")  # the stage that consumes the intake
    warnings: list[str] = []
    async with pipeline.client(on_no_pipeline=warnings.append) as client:
        assert await client.intake_consumers() >= 1
        # Past the moment the warning above arrives: long enough for the check to have run.
        assert await first_warning(warnings, NO_PIPELINE_GRACE_S + 2.0) is None


@pytest.fixture
def stock_writer(monkeypatch: pytest.MonkeyPatch) -> None:
    """aiormq as it is before anything installs farebox's writer (tests earlier in this process may have)."""
    monkeypatch.setattr(aiormq.connection, "FrameGenerator", aiormq_writes._Original)
    monkeypatch.setattr(aiormq.connection.Connection, "FRAME_BUFFER_SIZE", 10)


async def test_a_default_client_leaves_aiormqs_writer_alone(
    settings: Settings, bare_intake: aio_pika.abc.AbstractQueue, stock_writer: None
) -> None:
    async with FareboxClient.from_settings(settings) as client:
        await client.publish({"prompt": "hi", "job_id": "w-1"})
    assert aiormq.connection.FrameGenerator is aiormq_writes._Original
    assert aiormq.connection.Connection.FRAME_BUFFER_SIZE == 10


async def test_coalesce_writes_installs_farebox_writer(
    settings: Settings, bare_intake: aio_pika.abc.AbstractQueue, stock_writer: None
) -> None:
    async with FareboxClient.from_settings(settings, coalesce_writes=True):
        assert aiormq.connection.FrameGenerator is aiormq_writes.CoalescingFrameGenerator
        assert aiormq.connection.Connection.FRAME_BUFFER_SIZE == aiormq_writes.WRITE_QUEUE_FRAMES


async def test_a_runtime_error_in_a_publish_fails_out_of_the_retry_loop(
    settings: Settings, bare_intake: aio_pika.abc.AbstractQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    attempts = 0

    async def buggy(*args: object, **kwargs: object) -> None:
        nonlocal attempts
        attempts += 1
        raise RuntimeError("a bug, not the broker")

    async with FareboxClient.from_settings(settings) as client:
        monkeypatch.setattr(aiormq_writes, "publish", buggy)
        with pytest.raises(RuntimeError, match="a bug"):
            await asyncio.wait_for(client.publish({"prompt": "hi"}), 5)
    assert attempts == 1


async def test_a_failed_consumer_count_is_logged_not_raised_nor_warned(
    settings: Settings,
    bare_intake: aio_pika.abc.AbstractQueue,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def broker_away(self: FareboxClient) -> int:
        raise ConnectionResetError

    monkeypatch.setattr(FareboxClient, "intake_consumers", broker_away)
    caplog.set_level("INFO", logger="farebox.client")
    warnings: list[str] = []
    async with FareboxClient.from_settings(settings, on_no_pipeline=warnings.append):
        await asyncio.sleep(NO_PIPELINE_GRACE_S + 0.5)
    assert warnings == []
    assert "could not count the intake's consumers (ConnectionResetError)" in caplog.text
