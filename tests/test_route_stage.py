"""The route stage's core on its own, against the real Redis: what it puts on the envelope, and a budget
downgrade that reuses the first pass (one PII scan, one token count) with the same result as routing
again with ``downgrade=True``."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

import farebox.routing.pii as pii_module
import farebox.stages.route as route_module
from farebox.constants import NANO
from farebox.routing.choose import choose_route
from farebox.routing.store import CatalogStore
from farebox.schemas import ChatMessage, Envelope, Job
from farebox.settings import CATALOG_DIR, Settings
from farebox.stages.budgets import holds_for
from farebox.stages.route import RouteStage
from farebox.stages.stage import Delivery
from farebox.tokens import count_messages

EMAIL = "jane.doe@example.com"
MESSAGES = [
    {"role": "system", "content": "You answer briefly. Escalations go to ops@example.org."},
    {"role": "user", "content": f"Solve step by step, then mail {EMAIL}: 17 * 23 = ?"},
]


def policy_file(tmp_path: Path, budgets: list[dict[str, Any]]) -> Path:
    policy = json.loads((CATALOG_DIR / "policy.json").read_text())
    policy["budgets"] = budgets
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(policy))
    return path


def stage_for(settings: Settings, redis: Redis, policy: Path) -> RouteStage:
    s = settings.model_copy(update={"policy": policy})
    return RouteStage(s, CatalogStore(s.catalog, s.policy), redis)


def envelope(**job: Any) -> Envelope:
    return Envelope(job_id=f"route-{time.time_ns()}", job=Job(**job), received_at=time.time())


def delivery(env: Envelope) -> Delivery:
    return Delivery("route", env.model_dump_json().encode(), message_id=env.job_id)


def counting(monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> list[int]:
    calls: list[int] = []
    real: Callable[..., Any] = getattr(module, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


async def routed(stage: RouteStage, env: Envelope) -> Envelope:
    handled = await stage.handle(env, delivery(env))
    return Envelope.model_validate_json(handled.publishes[0].body)


async def test_a_downgrade_scans_and_counts_once_and_routes_as_before(
    settings: Settings, redis: Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    policy = policy_file(tmp_path, [{"tenant": "thrifty", "period": "month", "limit_usd": 1, "action": "downgrade"}])
    stage = stage_for(settings, redis, policy)
    env = envelope(messages=MESSAGES, tenant="thrifty", task="reason", quality="high", max_tokens=200)
    [(_, hold)] = holds_for(stage.store.current()[1], settings.keys, "thrifty", None, time.time())
    await redis.hset(hold.key, "spent_nusd", 2 * NANO)  # over the limit: the job is downgraded
    scans = counting(monkeypatch, pii_module, "scan")
    counts = counting(monkeypatch, route_module, "count_messages")

    out = await routed(stage, env)

    assert len(scans) == len(MESSAGES)  # one scan of each message, not a second pass for the downgrade
    assert len(counts) == 1
    monkeypatch.undo()
    catalog, policy_now, router = stage.store.current_unit()
    tokens = count_messages((m.role, m.content) for m in env.job.chat)
    before = choose_route(env.job, catalog, policy_now, input_tokens=tokens, downgrade=True, router=router)
    assert out.route == before.decision.model_copy(update={"reserved_usd": before.decision.estimated_cost_usd})
    assert out.route is not None and out.route.reason.startswith("budget downgrade") and out.route.redacted
    assert out.job.chat == before.messages
    assert EMAIL not in out.job.chat[1].content and "[REDACTED:email]" in out.job.chat[1].content
    assert out.budgets == (hold,)


async def test_the_prompt_token_count_rides_on_the_envelope(settings: Settings, redis: Redis, tmp_path: Path) -> None:
    stage = stage_for(settings, redis, policy_file(tmp_path, []))
    env = envelope(
        messages=[{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Solve 17 * 23."}]
    )
    out = await routed(stage, env)
    assert out.prompt_tokens == count_messages((m.role, m.content) for m in env.job.chat)
    assert out.job == env.job


async def test_a_redacted_prompt_leaves_the_count_to_the_execute_stage(
    settings: Settings, redis: Redis, tmp_path: Path
) -> None:
    stage = stage_for(settings, redis, policy_file(tmp_path, []))
    out = await routed(stage, envelope(messages=MESSAGES))
    assert out.job.chat[1] != ChatMessage.model_validate(MESSAGES[1])  # redacted...
    assert out.prompt_tokens is None  # ...so the count made before redaction does not describe it


def test_an_envelope_without_a_token_count_still_decodes() -> None:
    old = {"job_id": "j", "job": {"prompt": "hi"}, "received_at": 1.0}
    assert Envelope.model_validate_json(json.dumps(old)).prompt_tokens is None
    with_count = Envelope.model_validate_json(json.dumps({**old, "prompt_tokens": 12}))
    assert with_count.prompt_tokens == 12
    assert json.loads(with_count.model_dump_json(exclude_defaults=True))["prompt_tokens"] == 12


@pytest.mark.parametrize(
    ("lane", "providers", "price_lane"),
    [
        ("batch", frozenset({"openai", "anthropic", "google"}), "batch"),
        ("sync", frozenset({"openai", "anthropic", "google"}), "sync"),
        ("batch", frozenset(), "sync"),  # no provider with a Batch API: the sync lane
    ],
)
async def test_a_batch_lane_job_goes_to_its_providers_batch_queue(
    settings: Settings, redis: Redis, tmp_path: Path, lane: str, providers: frozenset[str], price_lane: str
) -> None:
    s = settings.model_copy(update={"policy": policy_file(tmp_path, [])})
    stage = RouteStage(s, CatalogStore(s.catalog, s.policy), redis, batch_providers=providers)
    env = envelope(prompt="Classify the sentiment of: great service.", task="classify", lane=lane)
    handled = await stage.handle(env, delivery(env))
    out = Envelope.model_validate_json(handled.publishes[0].body)
    assert out.route is not None and out.route.price_lane == price_lane
    topo = s.topology
    queue = topo.batch(out.route.provider) if price_lane == "batch" else topo.execute(out.route.provider)
    assert handled.publishes[0].routing_key == queue
    if price_lane == "batch":
        assert out.route.reason.startswith("batch lane (job asked for the batch lane; batch prices)")


def test_the_batch_providers_are_the_configured_ones_with_a_batch_api(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAREBOX_PROVIDERS_EXTRA", "lm-studio=http://127.0.0.1:1234/v1")
    stage = RouteStage(settings, CatalogStore(settings.catalog, settings.policy), Redis())
    assert stage.batch_providers == frozenset({"openai", "anthropic", "google"})
