"""Metric labels carry only the tenants the policy names; every other tenant counts under "other", so a "*"
budget or open intake never makes each new tenant name a Prometheus series (issue 19)."""

from __future__ import annotations

import json
import random
import string
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from farebox import metrics
from farebox.routing.policy import load_policy, parse_policy
from farebox.settings import CATALOG_DIR, Settings
from farebox.stages.budgets import BudgetAlerts, holds_for
from tests.support.pipeline import InProcessPipeline, collect

TENANT_METRICS = ("farebox_tenant_cost_usd", "llm_proxy_budget_used_ratio", "farebox_budget_alerts")
RANDOM_TENANTS = 5_000
ARMS = [
    {"name": "rules", "strategy": {"kind": "rules"}},
    {"name": "cheap", "strategy": {"kind": "model", "model": "openai/gpt-4o-mini"}},
]


def policy_data(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((CATALOG_DIR / "policy.json").read_text())
    data.update(overrides)
    return data


def tenant_labels() -> dict[str, set[str]]:
    """metric family -> the tenant label values the process registry holds for it."""
    out: dict[str, set[str]] = {name: set() for name in TENANT_METRICS}
    for family in REGISTRY.collect():
        if family.name in out:
            out[family.name].update(s.labels["tenant"] for s in family.samples if "tenant" in s.labels)
    return out


def sample(name: str, **labels: str) -> float:
    return float(REGISTRY.get_sample_value(name, labels) or 0.0)


def random_tenants(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    alphabet = string.ascii_letters + string.digits + "_.@-"
    names = {"".join(rng.choices(alphabet, k=rng.randint(4, 40))) for _ in range(n * 2)}
    return sorted(names)[:n]


def test_named_tenants_come_from_every_place_the_policy_names_one() -> None:
    policy = parse_policy(
        policy_data(
            tenants={"ruled": {"max_tier": "medium"}},
            cache_sharing=[["share-a", "share-b"]],
            budgets=[
                {"tenant": "*", "period": "day", "limit_usd": 1},
                {"tenant": "budgeted", "period": "month", "limit_usd": 5},
            ],
            auth={"mode": "user_id", "users": {"svc": ["authed", "budgeted"]}},
            experiments=[
                {"name": "ab", "tenants": ["tested"], "arms": ARMS},
                {"name": "everyone", "arms": ARMS},  # tenants None: every tenant, names none
            ],
            priority={"tenants": {"laned": "background"}, "weights": {"weighted": 2, "*": 1}},
        ),
        "policy",
    )
    assert policy.named_tenants == {"ruled", "share-a", "share-b", "budgeted", "authed", "tested", "laned", "weighted"}
    assert "*" not in policy.named_tenants
    assert load_policy(CATALOG_DIR / "policy.json").named_tenants == {"initech"}


def test_named_tenants_are_computed_once_per_policy_and_afresh_for_a_changed_copy() -> None:
    policy = parse_policy(policy_data(cache_sharing=[["a", "b"]], budgets=[]), "policy")
    assert policy.named_tenants is policy.named_tenants
    assert "named_tenants" not in policy.model_dump()
    assert policy.model_copy(update={"cache_sharing": ()}).named_tenants == frozenset()
    assert policy.model_copy().named_tenants == {"a", "b"}


def test_tenant_label_is_the_tenant_only_when_named() -> None:
    named = frozenset({"acme"})
    assert metrics.tenant_label("acme", named) == "acme"
    assert metrics.tenant_label("newcomer", named) == metrics.OTHER_TENANT == "other"
    assert metrics.tenant_label(None, named) == "other"
    assert metrics.tenant_label("acme", frozenset()) == "other"


async def test_budget_gauges_only_for_named_tenants_and_alerts_of_others_under_other(
    settings: Settings, redis: Redis
) -> None:
    policy = parse_policy(
        policy_data(
            budgets=[
                {"tenant": "*", "period": "day", "limit_usd": 1, "alerts": [0.5]},
                {"tenant": "gauged", "period": "month", "limit_usd": 1, "alerts": [0.5]},
            ]
        ),
        "policy",
    )
    alerts = BudgetAlerts(redis, settings, policy=lambda: policy)
    stranger = f"stranger-{uuid.uuid4().hex[:8]}"
    before = sample("farebox_budget_alerts_total", tenant="other", threshold="0.5")
    for tenant in ("gauged", stranger):
        holds = [h for _, h in holds_for(policy, settings.keys, tenant, None, time.time())]
        fired = await alerts.check(holds, [0.75] * len(holds))
        assert {json.loads(p.body)["tenant"] for p in fired} == {tenant}  # the alert itself names the tenant
    assert sample("llm_proxy_budget_used_ratio", tenant="gauged", period="month") == 0.75
    assert sample("llm_proxy_budget_used_ratio", tenant="gauged", period="day") == 0.75
    labels = tenant_labels()
    assert stranger not in labels["llm_proxy_budget_used_ratio"] | labels["farebox_budget_alerts"]
    assert "other" not in labels["llm_proxy_budget_used_ratio"]  # no gauge shared by the unnamed
    assert sample("farebox_budget_alerts_total", tenant="other", threshold="0.5") == before + 1
    assert sample("farebox_budget_alerts_total", tenant="gauged", threshold="0.5") >= 2  # its day and month


async def test_alerts_without_a_policy_name_no_tenant(settings: Settings, redis: Redis) -> None:
    policy = parse_policy(policy_data(budgets=[{"tenant": "nameless", "period": "day", "limit_usd": 1}]), "policy")
    holds = [h for _, h in holds_for(policy, settings.keys, "nameless", None, time.time())]
    await BudgetAlerts(redis, settings).check(holds, [1.0])
    assert "nameless" not in set().union(*tenant_labels().values())


@pytest.mark.parametrize("count", [pytest.param(RANDOM_TENANTS, marks=pytest.mark.slow), 500])
async def test_random_tenants_make_no_more_series_than_the_named_ones(
    settings: Settings, emulator: str, tmp_path: Path, count: int
) -> None:
    """Jobs of 5,000 tenants (500 in the default run) a "*" budget covers, through the real pipeline: the tenant
    label values added to the registry are the policy's named tenants and "other", whatever the tenants' names."""
    named = {"acme", "share-a", "share-b"}
    policy_path = tmp_path / "policy.json"
    policy_path.write_text(
        json.dumps(
            policy_data(
                cache_sharing=[["share-a", "share-b"]],
                budgets=[
                    # A tiny alert share: every tenant's first job crosses it, so alerts fire for each.
                    {"tenant": "*", "period": "day", "limit_usd": 10, "alerts": [1e-9, 1.0]},
                    {"tenant": "acme", "period": "month", "limit_usd": 10, "alerts": [1e-9]},
                    # Refused at the route stage, which raises the exhausted budget's alerts there.
                    {"tenant": "*", "user_tier": "free", "period": "day", "limit_usd": 1e-9},
                ],
            )
        )
    )
    assert load_policy(policy_path).named_tenants == named
    strangers = random_tenants(count, seed=19)
    tenants = [*strangers, *sorted(named)]
    jobs = [
        {
            "tenant": tenant,
            "prompt": f"Classify: label {i}",
            "quality": "low",
            "max_tokens": 16,
            "cache": {"mode": "bypass"},
            "job_id": str(uuid.uuid4()),
            **({"user_tier": "free"} if i % 10 == 0 else {}),
        }
        for i, tenant in enumerate(tenants)
    ]
    before = tenant_labels()
    other_before = sample("farebox_tenant_cost_usd_total", tenant="other")
    p = InProcessPipeline(settings.model_copy(update={"emulator_url": emulator, "policy": policy_path}))
    try:
        await p.start()
        async with p.client() as client:
            results = await collect(client.stream(jobs, max_in_flight=512, idle_timeout_s=60))
    finally:
        await p.close()
    assert len(results) == len(jobs)
    by_status = {s: [r for r in results if r.status == s] for s in ("ok", "error")}
    assert len(by_status["ok"]) > count // 2 and by_status["error"]  # costs counted and refusals made
    assert all(r.error and r.error.code == "budget_exceeded" for r in by_status["error"])
    after = tenant_labels()
    for name in TENANT_METRICS:
        added = after[name] - before[name]
        assert added <= named | {"other"}, f"{name}: {len(added)} new tenant label values, e.g. {sorted(added)[:5]}"
    assert len(set().union(*after.values()) - set().union(*before.values())) <= len(named) + 1
    assert after["llm_proxy_budget_used_ratio"] - before["llm_proxy_budget_used_ratio"] <= named
    stranger_cost = sum(r.cost_usd for r in by_status["ok"] if r.tenant not in named)
    other_cost = sample("farebox_tenant_cost_usd_total", tenant="other") - other_before
    assert other_cost == pytest.approx(stranger_cost, rel=1e-6, abs=1e-9)
