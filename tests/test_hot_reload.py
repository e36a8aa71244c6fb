"""Running workers pick up a changed catalog without a restart, and refuse a broken one while the
previous version keeps serving (one log line, not one per job)."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import uuid
from pathlib import Path

import pytest

from farebox.settings import CATALOG_DIR, Settings
from tests.support.pipeline import InProcessPipeline

PIN = "openai/gpt-4o-mini"
RELOAD_WAIT_S = 2.6  # CatalogStore looks at the files every 2 s


async def test_price_change_is_picked_up_and_a_broken_file_refused(
    settings: Settings, emulator: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    catalog = tmp_path / "model_costs.json"
    shutil.copy(CATALOG_DIR / "model_costs.json", catalog)
    s = settings.model_copy(update={"catalog": catalog, "emulator_url": emulator})
    p = InProcessPipeline(s)

    def job() -> dict[str, object]:  # same prompt, so the same usage; bypass so it is priced afresh
        return {"prompt": "Price me.", "model": PIN, "cache": {"mode": "bypass"}, "job_id": str(uuid.uuid4())}

    try:
        await p.start()
        async with p.client() as client:
            before = await client.complete(job(), timeout=30)
            data = json.loads(catalog.read_text())
            entry = data["openai"]["gpt-4o-mini"]
            for field in ("input_cost_per_1k_tokens", "output_cost_per_1k_tokens"):
                entry[field] *= 10
            catalog.write_text(json.dumps(data))
            await asyncio.sleep(RELOAD_WAIT_S)
            after = await client.complete(job(), timeout=30)

            caplog.clear()
            caplog.set_level(logging.INFO, logger="farebox.catalog")
            catalog.write_text('{"openai": {"gpt-4o-mini": {"input_cost_per_1k_tokens": "free"')
            await asyncio.sleep(RELOAD_WAIT_S)
            while_broken = await client.complete(job(), timeout=30)
            await asyncio.sleep(RELOAD_WAIT_S)
            still_broken = await client.complete(job(), timeout=30)
    finally:
        await p.close()
    assert before.status == after.status == while_broken.status == still_broken.status == "ok"
    assert before.usage == after.usage
    assert after.cost_usd == pytest.approx(10 * before.cost_usd)
    assert while_broken.cost_usd == pytest.approx(after.cost_usd)  # the previous version keeps serving
    refusals = [r for r in caplog.records if r.name == "farebox.catalog" and r.levelno >= logging.ERROR]
    # One line per store that noticed (dedup, route, account and each execute, for its tenants' weights,
    # keep one), not one per job or check.
    assert 1 <= len(refusals) <= 6
    assert all(str(catalog) in r.getMessage() for r in refusals)
