"""choose_route: each rule in its own row, on a small synthetic catalog whose right answers are obvious."""

from __future__ import annotations

from typing import Any

import pytest

import farebox.routing.pii as pii_module
from farebox.errors import InvalidRequest, PolicyBlocked
from farebox.routing.catalog import Catalog, cost_usd, load_catalog, parse_catalog
from farebox.routing.choose import choose_route, downgrade_route
from farebox.routing.policy import PiiPolicy, Policy, parse_policy
from farebox.routing.tasks import baseline_cost_usd, estimate_output_tokens, infer_task
from farebox.schemas import Job, Usage
from farebox.settings import CATALOG_DIR


def m(inp: float, out: float, ctx: int, tier: str | None = None, **extra: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "input_cost_per_1k_tokens": inp,
        "output_cost_per_1k_tokens": out,
        "context_window": ctx,
    }
    if tier:
        d["tier"] = tier
    return d | extra


CATALOG_DATA: dict[str, dict[str, Any]] = {
    "openai": {
        "lo-a": m(0.0001, 0.0002, 4000, "low"),
        "mid": m(0.0005, 0.0015, 16000, "medium"),
        "hi": m(0.0025, 0.01, 128000, "high"),
        "thinker": m(0.0001, 0.0004, 200000, "high", capabilities=["reasoning"]),
        "untiered": m(0.00001, 0.00001, 8000),
        "gpt-4-turbo": m(0.01, 0.03, 128000, "high"),
    },
    "anthropic": {
        "mid-pii": m(0.0008, 0.004, 200000, "medium", compliance=["pii"]),
        "hi-pii": m(0.003, 0.015, 200000, "high", compliance=["pii"]),
    },
    "google": {
        "lo-b": m(0.0001, 0.0002, 4000, "low"),  # same price as openai/lo-a: the tie-break decides
        "hi-long": m(0.005, 0.02, 1_000_000, "high"),
        "old": m(0.00001, 0.00001, 8000, "low", deprecated=True),
    },
}
POLICY_DATA: dict[str, Any] = {
    "baseline_model": "openai/gpt-4-turbo",
    "default_model": "openai/lo-a",
    "tasks": {
        "classify": {"default_tier": "low"},
        "reason": {"min_tier": "high"},
    },
    "user_tiers": {"free": {"max_tier": "medium"}, "enterprise": {"min_tier": "medium"}},
    "tenants": {
        "globex": {"deny": ["google/*"]},
        "lonely": {"allow": ["openai/lo-a"]},
        "nowhere": {"allow": ["openai/mid"]},
        "strict": {"pii_action": "block"},
    },
    "pii": {"action": "redact"},
}
CAT = parse_catalog(CATALOG_DATA, "test-catalog")
POL = parse_policy(POLICY_DATA, "test-policy")


def job(**kw: Any) -> Job:
    kw.setdefault("prompt", "hello there")
    return Job(**kw)


def with_pii(action: str) -> Policy:
    return POL.model_copy(update={"pii": PiiPolicy(action=action)})


@pytest.mark.parametrize(
    ("kw", "input_tokens", "target", "reason_part"),
    [
        # quality tiers
        ({"quality": "low"}, 100, "google/lo-b", "cheapest low-or-better"),
        ({"quality": "medium"}, 100, "openai/mid", "quality=medium"),
        ({"quality": "high"}, 100, "openai/hi", "quality=high"),
        ({}, 100, "openai/mid", "quality=medium"),  # default quality
        # task rules
        ({"quality": "low", "task": "reason"}, 100, "openai/hi", "task reason needs high"),
        ({"task": "classify"}, 100, "google/lo-b", "task classify defaults to low"),
        ({"task": "classify", "quality": "medium"}, 100, "openai/mid", "quality=medium"),  # explicit wins
        ({"prompt": "Solve step by step: 3x = 12", "quality": "low"}, 100, "openai/hi", "task=reason"),
        # reasoning models only with room for their hidden tokens
        ({"quality": "high", "max_tokens": 2000}, 100, "openai/thinker", "quality=high"),
        # user tiers
        ({"quality": "high", "user_tier": "free"}, 100, "openai/mid", "capped at medium"),
        (
            {"quality": "low", "user_tier": "enterprise"},
            100,
            "openai/mid",
            "user tier enterprise needs medium",
        ),
        ({"quality": "low", "user_tier": "unknown-tier"}, 100, "google/lo-b", "quality=low"),
        # tenant allow/deny
        ({"quality": "low", "tenant": "globex"}, 100, "openai/lo-a", "cheapest"),
        # context windows: too long for the cheap ones, routed to the ones that fit
        ({"quality": "low"}, 5000, "openai/mid", "cheapest"),
        ({"quality": "medium"}, 150_000, "anthropic/mid-pii", "cheapest"),
        ({"quality": "high"}, 500_000, "google/hi-long", "1 candidate"),
        # nothing qualifies: the policy's default model
        ({"quality": "high", "tenant": "lonely"}, 100, "openai/lo-a", "default model"),
    ],
)
def test_route_rules(kw: dict[str, Any], input_tokens: int, target: str, reason_part: str) -> None:
    routed = choose_route(job(**kw), CAT, POL, input_tokens=input_tokens)
    d = routed.decision
    assert d.target == target
    assert d.candidates[0] == target
    assert reason_part in d.reason
    # candidates are cost-ordered and never include deprecated or untiered models
    assert "google/old" not in d.candidates and "openai/untiered" not in d.candidates


