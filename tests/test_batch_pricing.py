"""The batch price lane without services: the policy's lane rules, batch prices in the catalog, routing on the
lane, the result's price, and `farebox submit --lane`."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from farebox.routing.batch_lane import BatchPolicy, price_lane
from farebox.routing.catalog import ModelInfo, cost_usd, has_batch_price, load_catalog, parse_catalog
from farebox.routing.choose import choose_route, downgrade_route
from farebox.routing.litellm_prices import import_litellm
from farebox.routing.policy import parse_policy
from farebox.schemas import Envelope, Job, Usage
from farebox.schemas.envelope import Outcome, RouteDecision
from farebox.schemas.job import PriceLane
from farebox.settings import CATALOG_DIR
from farebox.stages.results import build_result, sync_cost_usd
from farebox.submit import parse_line, with_lane


# --- the policy's lane ------------------------------------------------------------------------------------------
def lane_job(**kw: Any) -> Job:
    return Job(prompt="hi", **kw)


POLICY = BatchPolicy(default="sync", tenants={"acme": "batch", "rush": "sync"}, user_tiers={"free": "batch"})


@pytest.mark.parametrize(
    ("job", "priority", "lane", "reason"),
    [
        ({"lane": "batch"}, "interactive", "batch", "job asked for the batch lane"),
        ({"lane": "sync", "tenant": "acme"}, "background", "sync", "job asked for the sync lane"),
        ({"tenant": "acme"}, "interactive", "sync", "interactive job"),
        ({"tenant": "rush", "user_tier": "free"}, "background", "batch", "policy batch.user_tiers[free]"),
        ({"tenant": "acme", "user_tier": "pro"}, "background", "batch", "policy batch.tenants[acme]"),
        ({"tenant": "rush"}, "background", "sync", "policy batch.tenants[rush]"),
        ({}, "background", "sync", "policy batch.default"),
        (
            {"tenant": "acme", "deadline_s": 3600},
            "background",
            "sync",
            "deadline_s 3600 s is shorter than the batch lane's min_deadline_s 86400 s",
        ),
        ({"lane": "batch", "deadline_s": 90000}, "background", "batch", "job asked for the batch lane"),
        ({"lane": "sync", "deadline_s": 60}, "background", "sync", "job asked for the sync lane"),
    ],
)
def test_price_lane_rules(job: dict[str, Any], priority: str, lane: str, reason: str) -> None:
    assert price_lane(POLICY, lane_job(**job), priority) == (lane, reason)


def test_a_zero_min_deadline_keeps_short_deadlines_on_the_batch_lane() -> None:
    policy = BatchPolicy(default="batch", min_deadline_s=0)
    assert price_lane(policy, lane_job(deadline_s=10), "background") == ("batch", "policy batch.default")


@pytest.mark.parametrize(
    ("section", "field"),
    [
        ({"linger_s": 0}, "linger_s"),
        ({"linger_s": 86401}, "linger_s"),
        ({"max_requests": 0}, "max_requests"),
        ({"max_bytes": 0}, "max_bytes"),
        ({"min_deadline_s": -1}, "min_deadline_s"),
        ({"on_line_error": "retry"}, "on_line_error"),
        ({"default": "fast"}, "default"),
        ({"lingr_s": 5}, "lingr_s"),
    ],
)
def test_the_batch_section_is_validated(section: dict[str, Any], field: str) -> None:
    with pytest.raises(Exception, match=field):
        parse_policy({"batch": section}, "p.json")


def test_the_batch_sections_tenants_are_named_and_the_bundled_policy_stays_sync() -> None:
    policy = parse_policy({"batch": {"tenants": {"acme": "batch"}}}, "p.json")
    assert "acme" in policy.named_tenants
    bundled = json.loads((CATALOG_DIR / "policy.json").read_text())
    assert "batch" not in bundled and any("batch" in line for line in bundled["_about"])
    assert parse_policy(bundled, "bundled").batch == BatchPolicy()


# --- batch prices -----------------------------------------------------------------------------------------------
def info(**kw: Any) -> ModelInfo:
    base: dict[str, Any] = {"provider": "openai", "model": "x", "input_cost_per_1k": 1.0, "output_cost_per_1k": 4.0}
    return ModelInfo(**(base | kw))


BATCHY = {"batch_input_cost_per_1k": 0.5, "batch_output_cost_per_1k": 2.0}
USAGE = Usage(input_tokens=1000, output_tokens=1000, cached_input_tokens=400)


@pytest.mark.parametrize(
    ("model", "batch", "expected"),
    [
        (info(), False, 0.6 * 1 + 0.4 * 1 + 4),  # no cached price: cached tokens at the input rate
        (info(), True, 0.6 * 1 + 0.4 * 1 + 4),  # no batch price: the sync price
        (info(cached_input_cost_per_1k=0.1), False, 0.6 + 0.04 + 4),
        (info(cached_input_cost_per_1k=0.1, **BATCHY), False, 0.6 + 0.04 + 4),  # sync unchanged
        # The discounts stack: the cached rate scaled by the batch discount on input (0.1 * 0.5/1.0).
        (info(cached_input_cost_per_1k=0.1, **BATCHY), True, 0.6 * 0.5 + 0.4 * 0.05 + 4 * 0.5),
        # The catalog's own batch cached rate wins.
        (info(cached_input_cost_per_1k=0.1, batch_cached_input_cost_per_1k=0.02, **BATCHY), True, 0.3 + 0.008 + 2),
        (info(**BATCHY), True, 0.6 * 0.5 + 0.4 * 0.5 + 2),  # no cached rate at all: the batch input rate
        (info(batch_input_cost_per_1k=0.5), True, 0.6 + 0.4 + 4),  # half a batch price is no batch price
    ],
)
def test_cost_usd_on_each_lane(model: ModelInfo, batch: bool, expected: float) -> None:
    assert math.isclose(cost_usd(model, USAGE, batch=batch), expected, rel_tol=1e-12)


@pytest.mark.parametrize(
    ("model", "expected"),
    [(info(), False), (info(batch_input_cost_per_1k=0.5), False), (info(**BATCHY), True)],
)
def test_has_batch_price(model: ModelInfo, expected: bool) -> None:
    assert has_batch_price(model) is expected


def test_a_cache_hit_in_a_batch_is_not_billed_at_the_batch_input_rate() -> None:
    """LiteLLM bills cached tokens of a batch at the full batch input rate; the providers discount both."""
    catalog = load_catalog(CATALOG_DIR / "model_costs.json")
    for target in ("openai/gpt-4o-mini", "anthropic/claude-haiku-4-5"):
        model = catalog.get(target)
        assert model is not None and has_batch_price(model)
        cached_only = Usage(input_tokens=1000, output_tokens=0, cached_input_tokens=1000)
        uncached = Usage(input_tokens=1000, output_tokens=0)
        assert cost_usd(model, cached_only, batch=True) < cost_usd(model, uncached, batch=True)
    haiku = catalog.get("anthropic/claude-haiku-4-5")
    assert haiku is not None and haiku.batch_cached_input_cost_per_1k == pytest.approx(0.00005)


def test_the_catalog_reads_and_the_importer_maps_the_batch_cached_price() -> None:
    entry = {
        "input_cost_per_1k_tokens": 1,
        "output_cost_per_1k_tokens": 2,
        "batch_cached_input_cost_per_1k_tokens": 0.05,
    }
    assert parse_catalog({"openai": {"m": entry}}, "c").models["openai/m"].batch_cached_input_cost_per_1k == 0.05
    litellm = {
        "m": {
            "litellm_provider": "openai",
            "mode": "chat",
            "input_cost_per_token": 1e-6,
            "output_cost_per_token": 2e-6,
            "input_cost_per_token_batches": 5e-7,
            "output_cost_per_token_batches": 1e-6,
            "cache_read_input_token_cost_batches": 5e-8,
        }
    }
    assert import_litellm(litellm)["openai"]["m"]["batch_cached_input_cost_per_1k_tokens"] == 0.00005


# --- routing on the lane ----------------------------------------------------------------------------------------
def price(inp: float, out: float, tier: str, batch: bool = False) -> dict[str, Any]:
    d: dict[str, Any] = {"input_cost_per_1k_tokens": inp, "output_cost_per_1k_tokens": out, "tier": tier}
    if batch:
        d |= {"batch_input_cost_per_1k_tokens": inp / 2, "batch_output_cost_per_1k_tokens": out / 2}
    return d


# cheap-sync is the cheapest synchronously; batchy is cheaper than it only at its batch price.
CATALOG = parse_catalog(
    {
        "openai": {
            "cheap-sync": price(0.0004, 0.0008, "low"),
            "batchy": price(0.0006, 0.0012, "low", batch=True),
            "premium": price(0.01, 0.03, "high", batch=True),
        },
        "local": {"compat": price(0.0005, 0.001, "low", batch=True)},  # the cheapest batch price, no Batch API
    },
    "c",
)
ROUTE_POLICY = parse_policy({"baseline_model": "openai/premium", "default_model": "openai/cheap-sync"}, "p")
ASKED: tuple[PriceLane, str] = ("batch", "job asked for the batch lane")
OPENAI = frozenset({"openai"})


def route(batch: tuple[Any, str] = ("sync", ""), providers: frozenset[str] = OPENAI, **kw: Any) -> RouteDecision:
    job = Job(prompt="Classify this.", task="classify", quality="low", **kw)
    return choose_route(job, CATALOG, ROUTE_POLICY, input_tokens=50, batch=batch, batch_providers=providers).decision


@pytest.mark.parametrize(
    ("batch", "providers", "kw", "target", "lane", "head"),
    [
        (("sync", "policy batch.default"), OPENAI, {}, "openai/cheap-sync", "sync", "cheapest low-or-better"),
        (ASKED, OPENAI, {}, "openai/batchy", "batch", "batch lane (job asked for the batch lane; batch prices)"),
        (
            ASKED,
            frozenset(),
            {},
            "openai/cheap-sync",
            "sync",
            "sync lane (asked for batch, but provider openai has no Batch API configured)",
        ),
        (
            ASKED,
            OPENAI,
            {"model": "openai/cheap-sync"},
            "openai/cheap-sync",
            "sync",
            "sync lane (asked for batch, but openai/cheap-sync has no batch price)",
        ),
        (ASKED, OPENAI, {"model": "openai/batchy"}, "openai/batchy", "batch", "batch lane (job asked"),
        (
            ASKED,
            OPENAI,
            {"model": "local/compat"},
            "local/compat",
            "sync",
            "sync lane (asked for batch, but provider local has no Batch API configured)",
        ),
    ],
)
def test_route_on_the_price_lane(
    batch: tuple[Any, str], providers: frozenset[str], kw: dict[str, Any], target: str, lane: str, head: str
) -> None:
    decision = route(batch, providers, **kw)
    assert (decision.target, decision.price_lane) == (target, lane)
    assert decision.reason.startswith(head)
    model = CATALOG.get(target)
    assert model is not None
    job = Job(prompt="Classify this.", task="classify", quality="low", **kw)
    usage = choose_route(job, CATALOG, ROUTE_POLICY, input_tokens=50).context.usage
    assert decision.estimated_cost_usd == cost_usd(model, usage, batch=lane == "batch")


def test_sync_lane_routes_exactly_as_without_the_lane() -> None:
    job = Job(prompt="Classify this.", task="classify", quality="low")
    plain = choose_route(job, CATALOG, ROUTE_POLICY, input_tokens=50).decision
    assert route(("sync", "interactive job")) == plain
    assert plain.price_lane == "sync" and not plain.reason.startswith(("sync lane", "batch lane"))


def test_batch_candidates_are_ordered_by_their_lanes_price() -> None:
    assert route(ASKED).candidates[:3] == ("openai/batchy", "openai/cheap-sync", "local/compat")


def test_a_budget_downgrade_keeps_the_lane() -> None:
    job = Job(prompt="Prove it.", task="reason", quality="high")
    routed = choose_route(job, CATALOG, ROUTE_POLICY, input_tokens=50, batch=ASKED, batch_providers=OPENAI)
    assert routed.decision.target == "openai/premium" and routed.decision.price_lane == "batch"
    down = downgrade_route(routed).decision
    assert (down.target, down.price_lane) == ("openai/batchy", "batch")
    assert down.reason.startswith("batch lane (job asked for the batch lane; batch prices); budget downgrade")
    again = choose_route(
        job, CATALOG, ROUTE_POLICY, input_tokens=50, batch=ASKED, batch_providers=OPENAI, downgrade=True
    ).decision
    assert down == again


# --- the result's price -----------------------------------------------------------------------------------------
RESULT_POLICY = parse_policy({"baseline_model": "openai/premium"}, "p")


def finished(price_lane: str, batch_id: str | None, cache: str = "miss") -> Envelope:
    usage = Usage(input_tokens=1000, output_tokens=500, cached_input_tokens=0)
    decision = RouteDecision(
        provider="openai", model="batchy", reason="r", candidates=("openai/batchy",), price_lane=price_lane
    )
    outcome = Outcome(content="ok", provider="openai", model="batchy", usage=usage, batch_id=batch_id)
    return Envelope(
        job_id="j", job=Job(prompt="hi"), received_at=1.0, route=decision, outcome=outcome, cache_status=cache
    )


@pytest.mark.parametrize(
    ("lane", "batch_id", "cache", "at_batch"),
    [
        ("batch", "batch_abc", "miss", True),
        ("batch", None, "miss", False),  # moved back to the sync lane: no batch answered it
        ("sync", None, "miss", False),
    ],
)
def test_the_result_pays_the_lane_it_was_answered_on(
    lane: str, batch_id: str | None, cache: str, at_batch: bool
) -> None:
    env = finished(lane, batch_id, cache)
    result = build_result(env, CATALOG, RESULT_POLICY, now=2.0)
    model, premium = CATALOG.get("openai/batchy"), CATALOG.get("openai/premium")
    assert model is not None and premium is not None and env.outcome is not None
    usage = env.outcome.usage
    assert result.cost_usd == round(cost_usd(model, usage, batch=at_batch), 9)
    assert result.baseline_cost_usd == round(cost_usd(premium, usage), 9)  # the baseline's sync price always
    assert result.route is not None and result.route.lane == ("batch" if at_batch else "sync")
    assert sync_cost_usd(env, CATALOG) == (round(cost_usd(model, usage), 9) if at_batch else None)


def test_a_cache_hit_of_a_batch_answer_costs_nothing_and_is_no_batch_job() -> None:
    result = build_result(finished("batch", "batch_abc", "hit"), CATALOG, RESULT_POLICY, now=2.0)
    assert result.cost_usd == 0.0 and result.route is not None and result.route.lane == "sync"


# --- farebox submit --lane --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("line", "flag", "lane"),
    [
        ({"prompt": "a"}, "batch", "batch"),
        ({"prompt": "a"}, "sync", "sync"),
        ({"prompt": "a"}, None, None),
        ({"prompt": "a", "lane": "sync"}, "batch", "sync"),  # the line's own lane wins
        ({"prompt": "a", "lane": "batch"}, None, "batch"),
    ],
)
def test_submit_lane_sets_the_lane_of_jobs_without_one(line: dict[str, Any], flag: Any, lane: str | None) -> None:
    text = json.dumps(line)
    job = parse_line(3, text, flag)
    assert job.lane == lane
    assert job.job_id == parse_line(3, text).job_id  # --lane does not change a line's stable job_id
    assert with_lane(Job(prompt="a"), flag).lane == flag


def test_submit_parses_the_lane_flag(tmp_path: Path) -> None:
    from farebox.cli import build_parser

    args = build_parser().parse_args(["submit", "--lane", "batch", str(tmp_path / "jobs.jsonl")])
    assert args.lane == "batch"
    assert build_parser().parse_args(["submit", "f.jsonl"]).lane is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["submit", "--lane", "cheap", "f.jsonl"])
