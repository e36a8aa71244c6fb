"""/livez and /readyz on the metrics server (farebox/health.py), against the real broker and Redis.

Ready means every stage worker of the process consumes and Redis answers: not before the consumers
start, not while the broker connection or Redis is away, not once the drain has begun. Alive means
the event loop runs. Each probe is a real HTTP request to the server ``farebox worker`` starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from aio_pika.robust_queue import RobustQueue

from farebox import health, metrics
from farebox.settings import Settings
from farebox.stages.main import run_stage
from tests.support.pipeline import drop_namespace
from tests.support.tcp_proxy import proxy_in_front_of


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch: pytest.MonkeyPatch) -> None:
    """Probe state of this test's own: workers other tests left behind must not decide its answers."""
    monkeypatch.setattr(health, "READINESS", health.Readiness())
    monkeypatch.setattr(health, "LIVENESS", health.Liveness())


@pytest.fixture
def server() -> Iterator[str]:
    httpd, thread = metrics.start_http_server(0, "127.0.0.1")
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


class Stage:
    """One ``run_stage`` of the test, and the probes of the process it runs in."""

    def __init__(self, settings: Settings, stage: str, base: str) -> None:
        self.stop, self.ready = asyncio.Event(), asyncio.Event()
        self.settings = settings
        self.http = httpx.AsyncClient(base_url=base, timeout=2.0)

        async def on_ready() -> None:
            self.ready.set()

        self.task = asyncio.create_task(run_stage(settings, stage, stop=self.stop, on_ready=on_ready))

    async def probe(self, path: str) -> tuple[int, str]:
        reply = await self.http.get(path)
        return reply.status_code, reply.text

    async def until(self, path: str, status: int, *, containing: str = "", within_s: float = 10.0) -> str:
        """Poll ``path`` until it answers ``status`` with a text ``containing`` that; the text."""
        deadline = time.monotonic() + within_s
        while True:
            code, said = await self.probe(path)
            if code == status and containing in said:
                return said
            assert time.monotonic() < deadline, f"{path} still answers {code} {said!r}, not {status} {containing!r}"
            await asyncio.sleep(0.05)

    async def started(self) -> None:
        waiter = asyncio.create_task(self.ready.wait())
        await asyncio.wait([waiter, self.task], timeout=30, return_when=asyncio.FIRST_COMPLETED)
        if self.task.done():
            self.task.result()
        assert self.ready.is_set(), "the stage did not start consuming"


@contextlib.asynccontextmanager
async def running(settings: Settings, stage: str, base: str, **changed: str) -> AsyncIterator[Stage]:
    """``stage`` on ``settings`` with ``changed`` (an URL through a proxy); its queues dropped after."""
    s = Stage(settings.model_copy(update=changed), stage, base)
    try:
        yield s
    finally:
        s.stop.set()
        await asyncio.gather(s.task, return_exceptions=True)
        await s.http.aclose()
        await drop_namespace(settings)


def held(monkeypatch: pytest.MonkeyPatch, method: str, queue_suffix: str) -> asyncio.Event:
    """Make ``RobustQueue.<method>`` of the queue named ``*queue_suffix`` wait until the returned event is set."""
    real = getattr(RobustQueue, method)
    release = asyncio.Event()

    async def waiting(self: RobustQueue, *args: Any, **kwargs: Any) -> Any:
        if self.name.endswith(queue_suffix):
            await release.wait()
        return await real(self, *args, **kwargs)

    monkeypatch.setattr(RobustQueue, method, waiting)
    return release


# --- the probe server alone --------------------------------------------------------------------
def test_probes_answer_beside_the_metrics(server: str) -> None:
    with urllib.request.urlopen(f"{server}/livez", timeout=2) as reply:
        assert (reply.status, reply.read()) == (200, b"ok\n")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{server}/readyz", timeout=2)
    assert refused.value.code == 503
    assert refused.value.read().decode() == "not ready: no stage worker is running\n"
    with urllib.request.urlopen(f"{server}/metrics", timeout=2) as reply:
        assert b"llm_proxy_request_total" in reply.read()


