"""Experiments and feedback through the real pipeline: route.strategy on results, the ledger's arm aggregates,
feedback attached once per source, refusals dead-lettered with a typed receipt, sticky arms across reloads."""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from redis.asyncio import Redis

from farebox.constants import H_CODE, H_REASON, as_text, job_record
from farebox.routing.experiments import Assignment, Experiment
from farebox.settings import CATALOG_DIR, Settings
from farebox.stages.arms import ArmPins
from tests.support.pipeline import InProcessPipeline, get_message, ledger_entries

ARMS: list[dict[str, Any]] = [
    {"name": "rules", "weight": 1, "strategy": {"kind": "rules"}},
    {"name": "mini", "weight": 1, "strategy": {"kind": "model", "model": "openai/gpt-4o-mini"}},
]


def experiment_policy(tmp_path: Path, arms: list[dict[str, Any]] = ARMS, **extra: Any) -> Path:
    data = json.loads((CATALOG_DIR / "policy.json").read_text())
    data["experiments"] = [{"name": "ab", "tenants": ["acme"], "arms": arms, **extra}]
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(data))
    return path


async def arm_hash(redis: Redis, settings: Settings) -> dict[str, str]:
    out: dict[str, str] = {}
    for day in await redis.smembers(settings.keys.ledger_days):
        for key, value in (await redis.hgetall(settings.keys.ledger_arms(as_text(day)))).items():
            out[as_text(key)] = as_text(value)
        for key, value in (await redis.hgetall(settings.keys.feedback_arms(as_text(day)))).items():
            out["fb:" + as_text(key)] = as_text(value)
    return out


@pytest.fixture
async def ab_pipeline(settings: Settings, emulator: str, tmp_path: Path) -> Any:
    s = settings.model_copy(update={"emulator_url": emulator, "policy": experiment_policy(tmp_path)})
    p = InProcessPipeline(s)
    await p.start()
    try:
        yield p
    finally:
        await p.close()


async def test_jobs_carry_their_arm_and_the_ledger_counts_each_arm(
    ab_pipeline: InProcessPipeline, redis: Redis
) -> None:
    settings = ab_pipeline.settings
    async with ab_pipeline.client() as client:
        results = [
            await client.complete({"prompt": f"Tell me about topic {i}", "tenant": "acme"}, timeout=30)
            for i in range(12)
        ]
        outside = await client.complete(
            {"prompt": "Tell me about topic 0", "tenant": "other", "cache": {"mode": "bypass"}}
        )
    arms = {r.route.strategy.arm for r in results if r.route and r.route.strategy}
    assert arms == {"rules", "mini"}  # 12 jobs over two equal arms: both drawn
    for r in results:
        assert r.route is not None and r.route.strategy is not None and r.route.strategy.experiment == "ab"
        assert r.route.reason.startswith(f"experiment ab arm {r.route.strategy.arm} (job_id hash 0.")
        if r.route.strategy.arm == "mini":
            assert r.model == "gpt-4o-mini"
    assert outside.route is not None and outside.route.strategy is None  # not covered: tenant "other"
    agg = await arm_hash(redis, settings)
    per_arm = {arm: sum(1 for r in results if r.route.strategy.arm == arm) for arm in arms}  # type: ignore[union-attr]
    for arm, n in per_arm.items():
        assert int(agg[f"ab|{arm}|jobs"]) == n
    cost = sum(r.cost_usd for r in results if r.route.strategy.arm == "mini")  # type: ignore[union-attr]
    assert abs(int(agg["ab|mini|cost_nusd"]) / 1e9 - cost) < 1e-6
    kept = await redis.get(settings.keys.prompt(job_record("acme", results[0].job_id)))
    assert kept is not None and json.loads(kept) == [{"role": "user", "content": "Tell me about topic 0"}]
    assert 0 < await redis.ttl(settings.keys.prompt(job_record("acme", results[0].job_id))) <= 7 * 86_400
    assert await redis.get(settings.keys.prompt(job_record("other", outside.job_id))) is None  # only experiment jobs


