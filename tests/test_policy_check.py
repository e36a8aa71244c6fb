"""checked_policy: a catalog must serve every tier the policy's jobs can need; an absent default model is
replaced by the cheapest eligible one (with a warning), an absent baseline model is refused, as before:
the baseline prices every result's savings."""

from __future__ import annotations

from typing import Any

import pytest

from farebox.routing.catalog import CatalogError, parse_catalog
from farebox.routing.policy import checked_policy, parse_policy


def m(price: float, tier: str | None, **extra: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"input_cost_per_1k_tokens": price, "output_cost_per_1k_tokens": price}
    return d | ({"tier": tier} if tier else {}) | extra


ALL_TIERS = {"lo": m(0.001, "low"), "mid": m(0.002, "medium"), "hi": m(0.01, "high")}


def check(models: dict[str, dict[str, Any]], policy: dict[str, Any]) -> tuple[Any, list[str]]:
    catalog = parse_catalog({"openai": models}, "cat.json")
    pol = parse_policy({"baseline_model": f"openai/{next(iter(models))}", **policy}, "pol.json")
    return checked_policy(pol, catalog, "pol.json")


@pytest.mark.parametrize(
    ("models", "policy", "problem"),
    [
        ({"lo": m(0.001, "low"), "mid": m(0.002, "medium")}, {}, "no model of tier high"),
        ({"lo": m(0.001, "low")}, {}, "no model of tier medium or high"),
        ({"a": m(0.001, None), "b": m(0.002, None)}, {}, "no model of tier low or medium or high"),
        # deprecated models are never routed automatically, so they serve no tier
        ({**ALL_TIERS, "hi": m(0.01, "high", deprecated=True)}, {}, "no model of tier high"),
        # a user tier (or tenant) whose bounds leave it no model at all
        ({"hi": m(0.01, "high")}, {"user_tiers": {"free": {"max_tier": "low"}}}, "user tier free (max_tier low)"),
        (
            {"lo": m(0.001, "low"), "mid": m(0.002, "medium")},
            {"tenants": {"acme": {"min_tier": "high"}}},
            "tenant acme (min_tier high): no model of tier high",
        ),
    ],
)
def test_uncovered_tier_is_refused(models: dict[str, Any], policy: dict[str, Any], problem: str) -> None:
    with pytest.raises(CatalogError) as exc_info:
        check(models, policy)
    message = str(exc_info.value)
    assert message.startswith("pol.json: the catalog cat.json leaves tiers the policy uses without a model")
    assert problem in message and "--tier-rules" in message


@pytest.mark.parametrize(
    ("models", "policy", "warning"),
    [
        (ALL_TIERS, {}, None),
        ({"hi": m(0.01, "high")}, {}, None),  # every quality is served "or better"
        # tiers from the policy count like the catalog's
        ({"a": m(0.001, None), "b": m(0.01, None)}, {"tiers": {"openai/b": "high"}}, "used only when pinned"),
        # a gap inside a capped user tier: its medium jobs get the default model, within the cap
        (
            {"lo": m(0.001, "low"), "hi": m(0.01, "high")},
            {"user_tiers": {"free": {"max_tier": "medium"}}},
            "user tier free (max_tier medium): no model of tier medium: its jobs that need medium go to the default",
        ),
        (
            {"lo": m(0.001, "low"), "mid": m(0.002, "medium"), "o9": m(0.01, "high", capabilities=["reasoning"])},
            {},
            "tier high is served only by reasoning models",
        ),
    ],
)
def test_covered_tiers_pass(models: dict[str, Any], policy: dict[str, Any], warning: str | None) -> None:
    _, warnings = check(models, policy)
    if warning is None:
        assert warnings == []
    else:
        assert any(warning in w for w in warnings), warnings


FALLBACK_CATALOG = {
    "openai": {
        "lo": m(0.001, "low"),
        "mid": m(0.0005, "medium"),  # cheaper than lo: the cheapest eligible model, whatever its tier
        "think": m(0.0001, "low", capabilities=["reasoning"]),  # may answer nothing for a small max_tokens
        "old": m(0.00001, "low", deprecated=True),
        "pin-only": m(0.000001, None),
        "hi": m(0.01, "high"),
        "hi-cheap": m(0.005, "high"),
    }
}


@pytest.mark.parametrize(
    ("policy", "baseline", "default", "warned"),
    [
        ({"baseline_model": "openai/hi", "default_model": "openai/lo"}, "openai/hi", "openai/lo", []),
        ({"baseline_model": "openai/hi", "default_model": None}, "openai/hi", None, []),
        (
            {"baseline_model": "openai/hi", "default_model": "openai/gpt-4o-mini"},
            "openai/hi",
            "openai/mid",
            ["default_model"],
        ),
    ],
)
def test_an_absent_default_falls_back(
    policy: dict[str, Any], baseline: str, default: str | None, warned: list[str]
) -> None:
    catalog = parse_catalog(FALLBACK_CATALOG, "cat.json")
    effective, warnings = checked_policy(parse_policy(policy, "pol.json"), catalog, "pol.json")
    assert (effective.baseline_model, effective.default_model) == (baseline, default)
    fallbacks = [w for w in warnings if "is not in the catalog" in w]
    assert len(fallbacks) == len(warned)
    for fld, w in zip(warned, fallbacks, strict=True):
        named = policy[fld]
        assert w.startswith(f"pol.json: field '{fld}': model '{named}' is not in the catalog cat.json; using '")
        assert f"'{getattr(effective, fld)}', the cheapest" in w


@pytest.mark.parametrize("default", ["openai/lo", "x/gone-too", None])
def test_an_absent_baseline_is_refused(default: str | None) -> None:
    """Every result's baseline_cost_usd is priced on the baseline: a stand-in would change what savings mean."""
    catalog = parse_catalog(FALLBACK_CATALOG, "cat.json")
    with pytest.raises(CatalogError, match=r"^pol.json: field 'baseline_model': model 'x/gone' is not in the catalog"):
        checked_policy(
            parse_policy({"baseline_model": "x/gone", "default_model": default}, "pol.json"), catalog, "pol.json"
        )


def test_fallback_uses_a_reasoning_model_only_when_nothing_else_is_routable() -> None:
    catalog = parse_catalog({"openai": {"o9": m(0.01, "high", capabilities=["reasoning"])}}, "cat.json")
    effective, _ = checked_policy(parse_policy({"baseline_model": "openai/o9", "default_model": "x/y"}, "p"), catalog)
    assert effective.default_model == "openai/o9"
