"""A stage whose start is cut by the broker keeps trying instead of dying.

RabbitMQ can close a connection with INTERNAL_ERROR when a consume reaches a quorum queue that
another process declared a moment before (seen here: ``{badmatch,{error,noproc}}`` in
``rabbit_quorum_queue:consume``). Before the fix, the execute stage it hit never consumed and its
jobs waited until the caller gave up."""

from __future__ import annotations

from typing import Any

import aiormq
import pytest
from aio_pika.robust_queue import RobustQueue

from tests.support.pipeline import InProcessPipeline
from tests.support.workload import ticket_jobs


async def test_a_stage_whose_first_consume_fails_starts_anyway(
    pipeline: InProcessPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = RobustQueue.consume
    failed: list[str] = []

    async def consume(self: RobustQueue, *args: Any, **kwargs: Any) -> Any:
        if self.name.endswith(".execute.google") and not failed:
            failed.append(self.name)
            raise aiormq.exceptions.ConnectionInternalError(541, "INTERNAL_ERROR")
        return await real(self, *args, **kwargs)

    monkeypatch.setattr(RobustQueue, "consume", consume)
    await pipeline.start()
    jobs = ticket_jobs(20)
    async with pipeline.client() as client:
        results = [r async for r in client.stream(jobs, max_in_flight=10, idle_timeout_s=60)]
    assert failed, "the fault was never injected"
    assert sorted(r.job_id for r in results) == sorted(str(j["job_id"]) for j in jobs)
    assert all(r.status == "ok" for r in results), [r.error for r in results]
    assert any(r.provider == "google" for r in results)  # the stage that was cut did serve jobs
