"""Tier rules: how ``farebox catalog import`` gives each imported model a quality tier.

A price map has prices, not quality judgements, and a model without a tier is never routed automatically.
So the import applies an ordered list of rules (the bundled ``catalog/tier_rules.json``, or a file of the
user's): the first rule that matches a model decides its tier. A rule matches by fnmatch patterns over
"provider/model" and, optionally, by an output price ceiling (USD per 1,000 tokens), so one list holds both
name rules and price bands. ``"tier": null`` leaves the model untiered (used only when pinned); a model no
rule matches is untiered too.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from farebox.routing.catalog import TIERS, CatalogError, Tier, read_json_file, validation_failure

UNTIERED = "untiered"


class TierRule(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    match: tuple[str, ...] = Field(("*",), min_length=1)  # fnmatch patterns over "provider/model"
    max_output_cost_per_1k_tokens: float | None = Field(None, ge=0)
    # Required, so that leaving models untiered (null) is always a choice written down, never a default.
    tier: Tier | None
    why: str | None = None

    def matched_pattern(self, target: str, output_cost_per_1k: float) -> str | None:
        """The first pattern ``target`` matches when the price condition holds too, else None."""
        if self.max_output_cost_per_1k_tokens is not None and output_cost_per_1k > self.max_output_cost_per_1k_tokens:
            return None
        return next((p for p in self.match if fnmatch.fnmatchcase(target, p)), None)

    def describe(self, pattern: str) -> str:
        parts = [] if pattern == "*" else [f"name {pattern}"]
        if self.max_output_cost_per_1k_tokens is not None:
            parts.append(f"output <= ${self.max_output_cost_per_1k_tokens * 1000:g}/1M tokens")
        return ", ".join(parts) or "any model no earlier rule took"


class _RuleFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    rules: tuple[TierRule, ...] = Field(min_length=1)


@dataclass(frozen=True)
class TierRules:
    rules: tuple[TierRule, ...]
    source: str  # names the file in notes and messages

    def tier_for(self, target: str, output_cost_per_1k: float) -> tuple[Tier | None, str] | None:
        """The first matching rule's tier and why (its number and condition), or None when none matches."""
        for number, rule in enumerate(self.rules, start=1):
            pattern = rule.matched_pattern(target, output_cost_per_1k)
            if pattern is not None:
                why = f": {rule.why}" if rule.why else ""
                return rule.tier, f"{Path(self.source).name} rule {number} ({rule.describe(pattern)}{why})"
        return None


def parse_tier_rules(data: object, source: str) -> TierRules:
    if not isinstance(data, dict):
        raise CatalogError(f"{source}: top level must be an object with 'rules'")
    body = {k: v for k, v in data.items() if not str(k).startswith("_")}  # "_about": documentation
    try:
        return TierRules(_RuleFile.model_validate(body).rules, source)
    except ValidationError as exc:
        raise validation_failure(source, exc) from None


def load_tier_rules(path: str | Path) -> TierRules:
    path = Path(path)
    return parse_tier_rules(read_json_file(path, "tier rules"), str(path))


def apply_tier_rules(doc: dict[str, Any], rules: TierRules) -> dict[str, int]:
    """Give every model of the catalog document ``doc`` (our file format) the tier its first matching rule
    says, with a note naming the rule, in place. Returns how many models got each tier (and ``untiered``)."""
    counts = dict.fromkeys((*TIERS, UNTIERED), 0)
    for provider, models in doc.items():
        if provider.startswith("_") or not isinstance(models, dict):
            continue
        for name, entry in models.items():
            found = rules.tier_for(f"{provider}/{name}", float(entry["output_cost_per_1k_tokens"]))
            entry.pop("tier", None)
            if found is None:
                counts[UNTIERED] += 1
                continue
            tier, why = found
            counts[tier or UNTIERED] += 1
            if tier is not None:
                entry["tier"] = tier
            entry["note"] = f"{'tier ' + tier if tier else 'untiered'} by {why}"
    doc["_about"] = (
        f"imported from the LiteLLM price map by `farebox catalog import`; prices per 1,000 tokens. Tiers from "
        f"the tier rules {rules.source} (each model's 'note' names its rule); edit them here, or change the "
        "rules and import again. Untiered models are used only when pinned."
    )
    return counts