async def test_feedback_is_counted_once_per_source_and_replaced(ab_pipeline: InProcessPipeline, redis: Redis) -> None:
    settings = ab_pipeline.settings
    async with ab_pipeline.client() as client:
        r = await client.complete({"prompt": "Name a colour", "tenant": "acme"}, timeout=30)
        arm = r.route.strategy.arm  # type: ignore[union-attr]
        first = await client.feedback(r.job_id, "good", tenant="acme", source="user-thumbs")
        again = await client.feedback(r.job_id, 0.25, tenant="acme", source="user-thumbs", label="blue")
        graded = await client.feedback(r.job_id, 1.0, tenant="acme", source="grader")
    assert first is not None and first.status == "ok" and not first.replaced
    assert again is not None and again.status == "ok" and again.replaced
    assert graded is not None and graded.status == "ok" and not graded.replaced
    agg = await arm_hash(redis, settings)
    assert int(agg[f"fb:ab|{arm}|user-thumbs|n"]) == 1  # replaced, not added
    assert float(agg[f"fb:ab|{arm}|user-thumbs|sum"]) == pytest.approx(0.25)
    assert float(agg[f"fb:ab|{arm}|user-thumbs|sumsq"]) == pytest.approx(0.0625)
    assert int(agg[f"fb:ab|{arm}|grader|n"]) == 1
    stored = await redis.hgetall(settings.keys.feedback(job_record("acme", r.job_id)))
    thumbs = json.loads(stored[b"user-thumbs"])
    assert thumbs["score"] == 0.25 and thumbs["label"] == "blue"
    assert await redis.zscore(settings.keys.feedback_jobs, job_record("acme", r.job_id)) is not None
    assert len(await ledger_entries(redis, settings)) == 1  # feedback adds no ledger entry


async def raw_feedback(settings: Settings, body: bytes) -> tuple[dict[str, Any], Any]:
    """Publish ``body`` to the feedback queue with a reply queue; (the receipt, the dead letter)."""
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        replies = await channel.declare_queue(exclusive=True)
        await channel.default_exchange.publish(
            aio_pika.Message(body, reply_to=replies.name, correlation_id="fb-1"), routing_key=settings.topology.feedback
        )
        reply = await get_message(replies)
        dead = await get_message(await channel.get_queue(settings.topology.dead))
    assert reply.correlation_id == "fb-1"
    return json.loads(reply.body), dead


@pytest.mark.parametrize(
    ("body", "code", "fragment"),
    [
        (b"{not json", "invalid_request", "not UTF-8 JSON"),
        (b'{"job_id": "x", "score": 1.5}', "invalid_request", "score"),
        (b'{"job_id": "x", "score": "great"}', "invalid_request", "score"),
        (b'{"job_id": "x", "score": 1, "stars": 5}', "invalid_request", "stars"),
        (b'{"score": 1}', "invalid_request", "job_id"),
        (b'{"job_id": "never-ran", "score": 1}', "invalid_request", "no finished job 'never-ran'"),
    ],
)
async def test_bad_feedback_is_dead_lettered_with_a_typed_receipt(
    ab_pipeline: InProcessPipeline, redis: Redis, body: bytes, code: str, fragment: str
) -> None:
    settings = ab_pipeline.settings
    receipt, dead = await raw_feedback(settings, body)
    assert receipt["kind"] == "feedback" and receipt["status"] == "error"
    assert receipt["error"]["code"] == code and fragment in receipt["error"]["message"]
    record = json.loads(dead.body)  # a record of the refused message, never its body
    assert record["body_sha256"] == hashlib.sha256(body).hexdigest() and record["stage"] == "feedback"
    assert "body" not in record and dead.headers[H_CODE] == code and fragment in dead.headers[H_REASON]
    assert await ledger_entries(redis, settings) == []  # a refused feedback is not a job


