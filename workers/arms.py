"""Which experiment arm a job is in, pinned in Redis so that a policy reload never moves a running job.

The arm is drawn statelessly (farebox/routing/experiments.py): a redelivered job draws the same arm as long as
the policy is unchanged. A reload that changes the weights would draw some jobs differently, so the first draw
of a job is kept (``SET NX GET``, one round trip) for as long as its result is kept, and a redelivery after a
reload takes the kept arm if the policy still has it. With Redis away the draw is used as it is.
"""

from __future__ import annotations

import logging
from typing import Literal

from redis.asyncio import Redis

from farebox.constants import JobRecord, RedisKeys, as_text
from farebox.errors import REDIS_DOWN
from farebox.routing.experiments import Assignment, Experiment

log = logging.getLogger("farebox.route")


class ArmPins:
    def __init__(self, redis: Redis, keys: RedisKeys, *, ttl_s: int) -> None:
        self.redis = redis
        self.keys = keys
        self.ttl_s = ttl_s

    async def pin(self, record: JobRecord, drawn: Assignment, experiments: tuple[Experiment, ...]) -> Assignment:
        """The arm the job was first put in (when the policy still has it), else ``drawn``, now kept."""
        value = f"{drawn.experiment}|{drawn.arm}"
        try:
            kept = await self.redis.set(self.keys.arm(record), value, nx=True, get=True, ex=self.ttl_s)
        except REDIS_DOWN as err:
            log.warning("route: arm of job %s not pinned, Redis away (%s)", record, type(err).__name__)
            return drawn
        if not isinstance(kept, (bytes, str)) or as_text(kept) == value:
            return drawn  # nothing kept yet (None): the draw is now the job's arm
        # A kept arm gone from the policy: the job takes the arm it draws now.
        return still_in_policy(kept, experiments, drawn.draw, drawn.sticky) or drawn

    async def kept(self, record: JobRecord, experiments: tuple[Experiment, ...]) -> Assignment | None:
        """The arm a redelivered job was put in before a reload that no longer draws it (a lower share, a
        narrower experiment), when the policy still has that arm."""
        try:
            value = await self.redis.get(self.keys.arm(record))
        except REDIS_DOWN:
            return None
        return still_in_policy(value, experiments, 0.0, "job_id") if isinstance(value, (bytes, str)) else None


def still_in_policy(
    kept: bytes | str, experiments: tuple[Experiment, ...], draw: float, sticky: Literal["subject", "job_id"]
) -> Assignment | None:
    """The kept "experiment|arm" as an Assignment, when the policy still has that arm."""
    experiment, _, arm = as_text(kept).partition("|")
    for e in experiments:
        if e.name == experiment and e.arm(arm) is not None:
            return Assignment(experiment, arm, draw, sticky)
    return None
