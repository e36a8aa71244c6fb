"""Shadow grading: a cheaper arm's answers graded against the reference model, as feedback "shadow", under a cap."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from farebox.cli import main as cli_main
from farebox.constants import NANO, as_text, job_record
from farebox.emulator.knobs import EmulatorKnobs
from farebox.emulator.outcomes import wrong_answer
from farebox.emulator.server import running
from farebox.feedback_export import ExportFilter, collect, export_lines
from farebox.routing.outcomes import load_outcomes
from farebox.settings import CATALOG_DIR, Settings
from farebox.stages.shadow import JUDGE_PROMPT, agreement, evaluation_job_id, judge_verdict, period_of
from tests.support.pipeline import InProcessPipeline

REFERENCE = "openai/gpt-4-turbo"
CHEAP = "openai/gpt-4o-mini"
JUDGE = "anthropic/claude-3-haiku"


@pytest.mark.unit
@pytest.mark.parametrize(
    ("answer", "reference", "score"),
    [
        ("Paris", "paris", 1.0),
        ("  The answer is: 42. ", "the answer is 42", 1.0),
        ("(B)", "B", 1.0),
        ("B", "C", 0.0),
        ("42", "forty-two", 0.0),
        ("", "", 1.0),
        ("北京", "上海", 0.0),
        ("Да", "Нет", 0.0),
        ("Café!", "café", 1.0),
    ],
)
def test_exact_grader(answer: str, reference: str, score: float) -> None:
    assert agreement(answer, reference) == score


@pytest.mark.unit
@pytest.mark.parametrize(
    ("text", "score"), [("yes", 1.0), ("Yes.", 1.0), ("NO", 0.0), ("no, they differ", 0.0), ("maybe", None), ("", None)]
)
def test_judge_verdict(text: str, score: float | None) -> None:
    assert judge_verdict(text) == score


@pytest.mark.unit
@pytest.mark.parametrize(
    ("period", "ts", "expected"),
    [
        ("day", 0.0, "day:1970-01-01"),
        ("month", 1_764_633_600.0, "month:2025-12"),
        ("day", 1_764_633_599.0, "day:2025-12-01"),
    ],
)
def test_cap_periods(period: str, ts: float, expected: str) -> None:
    assert period_of(period, ts) == expected


PROMPTS = [f"Question {i}: which option is right?" for i in range(10)]
LABELS = [f"answer-{i}" for i in range(10)]
CHEAP_RIGHT = [i % 2 == 0 for i in range(10)]  # the cheap model gets the even questions right


def outcomes_file(tmp_path: Path, judge_lines: bool = False) -> Path:
    lines: list[dict[str, Any]] = []
    for prompt, label, ok in zip(PROMPTS, LABELS, CHEAP_RIGHT, strict=True):
        lines.append({"prompt": prompt, "label": label, "correct": {REFERENCE: True, CHEAP: ok}})
        if judge_lines:
            answer = label if ok else wrong_answer(label)
            judge = JUDGE_PROMPT.format(request=prompt, reference=label, answer=answer)
            lines.append({"prompt": judge, "label": "yes" if ok else "no"})
    path = tmp_path / "outcomes.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def shadow_policy(tmp_path: Path, premium_weight: float = 1, tenants: Any = None, **shadow: Any) -> Path:
    data = json.loads((CATALOG_DIR / "policy.json").read_text())
    if tenants is not None:
        data["tenants"] = tenants
    data["experiments"] = [
        {
            "name": "cheap-vs-premium",
            "arms": [
                {"name": "premium", "weight": premium_weight, "strategy": {"kind": "model", "model": REFERENCE}},
                {"name": "cheap", "weight": 1, "strategy": {"kind": "model", "model": CHEAP}},
            ],
            "shadow": {"share": 1.0, "reference": REFERENCE, "cap_usd": 10.0, **shadow},
        }
    ]
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
async def labelled_emulator(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[str]:
    judge = bool(getattr(request, "param", False))
    async with running(EmulatorKnobs(port=0, outcomes=str(outcomes_file(tmp_path, judge)))) as url:
        yield url


async def shadow_scores(
    redis: Redis, settings: Settings, job_ids: list[str], want: int, wait_s: float = 30
) -> dict[str, float]:
    """job id -> its "shadow" feedback score, waiting (up to ``wait_s``) for ``want`` of them."""
    scores: dict[str, float] = {}
    for _ in range(int(wait_s * 10)):
        for job_id in job_ids:
            raw = await redis.hget(settings.keys.feedback(job_record("acme", job_id)), "shadow")
            if raw is not None:
                scores[job_id] = json.loads(raw)["score"]
        if len(scores) >= want:
            return scores
        await asyncio.sleep(0.1)
    return scores


async def run_jobs(settings: Settings) -> list[Any]:
    p = InProcessPipeline(settings)
    await p.start()
    try:
        async with p.client() as client:
            # Fixed job ids: the same arms are drawn on every run.
            jobs = [{"job_id": f"q{i}", "prompt": q, "tenant": "acme"} for i, q in enumerate(PROMPTS)]
            results = [await client.complete(job, timeout=30) for job in jobs]
    except BaseException:
        await p.close()
        raise
    settings_pipeline.append(p)
    return results


settings_pipeline: list[InProcessPipeline] = []


@pytest.fixture(autouse=True)
async def _close_pipelines() -> AsyncIterator[None]:
    yield
    while settings_pipeline:
        await settings_pipeline.pop().close()


def cheap_jobs(results: list[Any]) -> dict[str, int]:
    """job id -> question index, for the jobs the cheap arm answered."""
    return {r.job_id: i for i, r in enumerate(results) if r.route.strategy.arm == "cheap"}


async def test_the_cheap_arm_is_graded_against_the_reference(
    settings: Settings, redis: Redis, labelled_emulator: str, tmp_path: Path
) -> None:
    s = settings.model_copy(update={"emulator_url": labelled_emulator, "policy": shadow_policy(tmp_path)})
    results = await run_jobs(s)
    cheap = cheap_jobs(results)
    assert 0 < len(cheap) < len(results)
    scores = await shadow_scores(redis, s, list(cheap), len(cheap))
    assert scores == {job_id: (1.0 if CHEAP_RIGHT[i] else 0.0) for job_id, i in cheap.items()}
    premium = [r.job_id for r in results if r.job_id not in cheap]
    assert await shadow_scores(redis, s, premium, 1, wait_s=0.5) == {}  # the reference arm is not graded against itself
    entry = json.loads(
        await redis.get(s.keys.ledger_entry(job_record("acme", evaluation_job_id("shadow", next(iter(cheap))))))
    )
    assert entry["evaluation"] == "shadow" and entry["model"] == "gpt-4-turbo" and entry["cost_usd"] > 0
    reference = json.loads(await redis.hget(s.keys.feedback(job_record("acme", next(iter(cheap)))), "shadow"))[
        "reference"
    ]
    assert reference == REFERENCE
    day = entry["day"]
    spent = int(await redis.hget(s.keys.ledger_arms(day), "cheap-vs-premium|cheap|shadow_nusd"))
    assert spent == pytest.approx(len(cheap) * entry["cost_usd"] * NANO, rel=0.5)
    assert int(await redis.hget(s.keys.ledger_agg(day), "acme|openai|gpt-4-turbo|evaluation_nusd")) == spent


async def test_the_shadow_cap_stops_spending_at_its_limit(
    settings: Settings, redis: Redis, labelled_emulator: str, tmp_path: Path
) -> None:
    # Each shadow call reserves a max_tokens (256) answer on gpt-4-turbo, about $0.0078, and costs about
    # $0.0002 once settled: under a $0.008 cap the spend leaves room for a reservation about twice.
    s = settings.model_copy(
        update={"emulator_url": labelled_emulator, "policy": shadow_policy(tmp_path, 0, cap_usd=0.008)}
    )
    results = await run_jobs(s)
    cheap = cheap_jobs(results)
    assert len(cheap) == len(PROMPTS)  # the premium arm has no weight
    graded = await shadow_scores(redis, s, list(cheap), len(cheap), wait_s=3)
    assert 1 <= len(graded) <= 3  # a few graded, then the cap stopped it
    keys = [as_text(k) async for k in redis.scan_iter(match=s.keys.shadow_spend("cheap-vs-premium", "*"))]
    assert len(keys) == 1
    assert int(await redis.get(keys[0])) <= 0.008 * NANO
    # What was spent, as the ledger has it (reservations are for max_tokens, so the actual is below them).
    day = json.loads(await redis.get(s.keys.ledger_entry(job_record("acme", results[0].job_id))))["day"]
    spent = int(await redis.hget(s.keys.ledger_agg(day), "acme|openai|gpt-4-turbo|evaluation_nusd"))
    assert 0 < spent <= 0.008 * NANO


@pytest.mark.parametrize("labelled_emulator", [True], indirect=True)
async def test_a_judge_model_grades_open_answers(
    settings: Settings, redis: Redis, labelled_emulator: str, tmp_path: Path
) -> None:
    policy = shadow_policy(tmp_path, grader="judge", judge_model=JUDGE)
    s = settings.model_copy(update={"emulator_url": labelled_emulator, "policy": policy})
    results = await run_jobs(s)
    cheap = cheap_jobs(results)
    scores = await shadow_scores(redis, s, list(cheap), len(cheap))
    assert scores == {job_id: (1.0 if CHEAP_RIGHT[i] else 0.0) for job_id, i in cheap.items()}
    judged = json.loads(
        await redis.get(s.keys.ledger_entry(job_record("acme", evaluation_job_id("judge", next(iter(cheap))))))
    )
    assert judged["evaluation"] == "judge" and judged["model"] == "claude-3-haiku"


async def test_feedback_export_is_training_data_for_router_train(
    settings: Settings, redis: Redis, labelled_emulator: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = settings.model_copy(update={"emulator_url": labelled_emulator, "policy": shadow_policy(tmp_path)})
    results = await run_jobs(s)
    cheap = cheap_jobs(results)
    await shadow_scores(redis, s, list(cheap), len(cheap))
    # A human rates one premium job too: that prompt has only the premium model's outcome.
    premium = next(r for r in results if r.job_id not in cheap)
    async with settings_pipeline[0].client() as client:
        await client.feedback(premium.job_id, "good", tenant="acme", source="user-thumbs")
    rows, counts = await collect(redis, s.keys, ExportFilter())
    lines = [json.loads(line) for line in export_lines(rows, counts, everything=False)]
    assert counts.written == len(cheap) and counts.single_model == 1 and counts.no_prompt == 0
    by_prompt = {line["prompt"]: line for line in lines}
    for i in cheap.values():
        line = by_prompt[PROMPTS[i]]
        assert line["outcomes"] == {CHEAP: 1.0 if CHEAP_RIGHT[i] else 0.0, REFERENCE: 1.0}
        assert line["group"] == "acme"
    path = tmp_path / "feedback.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    data = load_outcomes([path])  # what `farebox router train` reads
    assert data.strong_model == REFERENCE and data.weak_model == CHEAP and len(data) == len(cheap)
    only_thumbs, _ = await collect(redis, s.keys, ExportFilter(sources=frozenset({"user-thumbs"})))
    assert [r.line()["outcomes"] for r in only_thumbs] == [{REFERENCE: 1.0}]
    # The command line writes the same lines (and says what it left out).
    monkeypatch.setenv("FAREBOX_REDIS_PREFIX", s.redis_prefix)
    monkeypatch.setenv("FAREBOX_REDIS_URL", s.redis_url)
    out = tmp_path / "cli.jsonl"
    assert await asyncio.to_thread(cli_main, ["feedback", "export", "-o", str(out)]) == 0
    assert sorted(out.read_text().splitlines()) == sorted(json.dumps(line, ensure_ascii=False) for line in lines)


async def test_no_shadow_call_to_a_model_the_tenant_may_not_use(
    settings: Settings, redis: Redis, labelled_emulator: str, tmp_path: Path
) -> None:
    # acme may not send its prompts to gpt-4-turbo (data residency, say): the arm's jobs are not shadowed.
    policy = shadow_policy(tmp_path, 0, tenants={"acme": {"deny": [REFERENCE]}})
    s = settings.model_copy(update={"emulator_url": labelled_emulator, "policy": policy})
    results = await run_jobs(s)
    assert all(r.status == "ok" and r.model == "gpt-4o-mini" for r in results)
    assert await shadow_scores(redis, s, [r.job_id for r in results], 1, wait_s=1) == {}
    shadow_entry = s.keys.ledger_entry(job_record("acme", evaluation_job_id("shadow", results[0].job_id)))
    assert await redis.exists(shadow_entry) == 0


async def test_a_job_id_of_200_characters_is_graded(
    settings: Settings, redis: Redis, labelled_emulator: str, tmp_path: Path
) -> None:
    s = settings.model_copy(update={"emulator_url": labelled_emulator, "policy": shadow_policy(tmp_path, 0)})
    p = InProcessPipeline(s)
    await p.start()
    settings_pipeline.append(p)
    long_id = "x" * 200
    async with p.client() as client:
        r = await client.complete({"job_id": long_id, "prompt": PROMPTS[0], "tenant": "acme"}, timeout=30)
    assert r.status == "ok"
    assert await shadow_scores(redis, s, [long_id], 1) == {long_id: 1.0}
    assert len(evaluation_job_id("shadow", long_id)) <= 200
