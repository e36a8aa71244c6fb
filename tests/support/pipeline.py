"""Test harnesses: the pipeline's stages in this event loop, or as real OS processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence
from typing import Any, TypeVar

import aio_pika
from redis.asyncio import Redis

from farebox.client import FareboxClient
from farebox.constants import JobRecord, split_job_record
from farebox.redis_connect import connect_redis
from farebox.routing.catalog import CatalogError, load_catalog
from farebox.settings import CATALOG_DIR, Settings
from farebox.stages.main import run_stage
from farebox.stages.topology import declare_topology, queue_plan

T = TypeVar("T")

ALL_STAGES = ("dedup", "route", "execute:openai", "execute:anthropic", "execute:google", "account")


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that gives a child process these settings."""
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    for name, value in settings.model_dump(mode="json").items():
        if value is not None:
            env[f"FAREBOX_{name.upper()}"] = json.dumps(value) if isinstance(value, dict | list) else str(value)
    return env


class InProcessPipeline:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._stops: dict[str, asyncio.Event] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}

    async def start(self, *stages: str) -> None:
        for spec in stages or ALL_STAGES:
            stage, _, provider = spec.split("#")[0].partition(":")  # "execute:google#2": a second replica
            stop, ready = asyncio.Event(), asyncio.Event()

            async def on_ready(ready: asyncio.Event = ready) -> None:
                ready.set()

            task = asyncio.create_task(
                run_stage(self.settings, stage, provider=provider or None, stop=stop, on_ready=on_ready)
            )
            self._stops[spec], self._tasks[spec] = stop, task
            waiter = asyncio.create_task(ready.wait())
            await asyncio.wait([waiter, task], timeout=30, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                task.result()  # raise what killed it
            assert ready.is_set(), f"stage {spec} did not become ready"

    async def stop(self, *stages: str) -> None:
        for spec in stages:
            self._stops[spec].set()
            await asyncio.wait_for(self._tasks.pop(spec), 60)
            del self._stops[spec]

    def client(self, **kwargs: object) -> FareboxClient:
        return FareboxClient.from_settings(self.settings, **kwargs)  # type: ignore[arg-type]

    async def close(self) -> None:
        await self.stop(*list(self._stops))
        await drop_namespace(self.settings)


DROP_CHANNELS = 6


async def drop_namespace(settings: Settings) -> None:
    try:
        providers = load_catalog(settings.catalog).providers()
    except CatalogError:  # a test may leave its catalog broken on purpose
        providers = load_catalog(CATALOG_DIR / "model_costs.json").providers()
    # Best effort, as a teardown must be (a test may have stopped the broker), but one failed delete neither
    # stops the others nor keeps the exchanges.
    with contextlib.suppress(Exception):
        connection = await aio_pika.connect(settings.amqp_url)
        async with connection:
            # One channel holds one request at a time, and a quorum queue's delete waits for its Raft group to
            # stop: the queues go in parallel over a few channels (one after another took 0.10 s a test).
            names = list(queue_plan(settings, providers))
            channels = [await connection.channel() for _ in range(min(DROP_CHANNELS, len(names)))]

            async def delete_share(channel: aio_pika.abc.AbstractChannel, share: list[str]) -> None:
                for name in share:
                    await channel.queue_delete(name)

            shares = (delete_share(c, names[i :: len(channels)]) for i, c in enumerate(channels))
            await asyncio.gather(*shares, return_exceptions=True)
            last = await connection.channel()  # a share's error closes its channel, not this one
            await last.exchange_delete(settings.topology.dead_exchange)
            await last.exchange_delete(settings.topology.alerts_exchange)


@contextlib.asynccontextmanager
async def declared(settings: Settings) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    """The namespace's queues, the interactive twins among them, with nobody consuming them; dropped after."""
    connection = await aio_pika.connect(settings.amqp_url)
    try:
        channel = await connection.channel()
        await declare_topology(channel, settings, ["openai", "anthropic", "google"])
        yield channel
    finally:
        await connection.close()
        await drop_namespace(settings)


async def drop_redis_prefix(settings: Settings) -> None:
    redis = connect_redis(settings.redis_url)
    try:
        keys = [k async for k in redis.scan_iter(match=f"{settings.redis_prefix}*", count=1000)]
        for i in range(0, len(keys), 500):
            await redis.delete(*keys[i : i + 500])
    finally:
        await redis.aclose()


async def ledger_entries(redis: Redis, settings: Settings) -> list[str]:
    """The job_id of every ledger entry (entries are keyed by tenant and job_id)."""
    head, _, tail = settings.keys.ledger_entry(JobRecord("\0")).partition("\0")  # around the record
    keys = [k.decode() async for k in redis.scan_iter(match=f"{head}*{tail}", count=1000)]
    return [split_job_record(k.removeprefix(head).removesuffix(tail))[1] for k in keys]


async def ledger_entries_written(redis: Redis, settings: Settings, expected: int, within_s: float = 10.0) -> list[str]:
    """``ledger_entries`` once there are ``expected`` of them (or ``within_s`` has passed): an account stage
    that held its ledger writes while Redis was away or switching writes them a moment after the results."""
    deadline = asyncio.get_running_loop().time() + within_s
    while len(found := await ledger_entries(redis, settings)) < expected:
        if asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.1)
    return found


