"""Personal data through the real pipeline: a blocking policy refuses the job, and nothing of the
personal data shows up in the result, the logs or the ledger."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from redis.asyncio import Redis

from farebox.logs import quiet_libraries
from farebox.settings import Settings
from tests.conftest import EmulatorStats
from tests.support.pipeline import InProcessPipeline

EMAIL = "jane.doe.planted@example.com"
CARD = "4111 1111 1111 1111"


@pytest.fixture
def blocking_policy(tmp_path: Path) -> Path:
    policy = json.loads((Path(__file__).resolve().parents[1] / "catalog" / "policy.json").read_text())
    policy["pii"]["action"] = "block"
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(policy))
    return path


async def test_blocked_pii_job_leaks_nothing(
    settings: Settings,
    redis: Redis,
    emulator: str,
    emulator_stats: EmulatorStats,
    blocking_policy: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)  # farebox at its most verbose...
    quiet_libraries()  # ...with the library levels farebox's logging setup always applies
    s = settings.model_copy(update={"policy": blocking_policy, "emulator_url": emulator})
    p = InProcessPipeline(s)
    try:
        await p.start()
        async with p.client() as client:
            blocked = await client.complete(
                {"prompt": f"Mail {EMAIL}, card {CARD}: extract the facts.", "tenant": "acme", "job_id": "pii-1"},
                timeout=30,
            )
            clean = await client.complete(
                {"prompt": "Extract the facts: the sky is blue.", "tenant": "acme"}, timeout=30
            )
    finally:
        await p.close()
    assert blocked.status == "error" and blocked.error is not None and blocked.error.code == "blocked"
    assert "email" in blocked.error.message  # says which kind, never the value
    assert clean.status == "ok"
    assert await emulator_stats.total() == 1  # the blocked prompt never reached a provider
    captured = blocked.model_dump_json() + caplog.text
    async for key in redis.scan_iter(match=f"{s.redis_prefix}*"):
        if await redis.type(key) == b"string":
            captured += str(await redis.get(key))
    for secret in (EMAIL, CARD, "4111111111111111", "jane.doe"):
        assert secret not in captured
