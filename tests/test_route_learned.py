"""Routing with the learned router the policy names (issue 17): the policy's ``router`` field and its checks,
the tier a score gives and how the rules apply on top of it, the router file as part of the hot-reloaded
unit, `farebox catalog check`, and the real route stage end to end with the builtin router."""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import uuid
from pathlib import Path
from typing import Any

import pytest

from farebox.cli.catalog import add_commands
from farebox.routing.catalog import CatalogError, parse_catalog
from farebox.routing.choose import choose_route, downgrade_route
from farebox.routing.learned import FORMAT, LearnedRouter, load_router, prompt_text, router_from_document
from farebox.routing.policy import load_policy, parse_policy
from farebox.routing.store import CatalogStore, load_pair
from farebox.routing.strategies import RouterRule
from farebox.schemas import Job
from farebox.settings import CATALOG_DIR, Settings
from farebox.tokens import count_messages
from tests.support.files import Clock, write
from tests.support.pipeline import InProcessPipeline

# --- a tiny real router: one feature, log1p(characters), so a prompt of n characters scores exactly
# sigmoid(log1p(n) - log1p(100)) = (n + 1) / (n + 102): 100 characters score 0.5, 2 score 0.029, 1000 0.908.
LEVELS = {"low": 0.85, "medium": 0.95, "high": 0.98}
THRESHOLDS = {0.85: 0.7, 0.95: 0.5, 0.98: 0.3}


def router_doc(intercept: float = 0.0) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": 1,  # one linear model over the whole text (version 2 adds the choice model and knots)
        "features": ["log_chars"],
        "model": {"kind": "ridge-on-gain", "mean": [0.0], "scale": [1.0], "coef": [1.0], "intercept": [intercept]},
        "calibration": {
            "platt": [1.0, -math.log1p(100)],
            "levels": list(THRESHOLDS),
            "thresholds": list(THRESHOLDS.values()),
        },
        "training": {"rows": 3, "data_sha256": "0" * 64},
    }


ROUTER = router_from_document(router_doc(), "tiny")


def model(price: float, tier: str) -> dict[str, Any]:
    return {
        "input_cost_per_1k_tokens": price,
        "output_cost_per_1k_tokens": price,
        "context_window": 100_000,
        "tier": tier,
    }


CATALOG = parse_catalog(
    {
        "openai": {
            "lo": model(0.0001, "low"),
            "mid": model(0.001, "medium"),
            "hi": model(0.01, "high"),
            "gpt-4-turbo": model(0.03, "high"),
        }
    },
    "catalog.json",
)
LEARNED = {"kind": "learned", "path": "router.json", "levels": LEVELS, "premium_tier": "high", "economy_tier": "low"}
POLICY_DATA: dict[str, Any] = {
    "baseline_model": "openai/gpt-4-turbo",
    "default_model": "openai/lo",
    "tasks": {"classify": {"default_tier": "low"}, "extract": {"min_tier": "medium"}, "reason": {"min_tier": "high"}},
    "user_tiers": {"free": {"max_tier": "medium"}, "enterprise": {"min_tier": "medium"}},
    "router": LEARNED,
}
POLICY = parse_policy(POLICY_DATA, "policy.json")
TIER_OF = {"openai/lo": "low", "openai/mid": "medium", "openai/hi": "high"}


def text(n: int) -> str:
    return "x" * n


def score_of(n: int) -> float:
    return (n + 1) / (n + 102)


