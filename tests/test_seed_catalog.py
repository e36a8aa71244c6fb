"""The seed project's five-model price file with the bundled policy, unchanged: the policy's default model
(openai/gpt-4o-mini) is not among its models, so the cheapest eligible model stands in, with a warning."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import pytest

from farebox.cli.catalog import add_commands
from farebox.routing.catalog import load_catalog
from farebox.routing.choose import choose_route
from farebox.routing.estimate import estimate_lines
from farebox.routing.policy import load_policy, tier_of
from farebox.routing.store import CatalogStore
from farebox.routing.strategies import RouterRule
from farebox.schemas import Job
from farebox.settings import CATALOG_DIR, Settings

SEED_FILE = Path(__file__).parent / "fixtures" / "seed_model_costs.json"
POLICY = CATALOG_DIR / "policy.json"
FALLBACK = (
    f"{POLICY}: field 'default_model': model 'openai/gpt-4o-mini' is not in the catalog {SEED_FILE}; "
    "using 'google/gemini-pro', the cheapest eligible model, instead"
)


def test_seed_file_is_the_seed_format() -> None:
    catalog = load_catalog(SEED_FILE)
    assert sorted(catalog.models) == [
        "anthropic/claude-3-haiku",
        "anthropic/claude-3-opus",
        "google/gemini-pro",
        "openai/gpt-3.5-turbo",
        "openai/gpt-4-turbo",
    ]
    # Exactly the seed's shape: two price fields per model, no tier (the bundled policy tiers them).
    raw = json.loads(SEED_FILE.read_text())
    fields = {f for models in raw.values() for m in models.values() for f in m}
    assert fields == {"input_cost_per_1k_tokens", "output_cost_per_1k_tokens"}
    assert {m.tier for m in catalog.models.values()} == {None}
    policy = load_policy(POLICY)
    assert {m.target: tier_of(m, policy) for m in catalog.models.values()} == {
        "anthropic/claude-3-haiku": "low",
        "anthropic/claude-3-opus": "high",
        "google/gemini-pro": "low",
        "openai/gpt-3.5-turbo": "low",
        "openai/gpt-4-turbo": "high",
    }
    assert "openai/gpt-4o-mini" not in catalog.models


def test_check_accepts_it_with_a_warning(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="farebox")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["catalog", "check", str(SEED_FILE), "--policy", str(POLICY)])
    assert args.func(args, Settings()) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(f"ok: {SEED_FILE}: 5 models from anthropic, google, openai")
    assert f"warning: {FALLBACK}\n" in captured.err and "error" not in captured.err


@pytest.fixture
def store() -> CatalogStore:
    return CatalogStore(SEED_FILE, POLICY)


def test_pipeline_store_serves_the_fallback_and_says_so_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="farebox.catalog")
    store = CatalogStore(SEED_FILE, POLICY)
    _, policy = store.current()
    assert (policy.default_model, policy.baseline_model) == ("google/gemini-pro", "openai/gpt-4-turbo")
    said = [r.getMessage() for r in caplog.records if "default_model" in r.getMessage()]
    assert said == [f"catalog check: {FALLBACK}"]


@pytest.mark.parametrize(
    ("job", "target", "reason"),
    [
        ({"quality": "low"}, "google/gemini-pro", "cheapest low-or-better"),
        ({"quality": "medium"}, "openai/gpt-4-turbo", "cheapest medium-or-better"),  # no medium model: high
        ({"quality": "high"}, "openai/gpt-4-turbo", "cheapest high-or-better"),
        ({"task": "classify"}, "google/gemini-pro", "task classify defaults to low"),
        ({"task": "reason"}, "openai/gpt-4-turbo", "task reason needs high"),
        # free users are capped at medium and the seed has no medium model: the stand-in default serves them
        ({"quality": "high", "user_tier": "free"}, "google/gemini-pro", "using the policy's default model"),
    ],
)
def test_routes(store: CatalogStore, job: dict[str, str], target: str, reason: str) -> None:
    catalog, policy = store.current()
    policy = policy.model_copy(update={"router": RouterRule()})  # the quality -> tier rules, as the seed had them
    decision = choose_route(Job(prompt="hello there", **job), catalog, policy, input_tokens=10).decision
    assert decision.target == target and reason in decision.reason


def test_estimate(store: CatalogStore) -> None:
    catalog, policy = store.current()
    policy = policy.model_copy(update={"router": RouterRule()})  # rules: one job per tier the seed has
    lines = [json.dumps({"prompt": "hello", "quality": q}) for q in ("low", "medium", "high")]
    report = estimate_lines(lines, catalog, policy)
    assert report.total.jobs == 3 and report.invalid == report.blocked == 0
    assert set(report.by_tier) == {"low", "high"} and 0 < report.total.cost_usd < report.total.baseline_cost_usd