def test_candidates_sorted_by_cost_with_tie_break_and_estimate() -> None:
    j = job(quality="low")
    d = choose_route(j, CAT, POL, input_tokens=1000).decision
    out = estimate_output_tokens(j, infer_task(j))
    costs = [cost_usd(CAT.models[t], Usage(input_tokens=1000, output_tokens=out)) for t in d.candidates]
    assert costs == sorted(costs)
    assert d.candidates[:2] == ("google/lo-b", "openai/lo-a")  # equal cost: by target name
    assert d.estimated_cost_usd == pytest.approx(costs[0])
    assert "deprecated" not in d.reason


def test_tie_break_ignores_catalog_order() -> None:
    reversed_data = {p: dict(reversed(list(ms.items()))) for p, ms in reversed(list(CATALOG_DATA.items()))}
    other = parse_catalog(reversed_data, "reversed")
    for kw in ({"quality": "low"}, {"quality": "medium"}, {"quality": "high"}):
        a = choose_route(job(**kw), CAT, POL, input_tokens=100).decision
        b = choose_route(job(**kw), other, POL, input_tokens=100).decision
        assert a == b


@pytest.mark.parametrize(
    ("unhealthy", "target", "absent"),
    [
        (frozenset({"openai"}), "anthropic/hi-pii", "openai/hi"),
        (frozenset({"openai/hi"}), "anthropic/hi-pii", "openai/hi"),
        (frozenset({"anthropic"}), "openai/hi", "anthropic/hi-pii"),
    ],
)
def test_unhealthy_routed_around(unhealthy: frozenset[str], target: str, absent: str) -> None:
    d = choose_route(job(quality="high"), CAT, POL, input_tokens=100, unhealthy=unhealthy).decision
    assert d.target == target
    assert absent not in d.candidates
    assert "routed around unhealthy" in d.reason


def test_all_unhealthy_still_routes() -> None:
    every = frozenset(CAT.providers())
    d = choose_route(job(quality="high"), CAT, POL, input_tokens=100, unhealthy=every).decision
    assert d.target == "openai/hi"
    assert "routing anyway" in d.reason


@pytest.mark.parametrize(
    ("kw", "target"),
    [
        ({"quality": "high"}, "google/lo-b"),
        ({"quality": "high", "task": "reason"}, "google/lo-b"),
        ({"quality": "high", "tenant": "globex"}, "openai/lo-a"),  # still obeys the tenant's deny list
    ],
)
def test_downgrade_picks_cheapest(kw: dict[str, Any], target: str) -> None:
    d = choose_route(job(**kw), CAT, POL, input_tokens=100, downgrade=True).decision
    assert d.target == target
    assert d.reason.startswith("budget downgrade")


# --- pins ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("model", "reason_part"),
    [
        ("openai/hi", "pinned by the job"),
        ("google/old", "deprecated"),
        ("openai/untiered", "pinned by the job"),
    ],
)
def test_pin_known(model: str, reason_part: str) -> None:
    d = choose_route(job(model=model, quality="low"), CAT, POL, input_tokens=100).decision
    assert d.target == model
    assert d.candidates == (model,)
    assert reason_part in d.reason


def test_pin_with_downgrade_and_unhealthy_is_kept_and_explained() -> None:
    d = choose_route(
        job(model="openai/hi"), CAT, POL, input_tokens=100, downgrade=True, unhealthy=frozenset({"openai"})
    ).decision
    assert d.target == "openai/hi"
    assert "budget downgrade not applied" in d.reason and "unhealthy" in d.reason


