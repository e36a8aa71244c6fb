"""Catalog and policy files: loading, validation messages, bundled data vs the LiteLLM map, import."""

from __future__ import annotations

import json
import math
import os
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from farebox.errors import InvalidRequest
from farebox.routing.catalog import CatalogError, ModelInfo, cost_usd, load_catalog, parse_catalog
from farebox.routing.litellm_prices import import_litellm, normalize_providers
from farebox.routing.policy import check_policy, load_policy, parse_policy, tier_of
from farebox.schemas import Usage
from farebox.settings import CATALOG_DIR

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
LITELLM = SHARED / "data" / "litellm_model_prices.json"

# The seed's prices as a bare price file: only the two price fields per model, tiers left to the policy. The
# seed's own file, with its tiers, is tests/fixtures/seed_model_costs.json (tests/test_seed_catalog.py).
SEED = {
    "openai": {
        "gpt-4-turbo": {"input_cost_per_1k_tokens": 0.01, "output_cost_per_1k_tokens": 0.03},
        "gpt-3.5-turbo": {"input_cost_per_1k_tokens": 0.0005, "output_cost_per_1k_tokens": 0.0015},
    },
    "anthropic": {
        "claude-3-haiku": {"input_cost_per_1k_tokens": 0.00025, "output_cost_per_1k_tokens": 0.00125},
        "claude-3-opus": {"input_cost_per_1k_tokens": 0.015, "output_cost_per_1k_tokens": 0.075},
    },
    "google": {"gemini-pro": {"input_cost_per_1k_tokens": 0.000125, "output_cost_per_1k_tokens": 0.000375}},
}


def litellm_map() -> dict[str, Any]:
    if not LITELLM.exists():
        if os.environ.get("CI"):
            pytest.fail(f"LiteLLM price map missing at {LITELLM} (required in CI)")
        pytest.skip(f"LiteLLM price map not found at {LITELLM} (shared data not mounted)")
    data: dict[str, Any] = json.loads(LITELLM.read_text())
    return data


@pytest.fixture(scope="module")
def bundled() -> Any:
    return load_catalog(CATALOG_DIR / "model_costs.json")


def test_seed_file_accepted_as_is(tmp_path: Path) -> None:
    path = tmp_path / "model_costs.json"
    path.write_text(json.dumps(SEED))
    catalog = load_catalog(path)
    assert catalog.providers() == ["anthropic", "google", "openai"]
    gpt4 = catalog.get("openai/gpt-4-turbo")
    assert gpt4 is not None and gpt4.tier is None and gpt4.context_window is None
    assert gpt4.input_cost_per_1k == 0.01 and gpt4.output_cost_per_1k == 0.03
    # tiers then come from the policy
    policy = parse_policy({"tiers": {"openai/gpt-4-turbo": "high"}}, "p")
    assert tier_of(gpt4, policy) == "high"
    assert "used only when pinned" in " ".join(check_policy(policy, catalog))


def test_bundled_keeps_seed_prices(bundled: Any) -> None:
    for provider, models in SEED.items():
        for name, prices in models.items():
            info = bundled.get(f"{provider}/{name}")
            assert info is not None, f"seed model {provider}/{name} missing"
            assert info.input_cost_per_1k == prices["input_cost_per_1k_tokens"]
            assert info.output_cost_per_1k == prices["output_cost_per_1k_tokens"]


def test_bundled_catalog_and_policy_are_consistent(bundled: Any) -> None:
    policy = load_policy(CATALOG_DIR / "policy.json")
    assert check_policy(policy, bundled) == []  # every model tiered, baseline and default known
    assert policy.baseline_model == "openai/gpt-4-turbo"
    assert any("pii" in m.compliance for m in bundled.models.values())
    for tier in ("low", "medium", "high"):
        assert any(m.tier == tier and not m.deprecated for m in bundled.models.values()), tier


