"""Pick the model for a job: the cheapest one that is good enough, allowed, and fits.

Pure and synchronous: the route stage calls ``choose_route`` with the current catalog and policy, the token
count it measured, and the providers it currently considers unhealthy. Error messages never quote the prompt.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from farebox.errors import InvalidRequest, PolicyBlocked
from farebox.routing.catalog import TIER_RANK, TIERS, Catalog, CatalogError, ModelInfo, cost_usd
from farebox.routing.pii import PiiFinding, apply_redactions, scan
from farebox.routing.policy import AccessRule, PiiAction, Policy, tier_of
from farebox.schemas import ChatMessage, Job, RouteDecision, Usage


@dataclass(frozen=True)
class Routed:
    decision: RouteDecision
    messages: tuple[ChatMessage, ...]  # what to send: redacted when the policy's pii action is "redact"


# Keyword heuristics for jobs without a ``task``: first match wins, so the specific tasks come first.
# Only the start of the last user message is read: the instruction is almost always there, and it keeps
# routing O(1) in prompt length.
_TASK_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("summarize", re.compile(r"\b(summari[sz]e|summary|tl;?dr|condense|key points)\b")),
    (
        "classify",
        re.compile(
            r"\b(classify|categori[sz]e|which category|sentiment|label (this|the)|answer with the letter|"
            r"true or false|yes or no)\b"
        ),
    ),
    ("extract", re.compile(r"\b(extract|as json|into json|parse the|pull out|fill in the fields)\b")),
    (
        "code",
        re.compile(
            r"```|\b(def |function|python|javascript|typescript|sql|regex|refactor|stack trace|compile|"
            r"unit test|write (a|the) (program|script|class))\b"
        ),
    ),
    ("reason", re.compile(r"\b(prove|step by step|calculate|solve|how many|how much|derive|puzzle|logic)\b")),
    ("explain", re.compile(r"\b(explain|why does|why is|what is|what are|describe how)\b")),
    (
        "generate",
        re.compile(r"\b(write|draft|compose|story|poem|essay|slogan|email to|blog post|generate)\b"),
    ),
)
_INFER_CHARS = 2000

# Expected output length per task, as a share of max_tokens (or a small cap for label-like answers). Used only
# for estimates and context fit; the job's max_tokens stays the hard limit sent to the provider.
_OUTPUT_SHARE = {
    "summarize": 0.6,
    "extract": 0.5,
    "reason": 0.8,
    "code": 0.8,
    "generate": 0.9,
    "explain": 0.7,
    "chat": 0.5,
}
_CLASSIFY_CAP = 10


def infer_task(job: Job) -> str:
    if job.task is not None:
        return job.task
    text = ""
    for msg in reversed(job.chat):
        if msg.role == "user":
            text = msg.content
            break
    text = text[:_INFER_CHARS].lower()
    for task, pattern in _TASK_PATTERNS:
        if pattern.search(text):
            return task
    return "chat"


def estimate_output_tokens(job: Job, task: str) -> int:
    if task == "classify":
        return min(job.max_tokens, _CLASSIFY_CAP)
    return max(1, math.ceil(job.max_tokens * _OUTPUT_SHARE.get(task, 0.5)))


def baseline_cost_usd(policy: Policy, catalog: Catalog, usage: Usage) -> float:
    model = catalog.get(policy.baseline_model)
    if model is None:
        raise CatalogError(f"policy baseline_model '{policy.baseline_model}' is not in the catalog {catalog.source}")
    return cost_usd(model, usage)


def _fits(model: ModelInfo, tokens: int) -> bool:
    return model.context_window is None or tokens <= model.context_window


def _is_unhealthy(model: ModelInfo, unhealthy: frozenset[str]) -> bool:
    return bool(unhealthy) and (model.provider in unhealthy or model.target in unhealthy)


def _rules(job: Job, policy: Policy) -> list[tuple[str, AccessRule]]:
    rules = []
    if job.user_tier is not None and job.user_tier in policy.user_tiers:
        rules.append((f"user tier {job.user_tier}", policy.user_tiers[job.user_tier]))
    if job.tenant in policy.tenants:
        rules.append((f"tenant {job.tenant}", policy.tenants[job.tenant]))
    return rules


def _pii_action(policy: Policy, rules: list[tuple[str, AccessRule]]) -> PiiAction:
    # The tenant's override beats the user tier's: the tenant signs the data-processing contract.
    action = policy.pii.action
    for _, rule in rules:
        if rule.pii_action is not None:
            action = rule.pii_action
    return action


def _needed_tier(job: Job, task: str, policy: Policy, rules: list[tuple[str, AccessRule]]) -> tuple[int, int, str]:
    """(minimum tier rank, maximum tier rank, why) for an automatic route."""
    task_rule = policy.tasks.get(task)
    if "quality" not in job.model_fields_set and task_rule and task_rule.default_tier:
        need, why = TIER_RANK[task_rule.default_tier], [f"task {task} defaults to {task_rule.default_tier}"]
    else:
        need, why = TIER_RANK[job.quality], [f"quality={job.quality}"]
    if task_rule and task_rule.min_tier and TIER_RANK[task_rule.min_tier] > need:
        need = TIER_RANK[task_rule.min_tier]
        why.append(f"task {task} needs {task_rule.min_tier}")
    cap = TIER_RANK["high"]
    for name, rule in rules:
        if rule.min_tier and TIER_RANK[rule.min_tier] > need:
            need = TIER_RANK[rule.min_tier]
            why.append(f"{name} needs {rule.min_tier}")
        if rule.max_tier and TIER_RANK[rule.max_tier] < cap:
            cap = TIER_RANK[rule.max_tier]
    if need > cap:
        need = cap
        why.append(f"capped at {TIERS[cap]}")
    return need, cap, "; ".join(why)


def _refusal(model: ModelInfo, policy: Policy, rules: list[tuple[str, AccessRule]], cap: int) -> str | None:
    """Why policy forbids ``model`` for this job (tenant/user-tier lists and tier cap), or None."""
    for name, rule in rules:
        if not rule.permits(model.target):
            return f"model '{model.target}' is not allowed for {name}"
    tier = tier_of(model, policy)
    if tier is not None and TIER_RANK[tier] > cap:
        return f"model '{model.target}' is tier {tier}, above this job's cap ({TIERS[cap]}, user tier/tenant)"
    return None


def _scan_messages(job: Job, policy: Policy, action: PiiAction) -> tuple[tuple[ChatMessage, ...], list[str], bool]:
    """(messages to send, sorted PII kinds found, redacted?)."""
    messages = job.chat
    if action == "allow":
        return messages, [], False  # nothing to do with findings, so skip the scan's cost
    kinds = set(policy.pii.kinds)
    per_message: list[list[PiiFinding]] = [[f for f in scan(m.content) if f.kind in kinds] for m in messages]
    found = sorted({f.kind for fs in per_message for f in fs})
    if not found or action != "redact":
        return messages, found, False
    redacted = tuple(
        ChatMessage(role=m.role, content=apply_redactions(m.content, fs)) if fs else m
        for m, fs in zip(messages, per_message, strict=True)
    )
    return redacted, found, True


def _decision(chosen: ModelInfo, candidates: list[str], reason: str, cost: float, redacted: bool) -> RouteDecision:
    return RouteDecision(
        provider=chosen.provider,
        model=chosen.model,
        reason=reason,
        candidates=tuple(candidates),
        estimated_cost_usd=cost,
        redacted=redacted,
    )


def choose_route(
    job: Job,
    catalog: Catalog,
    policy: Policy,
    *,
    input_tokens: int,
    unhealthy: frozenset[str] = frozenset(),
    downgrade: bool = False,
) -> Routed:
    task = infer_task(job)
    out_tokens = estimate_output_tokens(job, task)
    total_tokens = input_tokens + out_tokens
    usage = Usage(input_tokens=input_tokens, output_tokens=out_tokens)
    rules = _rules(job, policy)
    action = _pii_action(policy, rules)
    messages, pii_kinds, redacted = _scan_messages(job, policy, action)
    kinds_txt = ", ".join(pii_kinds)
    if pii_kinds and action == "block":
        raise PolicyBlocked(
            f"personal data found in the prompt ({kinds_txt}); the policy blocks such jobs. "
            "Remove it, or ask the operator for a pii route"
        )
    pii_only = bool(pii_kinds) and action == "route"
    notes = []
    if redacted:
        notes.append(f"personal data redacted ({kinds_txt})")
    if pii_only:
        notes.append(f"personal data found ({kinds_txt}): pii-approved models only")
    need, cap, why = _needed_tier(job, task, policy, rules)

    if job.model is not None:
        return _pinned(
            job,
            catalog,
            policy,
            rules,
            cap,
            messages,
            usage,
            total_tokens,
            pii_only,
            kinds_txt,
            notes,
            unhealthy,
            downgrade,
            redacted,
        )

    eligible: list[tuple[float, str, ModelInfo]] = []
    too_small = wrong_pii = 0
    for model in catalog.models.values():
        tier = tier_of(model, policy)
        if tier is None or model.deprecated:
            continue  # untiered models are for pins only; deprecated ones may disappear any day
        if (not downgrade and TIER_RANK[tier] < need) or _refusal(model, policy, rules, cap) is not None:
            continue
        if "reasoning" in model.capabilities and job.max_tokens < policy.reasoning_min_max_tokens:
            continue
        if not _fits(model, total_tokens):
            too_small += 1
            continue
        if pii_only and "pii" not in model.compliance:
            wrong_pii += 1
            continue
        eligible.append((cost_usd(model, usage), model.target, model))

    healthy = [e for e in eligible if not _is_unhealthy(e[2], unhealthy)]
    if healthy and len(healthy) < len(eligible):
        skipped = sorted(e[1] for e in eligible if _is_unhealthy(e[2], unhealthy))
        notes.append(f"routed around unhealthy {', '.join(skipped)}")
    elif eligible and not healthy:
        # Health is a preference, not a rule: failing the job permanently for a transient outage would be
        # worse than trying; the execute stage retries and falls back down the list.
        notes.append("every eligible model is marked unhealthy; routing anyway")
        healthy = eligible
    if healthy:
        healthy.sort(key=lambda e: (e[0], e[1]))  # cost, then target: same input, same route
        chosen_cost, _, chosen = healthy[0]
        n = len(healthy)
        if downgrade:
            head = f"budget downgrade: cheapest eligible model regardless of tier (task={task}; {why})"
        else:
            head = f"cheapest {TIERS[need]}-or-better model for task={task} ({why})"
        reason = "; ".join([head, f"{n} candidate{'s' if n != 1 else ''}", *notes])
        return Routed(_decision(chosen, [e[1] for e in healthy], reason, chosen_cost, redacted), messages)

    # Nothing qualifies: the policy's default model, when it is at least possible for this job.
    default = catalog.get(policy.default_model) if policy.default_model else None
    if (
        default is not None
        and _fits(default, total_tokens)
        and not (pii_only and "pii" not in default.compliance)
        and _refusal(default, policy, rules, cap) is None
    ):
        reason = "; ".join(
            [
                f"no model of tier {TIERS[need]} or better fits task={task} ({why}); using the policy's default model",
                *notes,
            ]
        )
        return Routed(_decision(default, [default.target], reason, cost_usd(default, usage), redacted), messages)
    if pii_only and wrong_pii:
        raise PolicyBlocked(
            f"personal data found in the prompt ({kinds_txt}) and no pii-approved model fits this job; "
            "remove the personal data or ask the operator to approve a model"
        )
    if too_small:
        largest = max((m.context_window or 0) for m in catalog.models.values())
        raise InvalidRequest(
            f"prompt is {input_tokens} tokens plus about {out_tokens} expected output tokens, more than the "
            f"context window of every eligible model (largest in the catalog: {largest}); shorten the prompt "
            "or lower max_tokens"
        )
    raise InvalidRequest(
        f"no model in the catalog meets this job's requirements (tier {TIERS[need]} or better; {why}); "
        "see `farebox catalog show`"
    )


def _pinned(
    job: Job,
    catalog: Catalog,
    policy: Policy,
    rules: list[tuple[str, AccessRule]],
    cap: int,
    messages: tuple[ChatMessage, ...],
    usage: Usage,
    total_tokens: int,
    pii_only: bool,
    kinds_txt: str,
    notes: list[str],
    unhealthy: frozenset[str],
    downgrade: bool,
    redacted: bool,
) -> Routed:
    """An explicit ``job.model`` wins over cost, but is still checked against the catalog and the policy."""
    assert job.model is not None
    model = catalog.get(job.model)
    if model is None:
        raise InvalidRequest(f"unknown model '{job.model}'; see `farebox catalog show`")
    refusal = _refusal(model, policy, rules, cap)
    if refusal is not None:
        raise PolicyBlocked(f"{refusal}; remove the pin or pick an allowed model")
    if pii_only and "pii" not in model.compliance:
        approved = sorted(m.target for m in catalog.models.values() if "pii" in m.compliance)
        raise PolicyBlocked(
            f"personal data found in the prompt ({kinds_txt}); pinned model '{model.target}' is not approved "
            f"for personal data (approved: {', '.join(approved) or 'none'})"
        )
    if not _fits(model, total_tokens):
        raise InvalidRequest(
            f"prompt is {usage.input_tokens} tokens plus about {usage.output_tokens} expected output tokens, "
            f"more than the context window of '{model.target}' ({model.context_window}); shorten the prompt, "
            "lower max_tokens or pin a larger model"
        )
    extra = []
    if model.deprecated:
        extra.append("model is deprecated")
    if _is_unhealthy(model, unhealthy):
        extra.append("provider currently marked unhealthy")
    if downgrade:
        extra.append("budget downgrade not applied to a pinned model")
    reason = "; ".join([f"pinned by the job ({model.target})", *extra, *notes])
    return Routed(_decision(model, [model.target], reason, cost_usd(model, usage), redacted), messages)
