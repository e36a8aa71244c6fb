"""Tracks whether this process can reach Redis, logging only the transitions."""

from __future__ import annotations

import logging

from farebox import metrics

log = logging.getLogger("farebox.redis")


class RedisHealth:
    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.up = True
        metrics.REDIS_UP.labels(stage).set(1)

    def ok(self) -> None:
        if not self.up:
            self.up = True
            metrics.REDIS_UP.labels(self.stage).set(1)
            log.warning("stage %s: Redis is reachable again; cache and dedup resume", self.stage)

    def down(self, err: BaseException) -> None:
        if self.up:
            self.up = False
            metrics.REDIS_UP.labels(self.stage).set(0)
            log.error(
                "stage %s: Redis unreachable (%s); serving without cache/dedup until it returns",
                self.stage,
                type(err).__name__,
            )