# Our provider -> the LiteLLM map's key spellings and provider names for the same endpoint.
_MAP_KEYS = {
    "openai": (("{m}", "openai/{m}"), {"openai"}),
    "anthropic": (("{m}", "anthropic/{m}"), {"anthropic"}),
    "google": (("gemini/{m}", "{m}"), {"gemini", "vertex_ai-language-models"}),
}


def test_bundled_prices_match_litellm_unless_noted(bundled: Any) -> None:
    prices = litellm_map()
    compared, problems = 0, []
    for info in bundled.models.values():
        spellings, providers = _MAP_KEYS[info.provider]
        entry = next(
            (
                prices[k]
                for k in (s.format(m=info.model) for s in spellings)
                if k in prices and prices[k].get("litellm_provider") in providers
            ),
            None,
        )
        if entry is None:
            continue
        compared += 1
        theirs = (entry["input_cost_per_token"] * 1000, entry["output_cost_per_token"] * 1000)
        ours = (info.input_cost_per_1k, info.output_cost_per_1k)
        same = all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(ours, theirs, strict=True))
        if not same and not (info.note and "price" in info.note):
            problems.append(f"{info.target}: ours {ours} vs LiteLLM {theirs} and no note says why")
    assert compared >= 10
    assert problems == []


def test_bundled_models_without_litellm_entry_explain_their_price(bundled: Any) -> None:
    prices = litellm_map()
    for info in bundled.models.values():
        spellings, providers = _MAP_KEYS[info.provider]
        keys = [s.format(m=info.model) for s in spellings]
        if not any(k in prices and prices[k].get("litellm_provider") in providers for k in keys):
            assert info.note and "price" in info.note, f"{info.target}: not in the LiteLLM map, note must say why"


@pytest.mark.parametrize(
    ("entry", "fld", "problem"),
    [
        ({"output_cost_per_1k_tokens": 0.1}, "input_cost_per_1k_tokens", "missing"),
        (
            {"input_cost_per_1k_tokens": "cheap", "output_cost_per_1k_tokens": 0.1},
            "input_cost_per_1k_tokens",
            "number",
        ),
        (
            {"input_cost_per_1k_tokens": -1, "output_cost_per_1k_tokens": 0.1},
            "input_cost_per_1k_tokens",
            ">= 0",
        ),
        (
            {"input_cost_per_1k_tokens": True, "output_cost_per_1k_tokens": 0.1},
            "input_cost_per_1k_tokens",
            "number",
        ),
        (
            {"input_cost_per_1k_tokens": 1, "output_cost_per_1k_token": 0.1},
            "output_cost_per_1k_token",
            "unknown field",
        ),
        ({"input_cost_per_1k_tokens": 1, "output_cost_per_1k_tokens": 1, "tier": "ultra"}, "tier", "one of"),
        (
            {"input_cost_per_1k_tokens": 1, "output_cost_per_1k_tokens": 1, "context_window": 0},
            "context_window",
            "positive",
        ),
        (
            {"input_cost_per_1k_tokens": 1, "output_cost_per_1k_tokens": 1, "compliance": "pii"},
            "compliance",
            "list",
        ),
        (
            {"input_cost_per_1k_tokens": 1, "output_cost_per_1k_tokens": 1, "deprecated": "yes"},
            "deprecated",
            "true or false",
        ),
    ],
)
def test_catalog_errors_name_file_model_field(entry: dict[str, Any], fld: str, problem: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"openai": {"gpt-x": entry}}))
    with pytest.raises(CatalogError) as exc_info:
        load_catalog(path)
    message = str(exc_info.value)
    assert str(path) in message and "model 'openai/gpt-x'" in message and f"field '{fld}'" in message
    assert problem in message
    assert isinstance(exc_info.value, InvalidRequest)


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ([], "top level must be an object"),
        ({}, "no models"),
        ({"_about": "only docs"}, "no models"),
        ({"openai": []}, "must map model names"),
        ({"bad provider!": {}}, "provider name"),
        ({"openai": {"gpt x": {}}}, "model name"),
        ({"openai": {"gpt-x": 3}}, "must be an object"),
    ],
)
def test_catalog_shape_errors(data: Any, problem: str) -> None:
    with pytest.raises(CatalogError, match=problem):
        parse_catalog(data, "cat.json")


