"""Liveness and readiness of one worker process: ``/livez`` and ``/readyz`` beside ``/metrics``.

An orchestrator (deploy/kubernetes/) restarts a process whose /livez fails, and counts it out of its
Deployment's available replicas (a rollout, a PodDisruptionBudget) while its /readyz fails. Both answer
from state the event loop keeps up to date, so a probe never waits on the broker or Redis itself:

* alive: the event loop beat within ``LIVENESS_STALE_S``: a loop stuck in CPU work or a blocking call
  stops beating (``watch``);
* ready: every stage worker of the process is consuming, from the moment its consumers are started until
  its drain starts, and not while its broker connection is lost (``StageReadiness``, which the runtime
  reports into); and Redis answered the last PING, sent every ``REDIS_CHECK_EVERY_S`` with a short
  timeout (``watch``).

The state is per process, as the metrics registry is: a probe speaks for the whole process.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

if TYPE_CHECKING:  # farebox.metrics imports this module: no broker client behind every metric
    from aio_pika.abc import AbstractRobustConnection

LIVEZ = "/livez"
READYZ = "/readyz"
HEARTBEAT_EVERY_S = 1.0
# Far above any stall a healthy loop shows (a batch decoded at once takes milliseconds), far below the minutes a
# wedged process would otherwise sit: the orchestrator's own failure threshold is added on top.
LIVENESS_STALE_S = 15.0
REDIS_CHECK_EVERY_S = 2.0
# Below the stages' own Redis socket timeout (2 s, workers/main.py): a Redis too slow for the probe is too slow
# for the jobs as well.
REDIS_CHECK_TIMEOUT_S = 1.0


class Liveness:
    """When the event loop last beat (``time.monotonic``); read from the probe server's thread."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._last = clock()  # the process just started: alive until the first beat is overdue

    def beat(self) -> None:
        self._last = self._clock()

    def problem(self) -> str | None:
        silent = self._clock() - self._last
        return f"the event loop has not run for {silent:.1f}s" if silent > LIVENESS_STALE_S else None


class Condition:
    """One thing readiness waits for: ``problem`` is None while it holds, else why it does not."""

    def __init__(self, problem: str | None) -> None:
        self.problem = problem


class StageReadiness(Condition):
    """One stage worker: ready from ``consuming`` until ``draining``, except while its broker connection is
    away (a robust connection restores the consumers before it calls its reconnect callbacks)."""

    def __init__(self, stage: str) -> None:
        super().__init__(f"stage {stage}: not consuming yet")
        self.stage = stage
        self._draining = False

    def consuming(self, connection: AbstractRobustConnection) -> None:
        if self._draining:
            return
        self.problem = None
        connection.close_callbacks.add(self._connection_lost)
        connection.reconnect_callbacks.add(self._reconnected)

    def draining(self) -> None:
        self._draining = True
        self.problem = f"stage {self.stage}: draining"

    def _connection_lost(self, *_: Any) -> None:
        if not self._draining:
            self.problem = f"stage {self.stage}: broker connection lost"

    def _reconnected(self, *_: Any) -> None:
        if not self._draining:
            self.problem = None


class Readiness:
    """The conditions of every stage worker (and Redis check) running in this process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # the event loop adds and removes, the probe server's thread reads
        self._conditions: list[Condition] = []

    def track(self, conditions: Iterable[Condition]) -> None:
        with self._lock:
            self._conditions.extend(conditions)

    def untrack(self, conditions: Iterable[Condition]) -> None:
        with self._lock:
            for c in conditions:
                with contextlib.suppress(ValueError):
                    self._conditions.remove(c)

    def problem(self) -> str | None:
        """None when ready, else every reason why not (a process that runs no stage worker is not ready)."""
        with self._lock:
            conditions = list(self._conditions)
        if not conditions:
            return "no stage worker is running"
        problems = [c.problem for c in conditions if c.problem is not None]
        return "; ".join(dict.fromkeys(problems)) or None  # the same reason once


LIVENESS = Liveness()
READINESS = Readiness()


class Watch:
    """The heartbeat and the Redis check of one set of stage workers, until ``aclose``."""

    def __init__(
        self, ping: Callable[[], Awaitable[object]], stages: Sequence[StageReadiness], readiness: Readiness
    ) -> None:
        self.redis = Condition("Redis not checked yet")
        self._conditions: list[Condition] = [*stages, self.redis]
        self._readiness = readiness
        readiness.track(self._conditions)
        self._task = asyncio.create_task(self._run(ping, LIVENESS))

    async def _run(self, ping: Callable[[], Awaitable[object]], liveness: Liveness) -> None:
        await asyncio.gather(_heartbeat(liveness), _check_redis(ping, self.redis))

    async def aclose(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._readiness.untrack(self._conditions)


def watch(ping: Callable[[], Awaitable[object]], stages: Sequence[StageReadiness]) -> Watch:
    """Track ``stages`` in the process's readiness and start beating and checking Redis with ``ping`` (in a
    running loop)."""
    return Watch(ping, stages, READINESS)


async def _heartbeat(liveness: Liveness) -> None:
    while True:
        liveness.beat()
        await asyncio.sleep(HEARTBEAT_EVERY_S)


async def _check_redis(ping: Callable[[], Awaitable[object]], redis: Condition) -> None:
    while True:
        try:
            async with asyncio.timeout(REDIS_CHECK_TIMEOUT_S):
                await ping()
            redis.problem = None
        except Exception as err:  # whatever went wrong, Redis did not answer; its kind goes in the reason
            redis.problem = f"Redis does not answer ({type(err).__name__})"
        await asyncio.sleep(REDIS_CHECK_EVERY_S)


def with_probes(app: WSGIApplication) -> WSGIApplication:
    """``app`` (the metrics) with /livez and /readyz in front: 200 "ok", or 503 and the reason, as plain text."""

    def probed(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == LIVEZ:
            problem = LIVENESS.problem()
        elif path == READYZ:
            problem = READINESS.problem()
        else:
            return app(environ, start_response)
        status = "200 OK" if problem is None else "503 Service Unavailable"
        body = ("ok" if problem is None else f"not {'alive' if path == LIVEZ else 'ready'}: {problem}").encode()
        start_response(
            status,
            [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body) + 1))],
        )
        return [body + b"\n"]

    return probed