SECRET_PROMPT = "my card is 4111 1111 1111 1111 and mail jane@x.io"


@pytest.mark.parametrize(
    ("kw", "input_tokens", "policy", "error", "message_part"),
    [
        ({"model": "x/y"}, 100, POL, InvalidRequest, "unknown model 'x/y'; see `farebox catalog show`"),
        ({"model": "openai/lo-a"}, 5000, POL, InvalidRequest, "context window of 'openai/lo-a'"),
        ({"model": "openai/hi", "user_tier": "free"}, 100, POL, PolicyBlocked, "above this job's cap"),
        (
            {"model": "google/lo-b", "tenant": "globex"},
            100,
            POL,
            PolicyBlocked,
            "not allowed for tenant globex",
        ),
        (
            {"model": "openai/hi", "prompt": SECRET_PROMPT},
            100,
            with_pii("block"),
            PolicyBlocked,
            "card, email",
        ),
        (
            {"model": "openai/hi", "prompt": SECRET_PROMPT},
            100,
            with_pii("route"),
            PolicyBlocked,
            "not approved",
        ),
        ({"prompt": SECRET_PROMPT}, 100, with_pii("block"), PolicyBlocked, "(card, email)"),
        ({"prompt": SECRET_PROMPT, "tenant": "strict"}, 100, POL, PolicyBlocked, "policy blocks"),
        (
            {"prompt": SECRET_PROMPT, "quality": "low"},
            300_000,
            with_pii("route"),
            PolicyBlocked,
            "no pii-approved",
        ),
        ({"quality": "low"}, 2_000_000, POL, InvalidRequest, "more than the context window of every"),
        ({"quality": "high", "tenant": "nowhere"}, 100, POL, InvalidRequest, "no model in the catalog meets"),
    ],
)
def test_route_errors(
    kw: dict[str, Any], input_tokens: int, policy: Policy, error: type[Exception], message_part: str
) -> None:
    j = job(**kw)
    with pytest.raises(error) as exc_info:
        choose_route(j, CAT, policy, input_tokens=input_tokens)
    message = str(exc_info.value)
    assert message_part in message
    # never the prompt, never the values found in it
    assert "4111" not in message and "jane@" not in message and j.chat[0].content not in message


# --- PII actions -------------------------------------------------------------------------------
def test_pii_redact_sends_redacted_messages() -> None:
    routed = choose_route(job(prompt=SECRET_PROMPT), CAT, with_pii("redact"), input_tokens=100)
    assert routed.decision.redacted
    assert routed.messages[0].content == "my card is [REDACTED:card] and mail [REDACTED:email]"
    assert "personal data redacted (card, email)" in routed.decision.reason


def test_pii_route_only_compliant_models() -> None:
    routed = choose_route(job(prompt=SECRET_PROMPT, quality="low"), CAT, with_pii("route"), input_tokens=100)
    d = routed.decision
    assert d.candidates == ("anthropic/mid-pii", "anthropic/hi-pii")
    assert routed.messages[0].content == SECRET_PROMPT  # routed, not redacted
    assert "pii-approved models only" in d.reason


def test_pii_route_pin_to_compliant_model_is_fine() -> None:
    d = choose_route(job(prompt=SECRET_PROMPT, model="anthropic/hi-pii"), CAT, with_pii("route"), input_tokens=9)
    assert d.decision.target == "anthropic/hi-pii"


def test_pii_allow_leaves_everything() -> None:
    routed = choose_route(job(prompt=SECRET_PROMPT, quality="low"), CAT, with_pii("allow"), input_tokens=100)
    assert routed.messages[0].content == SECRET_PROMPT
    assert routed.decision.target == "google/lo-b" and not routed.decision.redacted


def test_pii_kinds_filter() -> None:
    policy = POL.model_copy(update={"pii": PiiPolicy(action="block", kinds=("ssn",))})
    routed = choose_route(job(prompt="mail jane@x.io"), CAT, policy, input_tokens=10)  # email not in kinds
    assert routed.messages[0].content == "mail jane@x.io"


def test_clean_prompt_not_marked() -> None:
    routed = choose_route(job(prompt="In 2024 order 12345678 shipped"), CAT, with_pii("block"), input_tokens=10)
    assert not routed.decision.redacted


