"""Pick the model for a job: the cheapest one that is good enough, allowed, and fits.

Pure and synchronous: the route stage calls ``choose_route`` with the current catalog, policy and learned
router (if the policy names one), the token count it measured, and the providers it currently considers
unhealthy. What routing measures once per job (task, token estimate, access rules, the PII scan, tier bounds
with the router's score: farebox/routing/tiering.py) is a ``RouteContext``; the models the job may use, of
any tier, are screened once from it. A budget downgrade (``downgrade_route``) picks again from those, without a
second scan or score. Error messages never quote the prompt.

A job on the batch price lane (farebox/routing/batch_lane.py) has the candidates whose provider has a Batch API
and whose model a batch price priced at that price, so the cheapest pick accounts for the discount; the decision
goes to the batch lane only when the chosen model can, else it runs (and is priced) sync.
"""

from __future__ import annotations

from dataclasses import dataclass

from farebox.errors import FareboxError, InvalidRequest, PolicyBlocked
from farebox.routing.catalog import TIER_RANK, TIERS, Catalog, ModelInfo, cost_usd, has_batch_price
from farebox.routing.learned import LearnedRouter
from farebox.routing.pii import scan_chat
from farebox.routing.policy import PiiAction, Policy, tier_of
from farebox.routing.tasks import estimate_output_tokens, infer_task
from farebox.routing.tiering import Rules, Tiering, needed_tier
from farebox.schemas import ChatMessage, Job, RouteDecision, Usage
from farebox.schemas.job import PriceLane


@dataclass(frozen=True)
class RouteContext:
    """What every routing step reads, measured once per job."""

    job: Job
    catalog: Catalog
    policy: Policy
    task: str
    usage: Usage  # the prompt's tokens and the expected output
    rules: Rules
    tiering: Tiering  # the tier bounds, how they came about and the learned router's score (if any)
    messages: tuple[ChatMessage, ...]  # what to send: redacted when the policy's pii action is "redact"
    pii_kinds: tuple[str, ...]  # sorted
    redacted: bool
    pii_only: bool  # personal data found and the action is "route": pii-approved models only
    unhealthy: frozenset[str]
    # The price lane the job asks for and why (batch_lane.price_lane), and the providers with a Batch API:
    # kept here so a budget downgrade picks on the same lane.
    lane: tuple[PriceLane, str] = ("sync", "")
    batch_providers: frozenset[str] = frozenset()

    @property
    def need(self) -> int:
        return self.tiering.need  # lowest tier rank an automatic route may pick

    @property
    def cap(self) -> int:
        return self.tiering.cap  # highest tier rank the rules allow

    @property
    def why(self) -> str:
        return "; ".join(self.tiering.why)

    @property
    def total_tokens(self) -> int:
        return self.usage.input_tokens + self.usage.output_tokens

    @property
    def kinds_txt(self) -> str:
        return ", ".join(self.pii_kinds)

    def pii_notes(self) -> list[str]:
        notes = []
        if self.redacted:
            notes.append(f"personal data redacted ({self.kinds_txt})")
        if self.pii_only:
            notes.append(f"personal data found ({self.kinds_txt}): pii-approved models only")
        return notes

    def on_batch(self, model: ModelInfo) -> bool:
        """Whether ``model`` would run on the batch lane for this job."""
        return self.lane[0] == "batch" and model.provider in self.batch_providers and has_batch_price(model)

    def price(self, model: ModelInfo) -> float:
        """The estimated cost on ``model`` at the price of the lane it would run on."""
        return cost_usd(model, self.usage, batch=self.on_batch(model))

    def lane_notes(self, model: ModelInfo) -> list[str]:
        """The reason's head for the price lane: nothing on the sync lane the job did not ask to leave."""
        if self.lane[0] != "batch":
            return []
        if self.on_batch(model):
            return [f"batch lane ({self.lane[1]}; batch prices)"]
        if model.provider not in self.batch_providers:
            return [f"sync lane (asked for batch, but provider {model.provider} has no Batch API configured)"]
        return [f"sync lane (asked for batch, but {model.target} has no batch price)"]


