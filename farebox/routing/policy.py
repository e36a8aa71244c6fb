"""The routing, PII, cache and budget policy: a validated data file (``catalog/policy.json``).

Everything an operator may want to change without a release lives here as data: which tier a task or a user
tier needs, what happens to personal data, which model is the savings baseline, which tenants share a cache,
and the budgets (only parsed and validated here; the account stage enforces them).
"""

from __future__ import annotations

import fnmatch
import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import Field, ValidationError, field_validator, model_validator

from farebox.routing.auth import AuthPolicy
from farebox.routing.batch_lane import BatchPolicy
from farebox.routing.catalog import (
    TIER_RANK,
    TIERS,
    Catalog,
    CatalogError,
    ModelInfo,
    Tier,
    read_json_file,
    validation_failure,
)
from farebox.routing.experiments import Experiment, check_experiments
from farebox.routing.learned import BUILTIN, LearnedRouter, load_router
from farebox.routing.priority import PriorityPolicy
from farebox.routing.strategies import RouterRule, Strict
from farebox.schemas import Job

PiiAction = Literal["block", "route", "redact", "allow"]
PiiKind = Literal["email", "phone", "card", "ssn", "iban", "secret"]
PII_KINDS: tuple[PiiKind, ...] = ("email", "phone", "card", "ssn", "iban", "secret")


class TaskRule(Strict):
    min_tier: Tier | None = None  # the task needs at least this, whatever the job asks
    default_tier: Tier | None = None  # used instead of the job's default when the job gives no quality


class AccessRule(Strict):
    """Tier bounds, model allow/deny lists (fnmatch patterns over "provider/model") and a PII override,
    for a user tier or a tenant."""

    min_tier: Tier | None = None
    max_tier: Tier | None = None
    allow: tuple[str, ...] | None = None  # None: every model
    deny: tuple[str, ...] = ()
    pii_action: PiiAction | None = None  # overrides pii.action for this tenant / user tier

    @model_validator(mode="after")
    def _bounds(self) -> AccessRule:
        if self.min_tier and self.max_tier and TIER_RANK[self.min_tier] > TIER_RANK[self.max_tier]:
            raise ValueError(f"min_tier {self.min_tier!r} is above max_tier {self.max_tier!r}")
        return self

    def permits(self, target: str) -> bool:
        if any(fnmatch.fnmatchcase(target, p) for p in self.deny):
            return False
        return self.allow is None or any(fnmatch.fnmatchcase(target, p) for p in self.allow)


class PiiPolicy(Strict):
    action: PiiAction = "redact"
    kinds: tuple[PiiKind, ...] = PII_KINDS  # which findings count; others are ignored


class CachePolicy(Strict):
    enabled: bool = True
    # Only deterministic requests are worth caching: by default temperature must be 0.
    max_temperature: float = Field(0.0, ge=0.0, le=2.0)


