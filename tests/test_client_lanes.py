"""Which intake the client sends an interactive job to, against the real broker: the interactive twin
(``<ns>.jobs.interactive``) only while something consumes it. A twin left behind by a rollback to a
pipeline without the interactive worker has nobody behind it, and a job published there would wait for ever."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import aio_pika.abc
import pytest

from farebox import intake
from farebox.client import FareboxClient
from farebox.settings import Settings
from tests.support.pipeline import declared, get_message
from tests.support.tcp_proxy import proxy_in_front_of


async def body_on(channel: aio_pika.abc.AbstractChannel, queue: str) -> dict[str, Any]:
    message = await get_message(await channel.declare_queue(queue, passive=True), timeout=5)
    body: dict[str, Any] = json.loads(message.body)
    return body


async def queue_depth(channel: aio_pika.abc.AbstractChannel, queue: str) -> int:
    return (await channel.declare_queue(queue, passive=True)).declaration_result.message_count or 0


class TwinConsumer:
    """A consumer on the interactive intake, as the interactive worker is: it takes what arrives there."""

    def __init__(self, queue: aio_pika.abc.AbstractQueue) -> None:
        self.queue = queue
        self.bodies: list[dict[str, Any]] = []
        self.tag: str | None = None

    async def start(self) -> None:
        async def take(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            self.bodies.append(json.loads(message.body))
            await message.ack()

        self.tag = await self.queue.consume(take)

    async def stop(self) -> None:
        assert self.tag is not None
        await self.queue.cancel(self.tag)
        self.tag = None


@contextlib.asynccontextmanager
async def consuming_twin(channel: aio_pika.abc.AbstractChannel, settings: Settings) -> AsyncIterator[TwinConsumer]:
    consumer = TwinConsumer(await channel.declare_queue(settings.topology.intake_interactive, passive=True))
    await consumer.start()
    try:
        yield consumer
    finally:
        if consumer.tag is not None:
            await consumer.stop()


async def wait_for_bodies(consumer: TwinConsumer, count: int, timeout: float = 5) -> list[dict[str, Any]]:
    deadline = asyncio.get_running_loop().time() + timeout
    while len(consumer.bodies) < count:
        assert asyncio.get_running_loop().time() < deadline, f"{len(consumer.bodies)} of {count} arrived"
        await asyncio.sleep(0.02)
    return consumer.bodies


async def test_a_twin_nobody_consumes_is_passed_by_for_the_plain_intake(settings: Settings) -> None:
    """(a) After a rollback the twin is still there, with no consumer: the job goes where the pipeline takes jobs."""
    topo = settings.topology
    async with declared(settings) as channel, FareboxClient.from_settings(settings) as client:
        await client.publish({"prompt": "hi", "job_id": "rolled-back"}, priority="interactive")
        body = await body_on(channel, topo.intake)
        assert await queue_depth(channel, topo.intake_interactive) == 0
    assert body == {"prompt": "hi", "job_id": "rolled-back"}  # as a pipeline from before the lanes knows jobs


async def test_a_twin_with_a_consumer_gets_the_interactive_jobs(settings: Settings) -> None:
    """(b) The interactive worker consumes the twin: interactive jobs go there, background work does not."""
    topo = settings.topology
    async with declared(settings) as channel, consuming_twin(channel, settings) as twin:
        async with FareboxClient.from_settings(settings) as client:
            await client.publish({"prompt": "now", "job_id": "i"}, priority="interactive")
            await client.publish({"prompt": "later", "job_id": "b"}, priority="background")
            got = await wait_for_bodies(twin, 1)
            plain = await body_on(channel, topo.intake)
    assert [(j["job_id"], j["priority"]) for j in got] == [("i", "interactive")]
    assert plain == {"prompt": "later", "job_id": "b", "priority": "background"}


async def test_the_client_follows_the_interactive_worker_coming_and_going(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client stays connected through a deploy and a rollback: it looks again every LANE_RECHECK_S."""
    monkeypatch.setattr(intake, "LANE_RECHECK_S", 0.2)
    topo = settings.topology
    async with declared(settings) as channel, FareboxClient.from_settings(settings) as client:
        await client.publish({"prompt": "one", "job_id": "before"}, priority="interactive")
        assert (await body_on(channel, topo.intake))["job_id"] == "before"
        async with consuming_twin(channel, settings) as twin:  # the interactive worker is deployed
            await asyncio.sleep(0.3)
            await client.publish({"prompt": "two", "job_id": "deployed"}, priority="interactive")
            assert [j["job_id"] for j in await wait_for_bodies(twin, 1)] == ["deployed"]
        await asyncio.sleep(0.3)  # and rolled back: its queue stays, nobody consumes it
        await client.publish({"prompt": "three", "job_id": "rolled-back"}, priority="interactive")
        assert await body_on(channel, topo.intake) == {"prompt": "three", "job_id": "rolled-back"}
        assert await queue_depth(channel, topo.intake_interactive) == 0


async def test_the_twin_is_probed_once_per_period_not_per_publish(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(intake, "LANE_RECHECK_S", 1.0)
    probes: list[str] = []
    real = intake.queue_consumers

    async def counted(connection: aio_pika.abc.AbstractConnection, queue: str) -> int | None:
        probes.append(queue)
        return await real(connection, queue)

    monkeypatch.setattr(intake, "queue_consumers", counted)
    async with declared(settings), FareboxClient.from_settings(settings) as client:
        assert probes == [settings.topology.intake, settings.topology.intake_interactive]  # at connect
        probes.clear()
        for i in range(20):
            await client.publish({"prompt": "hi", "job_id": f"fresh-{i}"}, priority="interactive")
        assert probes == []  # within the period: the answer of connect
        await asyncio.sleep(1.1)
        await client.publish({"prompt": "hi", "job_id": "no-lane"})  # names no lane: nothing to choose
        assert probes == []
        jobs = [{"prompt": "hi", "job_id": f"stale-{i}"} for i in range(50)]
        await asyncio.gather(*(client.publish(j, priority="interactive") for j in jobs))
        assert probes == [settings.topology.intake_interactive]  # one look, shared by the publishes of the moment


async def test_a_second_look_during_an_outage_keeps_the_last_answer_and_the_publish_goes_through(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(intake, "LANE_RECHECK_S", 0.1)
    caplog.set_level("INFO", logger="farebox.client")
    proxy, proxied_url = await proxy_in_front_of(settings.amqp_url)
    via_proxy = settings.model_copy(update={"amqp_url": proxied_url})
    try:
        async with declared(settings) as channel, consuming_twin(channel, settings) as twin:
            async with FareboxClient.from_settings(via_proxy) as client:
                proxy.refusing = True
                assert proxy.cut() > 0
                await asyncio.sleep(0.2)  # the answer is stale: the publish looks again, and cannot
                publishing = asyncio.create_task(
                    client.publish({"prompt": "hi", "job_id": "o"}, priority="interactive")
                )
                await asyncio.sleep(1.0)
                assert not publishing.done()
                assert "could not count the interactive intake's consumers" in caplog.text
                proxy.refusing = False
                await asyncio.wait_for(publishing, 30)
                assert [j["job_id"] for j in await wait_for_bodies(twin, 1)] == ["o"]
    finally:
        await proxy.stop()