@pytest.mark.parametrize(
    ("n", "job", "tier", "reason"),
    [
        # the router alone: the score against the threshold of the job's quality
        (
            2,
            {"quality": "medium"},
            "low",
            "learned router score 0.0288 < 0.5000 (quality=medium keeps 95% of premium "
            "quality): tier low; cheapest low-or-better model for task=chat; 4 candidates",
        ),
        (
            1000,
            {"quality": "medium"},
            "high",
            "learned router score 0.9083 >= 0.5000 (quality=medium keeps 95% of "
            "premium quality): tier high; cheapest high-or-better model for task=chat; 2 candidates",
        ),
        (100, {"quality": "medium"}, "high", "score 0.5000 >= 0.5000"),  # at the threshold: premium
        (100, {"quality": "low"}, "low", "score 0.5000 < 0.7000 (quality=low keeps 85% of premium quality): tier low"),
        (300, {"quality": "low"}, "high", "score 0.7488 >= 0.7000"),
        (100, {"quality": "high"}, "high", "score 0.5000 >= 0.3000 (quality=high keeps 98% of premium quality)"),
        (2, {"quality": "high"}, "low", "score 0.0288 < 0.3000"),  # an easy prompt needs no premium model
        (2, {}, "low", "quality=medium keeps 95%"),  # the job's default quality names a level too
        # the task's rules on top
        (
            2,
            {"task": "extract"},
            "medium",
            "tier low; cheapest medium-or-better model for task=extract (task extract needs medium)",
        ),
        (2, {"task": "reason", "quality": "low"}, "high", "(task reason needs high)"),
        (
            1000,
            {"task": "classify"},
            "low",
            "cheapest low-or-better model for task=classify (task classify defaults to low); 4 candidates",
        ),  # no quality given: the operator's default, no score
        (1000, {"task": "classify", "quality": "medium"}, "high", "learned router score 0.9083 >= 0.5000"),
        # the user tier's bounds on top
        (
            1000,
            {"user_tier": "free"},
            "medium",
            "tier high; cheapest medium-or-better model for task=chat (capped at medium)",
        ),
        (
            2,
            {"user_tier": "enterprise"},
            "medium",
            "tier low; cheapest medium-or-better model for task=chat (user tier enterprise needs medium)",
        ),
        (2, {"user_tier": "pro"}, "low", "score 0.0288 < 0.5000"),  # a user tier without rules changes nothing
    ],
)
def test_score_quality_task_and_user_tier_give_the_tier(n: int, job: dict[str, Any], tier: str, reason: str) -> None:
    d = choose_route(Job(prompt=text(n), **job), CATALOG, POLICY, input_tokens=10, router=ROUTER).decision
    assert TIER_OF[d.target] == tier, d.reason
    assert reason in d.reason, d.reason
    if "defaults to" in reason:
        assert "learned router" not in d.reason


def test_the_tiny_router_scores_as_the_table_says() -> None:
    assert [round(float(s), 6) for s in ROUTER.score([text(2), text(100), text(1000)])] == [
        round(score_of(2), 6),
        0.5,
        round(score_of(1000), 6),
    ]


def test_the_score_covers_every_message(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = count_scores(monkeypatch)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text(40)}]
    choose_route(Job(messages=messages), CATALOG, POLICY, input_tokens=10, router=ROUTER)
    assert seen == [[prompt_text(["Be brief.", text(40)])]]


