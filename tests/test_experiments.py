"""Experiments in the policy: which jobs they cover, sticky stateless assignment, weights, validation."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from farebox.routing.catalog import CatalogError, load_catalog
from farebox.routing.experiments import Experiment, assign, pick_arm, unit_draw
from farebox.routing.policy import checked_policy, parse_policy
from farebox.routing.store import load_routing
from farebox.schemas import Job
from farebox.settings import CATALOG_DIR

pytestmark = pytest.mark.unit

LEVELS = {"high": 0.98, "medium": 0.95, "low": 0.85}
RULES: dict[str, Any] = {"kind": "rules"}
LEARNED: dict[str, Any] = {"kind": "learned", "path": "builtin", "levels": LEVELS}


def experiment(**overrides: Any) -> Experiment:
    body: dict[str, Any] = {
        "name": "router-ab",
        "arms": [
            {"name": "rules", "weight": 1, "strategy": RULES},
            {"name": "learned", "weight": 1, "strategy": LEARNED},
        ],
    }
    body.update(overrides)
    return Experiment.model_validate(body)


def policy_with(experiments: list[dict[str, Any]]) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((CATALOG_DIR / "policy.json").read_text())
    data["experiments"] = experiments
    return data


def test_the_same_job_always_draws_the_same_arm() -> None:
    e = experiment()
    job = Job(prompt="hello")
    first = assign((e,), "job-1", job, "chat")
    assert first is not None
    assert all(assign((e,), "job-1", job, "chat") == first for _ in range(5))
    # A new Experiment object (a policy reload that changed nothing) draws the same.
    assert assign((experiment(),), "job-1", job, "chat") == first


def test_a_subject_keeps_all_its_jobs_in_one_arm() -> None:
    e = experiment()
    arms = {assign((e,), f"job-{i}", Job(prompt=f"p{i}", subject="user-42"), "chat").arm for i in range(50)}  # type: ignore[union-attr]
    assert len(arms) == 1
    drawn = assign((e,), "job-1", Job(prompt="p", subject="user-42"), "chat")
    assert drawn is not None and drawn.sticky == "subject"
    without = assign((e,), "job-1", Job(prompt="p"), "chat")
    assert without is not None and without.sticky == "job_id"


@pytest.mark.parametrize("weights", [(1, 1), (3, 1), (1, 9), (0.2, 0.3, 0.5)])
def test_weights_are_honoured_on_10000_hashed_ids(weights: tuple[float, ...]) -> None:
    arms = [{"name": f"a{i}", "weight": w, "strategy": RULES} for i, w in enumerate(weights)]
    e = experiment(arms=arms)
    job = Job(prompt="x")
    counts = Counter(assign((e,), f"id-{i}", job, "chat").arm for i in range(10_000))  # type: ignore[union-attr]
    total = sum(weights)
    for i, w in enumerate(weights):
        expected = 10_000 * w / total
        # 4 standard deviations of a binomial count: fails for a biased hash, not for chance.
        sd = (10_000 * (w / total) * (1 - w / total)) ** 0.5
        assert abs(counts[f"a{i}"] - expected) <= 4 * sd, (counts, weights)


def test_share_takes_part_of_the_traffic_and_does_not_reshuffle_arms() -> None:
    job = Job(prompt="x")
    full = experiment()
    half = experiment(share=0.5)
    taken = [assign((half,), f"id-{i}", job, "chat") for i in range(10_000)]
    inside = [i for i, a in enumerate(taken) if a is not None]
    assert abs(len(inside) - 5_000) <= 200
    # The jobs the half experiment takes are in the same arm as under the full one.
    for i in inside[:500]:
        assert taken[i] == assign((full,), f"id-{i}", job, "chat")


def test_coverage_by_tenant_task_and_pin() -> None:
    e = experiment(tenants=["acme"], tasks=["chat", "explain"])
    assert assign((e,), "j", Job(prompt="x", tenant="acme"), "chat") is not None
    assert assign((e,), "j", Job(prompt="x", tenant="initech"), "chat") is None
    assert assign((e,), "j", Job(prompt="x", tenant="acme"), "code") is None
    assert assign((e,), "j", Job(prompt="x", tenant="acme", model="openai/gpt-4o"), "chat") is None  # a pin wins


def test_the_first_covering_experiment_takes_the_job() -> None:
    narrow = experiment(name="narrow", tenants=["acme"])
    broad = experiment(name="broad")
    assert assign((narrow, broad), "j", Job(prompt="x", tenant="acme"), "chat").experiment == "narrow"  # type: ignore[union-attr]
    assert assign((narrow, broad), "j", Job(prompt="x", tenant="other"), "chat").experiment == "broad"  # type: ignore[union-attr]


@pytest.mark.parametrize(("draw", "arm"), [(0.0, "a"), (0.2499, "a"), (0.25, "b"), (0.9999, "b"), (0.999999999, "b")])
def test_pick_arm_edges(draw: float, arm: str) -> None:
    e = experiment(arms=[{"name": "a", "weight": 1, "strategy": RULES}, {"name": "b", "weight": 3, "strategy": RULES}])
    assert pick_arm(e, draw).name == arm


def test_a_zero_weight_arm_gets_nothing() -> None:
    e = experiment(arms=[{"name": "a", "weight": 0, "strategy": RULES}, {"name": "b", "weight": 1, "strategy": RULES}])
    assert {pick_arm(e, unit_draw(str(i))).name for i in range(2000)} == {"b"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"arms": [{"name": "only", "strategy": RULES}]}, "at least 2"),
        ({"arms": [{"name": "a", "strategy": RULES}, {"name": "a", "strategy": RULES}]}, "repeated: a"),
        (
            {"arms": [{"name": "a", "weight": 0, "strategy": RULES}, {"name": "b", "weight": 0, "strategy": RULES}]},
            "weight above 0",
        ),
        ({"arms": [{"name": "a", "strategy": {"kind": "modl"}}, {"name": "b", "strategy": RULES}]}, "does not match"),
        ({"share": 0}, "greater than 0"),
        ({"name": "has space"}, "pattern"),
        ({"shadow": {"share": 0.1, "reference": "openai/gpt-4o", "cap_usd": 1, "grader": "judge"}}, "judge_model"),
        ({"surprise": 1}, "Extra inputs"),
    ],
)
def test_a_broken_experiment_is_refused_with_its_field(change: dict[str, Any], message: str) -> None:
    body = {"name": "e", "arms": [{"name": "a", "strategy": RULES}, {"name": "b", "strategy": LEARNED}]}
    body.update(change)
    with pytest.raises(CatalogError, match="experiments") as err:
        parse_policy(policy_with([body]), "policy.json")
    assert message in str(err.value)


def test_the_policy_check_refuses_models_the_catalog_lacks() -> None:
    catalog = load_catalog(CATALOG_DIR / "model_costs.json")
    body = {
        "name": "e",
        "arms": [
            {"name": "a", "strategy": RULES},
            {"name": "b", "strategy": {"kind": "model", "model": "openai/nope"}},
        ],
        "shadow": {"share": 0.1, "reference": "openai/also-nope", "cap_usd": 1},
    }
    policy = parse_policy(policy_with([body]), "policy.json")
    with pytest.raises(CatalogError) as err:
        checked_policy(policy, catalog, "policy.json")
    assert "openai/nope" in str(err.value) and "openai/also-nope" in str(err.value)


def test_arm_plans_load_each_router_once(tmp_path: Path) -> None:
    body = {
        "name": "e",
        "arms": [
            {"name": "rules", "strategy": RULES},
            {"name": "strict", "strategy": LEARNED},
            {"name": "loose", "strategy": {**LEARNED, "levels": {"high": 0.9, "medium": 0.8, "low": 0.8}}},
            {"name": "mini", "strategy": {"kind": "model", "model": "openai/gpt-4o-mini"}},
        ],
    }
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(policy_with([body])))
    routing, _ = load_routing(CATALOG_DIR / "model_costs.json", path)
    plans = routing.arms
    assert plans["e", "rules"].router is None and plans["e", "rules"].policy.router.kind == "rules"
    assert plans["e", "strict"].router is plans["e", "loose"].router is routing.router  # builtin, read once
    assert plans["e", "loose"].policy.router.level("medium") == 0.8
    assert plans["e", "mini"].model == "openai/gpt-4o-mini"


def test_an_arm_router_file_that_is_missing_names_the_arm(tmp_path: Path) -> None:
    body = {
        "name": "e",
        "arms": [{"name": "a", "strategy": RULES}, {"name": "b", "strategy": {**LEARNED, "path": "gone.json"}}],
    }
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(policy_with([body])))
    with pytest.raises(CatalogError, match=r"experiments\.e\.b\.path"):
        load_routing(CATALOG_DIR / "model_costs.json", path)


@pytest.mark.parametrize(
    ("grader", "task", "chosen"),
    [
        ("exact", "chat", "exact"),
        ("judge", "classify", "judge"),
        ("auto", "classify", "exact"),
        ("auto", "extract", "exact"),
        ("auto", "summarize", "judge"),
        ("auto", "chat", "judge"),
    ],
)
def test_the_grader_for_a_task(grader: str, task: str, chosen: str) -> None:
    from farebox.routing.experiments import Shadow

    shadow = Shadow(share=0.1, reference="openai/gpt-4o", cap_usd=1, grader=grader, judge_model="openai/gpt-4o-mini")  # type: ignore[arg-type]
    assert shadow.grader_for(task) == chosen


def test_an_auto_grader_needs_a_judge() -> None:
    from pydantic import ValidationError

    from farebox.routing.experiments import Shadow

    with pytest.raises(ValidationError, match="grader 'auto' needs 'judge_model'"):
        Shadow(share=0.1, reference="openai/gpt-4o", cap_usd=1, grader="auto")