def test_catalog_file_errors(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="cannot read"):
        load_catalog(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{"openai": {')
    with pytest.raises(CatalogError, match=r"broken.json: not valid JSON \(line 1"):
        load_catalog(broken)


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        (Usage(input_tokens=1000, output_tokens=0), 0.002),
        (Usage(input_tokens=0, output_tokens=1000), 0.008),
        (
            Usage(input_tokens=1000, output_tokens=500, cached_input_tokens=400),
            (600 * 0.002 + 400 * 0.0005 + 500 * 0.008) / 1000,
        ),
        (
            Usage(input_tokens=10, output_tokens=0, cached_input_tokens=50),
            10 * 0.0005 / 1000,
        ),  # cached capped
    ],
)
def test_cost_usd(usage: Usage, expected: float) -> None:
    model = ModelInfo(
        provider="openai",
        model="m",
        input_cost_per_1k=0.002,
        output_cost_per_1k=0.008,
        cached_input_cost_per_1k=0.0005,
    )
    assert cost_usd(model, usage) == pytest.approx(expected, rel=1e-12)


def test_cost_usd_cached_without_cached_price() -> None:
    model = ModelInfo(provider="p", model="m", input_cost_per_1k=0.002, output_cost_per_1k=0.008)
    assert cost_usd(model, Usage(input_tokens=1000, cached_input_tokens=1000)) == pytest.approx(0.002)


# --- policy ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("data", "fld"),
    [
        ({"pii": {"action": "shred"}}, "pii.action"),
        ({"tasks": {"reason": {"min_teir": "high"}}}, "tasks.reason.min_teir"),
        ({"user_tiers": {"free": {"min_tier": "high", "max_tier": "low"}}}, "user_tiers.free"),
        ({"budgets": [{"tenant": "a", "period": "week", "limit_usd": 5}]}, "budgets.0.period"),
        ({"budgets": [{"tenant": "a", "period": "day", "limit_usd": 0}]}, "budgets.0.limit_usd"),
        (
            {"budgets": [{"tenant": "a", "period": "day", "limit_usd": 1, "alerts": [1.5]}]},
            "budgets.0.alerts",
        ),
        ({"budgets": [{"tenant": "a", "period": "day", "limit_usd": 1}] * 2}, "budgets"),
        ({"cache_sharing": [["a", "b"], ["b", "c"]]}, "cache_sharing"),
        ({"tiers": {"openai/x": "mega"}}, "tiers.openai/x"),
        ({"unknown_knob": 1}, "unknown_knob"),
    ],
)
def test_policy_errors_name_file_and_field(data: dict[str, Any], fld: str) -> None:
    with pytest.raises(CatalogError) as exc_info:
        parse_policy(data, "policy.json")
    assert str(exc_info.value).startswith(f"policy.json: field '{fld}'")


def test_policy_defaults_and_helpers() -> None:
    p = parse_policy(
        {
            "cache_sharing": [["acme", "globex"]],
            "budgets": [
                {"tenant": "initech", "period": "month", "limit_usd": 50, "action": "downgrade"},
                {"tenant": "*", "user_tier": "free", "period": "day", "limit_usd": 1},
            ],
        },
        "p",
    )
    assert p.baseline_model == "openai/gpt-4-turbo" and p.pii.action == "redact"
    assert p.cache_group("globex") == p.cache_group("acme") == "acme+globex"
    assert p.cache_group("initech") == "initech"
    assert [b.limit_usd for b in p.budgets_for("initech", "free")] == [50, 1]
    assert [b.limit_usd for b in p.budgets_for("acme", None)] == []
    assert p.budgets[0].alerts == (0.5, 0.8, 1.0)
    from farebox.schemas import Job

    assert p.is_cacheable(Job(prompt="x")) and not p.is_cacheable(Job(prompt="x", temperature=0.7))


