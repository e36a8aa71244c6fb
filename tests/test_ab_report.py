"""End to end: one arm is made worse on purpose (the emulator answers its model wrongly on labelled prompts), a
grader sends feedback, and `farebox report --by strategy` finds the difference."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from farebox.emulator.knobs import EmulatorKnobs
from farebox.emulator.server import running
from farebox.settings import CATALOG_DIR, Settings
from farebox.strategy_report import load_strategy_rows
from tests.support.pipeline import InProcessPipeline

GOOD = "openai/gpt-4o-mini"
BAD = "anthropic/claude-3-haiku"
N = 60


def labelled(tmp_path: Path) -> tuple[Path, list[str], list[str]]:
    prompts = [f"Labelled question number {i}?" for i in range(N)]
    labels = [f"label-{i}" for i in range(N)]
    # The bad arm's model is right on one question in four, the good one's on every one.
    lines = [
        {"prompt": p, "label": label, "correct": {BAD: i % 4 == 0, "*": True}}
        for i, (p, label) in enumerate(zip(prompts, labels, strict=True))
    ]
    path = tmp_path / "outcomes.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path, prompts, labels


def ab_policy(tmp_path: Path) -> Path:
    data = json.loads((CATALOG_DIR / "policy.json").read_text())
    data["experiments"] = [
        {
            "name": "worse-on-purpose",
            "arms": [
                {"name": "good", "weight": 1, "strategy": {"kind": "model", "model": GOOD}},
                {"name": "bad", "weight": 1, "strategy": {"kind": "model", "model": BAD}},
            ],
        }
    ]
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(data))
    return path


async def test_the_report_finds_the_arm_that_was_made_worse(settings: Settings, redis: Redis, tmp_path: Path) -> None:
    outcomes, prompts, labels = labelled(tmp_path)
    async with running(EmulatorKnobs(port=0, outcomes=str(outcomes))) as url:
        s = settings.model_copy(update={"emulator_url": url, "policy": ab_policy(tmp_path)})
        p = InProcessPipeline(s)
        await p.start()
        try:
            async with p.client() as client:
                results = [
                    r
                    async for r in client.stream(
                        [{"prompt": q, "tenant": "acme", "job_id": f"j{i}"} for i, q in enumerate(prompts)]
                    )
                ]
                for r in results:  # the grader: exact match with the label
                    i = int(r.job_id[1:])
                    receipt = await client.feedback(
                        r.job_id, 1.0 if r.content == labels[i] else 0.0, tenant="acme", source="grader"
                    )
                    assert receipt is not None and receipt.status == "ok"
        finally:
            await p.close()
    assert len(results) == N and all(r.status == "ok" for r in results)
    rows = await load_strategy_rows(redis, s.keys, arm_order={"worse-on-purpose": ["good", "bad"]})
    by_arm: dict[str, dict[str, Any]] = {r["arm"]: r for r in rows}
    assert set(by_arm) == {"good", "bad"}
    assert by_arm["good"]["jobs"] + by_arm["bad"]["jobs"] == N
    assert by_arm["good"]["feedback"] == by_arm["good"]["jobs"] and by_arm["good"]["mean_score"] == 1.0
    bad = by_arm["bad"]
    assert bad["control"] == "good" and bad["source"] == "grader"
    assert bad["mean_score"] < 0.5 and bad["diff_vs_control"] < -0.5
    assert bad["significant"] is True and bad["p_value"] < 0.05
    assert bad["diff_ci95"][1] < 0  # the whole interval is below the control