@dataclass(frozen=True)
class Screen:
    """Every model an automatic route may use for the job whatever its tier (the tier floor is applied when
    picking), and the tier ranks of the ones set aside only for size or for personal data (for the error)."""

    eligible: tuple[tuple[int, ModelInfo], ...]  # (tier rank, model)
    too_small: tuple[int, ...]
    wrong_pii: tuple[int, ...]


# (estimated cost for the context's usage, target, model): a plain tuple, as routing makes a dozen per job.
Candidate = tuple[float, str, ModelInfo]


@dataclass(frozen=True)
class Routed:
    decision: RouteDecision
    context: RouteContext
    screen: Screen | None  # None for a pinned model

    @property
    def messages(self) -> tuple[ChatMessage, ...]:
        return self.context.messages


def _fits(model: ModelInfo, tokens: int) -> bool:
    return model.context_window is None or tokens <= model.context_window


def _is_unhealthy(model: ModelInfo, unhealthy: frozenset[str]) -> bool:
    return bool(unhealthy) and (model.provider in unhealthy or model.target in unhealthy)


def _rules(job: Job, policy: Policy) -> Rules:
    rules = []
    if job.user_tier is not None and job.user_tier in policy.user_tiers:
        rules.append((f"user tier {job.user_tier}", policy.user_tiers[job.user_tier]))
    if job.tenant in policy.tenants:
        rules.append((f"tenant {job.tenant}", policy.tenants[job.tenant]))
    return tuple(rules)


def _pii_action(policy: Policy, rules: Rules) -> PiiAction:
    # The tenant's override beats the user tier's: the tenant signs the data-processing contract.
    action = policy.pii.action
    for _, rule in rules:
        if rule.pii_action is not None:
            action = rule.pii_action
    return action


def _refusal(model: ModelInfo, ctx: RouteContext) -> str | None:
    """Why policy forbids ``model`` for this job (tenant/user-tier lists and tier cap), or None."""
    for name, rule in ctx.rules:
        if not rule.permits(model.target):
            return f"model '{model.target}' is not allowed for {name}"
    tier = tier_of(model, ctx.policy)
    if tier is not None and TIER_RANK[tier] > ctx.cap:
        return f"model '{model.target}' is tier {tier}, above this job's cap ({TIERS[ctx.cap]}, user tier/tenant)"
    return None


def route_context(
    job: Job,
    catalog: Catalog,
    policy: Policy,
    *,
    input_tokens: int,
    unhealthy: frozenset[str] = frozenset(),
    router: LearnedRouter | None = None,
    task: str | None = None,
    lane: tuple[PriceLane, str] = ("sync", ""),
    batch_providers: frozenset[str] = frozenset(),
) -> RouteContext:
    """Measure the job once: task, token estimate, rules, the PII scan (which may block it) and tier bounds,
    with the learned router's score when the policy has one (``router``, loaded with the policy; never for
    a pinned job)."""
    if router is None and policy.router.kind == "learned":
        raise ValueError("the policy routes with a learned router: pass the one loaded with it (router=...)")
    task = task or infer_task(job)
    usage = Usage(input_tokens=input_tokens, output_tokens=estimate_output_tokens(job, task))
    rules = _rules(job, policy)
    action = _pii_action(policy, rules)
    messages: tuple[ChatMessage, ...] = job.chat
    pii_kinds: tuple[str, ...] = ()
    if action != "allow":  # with "allow" nothing is done with findings, so skip the scan's cost
        messages, pii_kinds = scan_chat(job.chat, frozenset(policy.pii.kinds), redact=action == "redact")
    if pii_kinds and action == "block":
        raise PolicyBlocked(
            f"personal data found in the prompt ({', '.join(pii_kinds)}); the policy blocks such jobs. "
            "Remove it, or ask the operator for a pii route"
        )
    tiering = needed_tier(job, task, policy, rules, router if job.model is None else None)
    return RouteContext(
        job=job,
        catalog=catalog,
        policy=policy,
        task=task,
        usage=usage,
        rules=rules,
        tiering=tiering,
        messages=messages,
        pii_kinds=pii_kinds,
        redacted=bool(pii_kinds) and action == "redact",
        pii_only=bool(pii_kinds) and action == "route",
        unhealthy=unhealthy,
        lane=lane,
        batch_providers=batch_providers,
    )