def test_policy_cross_check(bundled: Any) -> None:
    # An absent baseline is refused; an absent default is replaced (tests/test_policy_check.py has the rules).
    with pytest.raises(CatalogError, match="field 'baseline_model': model 'x/y' is not in the catalog"):
        check_policy(parse_policy({"baseline_model": "x/y"}, "p"), bundled, "p")
    warnings = check_policy(parse_policy({"tiers": {"nope/nope": "low"}}, "p"), bundled, "p")
    assert warnings == ["p: field 'tiers' names 1 models not in the catalog (ignored): nope/nope"]


# --- LiteLLM import ---------------------------------------------------------------------------
def test_import_litellm_map(tmp_path: Path) -> None:
    doc = import_litellm(litellm_map(), normalize_providers(["openai", "anthropic", "gemini"]), today=date(2025, 1, 1))
    assert set(doc) - {"_about"} == {"openai", "anthropic", "google"}
    gpt4o = doc["openai"]["gpt-4o"]
    assert gpt4o["input_cost_per_1k_tokens"] == 0.0025 and gpt4o["output_cost_per_1k_tokens"] == 0.01
    assert gpt4o["cached_input_cost_per_1k_tokens"] == 0.00125 and gpt4o["context_window"] == 128000
    assert "gemini-2.5-pro" in doc["google"]  # "gemini/gemini-2.5-pro" loses its prefix
    assert not any("/" in name for models in doc.values() if isinstance(models, dict) for name in models)
    # and the output is a valid catalog
    path = tmp_path / "imported.json"
    path.write_text(json.dumps(doc))
    catalog = load_catalog(path)
    assert len(catalog) > 50 and all(m.tier is None for m in catalog.models.values())


def test_import_rules_on_a_small_map() -> None:
    data = {
        "sample_spec": {"litellm_provider": "openai", "mode": "chat"},
        "gpt-x": {
            "litellm_provider": "openai",
            "mode": "chat",
            "input_cost_per_token": 1e-06,
            "output_cost_per_token": 2e-06,
            "max_input_tokens": 1000,
            "deprecation_date": "2024-01-01",
        },
        "text-embedding-x": {
            "litellm_provider": "openai",
            "mode": "embedding",
            "input_cost_per_token": 1e-07,
            "output_cost_per_token": 0,
        },
        "gemini/g-1": {
            "litellm_provider": "gemini",
            "mode": "chat",
            "input_cost_per_token": 1e-07,
            "output_cost_per_token": 4e-07,
        },
        "g-1": {
            "litellm_provider": "vertex_ai-language-models",
            "mode": "chat",
            "input_cost_per_token": 9e-07,
            "output_cost_per_token": 9e-07,
        },
        "bedrock/claude": {
            "litellm_provider": "bedrock",
            "mode": "chat",
            "input_cost_per_token": 1e-06,
            "output_cost_per_token": 1e-06,
        },
        "o3-x": {
            "litellm_provider": "openai",
            "mode": "chat",
            "input_cost_per_token": 1e-06,
            "output_cost_per_token": 1e-06,
            "supports_reasoning": True,
        },
        "no-price": {"litellm_provider": "anthropic", "mode": "chat"},
    }
    doc = import_litellm(data, None, today=date(2025, 6, 1))
    assert set(doc["openai"]) == {"gpt-x", "o3-x"}
    assert doc["openai"]["gpt-x"] == {
        "input_cost_per_1k_tokens": 0.001,
        "output_cost_per_1k_tokens": 0.002,
        "context_window": 1000,
        "deprecated": True,
    }
    assert doc["openai"]["o3-x"]["capabilities"] == ["reasoning"]
    assert doc["google"] == {"g-1": {"input_cost_per_1k_tokens": 0.0001, "output_cost_per_1k_tokens": 0.0004}}
    assert "anthropic" not in doc
    assert set(import_litellm(data, {"google"})) == {"_about", "google"}


def test_normalize_providers() -> None:
    assert normalize_providers(["gemini", "google", "openai"]) == {"google", "openai"}
    with pytest.raises(ValueError, match="unknown provider"):
        normalize_providers(["mistral"])
