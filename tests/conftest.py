"""Fixtures over the real RabbitMQ and Redis.

URLs come from FAREBOX_AMQP_URL / FAREBOX_REDIS_URL, else the local services, else testcontainers
when a Docker engine is there. A test that needs neither (its fixtures do not reach ``services``)
is marked ``unit``: ``pytest -m unit`` (``make unit``) runs those alone, without services. Any other
run that selects a test needing the services stops at once with a clear message when they do not
answer, in CI or not: a run must not pass by skipping them. Every test gets its own broker
namespace (queue prefix) and Redis key prefix, removed afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from urllib.parse import urlparse

import aio_pika
import aio_pika.abc
import httpx
import pytest
from redis.asyncio import Redis

from farebox.redis_connect import connect_redis
from farebox.settings import Settings
from tests.support.pipeline import InProcessPipeline, drop_redis_prefix

LOCAL_AMQP = "amqp://guest:guest@localhost:5672/"
LOCAL_REDIS = "redis://localhost:6379/0"


def _answers(url: str, default_port: int) -> bool:
    u = urlparse(url)
    try:
        with socket.create_connection((u.hostname or "localhost", u.port or default_port), timeout=1):
            return True
    except OSError:
        return False


@dataclass(frozen=True)
class Services:
    amqp_url: str
    redis_url: str


def _docker_services(stack: contextlib.ExitStack) -> Services | None:
    try:
        import docker  # type: ignore[import-untyped]

        docker.from_env().ping()
    except Exception:
        return None
    from testcontainers.rabbitmq import RabbitMqContainer  # type: ignore[import-untyped]
    from testcontainers.redis import RedisContainer  # type: ignore[import-untyped]

    rabbit = stack.enter_context(RabbitMqContainer("rabbitmq:3.13-management"))
    redis = stack.enter_context(RedisContainer("redis:7"))
    amqp = f"amqp://guest:guest@{rabbit.get_container_host_ip()}:{rabbit.get_exposed_port(5672)}/"
    return Services(amqp, f"redis://{redis.get_container_host_ip()}:{redis.get_exposed_port(6379)}/0")


def _needs_services(item: pytest.Item) -> bool:
    return "services" in getattr(item, "fixturenames", ())


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if not _needs_services(item):
            item.add_marker(pytest.mark.unit)


def _configured_urls() -> tuple[str, str]:
    return os.environ.get("FAREBOX_AMQP_URL", LOCAL_AMQP), os.environ.get("FAREBOX_REDIS_URL", LOCAL_REDIS)


def _docker_answers() -> bool:
    try:
        import docker  # type: ignore[import-untyped]

        docker.from_env().ping()
    except Exception:
        return False
    return True


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session: pytest.Session) -> None:
    """Stop before the first test when the selected tests need services that do not answer."""
    needing = sum(_needs_services(i) for i in session.items)
    if session.config.option.collectonly or not needing:
        return
    amqp, redis = _configured_urls()
    down = [
        f"{name} ({url})"
        for name, url, port in (("RabbitMQ", amqp, 5672), ("Redis", redis, 6379))
        if not _answers(url, port)
    ]
    if down and not _docker_answers():
        pytest.exit(
            f"{' and '.join(down)} not answering, and no Docker engine for testcontainers: {needing} selected "
            "tests need them. Start them (bash scripts/services.sh starts local installs), point "
            "FAREBOX_AMQP_URL / FAREBOX_REDIS_URL at them, or run only the unit tests: make unit (pytest -m unit).",
            returncode=3,
        )


@pytest.fixture(scope="session")
def services() -> Iterator[Services]:
    amqp, redis = _configured_urls()
    with contextlib.ExitStack() as stack:
        if _answers(amqp, 5672) and _answers(redis, 6379):
            yield Services(amqp, redis)
            return
        found = _docker_services(stack)
        if found is not None:
            yield found
            return
        pytest.fail(f"RabbitMQ ({amqp}) or Redis ({redis}) stopped answering and no Docker engine is available")


@pytest.fixture
async def settings(services: Services, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Settings]:
    """A queue namespace and Redis key prefix of the test's own; the keys go when the test ends
    (whichever fixtures or processes wrote them). Provider API keys from the shell are removed, so
    no pipeline a test starts (in process or as child processes) calls a real provider."""
    for var in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    run = uuid.uuid4().hex[:10]
    s = Settings(
        amqp_url=services.amqp_url,
        redis_url=services.redis_url,
        namespace=f"fbtest-{run}",
        redis_prefix=f"fbtest:{run}:",
        metrics_port=0,
        coalesce_poll_ms=50,
        emulator_url=os.environ.get("FAREBOX_TEST_EMULATOR_URL"),
    )
    yield s
    await drop_redis_prefix(s)


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[Redis]:
    client = connect_redis(settings.redis_url)
    yield client
    await client.aclose()  # the keys go with the settings fixture


@pytest.fixture(scope="session")
async def emulator() -> AsyncIterator[str]:
    """The provider emulator over real HTTP on loopback, for the whole session."""
    from farebox.emulator.knobs import EmulatorKnobs
    from farebox.emulator.server import serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ready = asyncio.Event()
    task = asyncio.create_task(serve(EmulatorKnobs(port=port, host="127.0.0.1"), ready=ready))
    await asyncio.wait_for(ready.wait(), 20)
    yield f"http://127.0.0.1:{port}"
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


@pytest.fixture
async def emulator_stats(emulator: str) -> AsyncIterator[EmulatorStats]:
    stats = EmulatorStats(emulator)
    await stats.reset()
    yield stats


class EmulatorStats:
    def __init__(self, url: str) -> None:
        self.url = url

    async def reset(self) -> None:
        async with httpx.AsyncClient() as c:
            (await c.post(f"{self.url}/_emulator/reset")).raise_for_status()

    async def requests(self) -> dict[str, int]:
        data: dict[str, int] = (await self.snapshot())["requests"]  # type: ignore[assignment]
        return data

    async def snapshot(self) -> dict[str, object]:
        async with httpx.AsyncClient() as c:
            r = await c.get(f"{self.url}/_emulator/stats")
            r.raise_for_status()
            data: dict[str, object] = r.json()
            return data

    async def total(self) -> int:
        return sum((await self.requests()).values())


@pytest.fixture
async def pipeline(settings: Settings, redis: Redis, emulator: str) -> AsyncIterator[InProcessPipeline]:
    """Every stage running in this event loop against the real broker and Redis."""
    p = InProcessPipeline(settings.model_copy(update={"emulator_url": emulator}))
    yield p
    await p.close()


@pytest.fixture
async def bare_intake(settings: Settings) -> AsyncIterator[aio_pika.abc.AbstractQueue]:
    """The namespace's intake queue with no pipeline behind it (as after `farebox up` stopped):
    publishes are confirmed and wait there."""
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        queue = await (await connection.channel()).declare_queue(settings.topology.intake)
        yield queue
        await queue.delete(if_unused=False, if_empty=False)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """No FAREBOX_* or provider variables from the caller's shell leak into Settings() (the compose file and
    the Kubernetes manifests are checked against the defaults)."""
    for name in list(os.environ):
        if name.startswith("FAREBOX_") or name.endswith(("_API_KEY", "_BASE_URL")):
            monkeypatch.delenv(name)
    yield monkeypatch
