"""estimate: expected cost under the policy vs everything on the baseline, without calling anyone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from farebox.routing.estimate import estimate_jobs, estimate_lines
from farebox.routing.store import load_pair
from farebox.schemas import Job
from farebox.settings import CATALOG_DIR


@pytest.fixture(scope="module")
def data() -> tuple[object, object, object]:
    # The bundled catalog, policy and the learned router it names, as `farebox estimate` loads them.
    catalog, policy, router, _ = load_pair(CATALOG_DIR / "model_costs.json", CATALOG_DIR / "policy.json")
    return catalog, policy, router


JOBS = [
    {
        "prompt": "Answer with the letter of the correct option only. A) 1 B) 2",
        "task": "classify",
        "max_tokens": 5,
    },
    {"prompt": "Summarize the following passage in two sentences. The sky is blue.", "task": "summarize"},
    {
        "prompt": "Natalia sold clips to 48 friends. How many?",
        "task": "reason",
        "quality": "high",
        "max_tokens": 400,
    },
    {"prompt": "Contact me at jane.doe@example.com. Extract the key facts as JSON.", "task": "extract"},
    {"prompt": "hello", "model": "openai/gpt-4o-mini"},
]


def test_estimate_jobs(data: tuple[object, object, object]) -> None:
    catalog, policy, router = data
    report = estimate_jobs((Job.model_validate(j) for j in JOBS), catalog, policy, router)  # type: ignore[arg-type]
    assert report.jobs == report.total.jobs == 5 and report.blocked == report.invalid == 0
    assert report.redacted == 1
    assert 0 < report.total.cost_usd < report.total.baseline_cost_usd
    assert set(report.by_task) == {"classify", "summarize", "reason", "extract", "chat"}
    assert set(report.by_tier) <= {"low", "medium", "high"}
    assert sum(b.jobs for b in report.by_model.values()) == 5
    assert report.by_model["openai/gpt-4o-mini"].jobs == 1
    assert sum(b.cost_usd for b in report.by_task.values()) == pytest.approx(report.total.cost_usd)
    d = report.as_dict()
    assert d["savings_usd"] == pytest.approx(d["baseline_cost_usd"] - d["cost_usd"]) and d["savings_pct"] > 0
    json.dumps(d)  # serialisable as-is for --json


def test_estimate_lines_counts_bad_lines(data: tuple[object, object, object]) -> None:
    catalog, policy, router = data
    lines = [
        json.dumps(JOBS[0]),
        "",  # blank lines are skipped, not counted
        "{not json",
        json.dumps({"prompt": "secret prompt text", "qualty": "high"}),  # typo: refused, not defaulted
        json.dumps({"prompt": "x", "model": "nope/nope"}),  # unknown pin
        json.dumps({"prompt": "my SSN is 078-05-1120", "model": "openai/gpt-4o"}),
    ]
    policy_block = policy.model_copy(update={"pii": policy.pii.model_copy(update={"action": "block"})})  # type: ignore[attr-defined]
    report = estimate_lines(lines, catalog, policy_block, router)  # type: ignore[arg-type]
    assert report.jobs == 5 and report.total.jobs == 1 and report.invalid == 3 and report.blocked == 1
    assert [n for n, _ in report.invalid_examples] == [3, 4, 5]
    messages = " ".join(m for _, m in report.invalid_examples)
    assert "not valid JSON" in messages and "unknown model 'nope/nope'" in messages
    assert report.invalid_examples[1] == (4, "qualty: Extra inputs are not permitted")  # farebox.errors' wording
    assert "secret prompt text" not in messages


def test_estimate_workload_file(data: tuple[object, object, object], tmp_path: Path) -> None:
    catalog, policy, router = data
    path = tmp_path / "jobs.jsonl"
    path.write_text("\n".join(json.dumps(j) for j in JOBS * 20) + "\n")
    with path.open() as f:
        report = estimate_lines(f, catalog, policy, router)  # type: ignore[arg-type]
    assert report.total.jobs == 100 and report.savings_usd > 0


def test_estimate_says_what_quality_the_learned_router_keeps(data: tuple[object, object, object]) -> None:
    catalog, policy, router = data
    jobs = [
        Job(prompt="What is the capital of France?", quality="high"),
        Job(prompt="What is the capital of Peru?", quality="low"),
        Job(prompt="Pinned", model="openai/gpt-4o-mini"),
        Job(prompt="Classify this ticket: refund please", task="classify"),  # the task's default tier decides
    ]
    report = estimate_jobs(jobs, catalog, policy, router)  # type: ignore[arg-type]
    assert report.scored == 2
    assert report.quality_kept == pytest.approx((0.98 + 0.85) / 2)
    assert set(report.by_quality) == {
        "high: learned, keeps 98% of premium quality",
        "low: learned, keeps 85% of premium quality",
        "pinned model",
        "medium: rules (task classify defaults to low)",
    }
    assert report.as_dict()["quality_kept"] == pytest.approx(0.915)
