"""The model price catalog: load, validate, look up, price a usage.

The file format is the seed's: ``{provider: {model: {"input_cost_per_1k_tokens": ..,
"output_cost_per_1k_tokens": .., optional fields}}}``, ``"tier"`` among them (the seed's own five-model file,
tests/fixtures/seed_model_costs.json, has the two prices and a tier). A bare price file is valid too; tiers then
come from the policy. Top-level keys starting with ``_`` are documentation and are skipped. Unknown
per-model fields are refused: a typo (``input_cost_per_1k_token``) is an error, not a silently missing price.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from farebox.errors import InvalidRequest
from farebox.schemas import Usage

Tier = Literal["low", "medium", "high"]
TIERS: tuple[Tier, ...] = ("low", "medium", "high")
TIER_RANK: Mapping[str, int] = MappingProxyType({t: i for i, t in enumerate(TIERS)})

# Same shapes Job.model accepts for a pin, so every catalog target can be pinned.
_PROVIDER_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_MODEL_RE = re.compile(r"^[A-Za-z0-9_.:@/-]+$")

# File field name -> ModelInfo field name. Prices are per 1,000 tokens in the file, as in the seed.
_PRICE_FIELDS = {
    "input_cost_per_1k_tokens": "input_cost_per_1k",
    "output_cost_per_1k_tokens": "output_cost_per_1k",
    "cached_input_cost_per_1k_tokens": "cached_input_cost_per_1k",
    "batch_input_cost_per_1k_tokens": "batch_input_cost_per_1k",
    "batch_output_cost_per_1k_tokens": "batch_output_cost_per_1k",
    "batch_cached_input_cost_per_1k_tokens": "batch_cached_input_cost_per_1k",
}
_REQUIRED = ("input_cost_per_1k_tokens", "output_cost_per_1k_tokens")
_INT_FIELDS = ("context_window", "max_output_tokens")
_LIST_FIELDS = ("capabilities", "compliance")
KNOWN_FIELDS = frozenset([*_PRICE_FIELDS, *_INT_FIELDS, *_LIST_FIELDS, "tier", "deprecated", "note"])


class CatalogError(InvalidRequest):
    """A catalog or policy file is unusable. The message names the file, the model and the field."""


class ModelInfo(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    provider: str
    model: str
    input_cost_per_1k: float
    output_cost_per_1k: float
    cached_input_cost_per_1k: float | None = None
    batch_input_cost_per_1k: float | None = None
    batch_output_cost_per_1k: float | None = None
    batch_cached_input_cost_per_1k: float | None = None  # prompt-cache hits inside a provider batch
    context_window: int | None = None
    max_output_tokens: int | None = None
    tier: Tier | None = None  # None: the policy's ``tiers`` decides
    capabilities: tuple[str, ...] = ()
    compliance: tuple[str, ...] = ()  # ("pii",): may receive personal data
    deprecated: bool = False
    note: str | None = None

    @property
    def target(self) -> str:
        return f"{self.provider}/{self.model}"


@dataclass(frozen=True)
class Catalog:
    models: Mapping[str, ModelInfo]  # keyed by "provider/model"
    source: str = "<memory>"
    _providers: tuple[str, ...] = field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        # Read-only view: a Catalog is shared between threads by the store, so nobody may mutate it.
        object.__setattr__(self, "models", MappingProxyType(dict(self.models)))
        object.__setattr__(self, "_providers", tuple(sorted({m.provider for m in self.models.values()})))

    def get(self, target: str) -> ModelInfo | None:
        return self.models.get(target)

    def providers(self) -> list[str]:
        return list(self._providers)

    def __len__(self) -> int:
        return len(self.models)


def _where(source: str, target: str | None, fld: str | None) -> str:
    parts = [source]
    if target is not None:
        parts.append(f"model '{target}'")
    if fld is not None:
        parts.append(f"field '{fld}'")
    return ": ".join(parts)


def _fail(source: str, target: str | None, fld: str | None, problem: str) -> CatalogError:
    return CatalogError(f"{_where(source, target, fld)}: {problem}")


def _price(value: object, source: str, target: str, fld: str) -> float:
    # bool is an int subclass; "true" as a price is a mistake, not 1.0.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _fail(source, target, fld, f"must be a number (USD per 1,000 tokens), got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise _fail(source, target, fld, f"must be a finite number >= 0, got {value!r}")
    return float(value)


def _parse_model(provider: str, name: str, raw: object, source: str) -> ModelInfo:
    target = f"{provider}/{name}"
    if not _MODEL_RE.match(name):
        raise _fail(source, target, None, "model name may only use letters, digits and _ . : @ / -")
    if not isinstance(raw, dict):
        raise _fail(source, target, None, f"must be an object of fields, got {type(raw).__name__}")
    for key in raw:
        if key not in KNOWN_FIELDS:
            raise _fail(source, target, str(key), f"unknown field; known fields: {', '.join(sorted(KNOWN_FIELDS))}")
    for key in _REQUIRED:
        if key not in raw:
            raise _fail(source, target, key, "missing (required)")
    kw: dict[str, Any] = {"provider": provider, "model": name}
    for key, attr in _PRICE_FIELDS.items():
        if raw.get(key) is not None:
            kw[attr] = _price(raw[key], source, target, key)
    for key in _INT_FIELDS:
        value = raw.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise _fail(source, target, key, f"must be a positive integer (tokens), got {value!r}")
        kw[key] = value
    for key in _LIST_FIELDS:
        value = raw.get(key)
        if value is None:
            continue
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise _fail(source, target, key, f"must be a list of non-empty strings, got {value!r}")
        kw[key] = tuple(value)
    tier = raw.get("tier")
    if tier is not None:
        if tier not in TIER_RANK:
            raise _fail(source, target, "tier", f"must be one of {', '.join(TIERS)}, got {tier!r}")
        kw["tier"] = tier
    if "deprecated" in raw:
        if not isinstance(raw["deprecated"], bool):
            raise _fail(source, target, "deprecated", f"must be true or false, got {raw['deprecated']!r}")
        kw["deprecated"] = raw["deprecated"]
    if raw.get("note") is not None:
        if not isinstance(raw["note"], str):
            raise _fail(source, target, "note", "must be a string")
        kw["note"] = raw["note"]
    return ModelInfo(**kw)


def parse_catalog(data: object, source: str) -> Catalog:
    """Validate already-decoded JSON. ``source`` names the file in every error message."""
    if not isinstance(data, dict):
        raise _fail(source, None, None, "top level must be an object {provider: {model: {...}}}")
    models: dict[str, ModelInfo] = {}
    for provider, entries in data.items():
        if not isinstance(provider, str) or provider.startswith("_"):
            continue  # "_about" and friends: documentation inside a format without comments
        if not _PROVIDER_RE.match(provider):
            raise _fail(source, None, None, f"provider name {provider!r} may only use letters, digits and _ . -")
        if not isinstance(entries, dict):
            raise _fail(source, None, None, f"provider '{provider}' must map model names to objects")
        for name, raw in entries.items():
            info = _parse_model(provider, str(name), raw, source)
            models[info.target] = info
    if not models:
        raise _fail(source, None, None, "no models defined")
    return Catalog(models=models, source=source)


def read_json_file(path: Path, what: str) -> object:
    """A catalog, policy or rule file's JSON, or a CatalogError naming the file and what is wrong."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CatalogError(f"{path}: cannot read {what}: {exc.strerror or exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CatalogError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None


