"""The router evaluation figures (farebox/routing/evaluation.py) on hand-computed fixtures, the outcome data
loader (farebox/routing/outcomes.py) and the baselines (farebox/routing/baselines.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from farebox.routing.baselines import random_scores, rules_policy, rules_scores
from farebox.routing.catalog import load_catalog
from farebox.routing.evaluation import apgr, bootstrap, cpt, figures, quality_curve, saving_at
from farebox.routing.outcomes import OutcomeDataError, load_outcomes
from farebox.routing.policy import Policy, checked_policy, load_policy
from farebox.settings import CATALOG_DIR

# The hand fixture: four prompts.
#   strong = [1, 1, 0, 1]  -> q_strong = 3/4
#   weak   = [0, 1, 1, 0]  -> q_weak   = 2/4, gap = 1/4
#   gain   = [1, 0, -1, 1] (what sending each prompt to strong adds)
# Per-prompt cost: strong $10, weak $1, so cost(x) = 1 + 9x and all-strong costs 10.
STRONG = np.array([1.0, 1.0, 0.0, 1.0])
WEAK = np.array([0.0, 1.0, 1.0, 0.0])
C_STRONG = np.full(4, 10.0)
C_WEAK = np.full(4, 1.0)


def test_oracle_curve_by_hand() -> None:
    # The oracle scores by the gain: order {0, 3} (a tie, gains 1 + 1), then 1 (0), then 2 (-1).
    # Corners (share, quality): (0, .5), (.5, .5 + 2/4 = 1), (.75, 1), (1, 1 - 1/4 = .75).
    # PGR = (q - .5) / .25 at the corners: 0, 2, 2, 1. APGR by trapezoids:
    #   [0, .5]: (0 + 2) / 2 * .5 = .5;  [.5, .75]: 2 * .25 = .5;  [.75, 1]: (2 + 1) / 2 * .25 = .375  -> 1.375
    # CPT(50%): quality .5 + .5 * .25 = .625 on the first segment (slope 1): x = .125; CPT(80%): .7 -> x = .2.
    # Saving at 95%: quality .95 * .75 = .7125 at x = .2125: cost 1 + 9 * .2125 = 2.9125, saving 1 - .29125.
    # Saving at 100%: quality .75 at x = .25: cost 3.25, saving .675.
    curve = quality_curve(STRONG - WEAK, STRONG, WEAK)
    assert curve.share.tolist() == [0.0, 0.5, 0.75, 1.0]
    assert curve.quality.tolist() == [0.5, 1.0, 1.0, 0.75]
    assert apgr(curve) == pytest.approx(1.375)
    assert cpt(curve, 0.5) == pytest.approx(0.125)
    assert cpt(curve, 0.8) == pytest.approx(0.2)
    f = figures(STRONG - WEAK, STRONG, WEAK, C_STRONG, C_WEAK)
    assert f.apgr == pytest.approx(1.375)
    assert f.saving95 == pytest.approx(0.70875)
    assert f.saving100 == pytest.approx(0.675)


def test_random_router_by_hand() -> None:
    # A constant score is one tie group: the straight line from (0, .5) to (1, .75); PGR(x) = x, APGR = .5.
    # CPT(p) = p. Saving at 95%: .5 + .25x = .7125 at x = .85, cost 1 + 7.65 = 8.65, saving .135.
    # Saving at 100% needs everything on strong: 0.
    curve = quality_curve(random_scores(4), STRONG, WEAK)
    assert curve.share.tolist() == [0.0, 1.0]
    assert apgr(curve) == 0.5
    assert cpt(curve, 0.5) == pytest.approx(0.5)
    assert cpt(curve, 0.8) == pytest.approx(0.8)
    assert saving_at(curve, 0.95, 10.0, 1.0) == pytest.approx(0.135)
    assert saving_at(curve, 1.0, 10.0, 1.0) == pytest.approx(0.0)


def test_decision_only_router_by_hand() -> None:
    # A 0/1 router sending only prompt 0 to strong: its curve runs from all-weak (0, .5) through its own point
    # (.25, .5 + 1/4 = .75) to all-strong (1, .75), the rest being one tie group (gains 0 - 1 + 1 = 0).
    # PGR 0, 1, 1: APGR = (0 + 1) / 2 * .25 + 1 * .75 = .875. CPT(50%): .625 at x = .125.
    # Saving at 95%: .7125 at x = .2125 (slope 1 up to .25): same as the oracle, 0.70875.
    decision = np.array([1.0, 0.0, 0.0, 0.0])
    curve = quality_curve(decision, STRONG, WEAK)
    assert curve.share.tolist() == [0.0, 0.25, 1.0]
    assert curve.quality.tolist() == [0.5, 0.75, 0.75]
    assert apgr(curve) == pytest.approx(0.875)
    f = figures(decision, STRONG, WEAK, C_STRONG, C_WEAK)
    assert f.cpt50 == pytest.approx(0.125)
    assert f.saving95 == pytest.approx(0.70875)


def test_ties_broken_in_expectation() -> None:
    rng = np.random.default_rng(7)
    strong = (rng.random(501) < 0.8).astype(float)
    weak = (rng.random(501) < 0.6).astype(float)
    assert apgr(quality_curve(np.full(501, 0.3), strong, weak)) == pytest.approx(0.5, abs=1e-12)
    # A tie group in the middle contributes linearly: the curve is the same whatever the order inside it.
    scores = np.r_[np.full(100, 2.0), np.full(301, 1.0), np.full(100, 0.0)]
    shuffled = rng.permutation(501)
    a = quality_curve(scores, strong, weak)
    b = quality_curve(scores[shuffled], strong[shuffled], weak[shuffled])
    assert a.share.tolist() == pytest.approx([0.0, 100 / 501, 401 / 501, 1.0])
    assert b.quality.tolist() == pytest.approx(a.quality.tolist())
    # Reversing the oracle gives the worst router: APGR below the random one.
    assert apgr(quality_curve(weak - strong, strong, weak)) < 0.5 < apgr(quality_curve(strong - weak, strong, weak))


def test_no_gap_and_never_reached() -> None:
    same = np.array([1.0, 0.0])
    assert np.isnan(apgr(quality_curve(np.array([1.0, 0.0]), same, same)))
    curve = quality_curve(np.zeros(2), np.array([0.5, 0.5]), np.array([0.0, 0.0]))
    assert saving_at(curve, 1.01, 1.0, 0.1) is None


def test_bootstrap_seeded_and_constant() -> None:
    rng = np.random.default_rng(1)
    strong = (rng.random(200) < 0.8).astype(float)
    weak = (rng.random(200) < 0.6).astype(float)
    costs = (np.full(200, 10.0), np.full(200, 1.0))
    scores = strong - weak + rng.normal(0, 0.5, 200)
    one = bootstrap(scores, strong, weak, *costs, rounds=50, seed=3)
    two = bootstrap(scores, strong, weak, *costs, rounds=50, seed=3)
    assert one == two
    assert one["apgr"].low is not None and one["apgr"].high is not None
    assert one["apgr"].low <= one["apgr"].value <= one["apgr"].high  # type: ignore[operator]
    flat = bootstrap(np.zeros(200), strong, weak, *costs, rounds=50, seed=3)["apgr"]
    assert (flat.value, flat.low, flat.high) == pytest.approx((0.5, 0.5, 0.5))
    assert bootstrap(scores, strong, weak, *costs, rounds=0)["apgr"].low is None


# ---- the outcome data loader ------------------------------------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_csv_routellm_layout(tmp_path: Path) -> None:
    # RouteLLM's layout: prompt, one column per model, optional <model>_response columns; group = file stem.
    f = write(
        tmp_path / "mmlu_anatomy.csv",
        'prompt,weak-m,strong-m,strong-m_response\n"Q1\nA. x",True,True,hello world\nQ2,False,True,\nQ3,0.5,1,x\n',
    )
    data = load_outcomes([f], output_tokens=7)
    assert (data.strong_model, data.weak_model) == ("strong-m", "weak-m")  # the better one on average
    assert data.prompts == ("Q1\nA. x", "Q2", "Q3")
    assert data.groups == ("mmlu_anatomy",) * 3 and data.benchmarks == ("mmlu",) * 3
    assert data.strong.tolist() == [1.0, 1.0, 1.0] and data.weak.tolist() == [1.0, 0.0, 0.5]
    assert data.strong_output_tokens[0] == 2 and data.strong_output_tokens[1] == 0  # counted from the responses
    assert data.weak_output_tokens.tolist() == [7, 7, 7]  # no responses: --output-tokens
    assert len(data.digest) == 64
    # The pair can be named, and a folder stands for its files.
    named = load_outcomes([tmp_path], strong="weak-m")
    assert (named.strong_model, named.weak_model) == ("weak-m", "strong-m")


def test_jsonl_layout(tmp_path: Path) -> None:
    lines = [
        {"prompt": "p1", "outcomes": {"a": True, "b": False}, "group": "src_x"},
        {
            "messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "there"}],
            "outcomes": {"a": 1, "b": 1},
        },
        {"prompt": "p3", "outcomes": {"a": 0.25, "b": 0.75}, "output_tokens": {"a": 40}},
    ]
    f = write(tmp_path / "feedback.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n\n")
    data = load_outcomes([f], strong="a", weak="b")
    assert data.prompts == ("p1", "hi\nthere", "p3")
    assert data.groups == ("src_x", "feedback", "feedback")
    assert data.strong.tolist() == [1.0, 1.0, 0.25]
    assert data.strong_output_tokens.tolist() == [10, 10, 40]


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("bad.csv", "prompt,a,b\nq1,True,False\nq2,maybe,True\n", "bad.csv: row 2, column 'a': 'maybe'"),
        ("bad.csv", "question,a,b\nq1,True,False\n", "bad.csv: no 'prompt' column"),
        ("bad.csv", "prompt,a,b\nq1,True,1.5\n", "bad.csv: row 1, column 'b'"),
        ("bad.jsonl", '{"prompt": "p", "outcomes": {"a": true, "b": false}}\n{oops\n', "bad.jsonl: line 2: not JSON"),
        ("bad.jsonl", '{"prompt": "p", "outcomes": {}}\n', "bad.jsonl: line 1: needs 'outcomes'"),
        ("bad.jsonl", '{"prompt": 3, "outcomes": {"a": true, "b": true}}\n', "bad.jsonl: line 1: needs 'prompt'"),
        ("bad.txt", "prompt\n", "bad.txt: unknown format"),
        ("empty.csv", "prompt,a,b\n", "holds no rows"),
    ],
)
def test_bad_outcome_data_names_file_and_row(tmp_path: Path, name: str, text: str, expected: str) -> None:
    f = write(tmp_path / name, text)
    with pytest.raises(OutcomeDataError) as info:
        load_outcomes([f])
    assert expected in str(info.value)


def test_bad_pairs_and_paths(tmp_path: Path) -> None:
    with pytest.raises(OutcomeDataError, match="no such file"):
        load_outcomes([tmp_path / "missing.csv"])
    with pytest.raises(OutcomeDataError, match=r"no \.csv or \.jsonl"):
        load_outcomes([tmp_path])
    three = write(tmp_path / "three.csv", "prompt,a,b,c\nq,True,True,False\n")
    with pytest.raises(OutcomeDataError, match="name the pair with --strong and --weak"):
        load_outcomes([three])
    with pytest.raises(OutcomeDataError, match="'z' does not have an outcome"):
        load_outcomes([three], strong="z", weak="a")
    data = load_outcomes([three], strong="a", weak="c")
    with pytest.raises(OutcomeDataError, match="no price for model 'a'"):
        data.costs({})


# ---- baselines ----------------------------------------------------------------------------------------------


def bundled() -> tuple[object, Policy]:
    catalog = load_catalog(CATALOG_DIR / "model_costs.json")
    policy, _ = checked_policy(load_policy(CATALOG_DIR / "policy.json"), catalog, "policy.json")
    return catalog, policy


def test_rules_baseline_is_a_decision() -> None:
    catalog, policy = bundled()
    got = rules_scores(
        ["hi there", "Solve step by step: how many primes are below 100?", "hi there", "Write a python function"],
        catalog,  # type: ignore[arg-type]
        policy,
    )
    # The bundled policy: a plain job is quality medium; tasks reason and code need the high tier.
    assert got.scores.tolist() == [0.0, 1.0, 0.0, 1.0]
    assert got.refused == 0


def test_rules_baseline_forces_the_rules_router() -> None:
    if "router" not in Policy.model_fields:
        pytest.skip("this Policy has no router field")
    _, policy = bundled()
    learned = Policy.model_validate(
        {
            **policy.model_dump(),
            "router": {"kind": "learned", "path": "builtin", "levels": {"low": 0.9, "medium": 0.95, "high": 1.0}},
        }
    )
    assert getattr(rules_policy(learned), "router").kind == "rules"  # noqa: B009