def count_scores(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    seen: list[list[str]] = []
    real = LearnedRouter.score

    def score(self: LearnedRouter, texts: Any) -> Any:
        seen.append(list(texts))
        return real(self, texts)

    monkeypatch.setattr(LearnedRouter, "score", score)
    return seen


def test_scored_once_per_job_and_not_again_on_downgrade(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = count_scores(monkeypatch)
    first = choose_route(Job(prompt=text(1000)), CATALOG, POLICY, input_tokens=10, router=ROUTER)
    down = downgrade_route(first)
    assert len(seen) == 1
    assert first.decision.target == "openai/hi" and down.decision.target == "openai/lo"
    assert down.decision.reason.startswith(
        "budget downgrade: cheapest eligible model regardless of tier (task=chat; learned router score 0.9083 >= 0.5000"
    )


@pytest.mark.parametrize(
    "job",
    [
        {"model": "openai/mid"},  # a pin: the job chose its model
        {"task": "classify"},  # the task's default tier, as no quality was given
    ],
)
def test_no_score_when_none_is_needed(monkeypatch: pytest.MonkeyPatch, job: dict[str, Any]) -> None:
    seen = count_scores(monkeypatch)
    d = choose_route(Job(prompt=text(1000), **job), CATALOG, POLICY, input_tokens=10, router=ROUTER).decision
    assert seen == [] and "learned router" not in d.reason


def test_pii_block_refuses_before_scoring(monkeypatch: pytest.MonkeyPatch) -> None:
    from farebox.errors import PolicyBlocked

    seen = count_scores(monkeypatch)
    policy = parse_policy({**POLICY_DATA, "pii": {"action": "block"}}, "policy.json")
    with pytest.raises(PolicyBlocked):
        choose_route(Job(prompt="mail jane@example.com"), CATALOG, policy, input_tokens=10, router=ROUTER)
    assert seen == []


def test_a_learned_policy_needs_its_router() -> None:
    with pytest.raises(ValueError, match="learned router: pass the one loaded with it"):
        choose_route(Job(prompt="hi"), CATALOG, POLICY, input_tokens=10)


def test_the_rules_router_ignores_scores() -> None:
    rules = POLICY.model_copy(update={"router": RouterRule()})
    d = choose_route(Job(prompt=text(2), quality="high"), CATALOG, rules, input_tokens=10, router=ROUTER).decision
    assert d.target == "openai/hi" and d.reason.startswith("cheapest high-or-better model for task=chat (quality=high)")


# --- the policy field ------------------------------------------------------------------------------------
def test_absent_router_means_rules() -> None:
    assert parse_policy({}, "p.json").router == RouterRule(kind="rules")


@pytest.mark.parametrize(
    ("router", "message"),
    [
        (
            {**LEARNED, "levels": {**LEVELS, "medium": 0}},
            "field 'router.levels': Value error, level of quality 'medium' is 0: a share of premium quality in (0, 1]",
        ),
        ({**LEARNED, "levels": {**LEVELS, "high": 1.2}}, "level of quality 'high' is 1.2"),
        (
            {**LEARNED, "levels": {"low": 0.8, "high": 0.99}},
            "field 'router': Value error, kind 'learned' needs a level for every quality; missing: medium",
        ),
        ({k: v for k, v in LEARNED.items() if k != "levels"}, "missing: low, medium, high"),
        ({**LEARNED, "levels": {**LEVELS, "hihg": 0.9}}, "field 'router.levels.hihg.[key]'"),
        ({**LEARNED, "economy_tier": "high"}, "economy_tier 'high' must be below premium_tier 'high'"),
        ({**LEARNED, "economy_tier": "medium", "premium_tier": "low"}, "economy_tier 'medium' must be below"),
        ({k: v for k, v in LEARNED.items() if k != "path"}, "kind 'learned' needs 'path'"),
        ({"kind": "rules", "levels": LEVELS}, "levels: only for kind 'learned'"),
        ({"kind": "magic"}, "field 'router.kind': Input should be 'rules' or 'learned'"),
        ({**LEARNED, "threshold": 0.5}, "field 'router.threshold': Extra inputs are not permitted"),
    ],
)
def test_policy_router_checks(router: dict[str, Any], message: str) -> None:
    with pytest.raises(CatalogError) as err:
        parse_policy({"router": router}, "policy.json")
    assert str(err.value).startswith("policy.json: field 'router") and message in str(err.value)
    assert "\n" not in str(err.value)


def test_economy_and_premium_may_be_any_two_tiers_in_order() -> None:
    rule = parse_policy({"router": {**LEARNED, "economy_tier": "medium"}}, "p.json").router
    assert (rule.economy_tier, rule.premium_tier) == ("medium", "high")
    d = choose_route(
        Job(prompt=text(2)), CATALOG, POLICY.model_copy(update={"router": rule}), input_tokens=10, router=ROUTER
    ).decision
    assert d.target == "openai/mid" and "tier medium; cheapest medium-or-better" in d.reason


def test_bundled_policy_names_the_builtin_router() -> None:
    rule = load_policy(CATALOG_DIR / "policy.json").router
    assert (rule.kind, rule.path, rule.levels) == ("learned", "builtin", {"high": 0.98, "medium": 0.95, "low": 0.85})
    _, _, router, _ = load_pair(CATALOG_DIR / "model_costs.json", CATALOG_DIR / "policy.json")
    assert router is not None and router.source.startswith("builtin")


def test_bundled_data_routes_to_economy_or_premium() -> None:
    catalog, policy, router, _ = load_pair(CATALOG_DIR / "model_costs.json", CATALOG_DIR / "policy.json")
    assert router is not None
    for prompt in ("hi", "Prove that the square root of 2 is irrational, step by step, citing each lemma."):
        d = choose_route(Job(prompt=prompt), catalog, policy, input_tokens=20, router=router).decision
        score = float(router.score([prompt])[0])
        threshold = router.threshold(0.95)
        tier = "high" if score >= threshold else "low"
        info = catalog.get(d.target)
        assert info is not None and info.tier == tier, d.reason
        op = ">=" if score >= threshold else "<"
        assert d.reason.startswith(f"learned router score {score:.4f} {op} {threshold:.4f} (quality=medium keeps 95%")


# --- the hot-reloaded unit -------------------------------------------------------------------------------
@pytest.fixture
def unit(tmp_path: Path) -> tuple[Path, Path, Path]:
    cat, pol, rtr = tmp_path / "model_costs.json", tmp_path / "policy.json", tmp_path / "router.json"
    write(cat, {"openai": {"lo": model(0.0001, "low"), "hi": model(0.01, "high")}}, 0)
    write(pol, {"baseline_model": "openai/hi", "router": LEARNED}, 0)  # "router.json": next to the policy
    write(rtr, router_doc(), 0)
    return cat, pol, rtr


def intercept(store: CatalogStore) -> float:
    router = store.current_unit()[2]
    assert router is not None
    return router.intercept


def same(unit: tuple[object, ...], old: tuple[object, ...]) -> bool:
    """The very objects served before (a router holds arrays, so ``==`` is not the question)."""
    return all(a is b for a, b in zip(unit, old, strict=True))


def refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_relative_router_path_is_from_the_policy_folder(
    unit: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    _, _, router, _ = load_pair(unit[0], unit[1])
    assert router is not None and router.source == str(unit[2])


def test_absolute_router_path(unit: tuple[Path, Path, Path], tmp_path: Path) -> None:
    cat, pol, rtr = unit
    other = tmp_path / "models" / "r.json"
    other.parent.mkdir()
    other.write_text(rtr.read_text())
    write(pol, {"baseline_model": "openai/hi", "router": {**LEARNED, "path": str(other)}}, 1)
    _, _, router, _ = load_pair(cat, pol)
    assert router is not None and router.source == str(other)


def test_retrained_router_in_place_is_reloaded(unit: tuple[Path, Path, Path], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="farebox.catalog")
    _, _, rtr = unit
    clock = Clock()
    store = CatalogStore(unit[0], unit[1], clock=clock)
    assert intercept(store) == 0.0
    write(rtr, router_doc(intercept=0.25), 1)  # `farebox router train -o router.json` again
    clock.now += 5
    assert intercept(store) == 0.25 and store.reloads == 1
    assert any("router " + str(rtr) in r.getMessage() for r in caplog.records if "reloaded" in r.getMessage())


@pytest.mark.parametrize(
    ("broken", "said"),
    [
        ("{not json", "router.json: not JSON (line 1"),
        (json.dumps({"format": "something-else"}), "not a farebox router file"),
        (json.dumps({**router_doc(), "features": ["no_such_feature"]}), "unknown features ['no_such_feature']"),
        (
            json.dumps({**router_doc(), "calibration": {"platt": [1, 0], "levels": [0.9, 0.8], "thresholds": [1, 1]}}),
            "calibration levels must increase",
        ),
    ],
)
def test_corrupt_router_is_refused_once_while_the_old_one_serves(
    unit: tuple[Path, Path, Path], caplog: pytest.LogCaptureFixture, broken: str, said: str
) -> None:
    _, pol, rtr = unit
    clock = Clock()
    store = CatalogStore(unit[0], pol, clock=clock)
    old = store.current_unit()
    caplog.set_level(logging.INFO, logger="farebox.catalog")
    write(rtr, broken, 1)
    for _ in range(5):  # many checks of the same broken file: one line
        clock.now += 5
        assert same(store.current_unit(), old)
    [line] = refusals(caplog)
    assert line.startswith(f"catalog reload refused, still serving the previous version: {pol}: field 'router.path': ")
    assert said in line and "\n" not in line
    write(rtr, router_doc(intercept=0.5), 2)  # fixed
    clock.now += 5
    assert intercept(store) == 0.5 and store.last_error is None


def test_policy_naming_a_missing_router_is_refused_then_taken_once_the_file_exists(
    unit: tuple[Path, Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    cat, pol, rtr = unit
    clock = Clock()
    store = CatalogStore(cat, pol, clock=clock)
    old = store.current_unit()
    caplog.set_level(logging.INFO, logger="farebox.catalog")
    write(pol, {"baseline_model": "openai/hi", "router": {**LEARNED, "path": "v2.json"}}, 1)
    for _ in range(3):
        clock.now += 5
        assert same(store.current_unit(), old)  # the old catalog, policy and router keep serving
    [line] = refusals(caplog)
    assert line == (
        f"catalog reload refused, still serving the previous version: {pol}: field 'router.path': "
        f"{pol.parent / 'v2.json'}: router file not found"
    )
    write(rtr, router_doc(intercept=0.75), 2)  # the old router retrained meanwhile: still refused (same unit)
    clock.now += 5
    assert same(store.current_unit(), old)
    write(pol.parent / "v2.json", router_doc(intercept=1.0), 3)  # the file the policy names appears
    clock.now += 5
    assert intercept(store) == 1.0 and store.last_error is None
    assert store.current_unit()[1].router.path == "v2.json"


def test_switching_between_learned_and_rules(unit: tuple[Path, Path, Path]) -> None:
    cat, pol, rtr = unit
    clock = Clock()
    store = CatalogStore(cat, pol, clock=clock)
    write(pol, {"baseline_model": "openai/hi"}, 1)
    clock.now += 5
    assert store.current_unit()[2] is None and store.current()[1].router.kind == "rules"
    write(pol, {"baseline_model": "openai/hi", "router": LEARNED}, 2)
    clock.now += 5
    assert intercept(store) == 0.0
    write(rtr, router_doc(intercept=0.125), 3)  # watched again
    clock.now += 5
    assert intercept(store) == 0.125


@pytest.mark.parametrize(("content", "said"), [(None, "router file not found"), ("[]", "not a farebox router")])
def test_first_load_fails_clearly(unit: tuple[Path, Path, Path], content: str | None, said: str) -> None:
    cat, pol, rtr = unit
    if content is None:
        rtr.unlink()
    else:
        rtr.write_text(content)
    with pytest.raises(CatalogError) as err:
        CatalogStore(cat, pol)
    assert str(err.value).startswith(f"{pol}: field 'router.path': {rtr}: ") and said in str(err.value)


def run_check(catalog: Path, policy: Path) -> int:
    parser = argparse.ArgumentParser(prog="farebox")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["catalog", "check", str(catalog), "--policy", str(policy)])
    code: int = args.func(args, Settings())
    return code


def test_catalog_check_loads_the_router(unit: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    cat, pol, rtr = unit
    assert run_check(cat, pol) == 0
    assert f"learned router {rtr} (trained on 3 rows" in capsys.readouterr().out
    rtr.write_text("{not json")
    assert run_check(cat, pol) == 1
    err = capsys.readouterr().err
    said = "not JSON (line 1: Expecting property name enclosed in double quotes)"
    assert err == f"error: {pol}: field 'router.path': {rtr}: {said}\n"


def test_catalog_check_of_the_bundled_files(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_check(CATALOG_DIR / "model_costs.json", CATALOG_DIR / "policy.json") == 0
    assert "learned router builtin (router.json)" in capsys.readouterr().out


def test_builtin_loads() -> None:
    router = load_router("builtin")
    assert router.score(["hello"]).shape == (1,)


# --- the real route stage, end to end ----------------------------------------------------------------------
REASON = re.compile(
    r"^learned router score (\d\.\d{4}) (>=|<) (\d\.\d{4}) \(quality=(\w+) keeps (\d+)% of premium quality\): "
    r"tier (\w+); cheapest (\w+)-or-better model for task=(\w+)"
)


async def test_pipeline_routes_with_the_builtin_router(pipeline: InProcessPipeline) -> None:
    await pipeline.start()
    catalog, policy, router, _ = load_pair(CATALOG_DIR / "model_costs.json", CATALOG_DIR / "policy.json")
    assert router is not None
    prompts = {
        "hi": "medium",
        "Prove, step by step, that there are infinitely many primes of the form 4k+3.": "high",
        "List three colours.": "low",
    }
    jobs = [
        {"prompt": p, "quality": q, "tenant": "acme", "job_id": str(uuid.uuid4()), "max_tokens": 40}
        for p, q in prompts.items()
    ]
    async with pipeline.client() as client:
        results = {r.job_id: r async for r in client.stream(jobs, max_in_flight=3)}
    levels = {"low": 0.85, "medium": 0.95, "high": 0.98}
    for j in jobs:
        r = results[str(j["job_id"])]
        assert r.status == "ok" and r.route is not None, r.error
        match = REASON.match(r.route.reason)
        assert match, r.route.reason
        score, op, threshold, quality, keeps, tier, need, _ = match.groups()
        expected = float(router.score([str(j["prompt"])])[0])
        level = levels[str(j["quality"])]
        assert score == f"{expected:.4f}" and threshold == f"{router.threshold(level):.4f}"
        assert quality == j["quality"] and int(keeps) == round(level * 100)
        assert op == (">=" if expected >= router.threshold(level) else "<")
        assert tier == ("high" if op == ">=" else "low") and (need == tier or "needs high" in r.route.reason)
        job = Job.model_validate({k: v for k, v in j.items() if k != "job_id"})
        tokens = count_messages((m.role, m.content) for m in job.chat)
        again = choose_route(job, catalog, policy, input_tokens=tokens, router=router).decision
        assert r.route.reason == again.reason  # what the stage said is what routing the job says