def _screen(ctx: RouteContext) -> Screen:
    eligible: list[tuple[int, ModelInfo]] = []
    too_small: list[int] = []
    wrong_pii: list[int] = []
    total_tokens = ctx.total_tokens
    room_to_reason = ctx.job.max_tokens >= ctx.policy.reasoning_min_max_tokens
    for model in ctx.catalog.models.values():
        tier = tier_of(model, ctx.policy)
        if tier is None or model.deprecated:
            continue  # untiered models are for pins only; deprecated ones may disappear any day
        if _refusal(model, ctx) is not None or ("reasoning" in model.capabilities and not room_to_reason):
            continue
        rank = TIER_RANK[tier]
        if not _fits(model, total_tokens):
            too_small.append(rank)
        elif ctx.pii_only and "pii" not in model.compliance:
            wrong_pii.append(rank)
        else:
            eligible.append((rank, model))
    return Screen(tuple(eligible), tuple(too_small), tuple(wrong_pii))


def _decision(ctx: RouteContext, chosen: ModelInfo, candidates: list[str], reason: str) -> RouteDecision:
    return RouteDecision(
        provider=chosen.provider,
        model=chosen.model,
        reason="; ".join([*ctx.lane_notes(chosen), reason]),
        candidates=tuple(candidates),
        estimated_cost_usd=ctx.price(chosen),
        redacted=ctx.redacted,
        price_lane="batch" if ctx.on_batch(chosen) else "sync",
    )


def choose_route(
    job: Job,
    catalog: Catalog,
    policy: Policy,
    *,
    input_tokens: int,
    unhealthy: frozenset[str] = frozenset(),
    downgrade: bool = False,
    router: LearnedRouter | None = None,
    task: str | None = None,
    batch: tuple[PriceLane, str] = ("sync", ""),
    batch_providers: frozenset[str] = frozenset(),
) -> Routed:
    """Route ``job``. ``router``: the learned router loaded with ``policy`` (required when the policy names
    one; see farebox/routing/store.py). ``task``: ``infer_task(job)`` when the caller has it already.
    ``batch``: the price lane the job asks for and why (``batch_lane.price_lane``); ``batch_providers``: the
    providers with a Batch API, the only ones a batch-lane job may go to at the batch price."""
    ctx = route_context(
        job,
        catalog,
        policy,
        input_tokens=input_tokens,
        unhealthy=unhealthy,
        router=router,
        task=task,
        lane=batch,
        batch_providers=batch_providers,
    )
    if job.model is not None:
        return _pinned(ctx, downgrade=downgrade)
    return _automatic(ctx, _screen(ctx), downgrade=downgrade)


def downgrade_route(routed: Routed) -> Routed:
    """What ``choose_route(..., downgrade=True)`` gives for the same job, picked from what ``routed`` already
    measured and screened: no second PII scan, token count or pass over the catalog."""
    if routed.screen is None:
        return _pinned(routed.context, downgrade=True)
    return _automatic(routed.context, routed.screen, downgrade=True)


def _healthy_first(eligible: list[Candidate], unhealthy: frozenset[str], notes: list[str]) -> list[Candidate]:
    """The eligible candidates not marked unhealthy, or all of them when none is (noted in ``notes``)."""
    healthy = [c for c in eligible if not _is_unhealthy(c[2], unhealthy)]
    if healthy and len(healthy) < len(eligible):
        skipped = sorted(target for _, target, model in eligible if _is_unhealthy(model, unhealthy))
        notes.append(f"routed around unhealthy {', '.join(skipped)}")
    elif eligible and not healthy:
        # Health is a preference, not a rule: failing the job permanently for a transient outage would be
        # worse than trying; the execute stage retries and falls back down the list.
        notes.append("every eligible model is marked unhealthy; routing anyway")
        healthy = eligible
    return healthy