class Budget(Strict):
    tenant: str = Field(min_length=1)  # "*": every tenant, each with its own budget
    user_tier: str | None = None
    period: Literal["day", "month"]
    limit_usd: float = Field(gt=0)
    alerts: tuple[float, ...] = (0.5, 0.8, 1.0)  # shares of limit_usd that raise an alert
    action: Literal["reject", "downgrade"] = "reject"

    @field_validator("alerts")
    @classmethod
    def _alerts(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if any(not 0 < a <= 1.0 for a in v):
            raise ValueError("each alert is a share of limit_usd in (0, 1]")
        return tuple(sorted(set(v)))


class Policy(Strict):
    baseline_model: str = "openai/gpt-4-turbo"
    default_model: str | None = None  # used when no model meets the job's requirements
    tiers: dict[str, Tier] = {}  # "provider/model" -> tier, for catalog entries without one
    tasks: dict[str, TaskRule] = {}
    user_tiers: dict[str, AccessRule] = {}
    tenants: dict[str, AccessRule] = {}
    pii: PiiPolicy = PiiPolicy()
    cache: CachePolicy = CachePolicy()
    cache_sharing: tuple[tuple[str, ...], ...] = ()  # groups of tenants that may read each other's cache
    budgets: tuple[Budget, ...] = ()
    router: RouterRule = RouterRule()
    auth: AuthPolicy = AuthPolicy()  # who may act for which tenant (farebox/routing/auth.py)
    experiments: tuple[Experiment, ...] = ()  # A/B tests of routing strategies (farebox/routing/experiments.py)
    priority: PriorityPolicy = PriorityPolicy()  # lanes and fair shares (farebox/routing/priority.py)
    batch: BatchPolicy = BatchPolicy()  # the sync or batch price lane (farebox/routing/batch_lane.py)
    # Feedback sources that get a Prometheus label of their own; any other source is counted as "other".
    feedback_sources: tuple[str, ...] = ("user", "user-thumbs", "grader", "shadow")
    # Models with the "reasoning" capability spend hidden tokens out of max_tokens; below this they may
    # return nothing at all, so the router does not pick them automatically.
    reasoning_min_max_tokens: int = Field(1024, ge=0)

    @field_validator("cache_sharing")
    @classmethod
    def _groups(cls, v: tuple[tuple[str, ...], ...]) -> tuple[tuple[str, ...], ...]:
        seen: set[str] = set()
        for group in v:
            if len(group) < 2:
                raise ValueError("a cache sharing group needs at least two tenants")
            for tenant in group:
                if tenant in seen:
                    raise ValueError(f"tenant {tenant!r} is in more than one cache sharing group")
                seen.add(tenant)
        return v

    @field_validator("budgets")
    @classmethod
    def _unique_budgets(cls, v: tuple[Budget, ...]) -> tuple[Budget, ...]:
        keys = [(b.tenant, b.user_tier, b.period) for b in v]
        dup = {k for k in keys if keys.count(k) > 1}
        if dup:
            tenant, user_tier, period = sorted(dup, key=str)[0]
            raise ValueError(f"two budgets for tenant {tenant!r}, user_tier {user_tier!r}, period {period!r}")
        return v

    @functools.cached_property
    def named_tenants(self) -> frozenset[str]:
        """Every tenant the policy names: tenant rules, cache sharing groups, budgets (not "*"), auth users'
        tenants, experiments' tenants, priority lanes and weights (not "*"), batch lanes. Only these get a metric
        label of their own (``metrics.tenant_label``). Computed once per policy object: it is frozen, and asked
        every job."""
        names = set(self.tenants)
        names.update(t for group in self.cache_sharing for t in group)
        names.update(b.tenant for b in self.budgets if b.tenant != "*")
        names.update(t for tenants in self.auth.users.values() for t in tenants)
        names.update(t for e in self.experiments for t in e.tenants or ())
        names.update(self.priority.tenants)
        names.update(t for t in self.priority.weights if t != "*")
        names.update(self.batch.tenants)
        return frozenset(names)

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        copied = super().model_copy(update=update, deep=deep)
        copied.__dict__.pop("named_tenants", None)  # pydantic copies cached properties; an update may rename
        return copied

    def experiment(self, name: str) -> Experiment | None:
        return next((e for e in self.experiments if e.name == name), None)

    def is_cacheable(self, job: Job) -> bool:
        return self.cache.enabled and job.temperature <= self.cache.max_temperature

    def cache_group(self, tenant: str) -> str:
        """The cache namespace of ``tenant``: its sharing group (sorted names joined by "+") or itself."""
        for group in self.cache_sharing:
            if tenant in group:
                return "+".join(sorted(group))
        return tenant

    def budgets_for(self, tenant: str, user_tier: str | None) -> tuple[Budget, ...]:
        return tuple(
            b for b in self.budgets if b.tenant in (tenant, "*") and (b.user_tier is None or b.user_tier == user_tier)
        )


def tier_of(model: ModelInfo, policy: Policy) -> str | None:
    """The catalog's tier for ``model``, else the policy's; None means "only when pinned"."""
    return model.tier or policy.tiers.get(model.target)


def parse_policy(data: object, source: str) -> Policy:
    if not isinstance(data, dict):
        raise CatalogError(f"{source}: top level must be an object")
    body = {k: v for k, v in data.items() if not str(k).startswith("_")}  # "_about": documentation
    try:
        return Policy.model_validate(body)
    except ValidationError as exc:
        raise validation_failure(source, exc) from None


def load_policy(path: str | Path) -> Policy:
    path = Path(path)
    return parse_policy(read_json_file(path, "policy"), str(path))


def rule_location(rule: RouterRule, policy_path: str | Path) -> str | Path | None:
    """Where a learned router rule's file is: "builtin", a path (relative ones from the policy file's folder),
    or None for the rules router."""
    if rule.kind != "learned" or rule.path is None:
        return None
    if rule.path == BUILTIN:
        return BUILTIN
    path = Path(rule.path).expanduser()
    return path if path.is_absolute() else Path(policy_path).parent / path


def router_location(policy: Policy, policy_path: str | Path) -> str | Path | None:
    """Where the policy's learned router file is (see ``rule_location``)."""
    return rule_location(policy.router, policy_path)


def load_rule_router(rule: RouterRule, policy_path: str | Path, field: str = "router") -> LearnedRouter | None:
    """The learned router ``rule`` names (None for the rules router); CatalogError in one line that names the
    policy file, the field and the router file."""
    where = rule_location(rule, policy_path)
    if where is None:
        return None
    try:
        return load_router(where)
    except CatalogError as exc:
        raise CatalogError(f"{policy_path}: field '{field}.path': {exc}") from None


def load_policy_router(policy: Policy, policy_path: str | Path) -> LearnedRouter | None:
    """The learned router the policy names (None for the rules router)."""
    return load_rule_router(policy.router, policy_path)


def _routable(catalog: Catalog, policy: Policy) -> list[tuple[int, ModelInfo]]:
    """(tier rank, model) of every model the router may pick on its own: tiered and not deprecated."""
    out = []
    for model in catalog.models.values():
        tier = tier_of(model, policy)
        if tier is not None and not model.deprecated:
            out.append((TIER_RANK[tier], model))
    return out


def _list_price(model: ModelInfo) -> tuple[float, str]:
    # A static ranking needs a usage; equal input and output weight, then the name for a stable answer.
    return (model.input_cost_per_1k + model.output_cost_per_1k, model.target)


def _fallback(routable: list[tuple[int, ModelInfo]]) -> ModelInfo:
    """The model standing in for an absent ``default_model``: the cheapest eligible one."""
    # Reasoning models may answer nothing for a small max_tokens, so they stand in only when nothing else can.
    plain = [(rank, m) for rank, m in routable if "reasoning" not in m.capabilities] or routable
    return min((m for _, m in plain), key=_list_price)


def _resolve_models(policy: Policy, catalog: Catalog, source: str) -> tuple[Policy, list[str]]:
    """``policy`` with an absent default model replaced by its fallback, and a warning saying so. An absent
    baseline is refused: every result's ``baseline_cost_usd`` is priced on it, and a stand-in would change
    what the savings mean. Only called once ``_coverage`` found no problem, so a routable model exists."""
    if catalog.get(policy.baseline_model) is None:
        raise CatalogError(
            f"{source}: field 'baseline_model': model '{policy.baseline_model}' is not in the catalog {catalog.source}"
        )
    if policy.default_model is None or catalog.get(policy.default_model) is not None:
        return policy, []
    stand_in = _fallback(_routable(catalog, policy))
    warning = (
        f"{source}: field 'default_model': model '{policy.default_model}' is not in the catalog {catalog.source}; "
        f"using '{stand_in.target}', the cheapest eligible model, instead"
    )
    return policy.model_copy(update={"default_model": stand_in.target}), [warning]


def _contexts(policy: Policy) -> list[tuple[str, int, int]]:
    """(who, lowest tier rank a job can need, highest it may get) for every job and each access rule."""
    out = [("", 0, len(TIERS) - 1)]
    for kind, rules in (("user tier", policy.user_tiers), ("tenant", policy.tenants)):
        for name, rule in sorted(rules.items()):
            lo = TIER_RANK[rule.min_tier] if rule.min_tier else 0
            cap = TIER_RANK[rule.max_tier] if rule.max_tier else len(TIERS) - 1
            if (lo, cap) != (0, len(TIERS) - 1):
                bounds = [f"{b} {t}" for b, t in (("min_tier", rule.min_tier), ("max_tier", rule.max_tier)) if t]
                out.append((f"{kind} {name} ({', '.join(bounds)})", lo, cap))
    return out


def _coverage(policy: Policy, catalog: Catalog) -> tuple[list[str], list[str]]:
    """(problems, warnings) for the tiers jobs can need that no routable model serves: such jobs all go to the
    default model. A quality a job may ask for left without a model (tier t or better), or a user tier or tenant
    left without any model it may use, is a problem. A gap inside a user tier's or tenant's bounds is only a
    warning: those jobs already accept less than they ask, and the default model they get stays within them."""
    routable = _routable(catalog, policy)
    everyone = {rank for rank, _ in routable}
    plain = {rank for rank, m in routable if "reasoning" not in m.capabilities}
    problems, warnings = [], []
    for who, lo, cap in _contexts(policy):
        # Tier t is served by any model of tier t..cap, so what is missing is always a top run k..cap.
        missing = [t for t in range(lo, cap + 1) if not any(t <= r <= cap for r in everyone)]
        weak = [t for t in range(lo, cap + 1) if t not in missing and not any(t <= r <= cap for r in plain)]
        head = f"{who}: " if who else ""
        if missing:
            gap = f"{head}no model of tier {' or '.join(TIERS[t] for t in missing)}"
            if not who or missing[0] == lo:
                problems.append(gap)
            else:
                warnings.append(f"{gap}: its jobs that need {TIERS[missing[0]]} go to the default model")
        if weak:
            warnings.append(
                f"{head}tier {' or '.join(TIERS[t] for t in weak)} is served only by reasoning models, which the "
                f"router skips for jobs with max_tokens below {policy.reasoning_min_max_tokens}: those jobs go to "
                "the default model"
            )
    return problems, warnings


def checked_policy(policy: Policy, catalog: Catalog, source: str = "policy") -> tuple[Policy, list[str]]:
    """Cross-check a policy against a catalog: (the policy to route with, warnings).

    Raises CatalogError when a tier the policy's jobs can need has no model to serve it. An absent baseline or
    default model is replaced by a fallback (see ``_fallback``), with a warning that names both."""
    broken = check_experiments(policy.experiments, catalog)
    if broken:
        raise CatalogError(f"{source}: field 'experiments': {'; '.join(broken)}")
    problems, coverage_warnings = _coverage(policy, catalog)
    if problems:
        raise CatalogError(
            f"{source}: the catalog {catalog.source} leaves tiers the policy uses without a model, so those jobs "
            f"would all go to the default model: {'; '.join(problems)}. Give models a tier (the catalog's "
            "'tier', the policy's 'tiers', or `farebox catalog import --tier-rules`)"
        )
    effective, warnings = _resolve_models(policy, catalog, source)
    warnings += coverage_warnings
    # One line: the bundled policy tiers the seed's five models, which an imported catalog may lack.
    absent = sorted(t for t in policy.tiers if catalog.get(t) is None)
    if absent:
        warnings.append(
            f"{source}: field 'tiers' names {len(absent)} models not in the catalog (ignored): {', '.join(absent)}"
        )
    untiered = sorted(m.target for m in catalog.models.values() if tier_of(m, policy) is None)
    if untiered:
        warnings.append(
            f"{len(untiered)} model(s) have no tier (catalog or policy) and are used only when pinned: "
            + ", ".join(untiered[:8])
            + (" ..." if len(untiered) > 8 else "")
        )
    return effective, warnings


def check_policy(policy: Policy, catalog: Catalog, source: str = "policy") -> list[str]:
    """The warnings of ``checked_policy`` (which raises CatalogError for what it refuses)."""
    return checked_policy(policy, catalog, source)[1]
