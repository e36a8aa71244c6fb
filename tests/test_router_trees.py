"""The learned router's choice model (issue 17): boosted trees fitted with scikit-learn and served with numpy,
the multiple-choice / open split, the position scale, and the router file's version 2 (version 1 still loads)."""

from __future__ import annotations

import copy
import csv
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.tree import DecisionTreeRegressor

from farebox.routing.evaluation import apgr, quality_curve
from farebox.routing.features import FEATURES, has_options, lexical_features, question_text
from farebox.routing.learned import RouterFileError, load_router, router_from_document
from farebox.routing.outcomes import OutcomeSet
from farebox.routing.training import MIN_CHOICE_ROWS, positions, quantile_knots, train_router
from farebox.routing.trees import _from_sklearn, fit_boosted
from tests.support.outcomes import outcome_set


@pytest.mark.parametrize(
    ("text", "choices", "question"),
    [
        ("What is 2+2?\nA. 3\nB. 4", True, "What is 2+2?\n"),
        ("Pick one:\n(a) red\n(b) blue\n(c) green", True, "Pick one:\n"),
        ("Only one line\nA. yes", False, "Only one line\n"),
        ("Summarise this text about A. Smith and B. Jones.", False, "Summarise this text about A. Smith and B. Jones."),
        ("", False, ""),
    ],
)
def test_options_and_question_text(text: str, choices: bool, question: str) -> None:
    assert has_options(text) is choices
    assert question_text(text) == question


def test_trees_predict_as_scikit_learn_does_including_at_the_thresholds() -> None:
    rng = np.random.default_rng(3)
    x = np.round(rng.normal(size=(400, 4)), 1)  # many rows sit exactly on a split value
    y = x[:, 0] * 2 - np.abs(x[:, 1]) + x[:, 2] * x[:, 3] + rng.normal(scale=0.1, size=400)
    trees = [DecisionTreeRegressor(max_depth=3, random_state=k).fit(x, y + rng.normal(size=400)) for k in range(4)]
    ours = _from_sklearn(trees, base=0.5, depth=3, rate=0.1)
    # Every split value on its own feature, and the doubles just either side of it: where float32 rounding of
    # the features decides the branch (scikit-learn compares float32 features with float64 thresholds).
    probes = []
    for t in trees:
        for f, thr in zip(t.tree_.feature, t.tree_.threshold, strict=True):
            if f >= 0:
                for v in (np.nextafter(thr, -np.inf), thr, np.nextafter(thr, np.inf), float(np.float32(thr))):
                    row = x[0].copy()
                    row[f] = v
                    probes.append(row)
    probe = np.vstack([x, *probes])
    assert any(np.float32(t) > t for tr in trees for t in tr.tree_.threshold[tr.tree_.feature >= 0])
    expected = 0.5 + 0.1 * sum(t.predict(probe) for t in trees)
    assert ours.predict(probe) == pytest.approx(expected, abs=1e-12)


def test_boosting_keeps_a_rising_feature_rising() -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(2000, 2))
    # the rising column's true effect dips in the middle; the constraint forbids the fit to follow it down
    y = x[:, 0] - 0.8 * ((x[:, 0] > 0.4) & (x[:, 0] < 0.6)) + x[:, 1] + rng.normal(scale=0.05, size=2000)
    trees = fit_boosted(x, y, [1, 0], trees=60, min_leaf=50)
    grid = np.column_stack([np.linspace(0, 1, 101), np.full(101, 0.5)])
    assert np.all(np.diff(trees.predict(grid)) >= -1e-12)
    free = fit_boosted(x, y, [0, 0], trees=60, min_leaf=50)
    assert np.any(np.diff(free.predict(grid)) < -0.05)  # the same fit without the constraint does dip


def test_training_without_scikit_learn_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn.tree", None)
    with pytest.raises(ImportError, match=r"farebox\[train\]"):
        fit_boosted(np.zeros((4, 1)), np.zeros(4), [0])


