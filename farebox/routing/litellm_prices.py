"""Convert the LiteLLM community price map (per-token prices) into our catalog format (per 1k tokens).

Only chat models of the providers farebox can call are taken. LiteLLM names Google's direct Gemini API
``gemini`` (keys like ``gemini/gemini-2.5-pro``) and Vertex AI ``vertex_ai-language-models``; both become our
``google``, and the direct API's entry wins a name clash because that is the endpoint farebox calls.
Tiers and compliance are judgements, not prices: this conversion leaves them out; ``farebox catalog import``
then gives tiers by the tier rules it names (farebox/routing/tier_rules.py), and compliance is the user's.
"""

from __future__ import annotations

import re
from datetime import date
from typing import Any

# LiteLLM provider -> ours, in order of preference for a name clash.
PROVIDER_MAP: dict[str, str] = {
    "openai": "openai",
    "anthropic": "anthropic",
    "gemini": "google",
    "vertex_ai-language-models": "google",
}
# Names a user may give to --providers, in LiteLLM's or our spelling.
_ALIASES = {
    "openai": "openai",
    "anthropic": "anthropic",
    "google": "google",
    "gemini": "google",
    "vertex_ai-language-models": "google",
}
_MODEL_RE = re.compile(r"^[A-Za-z0-9_.:@-]+$")


def normalize_providers(names: list[str]) -> set[str]:
    """Our provider names for a user's list; ValueError naming the unknown ones."""
    unknown = [n for n in names if n not in _ALIASES]
    if unknown:
        raise ValueError(f"unknown provider(s) {', '.join(unknown)}; known: {', '.join(sorted(_ALIASES))}")
    return {_ALIASES[n] for n in names}


def _per_1k(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        return None
    return round(float(value) * 1000, 12)  # drop binary noise from 1e-05 * 1000


def import_litellm(
    data: dict[str, Any], providers: set[str] | None = None, *, today: date | None = None
) -> dict[str, Any]:
    """Our catalog document for ``data`` (the decoded price map). ``today`` marks models whose
    ``deprecation_date`` has passed as deprecated (None: leave every model undeprecated)."""
    wanted = set(PROVIDER_MAP.values()) if providers is None else providers
    rank = {p: i for i, p in enumerate(PROVIDER_MAP)}
    chosen: dict[tuple[str, str], tuple[int, dict[str, Any]]] = {}
    for key, entry in data.items():
        if not isinstance(entry, dict) or entry.get("mode") != "chat":
            continue
        theirs = entry.get("litellm_provider")
        ours = PROVIDER_MAP.get(theirs) if isinstance(theirs, str) else None
        if ours is None or ours not in wanted:
            continue
        name = key.split("/", 1)[1] if key.startswith(f"{theirs}/") else key
        if not _MODEL_RE.match(name):
            continue  # fine-tune templates and other keys that are not callable model names
        inp, out = _per_1k(entry.get("input_cost_per_token")), _per_1k(entry.get("output_cost_per_token"))
        if inp is None or out is None:
            continue
        model: dict[str, Any] = {"input_cost_per_1k_tokens": inp, "output_cost_per_1k_tokens": out}
        for ours_f, theirs_f in (
            ("cached_input_cost_per_1k_tokens", "cache_read_input_token_cost"),
            ("batch_input_cost_per_1k_tokens", "input_cost_per_token_batches"),
            ("batch_output_cost_per_1k_tokens", "output_cost_per_token_batches"),
            ("batch_cached_input_cost_per_1k_tokens", "cache_read_input_token_cost_batches"),
        ):
            value = _per_1k(entry.get(theirs_f))
            if value is not None:
                model[ours_f] = value
        for ours_f, theirs_f in (
            ("context_window", "max_input_tokens"),
            ("max_output_tokens", "max_output_tokens"),
        ):
            value = entry.get(theirs_f)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                model[ours_f] = value
        if "supports_reasoning" in entry and entry.get("supports_reasoning") and name.startswith(("o1", "o3", "o4")):
            model["capabilities"] = ["reasoning"]  # OpenAI o-series always reason; others may switch it off
        deprecation = entry.get("deprecation_date")
        if today is not None and isinstance(deprecation, str):
            try:
                if date.fromisoformat(deprecation) <= today:
                    model["deprecated"] = True
            except ValueError:
                pass
        slot = (ours, name)
        prev = chosen.get(slot)
        if prev is None or rank[theirs] < prev[0]:  # type: ignore[index]
            chosen[slot] = (rank[theirs], model)  # type: ignore[index]
    doc: dict[str, Any] = {
        "_about": "imported from the LiteLLM price map by `farebox catalog import`; prices per 1,000 tokens. "
        "No tiers: set them in the policy's 'tiers' (untiered models are used only when pinned)."
    }
    for (provider, name), (_, model) in sorted(chosen.items()):
        doc.setdefault(provider, {})[name] = model
    return doc
