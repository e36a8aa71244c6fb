"""Tier rules: how an imported price map gets quality tiers, and the bundled rules on the real LiteLLM map."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from farebox.routing.catalog import CatalogError, parse_catalog
from farebox.routing.choose import choose_route
from farebox.routing.litellm_prices import import_litellm
from farebox.routing.policy import checked_policy, load_policy
from farebox.routing.strategies import RouterRule
from farebox.routing.tier_rules import apply_tier_rules, load_tier_rules, parse_tier_rules
from farebox.schemas import Job
from farebox.settings import CATALOG_DIR

LITELLM = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "litellm_model_prices.json"

RULES = parse_tier_rules(
    {
        "_about": "documentation is skipped",
        "rules": [
            {"match": ["*audio*", "google/lyria-*"], "tier": None, "why": "media"},
            {"max_output_cost_per_1k_tokens": 0, "tier": None},
            {"match": ["openai/gpt-4o-mini*"], "tier": "medium"},  # a name rule above the bands overrides them
            {"max_output_cost_per_1k_tokens": 0.0015, "tier": "low"},
            {"max_output_cost_per_1k_tokens": 0.006, "tier": "medium"},
            {"match": ["anthropic/*", "openai/*"], "tier": "high"},
        ],
    },
    "rules.json",
)


@pytest.mark.parametrize(
    ("target", "output_price", "expected"),
    [
        ("openai/gpt-4o-audio-preview", 0.01, (None, "rules.json rule 1 (name *audio*: media)")),
        ("google/lyria-3", 0.0, (None, "rules.json rule 1 (name google/lyria-*: media)")),
        ("google/gemini-exp", 0.0, (None, "rules.json rule 2 (output <= $0/1M tokens)")),
        ("openai/gpt-4o-mini", 0.0006, ("medium", "rules.json rule 3 (name openai/gpt-4o-mini*)")),
        ("openai/gpt-5-nano", 0.0004, ("low", "rules.json rule 4 (output <= $1.5/1M tokens)")),
        ("openai/x", 0.0015, ("low", "rules.json rule 4 (output <= $1.5/1M tokens)")),  # the ceiling is inclusive
        ("openai/y", 0.0016, ("medium", "rules.json rule 5 (output <= $6/1M tokens)")),
        ("anthropic/opus", 0.025, ("high", "rules.json rule 6 (name anthropic/*)")),
        ("google/pro", 0.01, None),  # no rule matches: untiered
    ],
)
def test_first_matching_rule_decides(target: str, output_price: float, expected: Any) -> None:
    assert RULES.tier_for(target, output_price) == expected


def test_apply_sets_tiers_and_notes() -> None:
    doc: dict[str, Any] = {
        "_about": "old",
        "openai": {
            "gpt-4o-mini": {"input_cost_per_1k_tokens": 0.00015, "output_cost_per_1k_tokens": 0.0006},
            "gpt-audio": {"input_cost_per_1k_tokens": 0.0025, "output_cost_per_1k_tokens": 0.01, "tier": "high"},
        },
        "google": {"pro": {"input_cost_per_1k_tokens": 0.001, "output_cost_per_1k_tokens": 0.01}},
    }
    counts = apply_tier_rules(doc, RULES)
    assert counts == {"low": 0, "medium": 1, "high": 0, "untiered": 2}
    assert doc["openai"]["gpt-4o-mini"]["tier"] == "medium"
    assert doc["openai"]["gpt-4o-mini"]["note"] == "tier medium by rules.json rule 3 (name openai/gpt-4o-mini*)"
    assert "tier" not in doc["openai"]["gpt-audio"]  # the rules decide, not what the document had
    assert doc["openai"]["gpt-audio"]["note"] == "untiered by rules.json rule 1 (name *audio*: media)"
    assert doc["google"]["pro"] == {"input_cost_per_1k_tokens": 0.001, "output_cost_per_1k_tokens": 0.01}
    assert "rules.json" in doc["_about"]
    parse_catalog(doc, "out.json")  # still a valid catalog


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ([], "top level must be an object"),
        ({}, "field 'rules': Field required"),
        ({"rules": []}, "field 'rules': Tuple should have at least 1 item"),
        ({"rules": [{"match": ["*"]}]}, "field 'rules.0.tier': Field required"),
        ({"rules": [{"tier": "ultra"}]}, "field 'rules.0.tier'"),
        ({"rules": [{"matc": ["*"], "tier": "low"}]}, "field 'rules.0.matc': Extra inputs are not permitted"),
        ({"rules": [{"match": [], "tier": "low"}]}, "field 'rules.0.match'"),
        ({"rules": [{"max_output_cost_per_1k_tokens": -1, "tier": "low"}]}, "max_output_cost_per_1k_tokens': Input"),
        ({"rules": [{"tier": "low"}], "default": "low"}, "field 'default': Extra inputs"),
        ({"rules": [{"tier": "low"}], "source": "x"}, "field 'source': Extra inputs"),
    ],
)
def test_rule_file_errors_name_file_and_field(data: Any, problem: str) -> None:
    with pytest.raises(CatalogError) as exc_info:
        parse_tier_rules(data, "rules.json")
    message = str(exc_info.value)
    assert message.startswith("rules.json: ") and problem in message


def test_rule_file_read_errors(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="cannot read tier rules"):
        load_tier_rules(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{"rules": [')
    with pytest.raises(CatalogError, match=r"broken.json: not valid JSON \(line 1"):
        load_tier_rules(broken)


@pytest.fixture(scope="module")
def imported() -> Any:
    doc = import_litellm(json.loads(LITELLM.read_text()), None, today=date(2026, 12, 1))
    apply_tier_rules(doc, load_tier_rules(CATALOG_DIR / "tier_rules.json"))
    return parse_catalog(doc, "imported.json")


def test_bundled_rules_make_the_litellm_map_routable(imported: Any) -> None:
    policy, _ = checked_policy(load_policy(CATALOG_DIR / "policy.json"), imported, "policy.json")
    policy = policy.model_copy(update={"router": RouterRule()})  # quality -> tier by rules: what is tested here
    for quality in ("low", "medium", "high"):
        decision = choose_route(Job(prompt="hello", quality=quality), imported, policy, input_tokens=10).decision
        model = imported.get(decision.target)
        assert model is not None and model.tier == quality, (quality, decision.target, decision.reason)
        assert "default model" not in decision.reason


def test_bundled_rules_leave_out_what_must_not_win_on_price(imported: Any) -> None:
    tiered = {m.target: m for m in imported.models.values() if m.tier is not None}
    assert tiered and all(m.output_cost_per_1k > 0 for m in tiered.values())
    assert not any("lyria" in t or "audio" in t or "/ft:" in t for t in tiered)
    for name in ("openai/gpt-4o-mini", "openai/gpt-4.1-mini", "openai/gpt-4o"):  # the bundled catalog agrees
        assert tiered[name].tier == {"gpt-4o-mini": "low", "gpt-4.1-mini": "medium", "gpt-4o": "high"}[name[7:]]