@pytest.mark.parametrize("raw", [np.array([0.3] * 50), np.linspace(-1, 1, 50)])
def test_positions_are_shares_of_training_rows_below(raw: np.ndarray) -> None:
    knots = quantile_knots(raw)
    assert np.all(np.diff(knots) > 0)
    assert positions(knots, np.array([-9.0, 9.0])).tolist() == [0.0, 1.0]
    if np.ptp(raw) > 0:
        assert positions(knots, np.array([0.0]))[0] == pytest.approx(0.5, abs=0.02)


def choice_data(n_groups: int = 6, per_group: int = 130, seed: int = 2) -> OutcomeSet:
    """Multiple-choice rows whose gain comes from the length of their options (not of their question), the
    same in every group: only a model that reads the options can learn it."""
    rng = np.random.default_rng(seed)
    prompts, groups, strong, weak = [], [], [], []
    for g in range(n_groups):
        for _ in range(per_group):
            option_words = int(rng.integers(1, 30))
            question = " ".join(["ask"] * int(rng.integers(3, 40))) + "?"
            options = "\n".join(f"{c}. " + " ".join(["opt"] * option_words) for c in "ABCD")
            hard = rng.random() < option_words / 30
            prompts.append(f"{question}\n{options}\nAnswer:")
            groups.append(f"quiz_{g}")
            strong.append(1.0 if hard or rng.random() < 0.9 else 0.0)
            weak.append(0.0 if hard else 1.0)
    return outcome_set(prompts, groups, strong, weak, "1" * 64)


@pytest.fixture(scope="module")
def trained_on_choices() -> Any:
    data = choice_data()
    assert len(data) * 2 // 3 >= MIN_CHOICE_ROWS  # each of 3 folds trains on two thirds: a choice model in every fold
    return train_router(data, folds=3)


def test_a_choice_model_learns_from_the_options_and_transfers_across_groups(trained_on_choices: Any) -> None:
    trained, data = trained_on_choices, trained_on_choices.trained_on
    assert trained.document["version"] == 2 and "choice_model" in trained.document
    assert trained.router.choice is not None
    held_out = apgr(quality_curve(trained.oof, data.strong, data.weak))
    by_question = apgr(
        quality_curve(lexical_features(data.prompts, ["log_question_chars"])[:, 0], data.strong, data.weak)
    )
    by_options = apgr(quality_curve(lexical_features(data.prompts, ["log_option_chars"])[:, 0], data.strong, data.weak))
    assert by_question < 0.56 < 0.65 < by_options  # the signal is in the options only
    assert held_out > 0.95 * by_options
    short, long = trained.router.score(["Q?\nA. a\nB. b", "Q?\n" + "\n".join(f"{c}. " + "opt " * 28 for c in "AB")])
    assert long > short


def test_open_prompts_are_scored_by_the_open_model_on_their_question(trained_on_choices: Any) -> None:
    router = trained_on_choices.router
    open_prompt = "Explain how tides work in a few sentences?"
    with_options = open_prompt + "\nA. the moon\nB. the wind"
    linear = router._linear([open_prompt])[0]
    assert router.raw([open_prompt])[0] == pytest.approx(linear)
    assert router.raw([with_options])[0] == pytest.approx(
        router.choice.predict(lexical_features([with_options], router.choice_features))[0]
    )
    # a mixed batch scores each prompt as it would alone
    batch = router.score([open_prompt, with_options, open_prompt])
    alone = [router.score([open_prompt])[0], router.score([with_options])[0], router.score([open_prompt])[0]]
    assert batch.tolist() == pytest.approx(alone)


def test_a_version_2_router_round_trips_through_a_file(trained_on_choices: Any, tmp_path: Path) -> None:
    path = tmp_path / "router.json"
    path.write_text(json.dumps(trained_on_choices.document))
    loaded = load_router(path)
    texts = [*trained_on_choices.trained_on.prompts[:50], "open question?", ""]
    assert loaded.score(texts) == pytest.approx(trained_on_choices.router.score(texts), abs=1e-12)
    assert loaded.thresholds == trained_on_choices.router.thresholds