async def report_json(settings: Settings, *args: str) -> Any:
    """``farebox report --json ARGS`` as a child process with these settings, parsed."""
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "farebox", "report", *args, "--json"],
        env=settings_env(settings),
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout)


class ProcessPipeline:
    """Each stage as ``python -m farebox worker ...``, so a test can kill -9 one."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.env = settings_env(settings)

    def start(self, stages: Iterable[str] = ALL_STAGES, runner: Sequence[str] = ("-m", "farebox")) -> None:
        for spec in stages:
            self.start_one(spec, runner=runner)

    def start_one(
        self, spec: str, *, crash: tuple[str, str] | None = None, runner: Sequence[str] = ("-m", "farebox")
    ) -> None:
        """Start one stage; ``crash`` (a point and a job_id): it kills itself there (tests/support/crash_points.py).
        ``runner``: what runs ``worker STAGE`` (a script that wraps farebox's command line, say)."""
        stage, _, provider = spec.partition(":")
        runner = ["-m", "tests.support.crash_points", *crash] if crash else list(runner)
        argv = [sys.executable, *runner, "worker", stage] + (["--provider", provider] if provider else [])
        env = dict(self.env)
        if self.settings.metrics_port:  # each process its own port, as `farebox up` gives them
            env["FAREBOX_METRICS_PORT"] = str(self.metrics_port(spec))
        self.procs[spec] = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def metrics_port(self, spec: str) -> int:
        return self.settings.metrics_port + list(ALL_STAGES).index(spec)

    def kill9(self, spec: str) -> None:
        self.procs[spec].send_signal(signal.SIGKILL)
        self.procs[spec].wait(10)

    def terminate(self) -> list[int | None]:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        codes = []
        for p in self.procs.values():
            try:
                codes.append(p.wait(60))
            except subprocess.TimeoutExpired:
                p.kill()
                codes.append(None)
        return codes


async def collect(stream: AsyncIterable[T]) -> list[T]:
    """Everything an async iterator yields (a client's result stream, say)."""
    return [item async for item in stream]


async def get_message(queue: aio_pika.abc.AbstractQueue, timeout: float = 30) -> aio_pika.abc.AbstractIncomingMessage:
    """The next message on ``queue``, acked; fails the test if none arrives in ``timeout`` s."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        message = await queue.get(fail=False)
        if message is not None:
            await message.ack()
            return message
        assert asyncio.get_running_loop().time() < deadline, "no message arrived"
        await asyncio.sleep(0.05)