def _automatic(ctx: RouteContext, screen: Screen, *, downgrade: bool) -> Routed:
    floor = 0 if downgrade else ctx.need  # a downgrade takes any tier the rules allow
    notes = ctx.pii_notes()
    priced = [(ctx.price(m), m.target, m) for rank, m in screen.eligible if rank >= floor]
    healthy = _healthy_first(priced, ctx.unhealthy, notes)
    if healthy:
        healthy.sort(key=lambda c: (c[0], c[1]))  # cost, then target: same input, same route
        (_, _, chosen), n = healthy[0], len(healthy)
        if downgrade:
            head = f"budget downgrade: cheapest eligible model regardless of tier (task={ctx.task}; {ctx.why})"
        else:
            head = ctx.tiering.head(ctx.task)
        reason = "; ".join([head, f"{n} candidate{'s' if n != 1 else ''}", *notes])
        decision = _decision(ctx, chosen, [target for _, target, _ in healthy], reason)
        return Routed(decision, ctx, screen)
    # Nothing qualifies: the policy's default model, when it is at least possible for this job.
    default = ctx.catalog.get(ctx.policy.default_model) if ctx.policy.default_model else None
    if (
        default is not None
        and _fits(default, ctx.total_tokens)
        and not (ctx.pii_only and "pii" not in default.compliance)
        and _refusal(default, ctx) is None
    ):
        head = (
            f"no model of tier {TIERS[ctx.need]} or better fits task={ctx.task} ({ctx.why}); "
            "using the policy's default model"
        )
        reason = "; ".join([head, *notes])
        decision = _decision(ctx, default, [default.target], reason)
        return Routed(decision, ctx, screen)
    raise _no_route(ctx, screen, floor)


def _no_route(ctx: RouteContext, screen: Screen, floor: int) -> FareboxError:
    """Why no model at all could take the job."""
    if ctx.pii_only and any(rank >= floor for rank in screen.wrong_pii):
        return PolicyBlocked(
            f"personal data found in the prompt ({ctx.kinds_txt}) and no pii-approved model fits this job; "
            "remove the personal data or ask the operator to approve a model"
        )
    if any(rank >= floor for rank in screen.too_small):
        largest = max((m.context_window or 0) for m in ctx.catalog.models.values())
        return InvalidRequest(
            f"prompt is {ctx.usage.input_tokens} tokens plus about {ctx.usage.output_tokens} expected output "
            f"tokens, more than the context window of every eligible model (largest in the catalog: {largest}); "
            "shorten the prompt or lower max_tokens"
        )
    return InvalidRequest(
        f"no model in the catalog meets this job's requirements (tier {TIERS[ctx.need]} or better; {ctx.why}); "
        "see `farebox catalog show`"
    )


def _pinned(ctx: RouteContext, *, downgrade: bool) -> Routed:
    """An explicit ``job.model`` wins over cost, but is still checked against the catalog and the policy."""
    assert ctx.job.model is not None
    model = ctx.catalog.get(ctx.job.model)
    if model is None:
        raise InvalidRequest(f"unknown model '{ctx.job.model}'; see `farebox catalog show`")
    refusal = _refusal(model, ctx)
    if refusal is not None:
        raise PolicyBlocked(f"{refusal}; remove the pin or pick an allowed model")
    if ctx.pii_only and "pii" not in model.compliance:
        approved = sorted(m.target for m in ctx.catalog.models.values() if "pii" in m.compliance)
        raise PolicyBlocked(
            f"personal data found in the prompt ({ctx.kinds_txt}); pinned model '{model.target}' is not approved "
            f"for personal data (approved: {', '.join(approved) or 'none'})"
        )
    if not _fits(model, ctx.total_tokens):
        raise InvalidRequest(
            f"prompt is {ctx.usage.input_tokens} tokens plus about {ctx.usage.output_tokens} expected output "
            f"tokens, more than the context window of '{model.target}' ({model.context_window}); shorten the "
            "prompt, lower max_tokens or pin a larger model"
        )
    extra = []
    if model.deprecated:
        extra.append("model is deprecated")
    if _is_unhealthy(model, ctx.unhealthy):
        extra.append("provider currently marked unhealthy")
    if downgrade:
        extra.append("budget downgrade not applied to a pinned model")
    reason = "; ".join([f"pinned by the job ({model.target})", *extra, *ctx.pii_notes()])
    return Routed(_decision(ctx, model, [model.target], reason), ctx, None)