async def test_feedback_from_another_tenant_names_no_job_of_this_one(
    ab_pipeline: InProcessPipeline, redis: Redis
) -> None:
    # Records are keyed by tenant and job_id: mallory naming acme's job_id names a job of mallory's own,
    # which does not exist, so nothing reaches acme's job (with auth mode user_id mallory could not even
    # claim to be acme: tests/test_auth.py).
    settings = ab_pipeline.settings
    async with ab_pipeline.client() as client:
        r = await client.complete({"prompt": "A secret of acme", "tenant": "acme"}, timeout=30)
        refused = await client.feedback(r.job_id, "bad", tenant="mallory")
    assert refused is not None and refused.status == "error"
    assert refused.error is not None and refused.error.code == "invalid_request"
    assert await redis.exists(settings.keys.feedback(job_record("acme", r.job_id))) == 0
    assert await redis.exists(settings.keys.feedback(job_record("mallory", r.job_id))) == 0
    body = json.dumps({"job_id": r.job_id, "tenant": "mallory", "score": 0}).encode()
    receipt, dead = await raw_feedback(settings, body)
    assert receipt["error"]["code"] == "invalid_request" and dead.headers[H_CODE] == "invalid_request"
    assert "PROMPT" not in receipt["error"]["message"] and "secret" not in receipt["error"]["message"]


async def test_a_kept_arm_survives_a_reload_that_changes_the_weights(settings: Settings, redis: Redis) -> None:
    pins = ArmPins(redis, settings.keys, ttl_s=60)
    even = Experiment.model_validate({"name": "ab", "arms": ARMS})
    job_id = f"job-{uuid.uuid4()}"
    first = await pins.pin(job_record("default", job_id), Assignment("ab", "rules", 0.3, "job_id"), (even,))
    assert first.arm == "rules"
    # After a reload that gives "rules" no weight, the same job draws "mini": it keeps "rules".
    moved = Experiment.model_validate({"name": "ab", "arms": [{**ARMS[0], "weight": 0}, ARMS[1]]})
    again = await pins.pin(job_record("default", job_id), Assignment("ab", "mini", 0.3, "job_id"), (moved,))
    assert again.arm == "rules"
    # An arm that has left the policy is not kept: the job takes the arm it draws now.
    renamed = Experiment.model_validate({"name": "ab", "arms": [{**ARMS[0], "name": "rules2"}, ARMS[1]]})
    assert (
        await pins.pin(job_record("default", job_id), Assignment("ab", "mini", 0.3, "job_id"), (renamed,))
    ).arm == "mini"
    assert 0 < await redis.ttl(settings.keys.arm(job_record("default", job_id))) <= 60


async def test_experiment_answers_do_not_fill_the_shared_cache(ab_pipeline: InProcessPipeline) -> None:
    async with ab_pipeline.client() as client:
        first = await client.complete({"prompt": "Cache me if you can", "tenant": "acme"}, timeout=30)
        again = await client.complete({"prompt": "Cache me if you can", "tenant": "acme"}, timeout=30)
        outside = await client.complete({"prompt": "Cache me if you can", "tenant": "other"}, timeout=30)
        outside_again = await client.complete({"prompt": "Cache me if you can", "tenant": "other"}, timeout=30)
    assert first.cache == "miss" and again.cache == "miss"  # an arm's answer is never served from the cache
    assert again.route is not None and again.route.strategy is not None
    assert outside.cache == "miss" and outside_again.cache == "hit"  # jobs outside experiments still are


async def test_a_redelivered_job_keeps_its_arm_when_a_reload_no_longer_draws_it(
    settings: Settings, redis: Redis
) -> None:
    pins = ArmPins(redis, settings.keys, ttl_s=60)
    ab = Experiment.model_validate({"name": "ab", "arms": ARMS})
    await pins.pin("job-7", Assignment("ab", "mini", 0.7, "job_id"), (ab,))
    kept = await pins.kept("job-7", (ab,))
    assert kept is not None and (kept.experiment, kept.arm) == ("ab", "mini")
    assert await pins.kept("job-8", (ab,)) is None  # never pinned
    assert await pins.kept("job-7", ()) is None  # the experiment has left the policy


def test_catalog_check_reads_the_arms_router_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from farebox.cli import main

    arms = [
        ARMS[0],
        {
            "name": "learned",
            "strategy": {"kind": "learned", "path": "gone.json", "levels": {"high": 0.9, "medium": 0.9, "low": 0.9}},
        },
    ]
    policy = experiment_policy(tmp_path, arms)
    assert main(["catalog", "check", "--policy", str(policy)]) != 0
    assert "experiments.ab.learned.path" in capsys.readouterr().err
