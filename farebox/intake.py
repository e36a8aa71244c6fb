"""The client's side of the pipeline's intake: whether it is there, what consumes it, and which of its
lanes a job goes to.

The workers declare the intake (``<namespace>.jobs``) and, since the lanes, its interactive twin
(``<namespace>.jobs.interactive``). The client finds both out with passive declares, each on a channel of
its own: a passive declare of a queue that does not exist closes its channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import aiormq
from aio_pika.abc import AbstractConnection

from farebox.constants import Topology
from farebox.errors import BROKER_DOWN_OR_TIMEOUT, DependencyUnavailable, broker_away
from farebox.schemas import Job
from farebox.schemas.job import Priority

log = logging.getLogger("farebox.client")  # the client's log: this is the client's, in a module of its own
# A consumer count that could not be had: the broker away, or the probe channel refused.
PROBE_FAILED: tuple[type[Exception], ...] = (*BROKER_DOWN_OR_TIMEOUT, aiormq.exceptions.AMQPError)
# How long the answer to "does anything consume the interactive intake?" is used before it is asked again.
LANE_RECHECK_S = 5.0
# A second look that takes longer than this is given up (the last answer stays).
LANE_PROBE_TIMEOUT_S = 5.0


async def queue_consumers(connection: AbstractConnection, queue: str) -> int | None:
    """Consumers on ``queue``, or None when the queue does not exist (yet)."""
    probe = await connection.channel()  # a failed passive declare closes its channel
    try:
        declared = await probe.declare_queue(queue, passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        return None
    finally:
        with contextlib.suppress(Exception):
            await probe.close()
    return declared.declaration_result.consumer_count or 0


async def wait_for_intake(connection: AbstractConnection, topology: Topology, wait_s: float) -> None:
    """The workers declare the intake; give a pipeline that is starting up ``wait_s`` to do so."""
    deadline = time.monotonic() + wait_s
    while await queue_consumers(connection, topology.intake) is None:
        if time.monotonic() >= deadline:
            raise DependencyUnavailable(
                f"queue {topology.intake!r} does not exist: is the pipeline running? (start it with `farebox up`)"
            )
        await asyncio.sleep(0.5)


class IntakeLanes:
    """Where each job goes: interactive ones to the interactive intake, but only while it exists *and*
    something consumes it.

    A rollback to a pipeline without the interactive worker leaves the twin behind (a queue outlives the
    workers that declared it) with nobody consuming it, and a job sent there would wait for ever. So while
    the twin has no consumer, every job goes to the plain intake in the form a pipeline from before the
    lanes expects, without a ``priority`` the client would have added. A pipeline whose interactive worker
    is only restarting gives those jobs the policy's lane meanwhile.

    When to look. A consumer count only holds for a moment, and a client may stay connected for hours
    while the interactive worker is rolled back or started, so one look at connect is not enough. Looking
    on every publish would open and close a channel on the broker for each job (channel churn, which
    RabbitMQ advises against) and add a round trip to each publish. So the answer is kept for
    ``LANE_RECHECK_S`` seconds. The first publish that needs it after that looks again and waits for the
    answer, since an answer kept through a long idle spell could be any age; publishes made at the same
    moment share that one probe. A client that publishes nothing probes nothing. Jobs sent between a
    rollback and the next look still land on the twin: draining it, along with what was already there, is
    part of the rollback. A look that fails (broker away, or no answer within ``LANE_PROBE_TIMEOUT_S``)
    keeps the last answer until the next period; the publish itself waits out the outage.
    """

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self.open = False  # interactive jobs go through the interactive intake
        self._checked_at = -float("inf")
        self._checking = asyncio.Lock()

    async def check(self, connection: AbstractConnection) -> bool:
        """Look now (at connect: failures are the caller's)."""
        self.open = bool(await queue_consumers(connection, self.topology.intake_interactive))
        self._checked_at = time.monotonic()
        return self.open

    async def current(self, connection: AbstractConnection) -> bool:
        """The answer, looked at again when it is older than ``LANE_RECHECK_S``."""
        if time.monotonic() - self._checked_at < LANE_RECHECK_S:
            return self.open
        async with self._checking:
            if time.monotonic() - self._checked_at < LANE_RECHECK_S:
                return self.open  # a publish beside this one looked meanwhile
            was = self.open
            try:
                await asyncio.wait_for(self.check(connection), LANE_PROBE_TIMEOUT_S)
            except Exception as err:
                if not (isinstance(err, PROBE_FAILED) or broker_away(err, connection)):
                    raise
                log.info("could not count the interactive intake's consumers (%s)", type(err).__name__)
                self._checked_at = time.monotonic()
            if self.open != was:
                log.info(
                    "interactive jobs now go to %r",
                    self.topology.intake_interactive if self.open else self.topology.intake,
                )
        return self.open

    async def address(self, connection: AbstractConnection, job: Job, priority: Priority | None) -> tuple[Job, str]:
        """``job`` as it is sent, and the queue it goes to. ``priority``: its lane if it names none."""
        if job.priority is None and priority is None:
            return job, self.topology.intake  # nothing to choose: the pipeline's policy decides
        lanes = await self.current(connection)
        if job.priority is None and priority is not None and lanes:
            job = job.model_copy(update={"priority": priority})
        lane = "interactive" if job.priority == "interactive" and lanes else "background"
        return job, self.topology.lane(self.topology.intake, lane)