def test_a_version_1_router_file_still_loads_and_reads_the_whole_text() -> None:
    doc = {
        "format": "farebox-router",
        "version": 1,
        "features": ["log_chars"],
        "model": {"kind": "ridge-on-gain", "mean": [0.0], "scale": [1.0], "coef": [1.0], "intercept": [0.0]},
        "calibration": {"platt": [1.0, -math.log1p(100)], "levels": [0.9], "thresholds": [0.5]},
    }
    router = router_from_document(doc, "old.json")
    text = "Q?\nA. one\nB. two"  # has options, but a version 1 file has no choice model
    assert router.reads == "whole" and router.choice is None and router.knots is None
    expected = 1 / (1 + math.exp(-(math.log1p(len(text)) - math.log1p(100))))
    assert router.score([text])[0] == pytest.approx(expected)


def _edited(doc: dict[str, Any], section: str, key: str, value: object) -> dict[str, Any]:
    out = copy.deepcopy(doc)
    if value is KeyError:
        del out[section][key]
    else:
        out[section][key] = value
    return out


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("choice_model", "kind", "forest", "boosted-trees"),
        ("choice_model", "depth", 0, "depth must be an integer"),
        ("choice_model", "base", "x", "base must be a finite number"),
        ("choice_model", "depth", True, "depth must be an integer"),
        ("choice_model", "depth", 1, "splits deeper than its depth 1"),
        ("choice_model", "left", KeyError, "must be a non-empty list"),
        ("choice_model", "features", ["nope"], "unknown features"),
        ("calibration", "knots", [0.0, 0.0], "knots must be at least 2 increasing"),
        ("model", "reads", "options", "'reads' must be one of"),
    ],
)
def test_a_bad_version_2_file_is_refused_in_one_line(
    trained_on_choices: Any, section: str, key: str, value: object, message: str
) -> None:
    with pytest.raises(RouterFileError, match=message) as err:
        router_from_document(_edited(trained_on_choices.document, section, key, value), "r.json")
    assert "\n" not in str(err.value)


def _tree_edit(field: str, node: int, value: int) -> Any:
    def edit(model: dict[str, Any]) -> None:
        model[field][0][node] = value

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_tree_edit("left", 0, 99), "points to a node it does not have"),
        (_tree_edit("feature", 0, 99), "splits on a feature the router does not read"),
        (_tree_edit("left", 1, 0), "points back|does not point to itself"),  # a cycle
        (_tree_edit("feature", 0, -1), "does not point to itself"),  # a split made a leaf
    ],
    ids=["child-out-of-range", "feature-out-of-range", "cycle", "split-made-leaf"],
)
def test_arrays_that_are_not_trees_are_refused(trained_on_choices: Any, edit: Any, message: str) -> None:
    doc = copy.deepcopy(trained_on_choices.document)
    edit(doc["choice_model"])
    with pytest.raises(RouterFileError, match=message):
        router_from_document(doc, "r.json")


def test_a_version_2_file_needs_its_knots(trained_on_choices: Any) -> None:
    doc = copy.deepcopy(trained_on_choices.document)
    del doc["calibration"]["knots"]
    with pytest.raises(RouterFileError, match="'knots' must be a list"):
        router_from_document(doc, "r.json")


def test_the_builtin_router_has_a_choice_model_over_every_feature() -> None:
    router = load_router("builtin")
    assert router.reads == "question" and router.choice is not None
    assert router.choice_features == tuple(FEATURES)
    assert router.knots is not None


def test_router_train_without_scikit_learn_is_one_clear_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from farebox.cli import main

    data = choice_data()
    path = tmp_path / "quiz.csv"
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["prompt", "group", "big", "small"])
        for row in zip(data.prompts, data.groups, data.strong == 1.0, data.weak == 1.0, strict=True):
            out.writerow(row)
    monkeypatch.setitem(sys.modules, "sklearn.tree", None)
    assert main(["router", "train", str(path), "-o", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert "farebox[train]" in err and err.count("\n") == 1
    assert not (tmp_path / "r.json").exists()
