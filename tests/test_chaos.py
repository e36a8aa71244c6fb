"""The full fault runs (`-m chaos`, minutes each); their short versions run by default in
test_faults.py and test_outages.py. `bench/chaos.py` prints the same runs as a table."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from farebox.settings import Settings
from tests.support.chaos import broker_outage, kill9_each_stage

pytestmark = pytest.mark.chaos


async def test_kill9_each_stage_three_times_during_5000_jobs(settings: Settings, redis: Redis, emulator: str) -> None:
    report = await kill9_each_stage(settings, redis, emulator, jobs=5000, rounds=3)
    assert (report.lost, report.double_charged, report.errors) == (0, 0, 0), report


async def test_broker_outages_resume_within_10s(settings: Settings, redis: Redis, emulator: str) -> None:
    report = await broker_outage(settings, redis, emulator, jobs=2000, cuts=2, outage_s=3.0)
    assert (report.lost, report.double_charged, report.errors) == (0, 0, 0), report
    assert report.resume_s and max(report.resume_s) < 10, report