def validation_failure(source: str, exc: ValidationError) -> CatalogError:
    """A data file's first validation error, with the field's path and how many more there are."""
    first = exc.errors(include_input=False, include_url=False)[0]
    where = ".".join(str(p) for p in first["loc"]) or "<top level>"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return CatalogError(f"{source}: field '{where}': {first['msg']}{more}")


def load_catalog(path: str | Path) -> Catalog:
    path = Path(path)
    return parse_catalog(read_json_file(path, "catalog"), str(path))


def has_batch_price(model: ModelInfo) -> bool:
    """Whether the catalog prices ``model`` on its provider's Batch API (both input and output rates)."""
    return model.batch_input_cost_per_1k is not None and model.batch_output_cost_per_1k is not None


def _rates(model: ModelInfo, batch: bool) -> tuple[float, float, float]:
    """(input, cached input, output) per 1k tokens on the sync lane, or on the batch lane when asked and known."""
    cached = model.cached_input_cost_per_1k
    if cached is None:
        cached = model.input_cost_per_1k
    if not batch or model.batch_input_cost_per_1k is None or model.batch_output_cost_per_1k is None:
        return model.input_cost_per_1k, cached, model.output_cost_per_1k
    batch_in = model.batch_input_cost_per_1k
    batch_cached = model.batch_cached_input_cost_per_1k
    if batch_cached is None:
        # The discounts stack (Anthropic and OpenAI price a cache hit in a batch at both): scale the cached
        # rate by the batch discount on input, never bill the hit at the full batch input rate.
        share = batch_in / model.input_cost_per_1k if model.input_cost_per_1k else 1.0
        batch_cached = cached * share
    return batch_in, batch_cached, model.batch_output_cost_per_1k


def cost_usd(model: ModelInfo, usage: Usage, *, batch: bool = False) -> float:
    """What ``usage`` costs on ``model``, at full float precision (sums are rounded only for display).

    ``cached_input_tokens`` is taken as the part of ``input_tokens`` served from the provider's prompt cache
    (OpenAI's convention), priced at the cached rate when the catalog knows it, else at the normal rate.
    ``batch``: at the model's Batch API rates (see ``_rates``); a model without them is priced as sync.
    """
    cached = min(usage.cached_input_tokens, usage.input_tokens)
    input_price, cached_price, output_price = _rates(model, batch)
    return (
        (usage.input_tokens - cached) * input_price + cached * cached_price + usage.output_tokens * output_price
    ) / 1000.0