@pytest.mark.parametrize(
    ("kw", "policy", "unhealthy"),
    [
        ({"quality": "high"}, POL, frozenset()),
        ({"quality": "high", "task": "reason"}, POL, frozenset({"google"})),
        ({"quality": "high", "tenant": "globex"}, POL, frozenset()),
        ({"quality": "high", "user_tier": "free"}, POL, frozenset()),
        ({"quality": "high", "tenant": "lonely"}, POL, frozenset()),  # the policy's default model
        ({"prompt": SECRET_PROMPT, "quality": "high"}, with_pii("redact"), frozenset()),
        ({"prompt": SECRET_PROMPT, "quality": "high"}, with_pii("route"), frozenset({"anthropic/mid-pii"})),
        ({"model": "openai/hi"}, POL, frozenset({"openai"})),  # a pin stays, and says so
    ],
)
def test_downgrade_from_the_first_pass_equals_routing_again(
    kw: dict[str, Any], policy: Policy, unhealthy: frozenset[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    j = job(**kw)
    again = choose_route(j, CAT, policy, input_tokens=100, unhealthy=unhealthy, downgrade=True)
    scans: list[str] = []
    real_scan = pii_module.scan

    def counting_scan(text: str) -> list[pii_module.PiiFinding]:
        scans.append(text)
        return real_scan(text)

    monkeypatch.setattr(pii_module, "scan", counting_scan)
    first = choose_route(j, CAT, policy, input_tokens=100, unhealthy=unhealthy)
    downgraded = downgrade_route(first)
    assert downgraded.decision == again.decision
    assert downgraded.messages == again.messages
    assert len(scans) == len(j.chat)  # the downgrade reused the first pass's scan


# --- task and output estimates -------------------------------------------------------------
@pytest.mark.parametrize(
    ("kw", "task"),
    [
        ({"task": "code", "prompt": "summarize this"}, "code"),  # the field wins
        ({"prompt": "Summarize the following passage in two sentences."}, "summarize"),
        ({"prompt": "Answer with the letter of the correct option only.\n\nA) x"}, "classify"),
        ({"prompt": "Extract the key facts from the message above as JSON."}, "extract"),
        ({"prompt": "Write a Python function that reverses a list"}, "code"),
        ({"prompt": "Natalia sold clips to 48 friends. How many clips did she sell?"}, "reason"),
        ({"prompt": "Explain how photosynthesis works"}, "explain"),
        ({"prompt": "Compose a poem about the sea"}, "generate"),
        ({"prompt": "hi!"}, "chat"),
        (
            {"messages": [{"role": "system", "content": "summarize"}, {"role": "user", "content": "hello"}]},
            "chat",  # the last user message decides, not the system prompt
        ),
    ],
)
def test_infer_task(kw: dict[str, Any], task: str) -> None:
    assert infer_task(Job(**kw)) == task


@pytest.mark.parametrize(
    ("task", "max_tokens", "expected"),
    [("classify", 5, 5), ("classify", 256, 10), ("summarize", 120, 72), ("reason", 400, 320), ("chat", 1, 1)],
)
def test_estimate_output_tokens(task: str, max_tokens: int, expected: int) -> None:
    assert estimate_output_tokens(job(max_tokens=max_tokens), task) == expected


def test_baseline_cost() -> None:
    usage = Usage(input_tokens=1000, output_tokens=1000)
    assert baseline_cost_usd(POL, CAT, usage) == pytest.approx(0.04)


# --- the bundled data, end to end ---------------------------------------------------------------
def bundled() -> tuple[Catalog, Policy]:
    from farebox.routing.policy import load_policy
    from farebox.routing.strategies import RouterRule

    # Pinned to the rules router (quality low/medium/high needs that tier): tests/test_route_learned.py routes
    # the bundled data with the learned router the bundled policy names.
    policy = load_policy(CATALOG_DIR / "policy.json").model_copy(update={"router": RouterRule()})
    return load_catalog(CATALOG_DIR / "model_costs.json"), policy


@pytest.mark.parametrize(
    ("kw", "tier"),
    [
        ({"task": "classify", "max_tokens": 5}, "low"),
        ({"quality": "medium"}, "medium"),
        ({"task": "reason", "quality": "high", "max_tokens": 400}, "high"),
    ],
)
def test_bundled_routes_by_tier(kw: dict[str, Any], tier: str) -> None:
    catalog, policy = bundled()
    d = choose_route(job(**kw), catalog, policy, input_tokens=200).decision
    info = catalog.get(d.target)
    assert info is not None and info.tier == tier and not info.deprecated
    assert d.estimated_cost_usd < baseline_cost_usd(policy, catalog, Usage(input_tokens=200, output_tokens=400))
