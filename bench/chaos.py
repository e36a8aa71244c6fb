"""Fault-injection runs against the real services, as a table (bench/results/chaos.md):
kill -9 of every stage process three times during 5,000 jobs, and broker outages through a TCP
proxy the run controls. The same runs are the `-m chaos` tests.

    .venv/bin/python bench/chaos.py [--jobs 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import uuid

from common import cores, publish_table
from redis.asyncio import Redis

from farebox.emulator.knobs import EmulatorKnobs
from farebox.emulator.server import running
from farebox.settings import Settings
from tests.support.chaos import HEADER, broker_outage, kill9_each_stage
from tests.support.pipeline import drop_redis_prefix


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=5000)
    a = ap.parse_args()
    rows = []
    async with running(EmulatorKnobs(port=0)) as emulator:
        for run in (
            lambda s, r: kill9_each_stage(s, r, emulator, jobs=a.jobs, rounds=3),
            lambda s, r: broker_outage(s, r, emulator, jobs=min(a.jobs, 2000), cuts=2, outage_s=3.0),
        ):
            tag = uuid.uuid4().hex[:8]
            settings = Settings(namespace=f"fbchaos-{tag}", redis_prefix=f"fbchaos:{tag}:", metrics_port=0)
            redis = Redis.from_url(settings.redis_url)
            try:
                rows.append((await run(settings, redis)).row())
            finally:
                await redis.aclose()
                await drop_redis_prefix(settings)
    publish_table(
        "chaos", "\n".join([f"# Fault injection ({cores()} cores, real RabbitMQ and Redis)", "", *HEADER, *rows, ""])
    )


if __name__ == "__main__":
    asyncio.run(main())