def test_liveness_fails_while_the_event_loop_is_stuck(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(health, "LIVENESS_STALE_S", 0.3)
    answers: list[int] = []

    def probe_while_stuck() -> None:
        time.sleep(0.6)
        try:
            answers.append(urllib.request.urlopen(f"{server}/livez", timeout=2).status)
        except urllib.error.HTTPError as err:
            answers.append(err.code)

    async def stuck_then_beating() -> None:
        probe = threading.Thread(target=probe_while_stuck)
        watch = health.watch(_answers, [])
        await asyncio.sleep(0)  # the heartbeat starts
        probe.start()
        time.sleep(1.0)  # noqa: ASYNC251  # the fault itself: a blocking call on the loop, which cannot beat
        probe.join()
        await asyncio.sleep(0.05)  # the loop runs again, and beats
        answers.append(await asyncio.to_thread(lambda: urllib.request.urlopen(f"{server}/livez", timeout=2).status))
        await watch.aclose()

    asyncio.run(stuck_then_beating())
    assert answers == [503, 200]


async def _answers() -> bool:
    return True


# --- a stage's readiness, end to end -----------------------------------------------------------
async def test_ready_only_from_every_workers_consume_until_the_drain(
    settings: Settings, server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The account process runs three workers (account, dead letters, feedback): one not consuming is enough.
    consume = held(monkeypatch, "consume", ".feedback")
    cancel = held(monkeypatch, "cancel", ".feedback")
    async with running(settings, "account", server) as stage:
        try:
            await stage.until("/readyz", 503, containing="not consuming yet")  # after "no stage worker" perhaps
            one_short = "not ready: stage feedback: not consuming yet\n"  # the others consume, Redis answers
            await stage.until("/readyz", 503, containing=one_short)
            for _ in range(5):
                await asyncio.sleep(0.1)
                assert await stage.probe("/readyz") == (503, one_short)
            consume.set()
            await stage.started()
            assert await stage.until("/readyz", 200) == "ok\n"
            assert await stage.probe("/livez") == (200, "ok\n")

            stage.stop.set()  # as SIGTERM does; the feedback worker's drain waits on its consumer's cancel
            text = await stage.until("/readyz", 503, within_s=2)
            assert "stage feedback: draining" in text, text
            assert await stage.probe("/livez") == (200, "ok\n")  # draining is alive
            cancel.set()
            await asyncio.wait_for(stage.task, 60)
            assert await stage.probe("/readyz") == (503, "not ready: no stage worker is running\n")
        finally:
            consume.set()
            cancel.set()


async def test_not_ready_while_redis_is_away(settings: Settings, server: str) -> None:
    proxy, via = await proxy_in_front_of(settings.redis_url)
    try:
        async with running(settings, "route", server, redis_url=via) as stage:
            await stage.started()
            await stage.until("/readyz", 200)
            proxy.refusing = True
            proxy.cut()
            try:
                text = await stage.until("/readyz", 503, within_s=health.REDIS_CHECK_EVERY_S + 5)
                assert "Redis does not answer" in text, text
                assert await stage.probe("/livez") == (200, "ok\n")  # Redis away is no reason to restart
            finally:
                proxy.refusing = False
            await stage.until("/readyz", 200, within_s=health.REDIS_CHECK_EVERY_S + 5)
    finally:
        await proxy.stop()


async def test_a_redis_that_never_answers_does_not_hold_up_the_probe(settings: Settings, server: str) -> None:
    held_open: list[asyncio.StreamWriter] = []

    async def accept_and_say_nothing(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held_open.append(writer)

    silent = await asyncio.start_server(accept_and_say_nothing, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    try:
        started = time.monotonic()
        async with running(settings, "route", server, redis_url=f"redis://127.0.0.1:{port}/0") as stage:
            # The check gives up on its own, before the stage's Redis client would (its socket timeout is 2 s).
            await stage.until("/readyz", 503, containing="Redis does not answer (TimeoutError)", within_s=5)
            assert time.monotonic() - started < 1.8, time.monotonic() - started
            await stage.started()
            for _ in range(15):
                t0 = time.monotonic()
                code, text = await stage.probe("/readyz")
                assert time.monotonic() - t0 < 0.5, "the probe waited for Redis"
                assert code == 503 and "Redis" in text, text
                await asyncio.sleep(0.2)
            assert "Redis does not answer (TimeoutError)" in text, text
    finally:
        for writer in held_open:
            writer.transport.abort()
        silent.close()
        await silent.wait_closed()


async def test_not_ready_while_the_broker_connection_is_lost(settings: Settings, server: str) -> None:
    proxy, via = await proxy_in_front_of(settings.amqp_url)
    try:
        async with running(settings, "route", server, amqp_url=via) as stage:
            await stage.started()
            await stage.until("/readyz", 200)
            proxy.refusing = True
            proxy.cut()
            try:
                text = await stage.until("/readyz", 503, within_s=5)
                assert "stage route: broker connection lost" in text, text
            finally:
                proxy.refusing = False  # the robust connection comes back and restores the consumers
            await stage.until("/readyz", 200, within_s=30)
    finally:
        await proxy.stop()
